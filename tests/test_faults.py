"""
The fault matrix: every bad input and fault gets one `error:` line (or a notice), no
traceback, and a run's files stay consistent: nothing lost, nothing half-written, no temp files.

Kinds covered: bad knobs of every script, unknown subcommands, corrupt and mismatched data,
unsafe or mismatched checkpoints, resume safety (vocabulary, model flags, block_size), two runs
in one out_dir (lock), partial/garbled logs, OS errors (read-only folders, disk full, on a tmpfs
mounted in a private mount namespace: `unshare -rm`; skipped with the reason where that is not
allowed), signals during long evaluations, and torchrun behaviour (slow).

Most cases are fast: scripts that refuse an input before building anything run in-process
(runpy/main), the rest as subprocesses on a 2-layer model and a 4000-token dataset.
"""

import contextlib
import io
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
from lib import cli, hardware
import evaluate
import plot
import prepare
from lib import loading, runs
from lib import tokenfiles
from lib import plotting
from helpers import ENV, REPO, TINY, make_dataset, read_log, run_train
from model import GPT

# -----------------------------------------------------------------------------
# helpers


def run_in_process(script, argv, cwd=None):
    """Run script (train.py, bench.py, ...) as __main__ in this process with argv; return
    (exit code, stderr text, stdout text). Only for inputs refused before anything heavy is built."""
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [script, *map(str, argv)]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO / script), run_name='__main__')
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    if isinstance(code, str):  # a ConfigError: Python would print it to stderr and exit 1
        err.write(code + '\n')
        code = 1
    return code or 0, err.getvalue(), out.getvalue()


def assert_error_line(code, stderr, *fragments):
    """Non-zero exit, no traceback, exactly one `error:` line holding every fragment."""
    assert code not in (0, None), stderr
    assert 'Traceback' not in stderr and 'Warning' not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_proc_error(proc, *fragments):
    return assert_error_line(proc.returncode, proc.stderr, *fragments)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob('*'))


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / 'data')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 3-iteration run (checkpoint, log, config), trained once; tests copy it before changing it."""
    root = tmp_path_factory.mktemp('trained')
    data = make_dataset(root / 'data')
    out = root / 'out'
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=3', '--eval_interval=3')
    assert proc.returncode == 0, proc.stderr
    return data, out


@pytest.fixture
def run_copy(trained, tmp_path):
    data, out = trained
    copy = tmp_path / 'out'
    shutil.copytree(out, copy)
    return data, copy


# -----------------------------------------------------------------------------
# train.py: every knob checked before anything is built or written

@pytest.mark.parametrize('flag, fragments', [
    ('--n_layer=0', ['n_layer', 'positive int', '0']),
    ('--n_head=0', ['n_head', 'positive int']),
    ('--n_embd=0', ['n_embd', 'positive int']),
    ('--n_head=3', ['n_embd', '32', 'divisible by n_head', '3']),
    ('--dropout=1.5', ['dropout', '[0, 1)', '1.5']),
    ('--dropout=-0.1', ['dropout', '[0, 1)']),
    ('--learning_rate=-1', ['learning_rate', '> 0', '-1']),
    ('--learning_rate=0', ['learning_rate', '> 0']),
    ('--learning_rate=1e999', ['learning_rate', 'finite']),
    ('--min_lr=-1', ['min_lr', '>= 0']),
    ('--beta1=-0.5', ['beta1', '[0, 1)']),
    ('--beta2=2', ['beta2', '[0, 1)', '2']),
    ('--weight_decay=-1', ['weight_decay', '>= 0']),
    ('--grad_clip=-1', ['grad_clip', '>= 0']),
    ('--max_iters=-5', ['max_iters', '>= 0', '-5']),
    ('--warmup_iters=-1', ['warmup_iters', '>= 0']),
    ('--lr_decay_iters=-1', ['lr_decay_iters', '>= 0']),
    ('--eval_iters=0', ['eval_iters', '>= 1']),
    ('--eval_interval=0', ['eval_interval', '>= 1']),
    ('--batch_size=0', ['batch_size', '>= 1']),
    ('--block_size=0', ['block_size', 'positive int']),
    ('--gradient_accumulation_steps=0', ['gradient_accumulation_steps', '>= 1']),
    ('--seed=-1', ['seed', '>= 0']),
    ('--compile=1', ['compile']),
    ('--backend=mpi', ['backend', 'mpi']),
    ('--device=tpu', ['tpu', 'cuda:N']),
    ('--dtype=float8', ['float8']),
    ('--init_from=gpt3', ["init_from='gpt3'"]),
    ('--init_from=resume', ['init_from=resume', 'no ', 'ckpt.pt']),
    ('--learning_rat=1', ["did you mean 'learning_rate'"]),
    ('--out_dir=', ['out_dir is empty']),
    ('--batch_size=big', ["'batch_size'", 'expected int']),
    ('--hellaswag_input=h.jsonl', ['hellaswag_input', 'hellaswag_interval is 0', '--hellaswag_interval']),
])
def test_train_knob_is_refused_before_anything_is_written(tmp_path, data, flag, fragments):
    out = tmp_path / 'out'
    # --max_iters=1 first (the case's flag wins): should a check be missing, the run is short
    code, stderr, _ = run_in_process('train.py', [*TINY, '--max_iters=1', f'--data_dir={data}', f'--out_dir={out}', flag])
    assert_error_line(code, stderr, *fragments)
    assert not out.exists()  # no folder, no config.json, no lock


def test_wandb_missing_is_one_line_at_startup(tmp_path, data):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here; the case is a missing wandb")
    except ImportError:
        pass
    out = tmp_path / 'out'
    code, stderr, stdout = run_in_process('train.py', [*TINY, f'--data_dir={data}', f'--out_dir={out}',
                                                       '--wandb_log=True'])
    assert_error_line(code, stderr, 'pip install wandb')
    assert 'parameters' not in stdout and not out.exists()  # before the model is built


def test_failed_run_writes_nothing_into_the_working_directory(tmp_path):
    """The default out_dir ('out', relative to where train.py runs) is not created by a run that fails."""
    proc = subprocess.run([sys.executable, str(REPO / 'train.py'), *TINY, '--dataset=no_such_corpus'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=ENV)
    assert_proc_error(proc, 'python prepare.py text --input=YOUR_TEXT --name=no_such_corpus')
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# prepare.py, evaluate.py, plot.py, bench.py: flags checked up front; unknown subcommands

def captured(fn, *args):
    """(exit code, stderr) of fn(*args) for scripts' main(): SystemExit and return codes alike."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = fn(*args)
        except SystemExit as e:
            code = e.code
            if isinstance(code, str):
                err.write(code + '\n')
                code = 1
    return code, err.getvalue()


