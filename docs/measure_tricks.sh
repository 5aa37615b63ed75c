#!/usr/bin/env bash
# The anchors' tricks, one at a time, on a CPU recipe (issue 19): the recipe's config, then the
# recipe plus one knob per row (not cumulative). Each row prints the steps and the seconds to
# val 1.88 (first evaluation at or below it; seconds since the training loop started,
# evaluations included), the final val loss and the whole process's wall time. Writes only into
# a temporary folder. Run it on an otherwise idle machine:
#
#   bash docs/measure_tricks.sh speedrun        # config/speedrun_shakespeare_char_cpu.py, ~4 min on 2 cores
#   bash docs/measure_tricks.sh quickstart      # config/train_shakespeare_char_cpu.py, ~45 min
#   ROWS="0 3" bash docs/measure_tricks.sh speedrun          # some rows
#   EXTRA="--max_iters=20 --lr_decay_iters=20" bash docs/measure_tricks.sh speedrun   # a smoke test
set -euo pipefail
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
[ -f "$HERE/data/shakespeare_char/train.bin" ] || { echo "error: run python prepare.py shakespeare_char first" >&2; exit 1; }
case "${1:-}" in
  speedrun) RECIPE="config/speedrun_shakespeare_char_cpu.py --eval_interval=20"; W=44 ;;   # 220 steps
  quickstart) RECIPE="config/train_shakespeare_char_cpu.py --eval_interval=100"; W=300 ;;  # 1,500 steps
  *) echo "error: say which recipe: bash docs/measure_tricks.sh speedrun|quickstart" >&2; exit 1 ;;
esac
# warmups of about a fifth of the run (modded-nanogpt: momentum warmup 300 of ~1,700 steps)
NAMES=("the recipe" "+ value embeddings" "+ x0 shortcut (learned mix)" "+ zero-init projections"
       "+ bigram embedding (4,096 rows)" "+ Muon momentum warmup" "+ embedding and scalar lr 1e-2"
       "+ batch-size warmup" "+ sequence-length warmup")
KNOBS=("" "--value_embeds=True" "--x0_mix=True" "--zero_init_proj=True" "--bigram_vocab=4096"
       "--muon_momentum_warmup=$W" "--embedding_lr=1e-2 --scalar_lr=1e-2" "--batch_warmup=$W" "--seq_warmup=$W")
ROWS=${ROWS:-"0 1 2 3 4 5 6 7 8"}

echo "$1: $(date -u '+%F %T UTC'), $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $("$PYTHON" -c 'import torch; print("torch", torch.__version__)'), load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '| %-34s | %-13s | %-16s | %-9s | %-9s |\n' row "steps to 1.88" "time to 1.88 (s)" "final val" "wall (s)"
echo "|---|---|---|---|---|"
for i in $ROWS; do
  out="$TMP/row$i"
  # shellcheck disable=SC2086
  (cd "$HERE" && /usr/bin/time -f '%e' -o "$out.time" "$PYTHON" train.py $RECIPE ${KNOBS[$i]} ${EXTRA:-} --out_dir="$out" \
     > "$out.log" 2>&1) || { echo "error: row $i failed, see its log:" >&2; tail -5 "$out.log" >&2; exit 1; }
  "$PYTHON" - "$out/log.jsonl" "${NAMES[$i]}" "$(cat "$out.time")" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
val = [r for r in rows if r['kind'] == 'eval' and r['split'] == 'val']
hit = next((r for r in val if r['loss'] <= 1.88), None)
steps, secs = (f"{hit['iter']}", f"{hit['time']:.1f}") if hit else ("never", "-")
print(f"| {sys.argv[2]:<34} | {steps:<13} | {secs:<16} | {val[-1]['loss']:<9.4f} | {float(sys.argv[3]):<9.1f} |")
PY
done
