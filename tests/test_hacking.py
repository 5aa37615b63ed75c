"""
docs/hacking.md's claim, checked: a new model knob is one GPTConfig field plus the code that
uses it. The worked example's diff is taken from the page, applied to a copy of the repository,
and the knob must then be settable, checked, shown in --help, recorded, resumed and benchmarked
with no other edit.
"""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ENV, REPO, TINY, make_dataset, read_log


def worked_example_diff():
    page = (REPO / 'docs' / 'hacking.md').read_text()
    return re.search(r"```diff\n(.*?)```", page, re.S).group(1)


def test_the_worked_example_touches_model_py_only_in_four_lines():
    diff = worked_example_diff()
    assert re.findall(r"^\+\+\+ b/(\S+)", diff, re.M) == ['model.py']
    added = [line for line in diff.splitlines() if line.startswith('+') and not line.startswith('+++')]
    removed = [line for line in diff.splitlines() if line.startswith('-') and not line.startswith('---')]
    assert len(added) == 4 and not removed


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('git') is None, reason='needs git to apply the diff')
def test_a_new_knob_works_everywhere_after_the_four_line_diff(tmp_path):
    repo = tmp_path / 'repo'
    repo.mkdir()
    for path in list(REPO.glob('*.py')) + [REPO / 'config', REPO / 'lib']:
        (shutil.copytree if path.is_dir() else shutil.copy)(path, repo / path.name)
    (tmp_path / 'knob.diff').write_text(worked_example_diff())
    applied = subprocess.run(['git', 'apply', str(tmp_path / 'knob.diff')], cwd=repo, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr  # the page's diff still fits model.py

    def run(*argv):
        return subprocess.run([sys.executable, *map(str, argv)], cwd=repo, capture_output=True, text=True,
                              env=ENV, timeout=300)

    assert 'a learned temperature per attention head' in run('train.py', '--help').stdout
    data, out = make_dataset(tmp_path / 'data'), tmp_path / 'out'
    args = [*TINY, f'--data_dir={data}', f'--out_dir={out}', '--eval_interval=2']
    proc = run('train.py', *args, '--max_iters=2', '--attn_temp=True')
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / 'config.json').read_text())['attn_temp'] is True
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ckpt['model_args']['attn_temp'] is True
    assert ckpt['model']['transformer.h.0.attn.q_temp'].shape == (2,)
    # the optimizer moved the new parameter away from its initial 1.0
    assert not torch.equal(ckpt['model']['transformer.h.0.attn.q_temp'], torch.ones(2))
    proc = run('train.py', *args, '--max_iters=4', '--init_from=resume')  # the knob comes from the checkpoint
    assert proc.returncode == 0, proc.stderr
    assert [row[0] for row in read_log(out, 'train')] == [0, 1, 2, 3]
    bad = run('train.py', *args, '--attn_temp=1')
    assert bad.returncode == 1 and bad.stderr.startswith('error:') and 'attn_temp' in bad.stderr
    assert 'Traceback' not in bad.stderr
    bench = run('bench.py', '--n_layer=1', '--n_embd=32', '--n_head=2', '--block_size=32', '--burn_in=0',
                '--num_iters=1', '--repeats=1', '--mode=train', '--device=cpu', '--attn_temp=True')
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout.splitlines()[-1])['model']['attn_temp'] is True
    evaluated = run('evaluate.py', 'perplexity', f'--out_dir={out}', f'--data_dir={data}', '--device=cpu')
    assert evaluated.returncode == 0, evaluated.stderr
