#!/usr/bin/env bash
# The speedrun (or the quick start) side by side: nanoGPT's README CPU recipe, then ours, one after
# the other, each timed by /usr/bin/time as a whole process (imports, data, evaluations included).
# Prints the final val loss and the wall time of each run. Writes only into a temporary folder.
#
#   bash dev/measure_speedrun.sh                         # nanoGPT from /tmp/nanogpt, once each
#   NANOGPT_DIR=~/src/nanoGPT REPEATS=3 PYTHON=.venv/bin/python bash dev/measure_speedrun.sh
#   RECIPE=quickstart bash dev/measure_speedrun.sh       # config/train_shakespeare_char_cpu.py instead
#   EXTRA=--seed=2 RECIPE=quickstart bash dev/measure_speedrun.sh   # flags added to our run
#
# nanoGPT needs its data prepared first: (cd $NANOGPT_DIR && python data/shakespeare_char/prepare.py);
# ours: python prepare.py shakespeare_char. Run it on an otherwise idle machine.
set -euo pipefail
NANOGPT_DIR=${NANOGPT_DIR:-/tmp/nanogpt}
REPEATS=${REPEATS:-1}
case ${RECIPE:=speedrun} in
  speedrun) CONFIG=config/speedrun_shakespeare_char_cpu.py ;;
  quickstart) CONFIG=config/train_shakespeare_char_cpu.py ;;
  *) echo "error: RECIPE=$RECIPE: say RECIPE=speedrun or RECIPE=quickstart" >&2; exit 1 ;;
esac
. "$(dirname "$0")/measure_lib.sh"  # PYTHON, HERE, TMP; need, machine, row_to_188
need "set NANOGPT_DIR, prepare both datasets" "$NANOGPT_DIR/train.py" "$NANOGPT_DIR/data/shakespeare_char/train.bin" \
  "$HERE/data/shakespeare_char/train.bin"

run() {  # run NAME DIR ARGS...: time one training process, print its last val loss and its wall time
  local name=$1 dir=$2
  shift 2
  (cd "$dir" && /usr/bin/time -f '%e %M' -o "$TMP/$name.time" "$PYTHON" "$@" --out_dir="$TMP/$name" \
     > "$TMP/$name.log" 2>&1) || { echo "error: $name failed, see its log:" >&2; tail -5 "$TMP/$name.log" >&2; exit 1; }
  local val wall rss
  val=$(grep -o 'val loss [0-9.]*' "$TMP/$name.log" | tail -1 | cut -d' ' -f3)
  read -r wall rss < "$TMP/$name.time"
  echo "$name: val loss $val, wall $wall s, peak RSS $((rss / 1024)) MB"
}

machine
for i in $(seq "$REPEATS"); do
  run "nanogpt-$i" "$NANOGPT_DIR" train.py config/train_shakespeare_char.py --device=cpu --compile=False \
      --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
  # shellcheck disable=SC2086
  run "$RECIPE-$i" "$HERE" train.py $CONFIG ${EXTRA:-}
done
