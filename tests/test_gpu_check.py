"""dev/gpu_check.py, the GPU check of the CPU speed targets, on its CPU twin: the same races on a tiny dataset
and tiny flags (needs nanoGPT's checkout, NANOGPT_DIR), and its one-line errors (always)."""

import os
import re
import subprocess
import sys

import pytest

from helpers import ENV, REPO, make_dataset


def gpu_check(*args, timeout=300):
    return subprocess.run([sys.executable, 'dev/gpu_check.py', *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def test_missing_inputs_are_one_error_line(tmp_path):
    data = make_dataset(tmp_path / 'data')
    for args, message in [([f'--data_dir={tmp_path / "nothing"}', f'--nanogpt={tmp_path}'], 'error: no dataset at'),
                          ([f'--data_dir={data}', f'--nanogpt={tmp_path / "nanoGPT"}'], 'error: no nanoGPT checkout at')]:
        r = gpu_check(*args, '--device=cpu')
        assert r.returncode != 0 and r.stdout == ''
        assert r.stderr.startswith(message) and r.stderr.count('\n') == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data']  # nothing written beside


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('NANOGPT_DIR'), reason='set NANOGPT_DIR to a nanoGPT checkout to run the check on the CPU')
def test_the_check_runs_on_the_cpu(tmp_path):
    """The documented CPU command, on a tiny dataset: both baby GPTs reach the target, the speedrun
    recipe runs to its end, every row has its numbers, and a run that fails makes the check fail."""
    data = make_dataset(tmp_path / 'data', n_tokens=20000)
    tiny = ('--extra=--batch_size=4 --block_size=16 --eval_iters=2 --eval_interval=5 --max_iters=10 '
            '--compile=False --n_layer=2 --n_head=2 --n_embd=32')
    r = gpu_check(f'--data_dir={data}', f"--nanogpt={os.environ['NANOGPT_DIR']}", '--device=cpu', '--target=4',
                  '--skip_bench', tiny)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith('| ours') or line.startswith('| nanoGPT')]
    assert len(rows) == 3, r.stdout
    for row in rows[:2]:
        assert re.fullmatch(r'\| .+ \| \d+\.\d \| \d\.\d{4} \| \d+ \|', row), row  # reached val 4 at some second
    assert re.fullmatch(r'\| ours: speedrun .+ \| - \(runs to its end\) \| \d\.\d{4} \| \d+ \|', rows[2]), rows[2]
    bad = gpu_check(f'--data_dir={data}', f"--nanogpt={os.environ['NANOGPT_DIR']}", '--device=cpu', '--target=4',
                    '--skip_bench', tiny + ' --n_head=5')  # 32 is not a multiple of 5 heads: every run fails
    assert bad.returncode != 0 and 'failed, see below' in bad.stdout
    assert bad.stderr.strip().startswith('error: ') and bad.stderr.strip().count('\n') == 0, bad.stderr
