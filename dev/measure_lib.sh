# Sourced by dev/measure_*.sh, not run: the temporary folder they write into (removed at the
# end), the check that a run's inputs exist, the line naming the machine, and one timed row of
# a time-to-1.88 table.
PYTHON=${PYTHON:-python}
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac  # runs from other folders too
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

need() {  # need HINT FILE...: stop with one error line, naming the file and HINT, unless each exists
  local hint=$1 f
  shift
  for f in "$@"; do
    [ -f "$f" ] || { echo "error: no $f ($hint)" >&2; exit 1; }
  done
}

machine() {  # one line: the date, the cores, the CPU model, torch's version and the load
  echo "$(date -u '+%F %T UTC'), $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $("$PYTHON" -c 'import torch; print("torch", torch.__version__)'), load $(cut -d' ' -f1-3 /proc/loadavg)"
}

row_to_188() {  # row_to_188 NAME WIDTH OUT ARGS...: time `train.py ARGS --out_dir=OUT` (a whole process), then print
  # | NAME | steps to val 1.88 (first evaluation at or below it) | seconds to it (since the training loop
  # started, evaluations included) | final val | wall seconds |, NAME padded to WIDTH
  local name=$1 width=$2 out=$3
  shift 3
  (cd "$HERE" && /usr/bin/time -f '%e' -o "$out.time" "$PYTHON" train.py "$@" --out_dir="$out" > "$out.log" 2>&1) \
    || { echo "error: $name failed, see its log:" >&2; tail -5 "$out.log" >&2; exit 1; }
  "$PYTHON" - "$out/log.jsonl" "$name" "$width" "$(cat "$out.time")" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
val = [r for r in rows if r['kind'] == 'eval' and r['split'] == 'val']
hit = next((r for r in val if r['loss'] <= 1.88), None)
steps, secs = (f"{hit['iter']}", f"{hit['time']:.1f}") if hit else ("never", "-")
print(f"| {sys.argv[2]:<{int(sys.argv[3])}} | {steps:<13} | {secs:<16} | {val[-1]['loss']:<9.4f} | {float(sys.argv[4]):<9.1f} |")
PY
}