@pytest.mark.parametrize('argv, fragments', [
    (['--num_train=-1'], ['--num_train', 'at least 1', '-1']),
    (['--num_val=0'], ['--num_val', 'at least 1']),
    (['--numbers=x'], ['--numbers', 'integer']),
    (['--min_len=9', '--max_len=4'], ['--min_len', '--max_len']),
    (['--num_trian=5'], ['did you mean --num_train']),
    (['--numbers=20', '--val_starts=50'], ['--val_starts=50', '--numbers=20', 'or less']),
])
def test_prepare_counting_bad_options(tmp_path, argv, fragments):
    code, stderr = captured(prepare.main, ['counting', f'--data_dir={tmp_path}', *argv])
    assert_error_line(code, stderr, *fragments)
    assert list(tmp_path.iterdir()) == []  # no empty split written


@pytest.mark.parametrize('script, argv, fragments', [
    ('evaluate', ['perplexty'], ["unknown command 'perplexty'", "did you mean 'perplexity'"]),
    ('evaluate', ['countin'], ["did you mean 'counting'"]),
    ('evaluate', ['perplexity', '--batch_size=0'], ['batch_size', '>= 1']),
    ('evaluate', ['perplexity', '--stride=-1'], ['stride', '>= 0']),
    ('evaluate', ['perplexity', '--split=dev'], ['split', "'dev'"]),
    ('evaluate', ['perplexity', '--block_size=8', '--stride=16'], ['stride=16', 'block_size=8']),
    ('evaluate', ['counting', '--starts=a,b'], ['starts', "'a,b'"]),
    ('evaluate', ['counting', '--prompt_len=0'], ['prompt_len', '>= 1']),
    ('evaluate', ['counting', '--max_new_tokens=0'], ['max_new_tokens', '>= 1']),
    ('evaluate', ['perplexity', '--batchsize=2'], ["did you mean 'batch_size'"]),
    ('plot', ['los'], ["unknown command 'los'", "did you mean 'loss'"]),
    ('plot', ['atention'], ["did you mean 'attention'"]),
    ('plot', ['attention', '--max_tokens=0'], ['max_tokens', '>= 1']),
    ('plot', ['attention', '--start=FILE:/no/such/prompt.txt'], ['/no/such/prompt.txt']),
    ('plot', ['attention', '--out=/no/such/dir/a.png'], ['/no/such/dir']),
    ('plot', ['attention', '--out=picture.jpg'], ['.png']),
    ('plot', ['loss', '/no/such/run'], ['/no/such/run/log.jsonl']),
    ('bench', ['--temperature=-1'], ['temperature', '>= 0']),
    ('bench', ['--top_k=-1'], ['top_k', '>= 0']),
    ('bench', ['--batch_size=0'], ['batch_size', '>= 1']),
    ('bench', ['--max_new_tokens=0'], ['max_new_tokens', '>= 1']),
    ('bench', ['--n_head=5'], ['n_embd 384', 'divisible by n_head 5']),
    ('bench', ['--dropout=1'], ['dropout']),
    ('bench', ['--pos_emb=rope', '--n_embd=18', '--n_head=6'], ['even head size', '18']),
    ('bench', ['--burn_in=-1'], ['burn_in', '>= 0']),
    ('bench', ['--gen_batch_sizes=[0]'], ['gen_batch_sizes']),
    ('bench', ['--mode=fast'], ['mode', "'fast'"]),
    ('bench', ['--json_out=/no/such/dir/b.jsonl'], ['json_out=/no/such/dir/b.jsonl']),
    ('bench', ['--data_dir=/no/such/data'], ['data_dir=/no/such/data', 'no train.bin', '--data_dir']),
])
def test_script_flags_checked_up_front(monkeypatch, script, argv, fragments):
    """Refused before any model is built or loaded, any data read, anything measured: each of
    those steps fails the test if it is reached."""
    reached = []

    def heavy(name):
        def step(*args, **kwargs):
            reached.append(name)
            raise AssertionError(f"{name} ran before the flags were refused")
        return step
    monkeypatch.setattr(GPT, '__init__', heavy('GPT()'))
    for module, names in ((loading, ['load_model']), (runs, ['load_checkpoint']),
                          (evaluate, ['open_tokens', 'perplexity', 'counting_accuracy', 'hellaswag_counts']),
                          (bench, ['build_models', 'make_batches', 'bench_train', 'bench_generate'])):
        for name in names:
            monkeypatch.setattr(module, name, heavy(f"{module.__name__}.{name}"))
    module = {'evaluate': evaluate, 'plot': plot, 'bench': bench}[script]
    code, stderr = captured(module.main, argv)
    assert_error_line(code, stderr, *fragments)
    assert reached == []


