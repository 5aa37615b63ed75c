#!/usr/bin/env bash
# The ablation on nanoGPT's README CPU recipe (issue 9): the recipe's flags in our train.py, then
# one knob added per row (cumulative). Each row prints: steps to val 1.88 (first evaluation at or
# below it; evaluations every 100 steps), the wall time to that evaluation (seconds since the
# training loop started, evaluations included) and the final val loss after 2,000 steps. Writes
# only into a temporary folder (removed at the end). Run it on an otherwise idle machine:
#
#   bash docs/measure_ablation.sh                  # all rows, ~12 min on 2 cores
#   PYTHON=.venv/bin/python ROWS="0 1" bash docs/measure_ablation.sh   # some rows
#   ROWS="1 2" STEPS="700 600" bash docs/measure_ablation.sh  # stop rows 1, 2 at those steps
#   EXTRA="--max_iters=40 --lr_decay_iters=40 --eval_interval=20" bash docs/measure_ablation.sh  # a smoke test
set -euo pipefail
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
[ -f "$HERE/data/shakespeare_char/train.bin" ] || { echo "error: run python prepare.py shakespeare_char first" >&2; exit 1; }

# nanoGPT's README CPU recipe (its config/train_shakespeare_char.py with these flags), evaluated every 100 steps
RECIPE="config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=100
  --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
  --dropout=0.0 --eval_interval=100"
NAMES=("GPT-2 architecture, AdamW (the recipe)" "+ Muon (muon_lr 0.05)" "+ RoPE" "+ QK-norm" "+ ReLU^2"
       "+ RMSNorm" "+ untied head" "+ logit softcap 15")
KNOBS=("" "--optimizer=muon --muon_lr=0.05" "--pos_emb=rope" "--qk_norm=True" "--mlp_act=relu2"
       "--norm=rmsnorm" "--tie_embeddings=False" "--logit_softcap=15")
ROWS=${ROWS:-"0 1 2 3 4 5 6 7"}
# STEPS (optional, one per row in ROWS): stop each row there. The learning-rate schedule still ends at
# step 2,000, so a row stopped at its step to 1.88 times exactly that part of the full run, cheaply.
read -r -a STOP <<< "${STEPS:-}"

echo "$(date -u '+%F %T UTC'), $(getconf _NPROCESSORS_ONLN) cores, $("$PYTHON" -c 'import torch; print("torch", torch.__version__)'), load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '| %-40s | %-13s | %-16s | %-9s | %-9s |\n' row "steps to 1.88" "time to 1.88 (s)" "final val" "wall (s)"
echo "|---|---|---|---|---|"
flags=""
for i in "${!NAMES[@]}"; do
  flags="$flags ${KNOBS[$i]}"
  case " $ROWS " in *" $i "*) ;; *) continue ;; esac
  out="$TMP/row$i"
  stop=""
  if [ ${#STOP[@]} -gt 0 ]; then stop="--max_iters=${STOP[0]}"; STOP=("${STOP[@]:1}"); fi
  # shellcheck disable=SC2086
  (cd "$HERE" && /usr/bin/time -f '%e' -o "$out.time" "$PYTHON" train.py $RECIPE $flags $stop ${EXTRA:-} --out_dir="$out" \
     > "$out.log" 2>&1) || { echo "error: row $i failed, see its log:" >&2; tail -5 "$out.log" >&2; exit 1; }
  "$PYTHON" - "$out/log.jsonl" "${NAMES[$i]}" "$(cat "$out.time")" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
val = [r for r in rows if r['kind'] == 'eval' and r['split'] == 'val']
hit = next((r for r in val if r['loss'] <= 1.88), None)
steps, secs = (f"{hit['iter']}", f"{hit['time']:.1f}") if hit else ("never", "-")
print(f"| {sys.argv[2]:<40} | {steps:<13} | {secs:<16} | {val[-1]['loss']:<9.4f} | {float(sys.argv[3]):<9.1f} |")
PY
done
