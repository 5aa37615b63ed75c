#!/usr/bin/env bash
# The anchors' tricks, one at a time, on a CPU recipe: the recipe's config, then the
# recipe plus one knob per row (not cumulative). Each row prints the steps and the seconds to
# val 1.88 (first evaluation at or below it; seconds since the training loop started,
# evaluations included), the final val loss and the whole process's wall time. Writes only into
# a temporary folder. Run it on an otherwise idle machine:
#
#   bash dev/measure_tricks.sh speedrun        # config/speedrun_shakespeare_char_cpu.py, ~4 min on 2 cores
#   bash dev/measure_tricks.sh quickstart      # config/train_shakespeare_char_cpu.py, ~45 min
#   ROWS="0 3" bash dev/measure_tricks.sh speedrun          # some rows
#   EXTRA="--max_iters=20 --lr_decay_iters=20" bash dev/measure_tricks.sh speedrun   # a smoke test
set -euo pipefail
. "$(dirname "$0")/measure_lib.sh"  # PYTHON, HERE, TMP; need, machine, row_to_188
need "run python prepare.py shakespeare_char first" "$HERE/data/shakespeare_char/train.bin"
case "${1:-}" in
  speedrun) RECIPE="config/speedrun_shakespeare_char_cpu.py --eval_interval=20"; W=44 ;;   # 220 steps
  quickstart) RECIPE="config/train_shakespeare_char_cpu.py --eval_interval=100"; W=300 ;;  # 1,500 steps
  *) echo "error: say which recipe: bash dev/measure_tricks.sh speedrun|quickstart" >&2; exit 1 ;;
esac
# warmups of about a fifth of the run (modded-nanogpt: momentum warmup 300 of ~1,700 steps)
NAMES=("the recipe" "+ value embeddings" "+ x0 shortcut (learned mix)" "+ zero-init projections"
       "+ bigram embedding (4,096 rows)" "+ Muon momentum warmup" "+ embedding and scalar lr 1e-2"
       "+ batch-size warmup" "+ sequence-length warmup")
KNOBS=("" "--value_embeds=True" "--x0_mix=True" "--zero_init_proj=True" "--bigram_vocab=4096"
       "--muon_momentum_warmup=$W" "--embedding_lr=1e-2 --scalar_lr=1e-2" "--batch_warmup=$W" "--seq_warmup=$W")
ROWS=${ROWS:-"0 1 2 3 4 5 6 7 8"}

echo "$1: $(machine)"
printf '| %-34s | %-13s | %-16s | %-9s | %-9s |\n' row "steps to 1.88" "time to 1.88 (s)" "final val" "wall (s)"
echo "|---|---|---|---|---|"
for i in $ROWS; do
  out="$TMP/row$i"
  # shellcheck disable=SC2086
  row_to_188 "${NAMES[$i]}" 34 "$out" $RECIPE ${KNOBS[$i]} ${EXTRA:-}
done
