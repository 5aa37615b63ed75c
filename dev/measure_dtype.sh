#!/usr/bin/env bash
# Median ms per training step (steps 6-20 of a 21-step run) of each CPU recipe in float32 and
# bfloat16 autocast, eager or compiled; the first step's seconds (a compile's cost) and the val
# loss at step 21. Writes only into a temporary folder. Run it on an otherwise idle machine:
#
#   bash dev/measure_dtype.sh                                   # speedrun, quick start, baby GPT; 2 rounds
#   VARIANTS="compile bf16compile" REPS=1 bash dev/measure_dtype.sh
#   NAMES=baby bash dev/measure_dtype.sh
set -euo pipefail
. "$(dirname "$0")/measure_lib.sh"  # PYTHON, HERE, TMP; need, machine, row_to_188
declare -A R
R[speedrun]="config/speedrun_shakespeare_char_cpu.py"
R[quick]="config/train_shakespeare_char_cpu.py"
R[baby]="config/train_shakespeare_char.py --device=cpu --compile=False --batch_size=12"
machine
for rep in ${REPS:-1 2}; do
  for name in ${NAMES:-speedrun quick baby}; do
    for variant in ${VARIANTS:-float32 bfloat16}; do
      case $variant in
        float32) f="--dtype=float32" ;; bfloat16) f="--dtype=bfloat16" ;;
        compile) f="--dtype=float32 --compile=True" ;; bf16compile) f="--dtype=bfloat16 --compile=True" ;;
        *) echo "error: unknown variant $variant (float32, bfloat16, compile, bf16compile)" >&2; exit 1 ;;
      esac
      out=$TMP/$name-$variant-$rep
      # shellcheck disable=SC2086
      (cd "$HERE" && "$PYTHON" train.py ${R[$name]} $f --max_iters=21 --lr_decay_iters=1000 --log_interval=1 \
         --eval_interval=1000 --eval_at_start=False --eval_iters=2 --out_dir="$out" > "$out.log" 2>&1) \
        || { echo "error: $name $variant failed:" >&2; tail -3 "$out.log" >&2; exit 1; }
      "$PYTHON" - "$out/log.jsonl" "$name" "$variant" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
ms = [r['ms_per_iter'] for r in rows if r['kind'] == 'train' and 6 <= r['iter'] <= 20]
first = next(r['ms_per_iter'] for r in rows if r['kind'] == 'train' and r['iter'] == 0)
val = [r['loss'] for r in rows if r.get('split') == 'val']
print(f"{sys.argv[2]:9} {sys.argv[3]:12} first step {first / 1000:.1f} s, median {statistics.median(ms):7.1f} "
      f"ms/step (min {min(ms):.1f}, max {max(ms):.1f}); val at step 21 {val[-1]:.4f}")
PY
    done
  done
done
