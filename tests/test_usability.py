"""The first hour of a new user: help text, the run folder chosen without --out_dir,
progress lines, the changed-knobs line, prepare's already-prepared answer, evaluate's default
dataset and the GPT-2 weights message. Everything writes under tmp_path."""

import dataclasses
import io
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lib import cli
import evaluate
import prepare
from lib import loading, runs
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_comments_come_from_the_source_next_to_each_default():
    comments = dict((name, comment) for name, comment, _ in cli.knob_comments(os.path.join(ROOT, 'train.py')))
    assert comments['out_dir'] == 'checkpoint, config.json and log.jsonl go here'
    assert comments['dropout'].startswith('0 for pretraining')
    # evaluate.py comments data_dir twice; each sub-command gets its own block's comment
    path = os.path.join(ROOT, 'evaluate.py')
    perplexity = cli._comments_for(list(evaluate.DEFAULTS['perplexity']), path)
    counting = cli._comments_for(list(evaluate.DEFAULTS['counting']), path)
    assert '<split>.bin' in perplexity['data_dir'] and 'counting' in counting['data_dir']
    assert set(perplexity) == set(evaluate.DEFAULTS['perplexity'])  # every knob has its comment


def test_help_lists_every_knob_and_exits_0(capsys):
    defaults = dict(evaluate.DEFAULTS['counting'])
    with pytest.raises(SystemExit) as e:
        cli.load_config(defaults, ['--starts=1', '-h'], usage='python evaluate.py counting [--key=value ...]')
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: python evaluate.py counting')
    for key, value in defaults.items():
        assert f"--{key}={value!r}" in out


def test_config_summary_shows_only_changed_knobs():
    defaults = {'a': 1, 'b': 'x', 'c': True}
    text = cli.config_summary({'a': 1, 'b': 'y', 'c': False}, defaults, 'out/config.json')
    assert "b='y'" in text and 'c=False' in text and 'a=1' not in text and 'out/config.json' in text
    assert 'none' in cli.config_summary(defaults, defaults)


def test_param_table_lists_each_kind_with_its_share_of_gpt2_124m():
    model = GPT(GPTConfig(vocab_size=50257))  # GPT-2 124M
    rows = [line.split() for line in cli.param_table(model.param_breakdown()).splitlines()]
    assert rows[0] == ['parameters', 'count', 'share']
    assert rows[-1] == ['total', '124,439,808', '100.0%']
    assert rows[2] == ['attention', f"{12 * (768 * 3 * 768 + 3 * 768 + 768 * 768 + 768):,}", '22.8%']


def test_find_run_dir_takes_the_newest_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.ConfigError) as e:
        runs.find_run_dir('out', False, what='sample from')
    assert 'python train.py' in e.value.message and '--out_dir' in e.value.message
    for i, name in enumerate(['out-old', 'out-new']):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'ckpt.pt').write_bytes(b'x')
        os.utime(tmp_path / name / 'ckpt.pt', (1e9 + i, 1e9 + i))
    (tmp_path / 'not-a-run').mkdir()
    assert runs.find_run_dir('out', False) == 'out-new'
    assert 'out-new' in capsys.readouterr().err  # the notice names it
    assert runs.find_run_dir('out-old', True) == 'out-old'  # asked for: used as is
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'ckpt.pt').write_bytes(b'x')
    assert runs.find_run_dir('out', False) == 'out'  # the default folder when it holds a run


def test_progress_is_silent_for_quick_work_and_prints_lines_when_not_a_terminal(monkeypatch):
    quick = io.StringIO()
    with cli.Progress('quick', total=10, stream=quick) as bar:
        for _ in range(10):
            bar.update()
    assert quick.getvalue() == ''
    slow = io.StringIO()
    clock = [0.0]
    monkeypatch.setattr(time, 'monotonic', lambda: clock[0])
    with cli.Progress('perplexity', total=100, unit='windows', after=3, every=10, stream=slow) as bar:
        for _ in range(100):
            clock[0] += 0.5  # 50 s in all
            bar.update()
    lines = slow.getvalue().splitlines()
    assert '\r' not in slow.getvalue()  # a log file gets plain lines, no bar
    assert 4 <= len(lines) <= 7, lines  # one every 10 s, plus the last
    assert lines[-1] == 'perplexity: 100/100 windows (100%), 50s'