def char_checkpoint(folder, chars='abc \n'):
    """out_dir/ckpt.pt of a tiny char-level model whose tokenizer metadata is in folder/data."""
    from model import GPT, GPTConfig
    data = Path(folder) / 'data'
    data.mkdir(parents=True)
    (data / 'meta.json').write_text(json.dumps({'tokenizer': 'char', 'chars': list(chars),
                                                'vocab_size': len(chars)}))
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=len(chars), bias=False, dropout=0.0)
    out = Path(folder) / 'out'
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': GPT(GPTConfig(**args)).state_dict(),
                            'model_args': args, 'iter_num': 1, 'best_val_loss': 1.0,
                            'config': {'data_dir': str(data), 'dataset': 'chars'}}, out / 'ckpt.pt')
    return out


def test_plot_attention_prompt_outside_char_vocabulary(tmp_path):
    out = char_checkpoint(tmp_path)
    code, stderr = captured(plot.main, ['attention', f'--out_dir={out}', '--start=xyz'])
    assert_error_line(code, stderr, 'prompt', "'x'")
    assert not (out / 'attention.png').exists()
    code, _ = captured(plot.main, ['attention', f'--out_dir={out}', '--start=abc'])
    assert code == 0 and (out / 'attention.png').is_file()  # the same command with a fitting prompt works


def test_evaluate_counting_without_metadata_is_refused(tmp_path):
    out = char_checkpoint(tmp_path)
    (tmp_path / 'empty').mkdir()
    code, stderr = captured(evaluate.main, ['counting', f'--out_dir={out}', f'--data_dir={tmp_path / "empty"}',
                                            '--device=cpu'])
    assert_error_line(code, stderr, 'no counting metadata', str(tmp_path / 'empty'), '--starts=1,10')


def test_plot_loss_skips_garbled_lines_with_one_notice(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    good = [dict(iter=i, kind='eval', split='val', loss=2.0 - i / 10, lr=1e-3, tokens=64 * i) for i in range(4)]
    lines = [json.dumps(r) for r in good]
    lines[1:1] = ['{"iter": 1, "kind": garbled', '[1, 2, 3]', '{"kind": "eval", "loss": "high"}', '\udcff\udcfe']
    (run / 'log.jsonl').write_bytes(('\n'.join(lines) + '\n').encode('utf-8', 'surrogateescape'))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        records = plotting.read_log(run)
    assert records == good
    assert err.getvalue().count('notice:') == 1 and '4 unreadable line(s)' in err.getvalue()
    pytest.importorskip('matplotlib')
    code, stderr = captured(plot.main, ['loss', str(run)])
    assert code == 0 and (run / 'loss.png').is_file() and 'Traceback' not in stderr


# -----------------------------------------------------------------------------
# corrupt data

@pytest.mark.parametrize('damage, fragments', [
    ('odd_size', ['train.bin', 'odd size', '8,001 bytes']),
    ('big_id', ['val.bin', 'token id 60000', 'vocab_size is 16']),
    ('bad_meta', ['meta.json', 'not valid JSON']),
    ('meta_vocab', ['vocab_size', "'many'"]),
])
def test_train_refuses_corrupt_data(tmp_path, data, damage, fragments):
    if damage == 'odd_size':
        with open(data / 'train.bin', 'ab') as f:
            f.write(b'\x01')
    elif damage == 'big_id':
        tokens = np.fromfile(data / 'val.bin', dtype=np.uint16)
        tokens[500] = 60000
        tokens[900] = 1234
        tokens.tofile(data / 'val.bin')
    elif damage == 'bad_meta':
        (data / 'meta.json').write_text('{"vocab_size": 16')
    else:
        (data / 'meta.json').write_text('{"vocab_size": "many"}')
    out = tmp_path / 'out'
    code, stderr, stdout = run_in_process('train.py', [*TINY, f'--data_dir={data}', f'--out_dir={out}'])
    assert_error_line(code, stderr, *fragments)
    assert 'parameters' not in stdout  # found before the model is built
    assert not out.exists()


def test_check_token_ids_names_the_largest_id(tmp_path):
    path = tmp_path / 'x.bin'
    tokens = np.zeros(100, dtype=np.uint16)
    tokens[[10, 70]] = [20, 99]
    tokens.tofile(path)
    tokenfiles.check_token_ids(path, 100, chunk=16)  # all ids fit
    with pytest.raises(tokenfiles.PrepareError, match=r'x.bin holds token id 99 but vocab_size is 50'):
        tokenfiles.check_token_ids(path, 50, chunk=16)  # the largest, also when it is in a later chunk


@pytest.mark.parametrize('size, fragment', [(9, 'odd size'), (0, 'no tokens')])
def test_evaluate_perplexity_refuses_odd_or_empty_token_file(tmp_path, size, fragment):
    out = char_checkpoint(tmp_path)
    (tmp_path / 'data' / 'test.bin').write_bytes(b'\0' * size)
    code, stderr = captured(evaluate.main, ['perplexity', f'--out_dir={out}', f'--data_dir={tmp_path / "data"}',
                                            '--device=cpu'])
    assert_error_line(code, stderr, 'test.bin', fragment)


# -----------------------------------------------------------------------------
# checkpoints: refused files say one line, and run nothing

def test_malicious_checkpoint_is_refused_in_one_line(tmp_path, data):
    marker = tmp_path / 'pwned'
    (tmp_path / 'out').mkdir()
    subprocess.run([sys.executable, '-c', textwrap.dedent(f"""
        import os, torch
        class Payload:
            def __reduce__(self):
                return (os.system, ('touch {marker}',))
        torch.save({{'model': Payload(), 'model_args': {{}}}}, {str(tmp_path / 'out' / 'ckpt.pt')!r})
    """)], check=True, env=ENV)
    for script in ('sample.py', 'train.py'):
        proc = subprocess.run([sys.executable, script, f'--out_dir={tmp_path / "out"}', '--device=cpu',
                               *([*TINY, '--init_from=resume', f'--data_dir={data}'] if script == 'train.py' else [])],
                              cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
        line = assert_proc_error(proc, 'ckpt.pt', 'refused')
        assert 'weights_only' not in proc.stderr and 'warn' not in proc.stderr.lower(), proc.stderr
        assert 'posix.system' in line or 'os.system' in line or 'nt.system' in line
    assert not marker.exists()


# -----------------------------------------------------------------------------
# resume safety

def test_resume_refuses_another_vocabulary(tmp_path, run_copy):
    _, out = run_copy
    other = make_dataset(tmp_path / 'chars65', vocab_size=65)
    before = (out / 'ckpt.pt').read_bytes(), (out / 'config.json').read_text(), (out / 'log.jsonl').read_text()
    code, stderr, _ = run_in_process('train.py', [*TINY, f'--data_dir={other}', f'--out_dir={out}',
                                                  '--init_from=resume', '--max_iters=6'])
    assert_error_line(code, stderr, 'vocab_size 65', 'vocab_size 16')
    after = (out / 'ckpt.pt').read_bytes(), (out / 'config.json').read_text(), (out / 'log.jsonl').read_text()
    assert before == after  # a refused resume leaves the run's files as they were
    assert not (out / 'run.lock').exists()


def test_resume_refuses_a_longer_block(run_copy):
    data, out = run_copy
    code, stderr, _ = run_in_process('train.py', [*TINY, f'--data_dir={data}', f'--out_dir={out}',
                                                  '--init_from=resume', '--block_size=32'])
    assert_error_line(code, stderr, 'block_size=32', "checkpoint's 16")


def test_resume_names_overridden_model_flags_and_records_the_truth(run_copy):
    data, out = run_copy
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--init_from=resume', '--max_iters=4',
                     '--eval_interval=4', '--n_layer=4', '--n_embd=64', '--bias=True')
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stdout.splitlines() if line.startswith('notice:')]
    assert len(notices) == 1 and 'n_layer=4' in notices[0] and 'n_embd=64' in notices[0] and 'bias=True' in notices[0]
    config = json.loads((out / 'config.json').read_text())
    ckpt = runs.load_checkpoint(out / 'ckpt.pt')
    for record in (config, ckpt['config'], ckpt['model_args']):
        assert (record['n_layer'], record['n_embd'], record['bias']) == (2, 32, False)


