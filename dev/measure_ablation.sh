#!/usr/bin/env bash
# The ablation on nanoGPT's README CPU recipe: the recipe's flags in our train.py, then
# one knob added per row (cumulative). Each row prints: steps to val 1.88 (first evaluation at or
# below it; evaluations every 100 steps), the wall time to that evaluation (seconds since the
# training loop started, evaluations included) and the final val loss after 2,000 steps. Writes
# only into a temporary folder (removed at the end). Run it on an otherwise idle machine:
#
#   bash dev/measure_ablation.sh                  # all rows, ~12 min on 2 cores
#   PYTHON=.venv/bin/python ROWS="0 1" bash dev/measure_ablation.sh   # some rows
#   ROWS="1 2" STEPS="700 600" bash dev/measure_ablation.sh  # stop rows 1, 2 at those steps
#   EXTRA="--max_iters=40 --lr_decay_iters=40 --eval_interval=20" bash dev/measure_ablation.sh  # a smoke test
set -euo pipefail
. "$(dirname "$0")/measure_lib.sh"  # PYTHON, HERE, TMP; need, machine, row_to_188
need "run python prepare.py shakespeare_char first" "$HERE/data/shakespeare_char/train.bin"

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

machine
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
  row_to_188 "${NAMES[$i]}" 40 "$out" $RECIPE $flags $stop ${EXTRA:-}
done