def test_prepare_says_already_prepared_and_force_redoes_it(tmp_path, capsys):
    args = ['counting', f'--data_dir={tmp_path}', '--num_train=200', '--num_val=50']
    assert prepare.main(args) == 0
    assert 'val.bin' in capsys.readouterr().out
    assert prepare.main(args) == 0
    out = capsys.readouterr().out
    assert 'already prepared' in out and '--force' in out and 'val.bin' not in out
    assert prepare.main(args + ['--seed=2']) == 0  # different knobs: prepared anew
    assert 'val.bin' in capsys.readouterr().out
    assert prepare.main(args + ['--seed=2', '--force']) == 0
    assert 'val.bin' in capsys.readouterr().out


def test_prepared_dataset_with_a_mistyped_input_says_so_and_keeps_the_data(tmp_path, capsys):
    """An --input that does not exist is an error even when the dataset is already prepared
    (not 'nothing to do', which hides the typo); the prepared files stay as they were."""
    text = tmp_path / 'input.txt'
    text.write_text('To be, or not to be, that is the question.\n' * 300)
    args = ['shakespeare_char', f'--data_dir={tmp_path}', f'--input={text}']
    assert prepare.main(args) == 0
    before = (tmp_path / 'shakespeare_char' / 'train.bin').read_bytes()
    capsys.readouterr()
    assert prepare.main(['shakespeare_char', f'--data_dir={tmp_path}', f'--input={tmp_path / "inptu.txt"}']) == 1
    assert capsys.readouterr().err == f'error: --input={tmp_path / "inptu.txt"} is not a file\n'
    assert (tmp_path / 'shakespeare_char' / 'train.bin').read_bytes() == before


def test_perplexity_defaults_to_the_checkpoints_own_dataset(tmp_path, capsys):
    prepare.prepare('counting', data_dir=tmp_path, num_train=200, num_val=50)
    data_dir = tmp_path / 'counting'
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=101))
    out_dir = tmp_path / 'run'
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                            'model_args': dataclasses.asdict(model.config), 'iter_num': 0, 'best_val_loss': 9.9,
                            'config': {'dataset': 'counting', 'data_dir': str(data_dir)}}, out_dir / 'ckpt.pt')
    assert evaluate.main(['perplexity', f'--out_dir={out_dir}', '--device=cpu']) == 0
    out = capsys.readouterr().out
    tokens = np.fromfile(data_dir / 'val.bin', dtype=np.uint16)  # counting has no test split: val
    assert f"{len(tokens) - 1:,} tokens scored" in out and 'val.bin' in out


def test_gpt2_weights_message_keeps_whole_words():
    long = ValueError("Cannot reach https://huggingface.co " + "because the network is unreachable " * 20)
    text = loading._first_sentence(long)
    assert len(text) <= 210 and text.endswith(' ...') and text[:-4] == text[:-4].rstrip()
    assert ' '.join(str(long).split()).startswith(text[:-4])  # cut at a space, not inside a word
    assert loading._first_sentence(OSError("Offline. Set HF_HUB_OFFLINE=0 to allow it.")) == "Offline."


def test_gpt2_name_without_local_files_says_what_is_missing(tmp_path, monkeypatch):
    # an empty cache and no network: the error names the model and how to get it
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'gpt2'"):
        loading.pretrained_folder("gpt2")


@pytest.mark.parametrize('script, argv, package', [('train.py', ['--help'], 'numpy'), ('sample.py', [], 'torch'),
                                                    ('prepare.py', ['--list'], 'requests')])
def test_a_missing_package_is_one_line_naming_the_fix(script, argv, package):
    """Outside the virtual environment numpy and torch are missing: one line, not a traceback."""
    code = (f"import runpy, sys; sys.modules[{package!r}] = None; sys.argv = [{script!r}, *{argv!r}]; "
            f"runpy.run_path({script!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith(f"error: no module named '{package}'"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and '.venv/bin/activate' in r.stderr


@pytest.mark.parametrize('argv, fragment', [
    (['--max_iters', '50'], 'did you mean --max_iters=50?'),
    (['--config=config/x.py'], 'a config file is a plain argument'),
])
def test_common_flag_slips_are_named(argv, fragment):
    with pytest.raises(cli.ConfigError, match=re.escape(fragment)):
        cli.load_config({'max_iters': 1, 'compile': False}, argv)


def test_an_integral_float_stands_for_an_int():
    assert cli.load_config({'max_iters': 1}, ['--max_iters=5e3']) == {'max_iters': 5000}
    with pytest.raises(cli.ConfigError, match='expected int'):
        cli.load_config({'max_iters': 1}, ['--max_iters=5.5'])