def test_resume_with_shorter_block_crops_the_optimizer_state_too(run_copy):
    data, out = run_copy
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--init_from=resume', '--max_iters=5',
                     '--eval_interval=5', '--block_size=8')
    assert proc.returncode == 0, proc.stderr
    ckpt = runs.load_checkpoint(out / 'ckpt.pt')
    assert ckpt['model_args']['block_size'] == 8 and ckpt['config']['block_size'] == 8
    assert ckpt['model']['transformer.wpe.weight'].shape == (8, 32)
    # the optimizer state has exactly the shapes of the (cropped) model's parameters
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(**ckpt['model_args']))
    param_shapes = sorted(tuple(p.shape) for p in model.parameters())
    for key in ('exp_avg', 'exp_avg_sq'):
        assert sorted(tuple(s[key].shape) for s in ckpt['optimizer']['state'].values()) == param_shapes
    assert (16, 32) in param_shapes and (8, 32) in param_shapes  # wte (16 ids) kept, wpe cropped to 8


def test_resume_drops_a_partial_last_log_line(run_copy):
    data, out = run_copy
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"iter": 3, "kind": "tra')  # killed while writing
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--init_from=resume', '--max_iters=5',
                     '--eval_interval=5')
    assert proc.returncode == 0, proc.stderr
    assert 'notice: dropped the partial last line' in proc.stdout
    assert [r[0] for r in read_log(out, 'train')] == [0, 1, 2, 3, 4]  # every line parses again


def test_nan_on_a_fresh_run_does_not_claim_a_checkpoint(tmp_path, data):
    out = tmp_path / 'out'
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=20', '--eval_interval=10',
                     '--learning_rate=1e30', '--decay_lr=False')
    line = assert_proc_error(proc, 'not finite', 'no checkpoint was saved yet')
    assert 'keeps the last good state' not in line and not (out / 'ckpt.pt').exists()


# -----------------------------------------------------------------------------
# one run per out_dir

def test_second_run_in_the_same_out_dir_stops_at_once(tmp_path, data):
    out = tmp_path / 'out'
    args = [*TINY, f'--data_dir={data}', f'--out_dir={out}']
    first = subprocess.Popen([sys.executable, 'train.py', *args, '--max_iters=100000', '--eval_interval=100000'],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 60
        while not (out / 'log.jsonl').exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (out / 'run.lock').read_text().split()[0] == str(first.pid)
        code, stderr, _ = run_in_process('train.py', [*args, '--max_iters=3'])
        assert_error_line(code, stderr, str(first.pid), 'in use')
        assert first.poll() is None  # the first run goes on undisturbed
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == hardware.STOPPED  # saved and stopped (not finished, not failed)
    assert not (out / 'run.lock').exists()  # released on exit
    records = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert len({(r['iter'], r['kind'], r['split']) for r in records}) == len(records)  # no duplicates


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / 'run.lock').write_text(f"{dead.pid} {os.uname().nodename}\n")
    notices = []
    lock = runs.RunLock(tmp_path).acquire(notice=notices.append)
    assert notices == [f'notice: taking over {tmp_path / "run.lock"} left by PID {dead.pid}, which is no longer running']
    assert (tmp_path / 'run.lock').read_text().split()[0] == str(os.getpid())
    lock.release()
    assert list(tmp_path.iterdir()) == []  # released; the folder existed before, so it stays


def test_lock_of_another_host_is_not_taken(tmp_path):
    (tmp_path / 'run.lock').write_text("12345 some-other-host\n")
    with pytest.raises(cli.ConfigError, match='PID 12345 on host some-other-host.*delete'):
        runs.RunLock(tmp_path).acquire()


