"""The GPU check: on one GPU, in under 8 minutes,

  1. our baby GPT (config/train_shakespeare_char.py) against nanoGPT's train.py with its own
     config/train_shakespeare_char.py: seconds to val loss 1.4697 (nanoGPT's README result
     after 5,000 A100 steps), whole process, compile included;
  2. our CPU speedrun recipe on the GPU: seconds to its end and its val loss;
  3. GPT-2 124M training throughput and MFU with torch.compile and bfloat16 (bench.py).

Each run is a child process with a time cap; a training run stops as soon as an evaluation
reaches the target. Writes only into a temporary folder. Run from the repository root, with
nanoGPT's checkout beside it (or NANOGPT_DIR=...) and data/shakespeare_char prepared:

    python dev/gpu_check.py                        # prints a markdown table for dev/LOG.md
    python dev/gpu_check.py --device=cpu --target=4 --skip_bench \
        --extra="--batch_size=4 --eval_iters=2 --eval_interval=5 --max_iters=10 --compile=False"   # this script, on a CPU
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed_run(cmd, cwd, cap, target=None):
    """Run cmd; return (seconds to the first 'val loss' <= target or None, last val loss, seconds
    run, output tail). Stops the process at the target or after cap seconds."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'), start_new_session=True)
    hit, last, tail = None, None, []
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-15:]
            found = re.search(r"val loss (\d+\.\d+)", line)
            if found:
                last = float(found.group(1))
                if target is not None and last <= target and hit is None:
                    hit = time.time() - start
                    break
            if time.time() - start > cap:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait()
    return hit, last, time.time() - start, '\n'.join(tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--nanogpt', default=os.environ.get('NANOGPT_DIR', str(ROOT.parent / 'nanoGPT')),
                    help="nanoGPT's checkout (default ../nanoGPT or $NANOGPT_DIR)")
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--cap', type=float, default=150, help='seconds at most per baby GPT run')
    ap.add_argument('--target', type=float, default=1.4697, help='val loss the baby GPTs race to')
    ap.add_argument('--skip_bench', action='store_true', help='leave out the GPT-2 124M benchmark')
    ap.add_argument('--extra', default='', help='flags added to every training run (both train.py take --key=value)')
    ap.add_argument('--data_dir', default=str(ROOT / 'data' / 'shakespeare_char'),
                    help='the character dataset both train.py read (default data/shakespeare_char)')
    args = ap.parse_args()
    data = Path(args.data_dir).resolve()
    if not (data / 'train.bin').is_file() or not (data / 'meta.json').is_file():
        sys.exit(f"error: no dataset at {data} (train.bin, meta.json); run python prepare.py shakespeare_char "
                 "first or pass --data_dir=PATH")
    nano = Path(args.nanogpt)
    if not (nano / 'train.py').is_file():
        sys.exit(f"error: no nanoGPT checkout at {nano}; clone karpathy/nanoGPT there or pass --nanogpt=PATH")
    py, failed = sys.executable, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # nanoGPT reads data/shakespeare_char/ from its own folder: a copy of ours (train.bin,
        # val.bin, and a meta.pkl it can read, written from our meta.json)
        work = tmp / 'nanoGPT'
        shutil.copytree(nano, work, ignore=shutil.ignore_patterns('.git', 'out*'))
        (work / 'data' / 'shakespeare_char').mkdir(parents=True, exist_ok=True)
        for f in ('train.bin', 'val.bin'):
            shutil.copy(data / f, work / 'data' / 'shakespeare_char' / f)
        subprocess.run([py, '-c', "import json, pickle, sys; m = json.load(open(sys.argv[1])); "
                        "pickle.dump({'vocab_size': m['vocab_size']}, open(sys.argv[2], 'wb'))",
                        str(data / 'meta.json'), str(work / 'data' / 'shakespeare_char' / 'meta.pkl')], check=True)
        runs = [
            ('ours: baby GPT, config/train_shakespeare_char.py', ROOT,
             [py, 'train.py', 'config/train_shakespeare_char.py', f'--device={args.device}', f'--out_dir={tmp}/ours',
              f'--data_dir={data}'],
             args.cap, args.target),
            ("nanoGPT: its config/train_shakespeare_char.py", work,
             [py, 'train.py', 'config/train_shakespeare_char.py', f'--device={args.device}', f'--out_dir={tmp}/nano'],
             args.cap, args.target),
            (f'ours: speedrun recipe (config/speedrun_shakespeare_char_cpu.py) on {args.device}', ROOT,
             [py, 'train.py', 'config/speedrun_shakespeare_char_cpu.py', f'--device={args.device}',
              f'--out_dir={tmp}/speedrun', f'--data_dir={data}'], 90, None),
        ]
        extra = args.extra.split()
        runs = [(name, cwd, cmd + extra, cap, target) for name, cwd, cmd, cap, target in runs]
        print(f"| run | seconds to val {args.target} | last val loss | seconds run |\n|---|---|---|---|")
        for name, cwd, cmd, cap, target in runs:
            hit, last, secs, tail = timed_run(cmd, cwd, cap, target)
            if last is None:
                print(f"| {name} | failed, see below | - | {secs:.0f} |\n\n```\n{tail}\n```\n")
                failed.append(name)
                continue
            to_target = '- (runs to its end)' if target is None else 'not within the cap' if hit is None else f'{hit:.1f}'
            print(f"| {name} | {to_target} | {last:.4f} | {secs:.0f} |", flush=True)
    if not args.skip_bench:
        r = subprocess.run([py, 'bench.py', 'config/bench_gpt2.py', f'--device={args.device}', '--compile=True',
                            '--dtype=bfloat16'], cwd=ROOT, capture_output=True, text=True, timeout=240)
        lines = [line for line in r.stdout.splitlines() if 'MFU' in line] or (r.stdout + r.stderr).splitlines()[-10:]
        print("\nGPT-2 124M, bench.py config/bench_gpt2.py --compile=True --dtype=bfloat16:\n")
        print('\n'.join(lines))
        if r.returncode != 0:
            failed.append('bench.py')
    if failed:
        sys.exit(f"error: {', '.join(failed)} failed (output above); fix that and run this check again")


if __name__ == '__main__':
    main()
