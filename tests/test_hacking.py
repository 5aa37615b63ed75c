"""
docs/hacking.md's claim, checked: a new model knob is one GPTConfig field plus the code that
uses it. The worked example's diff is taken from the page, applied to a copy of the repository,
and the knob must then be settable, checked, shown in --help, recorded, resumed and benchmarked
with no other edit. The diff is applied by its anchors (each run of added lines goes after the
line just above it, found by content), so edits elsewhere in model.py do not break it.
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


def apply_by_anchors(diff, source):
    """source with the diff's added lines: each run of '+' lines goes after its anchor, the
    context line just above it in the diff, which must be in source exactly once (compared
    without surrounding whitespace). The diff's other lines (headers, later context) are for
    the reader; an anchor that is gone fails with its text."""
    lines = source.splitlines(keepends=True)
    anchor, run, runs = None, [], []
    for line in diff.splitlines()[2:] + ['@@']:  # after the ---/+++ header; '@@' ends the last run
        if line.startswith('+'):
            run.append(line[1:] + '\n')
            continue
        if run:
            runs.append((anchor, run))
            anchor, run = None, []
        anchor = line[1:] if line.startswith(' ') else None
    for anchor, run in runs:
        assert anchor is not None, f"added lines {run} have no context line above them to anchor them"
        where = [i for i, line in enumerate(lines) if line.strip() == anchor.strip()]
        assert len(where) == 1, (f"the worked example's anchor {anchor.strip()!r} is in model.py "
                                 f"{len(where)} times, not once: update docs/hacking.md's diff")
        lines[where[0] + 1:where[0] + 1] = run
    return ''.join(lines)


def test_the_worked_example_touches_model_py_only_in_four_lines_and_still_fits():
    diff = worked_example_diff()
    assert re.findall(r"^\+\+\+ b/(\S+)", diff, re.M) == ['model.py']
    added = [line for line in diff.splitlines() if line.startswith('+') and not line.startswith('+++')]
    removed = [line for line in diff.splitlines() if line.startswith('-') and not line.startswith('---')]
    assert len(added) == 4 and not removed
    source = (REPO / 'model.py').read_text()
    assert 'attn_temp' not in source, "the worked example's knob is in model.py: pick a new example (docs/hacking.md)"
    patched = apply_by_anchors(diff, source)
    assert len(patched.splitlines()) == len(source.splitlines()) + 4
    compile(patched, 'model.py', 'exec')  # the lines landed where Python accepts them


def copy_of_the_code(tmp_path):
    """tmp_path/repo holding the scripts, model.py, config/ and lib/: a repository to edit."""
    repo = tmp_path / 'repo'
    repo.mkdir()
    for path in list(REPO.glob('*.py')) + [REPO / 'config', REPO / 'lib']:
        (shutil.copytree if path.is_dir() else shutil.copy)(path, repo / path.name)
    return repo


@pytest.mark.slow
def test_a_new_knob_works_everywhere_after_the_four_line_diff(tmp_path):
    repo = copy_of_the_code(tmp_path)
    model_py = repo / 'model.py'
    model_py.write_text(apply_by_anchors(worked_example_diff(), model_py.read_text()))  # the page's diff

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


# docs/hacking.md's second example: logging the gradient norm, two edits in train.py (nanoGPT: two too)
GRAD_NORM_EDITS = [
    ("        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n",
     "        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)\n"),
    ("lr, tokens, dt, tokens_per_sec, mfu, left)\n",
     "lr, tokens, dt, tokens_per_sec, mfu, left,\n                         grad_norm=grad_norm.item())\n"),
]


def test_the_grad_norm_example_matches_train_py_and_the_page():
    source = (REPO / 'train.py').read_text()
    page = (REPO / 'docs' / 'hacking.md').read_text()
    for old, new in GRAD_NORM_EDITS:
        assert source.count(old) == 1, old  # each edit's anchor is still in train.py, once
        assert new.strip().split('\n')[0].strip() in page, new  # and the page shows the edit


@pytest.mark.slow
def test_logging_the_gradient_norm_is_two_edits_in_train_py(tmp_path):
    repo = copy_of_the_code(tmp_path)
    source = (repo / 'train.py').read_text()
    for old, new in GRAD_NORM_EDITS:
        source = source.replace(old, new)
    (repo / 'train.py').write_text(source)
    data, out = make_dataset(tmp_path / 'data'), tmp_path / 'out'
    proc = subprocess.run([sys.executable, 'train.py', *TINY, f'--data_dir={data}', f'--out_dir={out}',
                           '--max_iters=3', '--eval_interval=3'], cwd=repo, capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(', grad_norm ') == 3  # one per progress line
    rows = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    norms = [r['grad_norm'] for r in rows if r['kind'] == 'train']
    assert len(norms) == 3 and all(n > 0 for n in norms)


def test_the_worked_example_names_model_py_s_line_numbers_rightly():
    """Each @@ header's old line number is where its first context line is in model.py today, so
    `git apply` takes the page's diff as it stands (regenerate it with `git diff -U1` after the
    edit when model.py moves)."""
    lines = (REPO / 'model.py').read_text().splitlines()
    hunks = re.findall(r"^@@ -(\d+),\d+ \+\d+,\d+ @@\n (.*)$", worked_example_diff(), re.M)
    assert len(hunks) == 3
    for number, context in hunks:
        assert lines[int(number) - 1] == context, (f"docs/hacking.md's diff says model.py line {number} is "
                                                   f"{context.strip()!r}; it is {lines[int(number) - 1].strip()!r}")