def test_lock_released_on_error_paths(run_copy):
    data, out = run_copy
    code, stderr, _ = run_in_process('train.py', [*TINY, f'--data_dir={data}', f'--out_dir={out}',
                                                  '--init_from=resume', '--block_size=64'])
    assert code == 1 and not (out / 'run.lock').exists()


# -----------------------------------------------------------------------------
# OS errors on a tmpfs in a private mount namespace (unshare -rm: no root needed, nothing leaks)

def _can_mount_tmpfs():
    if not sys.platform.startswith('linux') or not shutil.which('unshare'):
        return "needs Linux and unshare(1)"
    probe = subprocess.run(['unshare', '-rm', 'sh', '-c', 'mount -t tmpfs -o size=64k tmpfs /mnt'],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


TMPFS_SKIP = _can_mount_tmpfs()
needs_tmpfs = pytest.mark.skipif(TMPFS_SKIP is not None, reason=TMPFS_SKIP or '')


def in_tmpfs(mount, size, script, tmp_path):
    """Run the shell script with a fresh tmpfs of `size` mounted at mount (created if needed),
    inside a private mount namespace. Python is $PY; the repo is the working directory.
    Returns the CompletedProcess; the tmpfs and its files vanish afterwards."""
    mount.mkdir(parents=True, exist_ok=True)
    body = f"set -u\nmount -t tmpfs -o size={size} tmpfs {mount}\n{textwrap.dedent(script)}"
    (tmp_path / 'script.sh').write_text(body)
    return subprocess.run(['unshare', '-rm', 'sh', str(tmp_path / 'script.sh')], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**ENV, 'PY': sys.executable})


def fill_disk(path):
    return f"dd if=/dev/zero of={path} bs=4k 2>/dev/null || true\n"


@needs_tmpfs
def test_read_only_out_dir_is_one_line(tmp_path, data):
    mnt = tmp_path / 'mnt'
    proc = in_tmpfs(mnt, '1m', f"""
        mount -o remount,ro {mnt}
        $PY train.py {' '.join(TINY)} --data_dir={data} --out_dir={mnt}/out --max_iters=2
        echo "exit=$?"
        """, tmp_path)
    assert 'exit=1' in proc.stdout, proc.stdout + proc.stderr
    assert_error_line(1, proc.stderr, f'{mnt}/out', 'Read-only file system')


@needs_tmpfs
def test_read_only_data_dir_trains_and_read_only_prepare_is_one_line(tmp_path, data):
    mnt = tmp_path / 'mnt'
    proc = in_tmpfs(mnt, '1m', f"""
        cp {data}/* {mnt}/
        mount -o remount,ro {mnt}
        $PY train.py {' '.join(TINY)} --data_dir={mnt} --out_dir={tmp_path}/out --max_iters=2 --eval_interval=2 >/dev/null
        echo "train=$?"
        $PY prepare.py counting --data_dir={mnt} --num_train=50 --num_val=10
        echo "prepare=$?"
        ls -a {mnt}
        """, tmp_path)
    assert 'train=0' in proc.stdout and 'prepare=1' in proc.stdout, proc.stdout + proc.stderr
    assert_error_line(1, proc.stderr, f'{mnt}/counting', 'Read-only file system')


@needs_tmpfs
def test_disk_full_during_prepare_keeps_the_previous_files(tmp_path):
    mnt = tmp_path / 'mnt'
    keep = tmp_path / 'keep'
    proc = in_tmpfs(mnt, '2m', f"""
        $PY prepare.py counting --data_dir={mnt} --num_train=500 --num_val=50 >/dev/null || echo first-failed
        mkdir {keep} && cp {mnt}/counting/* {keep}/
        {fill_disk(f'{mnt}/filler')}
        $PY prepare.py counting --data_dir={mnt} --num_train=20000 --num_val=1000 --seed=1
        echo "exit=$?"
        rm {mnt}/filler
        ls -A {mnt}/counting
        cmp {keep}/train.bin {mnt}/counting/train.bin && cmp {keep}/meta.json {mnt}/counting/meta.json && echo same
        """, tmp_path)
    assert 'first-failed' not in proc.stdout and 'exit=1' in proc.stdout, proc.stdout + proc.stderr
    assert_error_line(1, proc.stderr, 'counting/train.bin', 'No space left on device')
    listing = proc.stdout.split('exit=1')[1].split()
    assert sorted(listing[:-1]) == ['meta.json', 'train.bin', 'val.bin']  # no temporary files left
    assert listing[-1] == 'same'  # the previous good files are intact


@pytest.mark.slow
@needs_tmpfs
def test_disk_full_during_checkpoint_save_keeps_the_last_good_checkpoint(tmp_path, data):
    mnt = tmp_path / 'mnt'
    args = ' '.join([*TINY, f'--data_dir={data}', f'--out_dir={mnt}/out', '--eval_interval=2'])
    proc = in_tmpfs(mnt, '4m', f"""
        $PY train.py {args} --max_iters=2 >/dev/null || echo first-failed
        cp {mnt}/out/ckpt.pt {tmp_path}/good.pt
        rm -f {mnt}/out/loss.png
        {fill_disk(f'{mnt}/filler')}
        $PY train.py {args} --max_iters=4 --init_from=resume >/dev/null
        echo "exit=$?"
        rm {mnt}/filler
        ls -A {mnt}/out
        cmp {tmp_path}/good.pt {mnt}/out/ckpt.pt && echo same
        """, tmp_path)
    assert 'first-failed' not in proc.stdout and 'exit=1' in proc.stdout, proc.stdout + proc.stderr
    assert_error_line(1, proc.stderr, f'{mnt}/out/', 'No space left on device')
    listing = proc.stdout.split('exit=1')[1].split()
    assert not [name for name in listing if name.endswith('.tmp') or name == 'run.lock'], listing
    assert listing[-1] == 'same'


