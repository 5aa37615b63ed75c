#!/usr/bin/env bash
# The baby GPT's step time side by side: our train.py with config/train_shakespeare_char.py
# and its README's CPU flags (default dtype and compile), then nanoGPT's with its README's
# (--device=cpu --compile=False), alternating, batch 12. Prints the median ms per step of steps
# 6-20 for each run. Writes only into a temporary folder. Run it on an otherwise idle machine:
#
#   NANOGPT_DIR=~/nanoGPT bash dev/measure_baby_step.sh          # 2 rounds
#   REPEATS=3 EXTRA_OURS="--dtype=float32" bash dev/measure_baby_step.sh
#
# nanoGPT needs its data prepared first: (cd $NANOGPT_DIR && python data/shakespeare_char/prepare.py)
set -euo pipefail
NANOGPT_DIR=${NANOGPT_DIR:-../nanoGPT}
REPEATS=${REPEATS:-2}
. "$(dirname "$0")/measure_lib.sh"  # PYTHON, HERE, TMP; need, machine, row_to_188
need "set NANOGPT_DIR, prepare both datasets" "$NANOGPT_DIR/train.py" "$NANOGPT_DIR/data/shakespeare_char/train.bin" \
  "$HERE/data/shakespeare_char/train.bin"
STEPS="--batch_size=12 --max_iters=21 --lr_decay_iters=5000 --log_interval=1 --eval_interval=1000 --eval_iters=2"
median() {  # median of the ms of steps 6-20 in a log: ours "iter N: ... NNNms", nanoGPT "iter N: ... time NNms"
  "$PYTHON" - "$1" <<'PY'
import re, statistics, sys
ms = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"iter (\d+)[:/].*?(?:time )?([\d.]+) ?ms", open(sys.argv[1]).read())}
steps = [ms[i] for i in range(6, 21) if i in ms]
print(f"median {statistics.median(steps):.0f} ms/step (min {min(steps):.0f}, max {max(steps):.0f}, {len(steps)} steps)")
PY
}
machine
for i in $(seq "$REPEATS"); do
  # shellcheck disable=SC2086
  (cd "$HERE" && "$PYTHON" train.py config/train_shakespeare_char.py --device=cpu $STEPS ${EXTRA_OURS:-} \
     --out_dir="$TMP/ours-$i" > "$TMP/ours-$i.log" 2>&1) || { tail -5 "$TMP/ours-$i.log" >&2; exit 1; }
  echo "ours    round $i: $(median "$TMP/ours-$i.log"); $(grep -m1 '^device' "$TMP/ours-$i.log")"
  # shellcheck disable=SC2086
  (cd "$NANOGPT_DIR" && "$PYTHON" train.py config/train_shakespeare_char.py --device=cpu --compile=False $STEPS \
     --out_dir="$TMP/nano-$i" > "$TMP/nano-$i.log" 2>&1) || { tail -5 "$TMP/nano-$i.log" >&2; exit 1; }
  echo "nanoGPT round $i: $(median "$TMP/nano-$i.log")"
done