@needs_tmpfs
@pytest.mark.parametrize('command', ['plot', 'bench'])
def test_unwritable_output_file_is_one_line(tmp_path, command):
    mnt = tmp_path / 'mnt'
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'log.jsonl').write_text(json.dumps(dict(iter=0, kind='eval', split='val', loss=1.0, tokens=0)) + '\n')
    if command == 'plot':
        pytest.importorskip('matplotlib')
        cmd = f"$PY plot.py loss {run} --out={mnt}/loss.png"
    else:
        cmd = (f"$PY bench.py --device=cpu --n_layer=1 --n_head=1 --n_embd=8 --block_size=8 --mode=train "
               f"--num_iters=1 --repeats=1 --json_out={mnt}/bench.jsonl")
    proc = in_tmpfs(mnt, '1m', f"""
        echo old > {mnt}/keep.txt
        mount -o remount,ro {mnt}
        {cmd}
        echo "exit=$?"
        ls -A {mnt}
        """, tmp_path)
    assert 'exit=1' in proc.stdout, proc.stdout + proc.stderr
    assert_error_line(1, proc.stderr, str(mnt), 'read-only')
    assert proc.stdout.split('exit=1')[1].split() == ['keep.txt']


# -----------------------------------------------------------------------------
# signals: a long evaluation does not delay Ctrl-C / SIGTERM

def wait_for(predicate, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize('sig', [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_during_long_evaluation_stops_within_seconds(tmp_path, run_copy, sig):
    data, out = run_copy
    # resumed at iteration 3, the first evaluation (iteration 4) takes minutes: 10^6 batches
    args = [*TINY, f'--data_dir={data}', f'--out_dir={out}', '--init_from=resume', '--max_iters=100',
            '--eval_interval=4', '--eval_iters=1000000']
    proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert wait_for(lambda: len(read_log(out, 'train')) >= 4)  # iteration 3 logged: the eval runs
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
        elapsed = time.time() - t0
    finally:
        proc.kill()
    assert proc.returncode == hardware.STOPPED, stderr
    assert elapsed < 10, elapsed
    assert f'stopped by {sig.name} during the evaluation at iteration 4' in stdout
    assert runs.load_checkpoint(out / 'ckpt.pt')['iter_num'] == 4  # the last finished step is saved
    assert not (out / 'run.lock').exists()


# -----------------------------------------------------------------------------
# torchrun: one error line, all ranks exit together, no orphaned workers

def test_a_signal_during_the_stop_all_reduce_counts_at_the_next_check_on_every_rank(monkeypatch):
    """The ranks agree on stopping through one all-reduce; a SIGTERM that lands on this rank while
    it is in that all-reduce (the others saw no signal: the reduced flag is 0) must not make this
    rank stop alone, leaving the others waiting in their next collective (a hang under torchrun
    until it kills them, seen on a loaded machine). It counts at the next check instead."""
    import torch.distributed as dist
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = hardware.StopSignal(ddp=True)
        calls = []

        def all_reduce(flag, op=None):  # the other ranks' flags are 0; the signal lands meanwhile
            calls.append(flag.item())
            if len(calls) == 1:
                stop._remember(signal.SIGTERM, None)
        monkeypatch.setattr(dist, 'all_reduce', all_reduce)
        assert stop.requested() is False  # as the other ranks see it: nobody had a signal yet
        assert stop.requested() is True and stop.name == 'SIGTERM'  # the next check: all stop
        assert calls == [0.0, 1.0]
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def torchrun_popen(*args, restarts=0):
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             f'--max-restarts={restarts}', 'train.py', *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, start_new_session=True)


def workers_of(out):
    """PIDs of train.py processes started for this out_dir (workers outlive a killed torchrun)."""
    found = subprocess.run(['pgrep', '-f', '--', f'--out_dir={out}'], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


@pytest.mark.slow
@pytest.mark.parametrize('fault', ['wandb', 'lock', 'vocab'])
def test_torchrun_error_printed_once_and_all_ranks_exit(tmp_path, data, trained, fault):
    out = tmp_path / 'out'
    args = [*TINY, f'--data_dir={data}', '--gradient_accumulation_steps=2', '--max_iters=50']
    if fault == 'wandb':
        try:
            import wandb  # noqa: F401
            pytest.skip("wandb is installed here")
        except ImportError:
            pass
        args += [f'--out_dir={out}', '--wandb_log=True']
        fragment = 'pip install wandb'
    elif fault == 'lock':
        out.mkdir()
        holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
        (out / 'run.lock').write_text(f"{holder.pid} {os.uname().nodename}\n")
        args += [f'--out_dir={out}']
        fragment = f'PID {holder.pid}'
    else:
        shutil.copytree(trained[1], out)
        args = [*args, f'--data_dir={make_dataset(tmp_path / "d65", vocab_size=65)}', f'--out_dir={out}',
                '--init_from=resume']
        fragment = 'vocab_size 65'
    t0 = time.time()
    proc = torchrun_popen(*args)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        if fault == 'lock':
            holder.kill()
    assert proc.returncode != 0
    assert time.time() - t0 < 60
    errors = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and fragment in errors[0], stderr
    assert 'parameters' not in stdout or fault == 'vocab'
    assert workers_of(out) == []


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGKILL])
def test_torchrun_stopped_during_long_evaluation_leaves_no_workers(run_copy, sig):
    """SIGTERM to torchrun is forwarded to the workers; after a SIGKILL of torchrun the workers get
    SIGTERM from the kernel (PR_SET_PDEATHSIG). Either way they agree to stop within seconds, and
    torchrun, stopped itself, does not restart them (--max-restarts) though they exit non-zero."""
    data, out = run_copy  # resumed at iteration 3: the evaluation at iteration 4 takes minutes
    proc = torchrun_popen(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--gradient_accumulation_steps=2',
                          '--max_iters=100', '--eval_interval=4', '--eval_iters=1000000', '--init_from=resume',
                          restarts=2)
    try:
        assert wait_for(lambda: (out / 'log.jsonl').exists() and len(read_log(out, 'train')) >= 4, 120)
        time.sleep(0.5)
        assert len(workers_of(out)) == 3  # torchrun and its two workers
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)  # returns when the workers closed the pipes too
        assert wait_for(lambda: workers_of(out) == [], 15), workers_of(out)
    finally:
        for pid in workers_of(out):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert stdout.count('resuming from') <= 1, stdout  # no restart
    if sig == signal.SIGTERM:
        assert 'stopped by SIGTERM' in stdout, stdout + stderr
        assert stdout.count('resuming from') == 1 and 'exit status 75' in stdout, stdout
        assert runs.load_checkpoint(out / 'ckpt.pt')['iter_num'] == 4
        assert not (out / 'run.lock').exists()
    else:
        # Known gap: after kill -9 of torchrun the workers usually save (iteration 4) and release the
        # lock, but on a loaded machine they sometimes exit without saving (the agent hosting the
        # store is gone). What is guaranteed: no orphans, and ckpt.pt is a good checkpoint.
        assert runs.load_checkpoint(out / 'ckpt.pt')['iter_num'] in (3, 4)


# -----------------------------------------------------------------------------
# second pass (an adversary's matrix): inputs that used to give a traceback, exit 0 wrongly,
# write outside data_dir or leave a temporary file behind

def test_prepare_name_must_stay_inside_data_dir(tmp_path):
    (tmp_path / 'in.txt').write_text('hello world\n' * 50)
    data_dir = tmp_path / 'data'
    for name in ('../escaped', 'a/b', '..'):
        code, stderr = captured(prepare.main, ['text', f'--input={tmp_path / "in.txt"}', f'--data_dir={data_dir}',
                                               '--tokenizer=char', f'--name={name}'])
        assert_error_line(code, stderr, '--name', 'plain folder name', repr(name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in.txt']  # nothing written, inside or out


def test_prepare_list_with_a_name_is_refused(tmp_path):
    code, stderr = captured(prepare.main, ['--list', 'counting'])
    assert_error_line(code, stderr, '--list', "'counting'")


def test_prepare_parquet_text_column_of_numbers(tmp_path):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    folder = tmp_path / 'shards'
    folder.mkdir()
    pq.write_table(pa.table({'text': [1, 2, 3]}), folder / 'a.parquet')
    code, stderr = captured(prepare.main, ['fineweb_edu', f'--input={folder}', f'--data_dir={tmp_path / "data"}'])
    assert_error_line(code, stderr, 'a.parquet', "'text' column holds int64", 'strings')
    assert not list((tmp_path / 'data').rglob('*.bin*'))


@pytest.mark.parametrize('existing', [False, True])
def test_prepare_sigterm_leaves_no_temporary_file(tmp_path, existing):
    """SIGTERM (kill, a job scheduler) cleans up like Ctrl-C: no .train.bin.tmp is left, and the
    folders prepare made are removed again; a folder that was there before stays."""
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'a.txt').write_text('the quick brown fox jumps over the lazy dog\n' * 400_000)  # 18 MB
    data_dir = tmp_path / 'data'
    if existing:
        (data_dir / 'text').mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, str(REPO / 'prepare.py'), 'text', f'--input={tmp_path / "in"}',
                             f'--data_dir={data_dir}', '--num_threads=1'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 60
    while not list(data_dir.rglob('.*.tmp')) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.skip("prepare finished before the signal could be sent (a very fast machine)")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0 and 'Traceback' not in stderr, stderr
    assert not list(data_dir.rglob('*.tmp')) and not list(data_dir.rglob('*.bin')), files_under(data_dir)
    if existing:
        assert (data_dir / 'text').is_dir()
    else:
        assert not data_dir.exists(), files_under(data_dir)


def test_train_refuses_meta_json_that_is_not_an_object(tmp_path, data):
    (data / 'meta.json').write_text('[1, 2]')
    out = tmp_path / 'out'
    code, stderr, _ = run_in_process('train.py', [*TINY, f'--data_dir={data}', f'--out_dir={out}'])
    assert_error_line(code, stderr, 'meta.json', 'JSON list', 'expected an object')
    assert not out.exists()


@pytest.mark.parametrize('damage, fragments', [
    ('model_args_junk', ['model_args', 'n_layer', "'x'", 'damaged']),
    ('missing_tensor', ['Missing key', 'damaged']),
    ('wrong_shape', ['size mismatch', 'damaged']),
    ('iter_str', ["iter_num '3'", 'damaged']),
    ('no_optimizer', ['lacks optimizer', 'new --out_dir']),
    ('no_vocab', ["model_args['vocab_size']"]),
])
def test_resume_refuses_a_damaged_checkpoint_in_one_line(run_copy, damage, fragments):
    data, out = run_copy
    ckpt = runs.load_checkpoint(out / 'ckpt.pt')
    if damage == 'model_args_junk':
        ckpt['model_args']['n_layer'] = 'x'
    elif damage == 'missing_tensor':
        ckpt['model'].pop('transformer.wte.weight')
    elif damage == 'wrong_shape':
        ckpt['model_args']['n_embd'] = 64
    elif damage == 'iter_str':
        ckpt['iter_num'] = '3'
    elif damage == 'no_optimizer':
        del ckpt['optimizer']
    else:
        del ckpt['model_args']['vocab_size']
    torch.save(ckpt, out / 'ckpt.pt')
    before = (out / 'ckpt.pt').read_bytes(), (out / 'log.jsonl').read_text()
    code, stderr, _ = run_in_process('train.py', [*TINY, f'--data_dir={data}', f'--out_dir={out}',
                                                  '--init_from=resume', '--max_iters=5'])
    assert_error_line(code, stderr, 'ckpt.pt', *fragments)
    assert before == ((out / 'ckpt.pt').read_bytes(), (out / 'log.jsonl').read_text())
    assert not (out / 'run.lock').exists()


def test_lock_path_that_is_a_folder_is_one_line(tmp_path, data):
    out = tmp_path / 'out'
    (out / 'run.lock').mkdir(parents=True)
    code, stderr, _ = run_in_process('train.py', [*TINY, f'--data_dir={data}', f'--out_dir={out}'])
    assert_error_line(code, stderr, 'run.lock', 'is a folder')


HELLASWAG_OK = json.dumps({'ctx': 'A man', 'endings': [' a', ' b', ' c', ' d'], 'label': 0})


@pytest.mark.parametrize('content, argv, fragments', [
    (b'\xff\xfe\x00garbage\n', [], ['line 1', 'UnicodeDecodeError']),
    (json.dumps({'ctx': 5, 'endings': ['a', 'b', 'c', 'd'], 'label': 0}).encode(), [], ['line 1', 'strings']),
    (json.dumps({'ctx': 'x', 'endings': ['a', 'b', 'c', 5], 'label': 0}).encode(), [], ['line 1', 'strings']),
    (HELLASWAG_OK.encode(), ['--limit=-1'], ['limit', '>= 0']),
])
def test_evaluate_hellaswag_bad_input_is_one_line(tmp_path, content, argv, fragments):
    path = tmp_path / 'hs.jsonl'
    path.write_bytes(content)
    code, stderr = captured(evaluate.main, ['hellaswag', f'--input={path}', f'--out_dir={tmp_path}/none', *argv])
    assert_error_line(code, stderr, *fragments)


@pytest.mark.parametrize('script', ['evaluate', 'plot'])
def test_no_command_is_an_error_line(script):
    module = {'evaluate': evaluate, 'plot': plot}[script]
    code, stderr = captured(module.main, [])
    assert_error_line(code, stderr, 'name a command')


def test_evaluate_counting_refuses_a_model_of_other_data(tmp_path):
    out = char_checkpoint(tmp_path)
    code, stderr = captured(evaluate.main, ['counting', f'--out_dir={out}', '--device=cpu'])
    assert_error_line(code, stderr, 'prepare.py counting', 'char')


@pytest.mark.parametrize('log', ['', '\xff\xfe garbage\n', '{"iter": 1}\n[1]\n'])
def test_plot_loss_of_a_log_without_losses_is_one_line(tmp_path, log):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'log.jsonl').write_text(log, errors='surrogateescape')
    code, stderr = captured(plot.main, ['loss', str(tmp_path / 'run')])
    assert_error_line(code, stderr, 'no loss records', 'log.jsonl')
    assert not (tmp_path / 'run' / 'loss.png').exists()  # no empty picture


@pytest.mark.parametrize('body, code, stderr', [
    ("print('done', end='')", 0, ''),  # unflushed output still arrives
    ("cli.die('bad flag; use --x=1')", 1, 'error: bad flag; use --x=1\n'),
    ("raise SystemExit(3)", 3, ''),
    ("raise RuntimeError('boom')", 1, 'RuntimeError: boom'),
])
def test_ddp_exit_keeps_the_status_and_message_python_would_give(body, code, stderr):
    """hardware.ddp_exit() (a torchrun worker's last call, skipping finalization) exits with the status
    and prints the one line (or traceback) of the exception in flight, and flushes buffered output."""
    script = (f"import atexit\nfrom lib import cli, hardware\natexit.register(lambda: print('atexit ran'))\n"
              f"try:\n    {body}\nfinally:\n    hardware.ddp_exit()\n")
    proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ('done' if code == 0 else '')  # and atexit handlers (finalization) did not run
    if stderr.startswith('error:') or not stderr:
        assert proc.stderr == stderr
    else:
        assert proc.stderr.startswith('Traceback') and proc.stderr.rstrip().endswith(stderr)


@pytest.mark.parametrize('body, code', [("pass", 75), ("cli.die('bad flag; use --x=1')", 1)])
def test_ddp_exit_with_a_status_keeps_it_unless_an_error_is_leaving(body, code):
    """A stopped run's workers leave with hardware.STOPPED; an error in flight keeps its own status."""
    script = f"from lib import cli, hardware\ntry:\n    {body}\nfinally:\n    hardware.ddp_exit(hardware.STOPPED)\n"
    proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr


# -----------------------------------------------------------------------------
# third pass (a new user's first hour, round two): the message names the fix the user needs

def test_a_misspelled_dataset_names_the_nearest_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenfiles, 'DATA_DIR', tmp_path / 'data')
    (tmp_path / 'data' / 'shakespeare_char').mkdir(parents=True)
    (tmp_path / 'data' / 'shakespeare_char' / 'meta.json').write_text('{}')
    monkeypatch.chdir(tmp_path)
    code, stderr, _ = run_in_process('train.py', [*TINY, '--dataset=shakespear_char', f'--out_dir={tmp_path / "o"}'])
    assert_error_line(code, stderr, "no dataset 'shakespear_char'", 'did you mean --dataset=shakespeare_char?')


def test_plot_loss_without_a_run_suggests_what_plot_takes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stderr = captured(plot.main, ['loss'])
    line = assert_error_line(code, stderr, 'no trained model to plot', 'python plot.py loss RUN_FOLDER')
    assert '--init_from' not in line and '--out_dir' not in line


def test_evaluate_hellaswag_finds_a_missing_run_before_downloading(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded before checking the run")
    monkeypatch.setattr(evaluate, 'hellaswag_path', no_download)
    code, stderr = captured(evaluate.main, ['hellaswag', f'--out_dir={tmp_path / "no-run"}', '--device=cpu'])
    assert_error_line(code, stderr, 'no checkpoint at', 'no-run')
