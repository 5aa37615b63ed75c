"""
Tests for train.py and the run files (runs.py, hardware.py) on CPU: tiny models on tiny random datasets in temporary folders.

train.py runs as a subprocess, as a user would run it; losses are read back from out_dir/log.jsonl.
Tests marked slow start torchrun or several runs (run them all with `python -m pytest test_train.py`).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lib import cli
from lib import hardware
from lib import loading, runs
from lib.tokenfiles import SMALL_DATA, small_data_notice
from lib.export import save_hf
from helpers import (ENV, REPO, TINY, train_defaults, assert_ddp_matches_single_process, assert_exact_resume, assert_one_line_error,
                     free_port, make_dataset, read_log, run_train, torchrun)
from local_data import SHAKESPEARE
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# cli.load_config

DEFAULTS = {'batch_size': 12, 'learning_rate': 6e-4, 'decay_lr': True, 'out_dir': 'out', 'device': 'auto',
            'max_iters': 100, 'lr_decay_iters': 100, 'compile': None}


def test_config_files_compose_and_flags_win(tmp_path):
    a = tmp_path / 'a.py'
    a.write_text("batch_size = 32  # first file\nmax_iters = 50\nout_dir = 'out-a'\n")
    b = tmp_path / 'b.py'
    b.write_text("import math\nbatch_size = 64  # second file wins over the first\nlr_decay_iters = max_iters\n")
    overrides = cli.load_config(DEFAULTS, [str(a), '--batch_size=8', str(b), '--device=cuda:1',
                                              '--learning_rate=1', "--out_dir='x y'", '--compile=False'])
    # files apply in order, then flags (also flags written before a file)
    assert overrides == {'batch_size': 8, 'max_iters': 50, 'out_dir': 'x y', 'lr_decay_iters': 50,
                         'device': 'cuda:1', 'learning_rate': 1.0, 'compile': False}
    assert isinstance(overrides['learning_rate'], float)  # an int stands for a float, stored as float


@pytest.mark.parametrize('argv, fragments', [
    (['--learning_rat=1e-3'], ["'learning_rat'", "did you mean 'learning_rate'"]),
    (['--batch_size=1.5'], ["'batch_size'", '1.5', 'expected int']),
    (['--decay_lr=yes'], ["'decay_lr'", "'yes'", 'True or False']),
    (['--decay_lr=1'], ["'decay_lr'", 'True or False']),
    (['--learning_rate=fast'], ["'learning_rate'", "'fast'", 'expected float']),
    (['--batch_size'], ['--key=value']),
    (['no_such_file.py'], ['no_such_file.py', 'not found']),
])
def test_config_flag_errors(argv, fragments):
    with pytest.raises(cli.ConfigError) as error:
        cli.load_config(DEFAULTS, argv)
    for fragment in fragments:
        assert fragment in error.value.message


def test_config_file_errors(tmp_path):
    typo = tmp_path / 'typo.py'
    typo.write_text("batchsize = 32\n")
    with pytest.raises(cli.ConfigError, match="'batchsize' in .*typo.py; did you mean 'batch_size'"):
        cli.load_config(DEFAULTS, [str(typo)])
    wrong_type = tmp_path / 'wrong.py'
    wrong_type.write_text("decay_lr = 'no'\n")
    with pytest.raises(cli.ConfigError, match="'decay_lr' in .*wrong.py: got 'no'"):
        cli.load_config(DEFAULTS, [str(wrong_type)])


def test_train_py_config_errors_are_one_line(tmp_path, data):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("n_layers = 4\n")
    assert_one_line_error(run_train(cfg), "'n_layers'", "did you mean 'n_layer'")
    assert_one_line_error(run_train('--max_iter=5'), "did you mean 'max_iters'")
    assert_one_line_error(run_train('--batch_size=big'), "'batch_size'", "'big'", 'expected int')


# config/ also holds presets for the other scripts (bench_*.py for bench.py, ...): those are not train.py's.
TRAIN_CONFIGS = sorted(p for p in (REPO / 'config').glob('*.py') if not p.name.startswith(('bench_', 'sample_')))


@pytest.mark.parametrize('path', TRAIN_CONFIGS, ids=lambda p: p.name)
def test_repo_config_files_are_valid_and_commented(path):
    overrides = cli.load_config(train_defaults(), [str(path)])
    assert overrides
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith('#'):
            assert '  # ' in line, f"{path.name}: every setting gets a trailing comment: {line!r}"


# -----------------------------------------------------------------------------
# device and checkpoints (hardware.py, runs.py)

def test_setup_device_cpu():
    dev = hardware.setup_device('cpu', 'auto')
    assert (dev.device, dev.device_type, dev.dtype, dev.use_grad_scaler) == ('cpu', 'cpu', 'float32', False)
    dev = hardware.setup_device('cpu', 'bfloat16')  # an explicit dtype is honoured, also on CPU
    assert dev.ptdtype == torch.bfloat16
    with dev.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(cli.ConfigError, match='float8'):
        hardware.setup_device('cpu', 'float8')
    if not torch.cuda.is_available():
        with pytest.raises(cli.ConfigError, match='--device=cpu'):
            hardware.setup_device('cuda', 'auto')


def test_checkpoint_roundtrip_and_errors(tmp_path):
    path = tmp_path / 'ckpt.pt'
    ckpt = {'format': runs.CHECKPOINT_FORMAT, 'model': {'w': torch.ones(3)}, 'model_args': {'n_layer': 1}}
    runs.save_checkpoint(ckpt, path)
    assert torch.equal(runs.load_checkpoint(path)['model']['w'], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind
    with pytest.raises(cli.ConfigError, match='no checkpoint at'):
        runs.load_checkpoint(tmp_path / 'missing.pt')
    (tmp_path / 'truncated.pt').write_bytes(path.read_bytes()[:100])
    with pytest.raises(cli.ConfigError, match='truncated, corrupt'):
        runs.load_checkpoint(tmp_path / 'truncated.pt')
    torch.save({'weights': torch.ones(1)}, tmp_path / 'foreign.pt')
    with pytest.raises(cli.ConfigError, match='not a training checkpoint'):
        runs.load_checkpoint(tmp_path / 'foreign.pt')


def test_model_state_dict_strips_prefix_only_for_nanogpt_files():
    nanogpt = {'model': {'_orig_mod.wte.weight': 1, 'lm_head.weight': 2}, 'model_args': {}}
    assert runs.model_state_dict(nanogpt) == {'wte.weight': 1, 'lm_head.weight': 2}
    ours = {'format': runs.CHECKPOINT_FORMAT, 'model': {'_orig_mod.x': 1}, 'model_args': {}}
    assert runs.model_state_dict(ours) == {'_orig_mod.x': 1}


def test_mfu_and_peak_flops():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=53, n_layer=2, n_head=2, n_embd=24))
    assert hardware.estimate_mfu(model, 1000.0, "cpu", torch.float32) is None
    assert hardware.estimate_mfu(model, 1000.0, "AMD EPYC", torch.float32) is None
    mfu = hardware.estimate_mfu(model, 1e9, "NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert mfu == pytest.approx(model.flops_per_token() * 1e9 / 989e12)
    assert hardware.peak_flops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312e12
    assert hardware.peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert hardware.peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert hardware.peak_flops("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16 on V100
    assert hardware.peak_flops("Some Future GPU", torch.bfloat16) is None


def test_kill_during_save_keeps_old_checkpoint(tmp_path):
    """SIGKILL a process in the middle of save_checkpoint: ckpt.pt still holds the previous, loadable state."""
    path = tmp_path / 'ckpt.pt'
    runs.save_checkpoint({'model': {'w': torch.zeros(4)}, 'model_args': {}, 'iter_num': 1}, path)
    # The child's torch.save writes some bytes and then stalls, so the kill lands mid-write for sure.
    child = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f"""
        import time, torch
        from lib import runs
        def stalling_save(obj, f):
            f.write(b'half a checkpoint')
            f.flush()
            print('writing', flush=True)
            time.sleep(60)
        runs.torch.save = stalling_save
        runs.save_checkpoint({{'model': {{'w': torch.ones(4)}}, 'model_args': {{}}, 'iter_num': 2}}, {str(path)!r})
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert child.stdout.readline().strip() == 'writing'
        child.kill()
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.glob('.ckpt.pt.*.tmp')]  # the half-written file is a temporary
    ckpt = runs.load_checkpoint(path)
    assert ckpt['iter_num'] == 1 and torch.equal(ckpt['model']['w'], torch.zeros(4))
    runs.save_checkpoint({'model': {}, 'model_args': {}, 'iter_num': 3}, path)  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt']


# -----------------------------------------------------------------------------
# train.py end to end

def test_loss_decreases(tmp_path, data):
    out = tmp_path / 'out'
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=30', '--eval_interval=30',
                     '--eval_iters=8')
    assert proc.returncode == 0, proc.stderr
    evals = [loss for it, kind, split, loss in read_log(out, 'eval') if split == 'val']
    assert evals[-1] < evals[0] - 1.0, evals  # from ~ln(16)=2.8 down towards the 10%-noise floor
    config = json.loads((out / 'config.json').read_text())
    assert config['max_iters'] == 30 and config['n_embd'] == 32
    ckpt = runs.load_checkpoint(out / 'ckpt.pt')
    assert ckpt['iter_num'] == 30 and not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    assert {'optimizer', 'model_args', 'best_val_loss', 'config', 'rng', 'scaler', 'data'} <= set(ckpt)
    # the parameter table is printed once; the loss curve is drawn at each evaluation
    assert proc.stdout.count('parameters') >= 1 and 'attention' in proc.stdout and 'total' in proc.stdout
    matplotlib = pytest.importorskip('matplotlib')
    from matplotlib import image
    png = image.imread(out / 'loss.png')
    assert png.shape[:2] == (600, 1200), png.shape


@pytest.mark.slow
def test_exact_resume(tmp_path, data):
    """2N iterations straight give the same losses as N, stop, resume for N more (dropout on)."""
    args = [*TINY, f'--data_dir={data}', '--dropout=0.1', '--gradient_accumulation_steps=2', '--eval_interval=4']
    _, proc = assert_exact_resume(args, tmp_path, iters=8)
    assert 'resuming from' in proc.stdout
    assert len(read_log(tmp_path / 'resumed', 'train')) == 8


def test_sigterm_saves_and_exits_with_the_stopped_status(tmp_path, data):
    """SIGTERM (a job scheduler, kill): the step finishes, ckpt.pt is saved, and the exit status
    says stopped (hardware.STOPPED, not 0: a job script must not read success); the summary says
    how to continue, not 'best val loss inf' and a sample of an untrained model."""
    out = tmp_path / 'out'
    args = [*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=100000', '--eval_interval=100000']
    proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if (out / 'log.jsonl').exists() and len(read_log(out, 'train')) >= 3:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == hardware.STOPPED == 75, stderr
    assert 'stopped by SIGTERM' in stdout
    summary = stdout[stdout.index('\nstopped by SIGTERM at iteration'):]
    assert 'exit status 75' in summary and f'continue with: python train.py --init_from=resume --out_dir={out}' in summary
    assert 'inf' not in summary and 'sample.py' not in summary and 'done:' not in summary
    ckpt = runs.load_checkpoint(out / 'ckpt.pt')
    assert ckpt['iter_num'] >= 3
    assert ckpt['iter_num'] == read_log(out, 'train')[-1][0] + 1  # the state after the last finished step


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data):
    """A run that diverges stops with an error naming the iteration; ckpt.pt keeps the last good state.

    The divergence is a real one: resuming with learning_rate=1e30, a single AdamW step moves every
    weight by ~1e30, and the next forward pass overflows float32 (LayerNorm squares ~1e30 values).
    """
    out = tmp_path / 'out'
    args = [*TINY, f'--data_dir={data}', f'--out_dir={out}', '--eval_interval=3']
    assert run_train(*args, '--max_iters=3').returncode == 0
    good = runs.load_checkpoint(out / 'ckpt.pt')
    proc = run_train(*args, '--max_iters=20', '--init_from=resume', '--learning_rate=1e30', '--decay_lr=False')
    assert_one_line_error(proc, 'not finite', 'iteration', 'ckpt.pt keeps the last good state')
    after = runs.load_checkpoint(out / 'ckpt.pt')
    assert after['iter_num'] == good['iter_num'] == 3
    assert all(torch.equal(after['model'][k], good['model'][k]) for k in good['model'])


def test_resume_from_nanogpt_checkpoint(tmp_path, data):
    """A checkpoint in nanoGPT's layout (compiled-model keys, no RNG or data state) resumes."""
    out = tmp_path / 'out'
    args = [*TINY, f'--data_dir={data}', f'--out_dir={out}', '--eval_interval=3']
    assert run_train(*args, '--max_iters=3').returncode == 0
    ours = runs.load_checkpoint(out / 'ckpt.pt')
    nanogpt = {'model': {'_orig_mod.' + k: v for k, v in ours['model'].items()},
               'optimizer': ours['optimizer'], 'model_args': ours['model_args'], 'iter_num': 3,
               'best_val_loss': torch.tensor(ours['best_val_loss']), 'config': ours['config']}
    torch.save(nanogpt, out / 'ckpt.pt')
    proc = run_train(*args, '--max_iters=5', '--init_from=resume')
    assert proc.returncode == 0, proc.stderr
    assert [row[0] for row in read_log(out, 'train')] == [0, 1, 2, 3, 4]


def test_checkpoint_records_nanogpts_keys_plus_the_modern_knobs_that_are_on(tmp_path, data):
    """model_args: nanoGPT's seven keys, and a modern knob only where it differs from GPT-2."""
    nanogpt_keys = {'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout'}
    for flags, extra in [([], {}), (['--pos_emb=rope', '--qk_norm=True'], {'pos_emb': 'rope', 'qk_norm': True})]:
        out = tmp_path / f'out{len(flags)}'
        proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2', *flags)
        assert proc.returncode == 0, proc.stderr
        args = runs.load_checkpoint(out / 'ckpt.pt')['model_args']
        assert set(args) == nanogpt_keys | set(extra) and all(args[k] == v for k, v in extra.items())


def test_checkpoint_of_the_previous_layout_resumes_samples_and_evaluates(tmp_path, data):
    """Checkpoints written before the layout change recorded every model knob in model_args,
    GPT-2's values included: they still resume exactly, sample and evaluate."""
    out = tmp_path / 'out'
    args = [*TINY, f'--data_dir={data}', f'--out_dir={out}', '--eval_interval=3']
    assert run_train(*args, '--max_iters=3').returncode == 0
    ckpt = runs.load_checkpoint(out / 'ckpt.pt')
    ckpt['model_args'].update(pos_emb='learned', norm='layernorm', mlp_act='gelu', qk_norm=False,
                              tie_embeddings=True, logit_softcap=0.0)  # what main wrote before
    torch.save(ckpt, out / 'ckpt.pt')
    model, _ = loading.load_model('resume', out)
    with torch.no_grad():  # sample.py's and evaluate.py's loader gives the same model
        assert model(torch.zeros(1, 4, dtype=torch.long))[0].shape == (1, 1, 16)
    proc = run_train(*args, '--max_iters=5', '--init_from=resume')
    assert proc.returncode == 0, proc.stderr
    assert [row[0] for row in read_log(out, 'train')] == [0, 1, 2, 3, 4]
    chars = list('abcdefghijklmnop')  # a character vocabulary for the 16 ids, so sample.py can print
    (data / 'meta.json').write_text(json.dumps({'vocab_size': 16, 'tokenizer': 'char', 'chars': chars}))
    for argv in (['sample.py', '--max_new_tokens=5', '--start=abc'], ['evaluate.py', 'perplexity']):
        r = subprocess.run([sys.executable, *argv, f'--out_dir={out}', f'--data_dir={data}', '--device=cpu'],
                           cwd=REPO, capture_output=True, text=True, env=ENV, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith('abc') if argv[0] == 'sample.py' else 'perplexity' in r.stdout


NANOGPT_DIR = os.environ.get('NANOGPT_DIR')


@pytest.mark.skipif(not NANOGPT_DIR, reason='set NANOGPT_DIR to a nanoGPT checkout to test that its model.py '
                                            'and sample.py read our checkpoints')
def test_nanogpts_own_model_and_sample_read_our_checkpoint(tmp_path):
    """A GPT-2-knob run of ours, read by nanoGPT's model.py (same logits) and sample.py (runs as is)."""
    import importlib.util
    import pickle
    nano = Path(NANOGPT_DIR)
    work = tmp_path / 'nano'  # nanoGPT's sample.py reads data/<dataset>/meta.pkl and configurator.py from its cwd
    work.mkdir()
    for name in ('model.py', 'sample.py', 'configurator.py'):
        (work / name).write_bytes((nano / name).read_bytes())
    chars = sorted(set("ROMEO: JULIET the quick brown fox jumps\n"))
    text = ("ROMEO: the quick brown fox\nJULIET: jumps\n" * 200)
    data = work / 'data' / 'chars'
    data.mkdir(parents=True)
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    ids.tofile(data / 'train.bin')
    ids[:1000].tofile(data / 'val.bin')
    (data / 'meta.json').write_text(json.dumps({'vocab_size': len(chars), 'tokenizer': 'char', 'chars': chars}))
    with open(data / 'meta.pkl', 'wb') as f:  # nanoGPT's char-level prepare.py writes this
        pickle.dump({'vocab_size': len(chars), 'itos': dict(enumerate(chars)),
                     'stoi': {c: i for i, c in enumerate(chars)}}, f)
    out = work / 'out'
    proc = run_train(*TINY, '--dataset=chars', f'--data_dir={data}', f'--out_dir={out}', '--max_iters=4',
                     '--eval_interval=4', '--dropout=0.1')
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    spec = importlib.util.spec_from_file_location('nanogpt_model_for_test', work / 'model.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    theirs = module.GPT(module.GPTConfig(**ckpt['model_args']))  # a TypeError before the fix
    theirs.load_state_dict(ckpt['model'])
    ours, _ = loading.load_model('resume', out)
    theirs.eval()
    idx = torch.randint(0, len(chars), (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx, idx)[0], ours(idx, idx)[0], atol=1e-5, rtol=0)
    r = subprocess.run([sys.executable, 'sample.py', '--out_dir=out', '--device=cpu', '--dtype=float32',
                        '--compile=False', '--num_samples=1', '--max_new_tokens=20', '--start=ROMEO:'],
                       cwd=work, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('ROMEO:') >= 1 and 'Loading meta from data/chars/meta.pkl' in r.stdout


def test_eval_only_from_local_hugging_face_folder(tmp_path, data):
    """init_from a folder written by export.save_hf, with eval_only: one evaluation, no training."""
    folder = tmp_path / 'hf'
    save_hf(GPT(GPTConfig(block_size=32, vocab_size=16, n_layer=1, n_head=2, n_embd=16)), folder)
    out = tmp_path / 'out'
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', f'--init_from={folder}', '--eval_only=True')
    assert proc.returncode == 0, proc.stderr
    assert [row[1:3] for row in read_log(out)] == [('eval', 'train'), ('eval', 'val')]
    assert not (out / 'ckpt.pt').exists()
    assert_one_line_error(run_train(*TINY, f'--data_dir={data}', '--init_from=gpt3'), "init_from='gpt3'")


def test_data_errors(tmp_path, data):
    missing = run_train(*TINY, '--dataset=nonexistent_corpus', f'--out_dir={tmp_path / "out"}')
    assert_one_line_error(missing, 'python prepare.py text --input=YOUR_TEXT --name=nonexistent_corpus')
    short = make_dataset(tmp_path / 'short', n_tokens=40)  # val.bin gets 10 tokens
    proc = run_train(*TINY, f'--data_dir={short}', f'--out_dir={tmp_path / "out"}')
    assert_one_line_error(proc, 'has 10 tokens', 'block_size=16', 'at least 17')


# -----------------------------------------------------------------------------
# DDP on CPU (gloo)

@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path, data):
    """torchrun with 2 processes trains on the same global batches as 1 process: losses agree to 1e-5 relative.

    The two differ only in the order of floating-point sums (gradients are averaged across ranks).
    """
    ddp = assert_ddp_matches_single_process(tmp_path, *TINY, f'--data_dir={data}')
    assert ddp.stdout.count('step 3:') == 1  # only rank 0 prints
    # the accumulation count is global, so it must divide over the processes
    odd = torchrun('--standalone', '--nproc_per_node=2', 'train.py', *TINY, f'--data_dir={data}', '--max_iters=6',
                   '--gradient_accumulation_steps=3', f'--out_dir={tmp_path / "odd"}')
    assert odd.returncode != 0
    assert 'gradient_accumulation_steps=3 is the global count' in odd.stderr


@pytest.mark.slow
def test_multi_node_rendezvous_on_localhost(tmp_path, data):
    """Two torchrun 'nodes' (one process each) meet through a c10d rendezvous and train together."""
    port = free_port()
    common_args = ['--nnodes=2', '--nproc_per_node=1', '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{port}',
                   '--rdzv_id=test', 'train.py', *TINY, f'--data_dir={data}', '--gradient_accumulation_steps=2',
                   '--max_iters=4', '--eval_interval=4', f'--out_dir={tmp_path / "out"}']
    # the same command on both 'nodes', as in the README; the rendezvous assigns the ranks
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *common_args],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    try:
        results = [node.communicate(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (stdout, stderr) in zip(nodes, results):
        # Known torchrun race (pytorch/pytorch#69197): when the agent hosting the c10d store exits first,
        # the other agent's last poll of the store fails, after its worker finished successfully.
        agent_race = 'RendezvousConnectionError' in stderr and 'num_nodes_waiting' in stderr
        assert node.returncode == 0 or agent_race, stderr
        assert 'ChildFailedError' not in stderr, stderr  # no train.py process failed
    assert len(read_log(tmp_path / 'out', 'train')) == 4
    assert runs.load_checkpoint(tmp_path / 'out' / 'ckpt.pt')['iter_num'] == 4


@pytest.mark.slow  # ~20 s: two training runs and an evaluate.py run
def test_hellaswag_interval_logs_acc_norm_of_the_model_being_trained(tmp_path):
    """A GPT-2-vocabulary run with hellaswag_interval=2: acc_norm in log.jsonl at iterations 0, 2
    and 4, and the last one equals `evaluate.py hellaswag` on the checkpoint saved at iteration 4."""
    folder = make_dataset(tmp_path / 'gpt2data', vocab_size=50257)
    (folder / 'meta.json').write_text(json.dumps({'vocab_size': 50257, 'tokenizer': 'gpt2'}))
    examples = [{'ctx': f'Example {k}: a person opens the door and', 'label': k % 4,
                 'endings': ['walks in.', 'closes it again slowly.', 'waves', f'sees {k} cats on the mat.']}
                for k in range(3)]
    hs_file = tmp_path / 'hs.jsonl'
    hs_file.write_text(''.join(json.dumps(e) + '\n' for e in examples))
    out = tmp_path / 'out'
    proc = run_train(*TINY, f'--data_dir={folder}', f'--out_dir={out}', '--max_iters=4', '--eval_interval=2',
                     '--hellaswag_interval=2', f'--hellaswag_input={hs_file}')
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in open(out / 'log.jsonl')]
    hs = [r for r in rows if r['kind'] == 'hellaswag']
    assert [r['iter'] for r in hs] == [0, 2, 4] and all(r['examples'] == 3 for r in hs)
    assert 'step 4: hellaswag acc_norm' in proc.stdout and (out / 'loss.png').is_file()
    check = subprocess.run([sys.executable, 'evaluate.py', 'hellaswag', f'--out_dir={out}', f'--input={hs_file}',
                            '--device=cpu'], cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().splitlines()[-1] == (f"hellaswag: 3 examples, acc {hs[-1]['acc']:.4f}, "
                                                     f"acc_norm {hs[-1]['acc_norm']:.4f}")
    # a run on data with another tokenizer refuses at the start, in one line
    small = make_dataset(tmp_path / 'small')
    assert_one_line_error(run_train(*TINY, f'--data_dir={small}', f'--out_dir={tmp_path / "o2"}', '--max_iters=2',
                                    '--hellaswag_interval=2', f'--hellaswag_input={hs_file}'),
                          'hellaswag_interval needs GPT-2 BPE data')


def test_progress_lines_show_the_step_count_and_the_time_left(tmp_path, data):
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}', '--max_iters=6', '--eval_interval=3')
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith('iter ')]
    assert [line.split(':')[0] for line in lines] == [f'iter {i}/6' for i in range(6)]
    assert all(line.endswith(' left') and 'mfu' not in line for line in lines)
    assert proc.stdout.count('mfu: not shown (no known peak FLOP/s for cpu') == 1  # said once


def lines_until_the_long_run_notice(*args):
    """The output lines of a train.py run of 10^8 iterations, up to its 'notice: at ...' line."""
    proc = subprocess.Popen([sys.executable, 'train.py', *args, '--max_iters=100000000', '--eval_interval=100000000',
                             '--eval_at_start=False'],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith('notice: at ') or len(seen) > 200:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    return seen


def test_a_run_of_hours_says_so_and_names_a_cpu_recipe(tmp_path, data):
    """A GPU-sized run on a CPU used to run for hours without a word; after a few steps it says
    how long it will take, once, with what to run instead."""
    seen = lines_until_the_long_run_notice(*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "o"}')
    notice = [line for line in seen if line.startswith('notice: at ')]
    assert len(notice) == 1 and 'iterations left take about' in notice[0], ''.join(seen[-20:])
    assert 'on a CPU, shrink it' in notice[0] and 'config/train_shakespeare_char_cpu.py' in notice[0]


def test_the_cpu_recipe_running_slowly_is_not_told_to_run_itself(tmp_path, data):
    """The quick start's own config on a slow or busy CPU: the notice names no config (the one
    running is the CPU recipe) but the likely causes, and its pace is the progress line's."""
    seen = lines_until_the_long_run_notice('config/train_shakespeare_char_cpu.py', *TINY, '--log_interval=5',
                                           f'--data_dir={data}', f'--out_dir={tmp_path / "o"}')
    notice = [line for line in seen if line.startswith('notice: at ')]
    assert len(notice) == 1, ''.join(seen[-20:])
    assert 'config/' not in notice[0] and 'already' in notice[0] and 'busy' in notice[0], notice[0]
    # the pace quoted is the one on the progress line just above (the iterations since the last line)
    line_above = seen[seen.index(notice[0]) - 1]
    assert line_above.startswith('iter 5/'), line_above
    assert line_above.split(', ')[2] == notice[0].split()[2].rstrip(','), (line_above, notice[0])


def test_time_left_follows_the_pace_of_the_iterations_since_the_last_line():
    """The first line's pace holds the first step's start-up cost (allocation, compilation): the
    next line's replaces it, and a line over many iterations outweighs one over a single step."""
    left = cli.TimeLeft(max_iters=1500, eval_interval=500)
    left.after_step(1, 0.9)  # iteration 0, on a machine that was still quiet
    assert left.after_step(51, 3.236) == pytest.approx((1500 - 51) * 3.236)  # 50 iterations, then busy
    assert left.pace == pytest.approx(3.236)
    left.after_step(52, 1.0)  # one faster step moves the pace a little, 50 would replace it
    assert 2.5 < left.pace < 3.236
    left.evaluation_took(10.0)
    assert left.after_step(102, 2.0) == pytest.approx((1500 - 102) * 2.0 + 3 * 10.0, rel=1e-3)


def test_tiny_data_for_the_model_is_named_before_training(tmp_path):
    small = make_dataset(tmp_path / 'small', n_tokens=400)
    proc = run_train(*TINY, f'--data_dir={small}', f'--out_dir={tmp_path / "out"}', '--max_iters=2000',
                     '--eval_interval=1000', '--n_embd=64', '--max_iters=1')
    assert proc.returncode == 0, proc.stderr
    assert 'notice: the training split holds 400 tokens' in proc.stdout and 'memorize' in proc.stdout
    big = make_dataset(tmp_path / 'big', n_tokens=40000)
    proc = run_train(*TINY, f'--data_dir={big}', f'--out_dir={tmp_path / "out2"}', '--max_iters=1')
    assert 'memorize' not in proc.stdout


@pytest.mark.parametrize('train_tokens, n_params, tokens_to_read, memorizes', [
    (40_500, 1_782_528, 1500 * 2048, True),  # README's own-text command on 45,000 characters
    (18_945, 1_869_504, 200 * 2048, True),  # 200 steps on them in a 512-token BPE: train 0.81, val 4.52
    (SMALL_DATA - 5000, 1_782_528, 1500 * 2048, True),  # under prepare.py's SMALL_DATA: it warns too
    (SMALL_DATA + 10000, 1_782_528, 1500 * 2048, False),  # over it: prepare.py is silent, so is train.py
    (40_500, 1_782_528, 50 * 2048, False),  # 50 steps read the text twice: too few to memorize it
    (40_500, 102_400, 300 * 2048, False),  # README's settings for tens of kilobytes
    (1_003_854, 1_782_528, 1500 * 2048, False),  # the quick start
    (1_003_854, 10_646_784, 5000 * 64 * 256, False),  # nanoGPT's baby GPT (config/train_shakespeare_char.py)
])
def test_small_data_notice_agrees_with_prepare_and_the_readme(train_tokens, n_params, tokens_to_read, memorizes):
    """The runs that memorized silently (the two first) are named; prepare.py's threshold is the
    same for the quick start's model; the settings README gives for small texts are not."""
    notice = small_data_notice(train_tokens, n_params, tokens_to_read)
    assert (notice is not None) == memorizes, notice
    if memorizes:
        assert f'{train_tokens:,} tokens' in notice and "README, 'Train on your own text'" in notice


def test_own_text_of_45k_characters_is_named_by_prepare_and_by_train(tmp_path):
    """README's own-text commands on a 45,000-character text: prepare.py's notice, and train.py's
    once before it trains (it said nothing, then memorized the text)."""
    source = SHAKESPEARE.read_text(encoding='utf-8') if SHAKESPEARE else ''.join(
        f"Line {i}: to be, or not to be, that is question {i * 7}.\n" for i in range(1000))
    (tmp_path / 'mine.txt').write_text(source[:45000], encoding='utf-8')
    prep = subprocess.run([sys.executable, 'prepare.py', 'text', f'--input={tmp_path / "mine.txt"}', '--tokenizer=char',
                           '--name=mine', f'--data_dir={tmp_path / "data"}'], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert prep.returncode == 0, prep.stderr
    assert 'notice: 40,500 training tokens is little text' in prep.stdout, prep.stdout
    # the quick start's recipe as README's command runs it; eval_only: the start lines, one evaluation
    proc = run_train('config/train_shakespeare_char_cpu.py', f'--data_dir={tmp_path / "data" / "mine"}',
                     f'--out_dir={tmp_path / "out"}', '--eval_only=True', '--eval_iters=1')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count('memorize') == 1, proc.stdout
    assert 'notice: the training split holds 40,500 tokens' in proc.stdout


# -----------------------------------------------------------------------------
# train.py as a reader meets it: --help, a bare run, the start lines, its own structure

def test_help_groups_the_knobs_under_headings_within_100_columns():
    proc = run_train('--help')
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    headings = [line.split(':')[0] for line in lines if line and not line.startswith((' ', 'usage', 'knobs'))]
    for wanted in ('run', 'data', 'model', 'optimizer', 'learning rate schedule', 'system'):
        assert wanted in headings, headings
    assert headings.index('data') < headings.index('model') < headings.index('optimizer') < headings.index('system')
    flags = [line.split()[0].split('=')[0] for line in lines if line.startswith('  --')]
    assert sorted(flags) == sorted(f'--{k}' for k in train_defaults())  # every knob, once
    model_part = proc.stdout.split('\nmodel')[1].split('\n\n')[0]
    assert '--pos_emb=' in model_part and '--qk_norm=' in model_part  # model.py's knobs under 'model'
    assert 'Chinchilla' not in proc.stdout and 'MFU' not in proc.stdout
    assert 'Nesterov' not in proc.stdout or "look-ahead" in proc.stdout
    ns = next(line for line in lines if '--muon_ns_steps' in line)
    assert 'orthogonal' in ns  # what Newton-Schulz does, not only its name


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available() or
                    (REPO / 'data' / 'openwebtext' / 'train.bin').exists(),
                    reason='the case is a machine with no GPU and no OpenWebText prepared')
def test_bare_run_on_a_cpu_points_at_the_cpu_quick_start(tmp_path):
    """`python train.py` with no config trains GPT-2 on OpenWebText, a GPU job: on a CPU the error
    names the CPU quick start, and still how to get OpenWebText."""
    proc = subprocess.run([sys.executable, str(REPO / 'train.py')], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert_one_line_error(proc, 'python prepare.py shakespeare_char',
                          'python train.py config/train_shakespeare_char_cpu.py', 'python prepare.py openwebtext')
    assert list(tmp_path.iterdir()) == []


def test_missing_openwebtext_on_a_gpu_says_how_to_prepare_it(tmp_path):
    from types import SimpleNamespace
    from lib.batches import Batches
    gpu = SimpleNamespace(device_type='cuda', device='cuda')
    with pytest.raises(cli.ConfigError) as e:
        Batches(str(tmp_path / 'openwebtext'), 'openwebtext', gpu, seed=0, batch_size=1, block_size=8,
                accumulation=1, batch_warmup=0, seq_warmup=0, eval_iters=1)
    assert 'python prepare.py openwebtext' in e.value.message and 'shakespeare' not in e.value.message


def test_the_model_line_and_the_parameter_table_count_the_same_parameters(tmp_path, data):
    """A bigram table is an embedding: the start printed '0.03M parameters' and then a table whose
    total counted it too. The model line now gives the table's total (and names the other count)."""
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}', '--max_iters=1',
                     '--bigram_vocab=64')
    assert proc.returncode == 0, proc.stderr
    model_line = next(line for line in proc.stdout.splitlines() if line.startswith('model:'))
    total_line = next(line for line in proc.stdout.splitlines() if line.startswith('total'))
    total = total_line.split()[1]
    assert model_line.startswith(f'model: {total} parameters'), (model_line, total_line)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=16, bias=False,
                          bigram_vocab=64))
    assert total == f"{sum(p.numel() for p in model.parameters()):,}"
    assert f"{model.get_num_params():,} without" in model_line  # the other count, named


def test_init_from_is_read_in_one_place_with_one_error(tmp_path, data):
    folder = tmp_path / 'hf'
    save_hf(GPT(GPTConfig(block_size=32, vocab_size=16, n_layer=1, n_head=2, n_embd=16)), folder)
    ckpt = tmp_path / 'run' / 'ckpt.pt'
    ckpt.parent.mkdir()
    ckpt.write_bytes(b'x')
    kinds = {name: loading.init_kind(name, scratch=True) for name in
             ['scratch', 'resume', 'gpt2', 'gpt2-xl', str(folder), str(ckpt)]}
    assert list(kinds.values()) == ['scratch', 'resume', 'pretrained', 'pretrained', 'pretrained', 'checkpoint']
    for bad in ['gpt3', 'gpt2-huge', str(tmp_path / 'run' / 'other.pt')]:
        with pytest.raises(cli.ConfigError, match=f"init_from='{bad}' not understood"):
            loading.init_kind(bad, scratch=True)
    with pytest.raises(cli.ConfigError, match=r"not understood \(no such file or folder\)"):
        loading.init_kind(str(tmp_path / 'missing' / 'ckpt.pt'), scratch=True)
    with pytest.raises(cli.ConfigError, match="not understood: use resume, gpt2"):
        loading.init_kind('scratch')  # scratch has no weights to load (sample.py, evaluate.py, ...)
    # train.py and sample.py say it in the same words
    train = run_train(*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "o"}', '--init_from=gpt3')
    sample = subprocess.run([sys.executable, 'sample.py', '--init_from=gpt3', '--device=cpu'], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=ENV)
    for proc in (train, sample):
        assert_one_line_error(proc, "init_from='gpt3' not understood: use ",
                              "gpt2, gpt2-medium, gpt2-large, gpt2-xl, the path of a local Hugging Face model "
                              "folder or of a run's ckpt.pt")


def test_batch_plan_splits_the_same_draws_over_processes_and_counts_warmup_tokens(tmp_path, data):
    from types import SimpleNamespace
    from lib.batches import Batches
    cpu = SimpleNamespace(device_type='cpu', device='cpu')
    common = dict(seed=3, batch_size=4, block_size=16, accumulation=4, batch_warmup=8, seq_warmup=0, eval_iters=2)
    one = Batches(str(data), 'test', cpu, **common)
    two = [Batches(str(data), 'test', cpu, rank=r, world_size=2, **common) for r in (0, 1)]
    for it in (0, 5, 9):
        offsets, seeds = one.plan(it)
        halves = [b.plan(it) for b in two]
        assert np.array_equal(offsets, np.concatenate([h[0] for h in halves]))
        assert np.array_equal(seeds, np.concatenate([h[1] for h in halves]))
    assert [one.shape(it)[0] for it in range(9)] == [1, 1, 1, 2, 2, 2, 3, 3, 4]  # 2/8 .. 7/8 of 4, then 4
    assert one.tokens_through(9) == 4 * 16 * sum(one.shape(it)[0] for it in range(9))
    assert one.tokens_through(12) - one.tokens_through(9) == 3 * 4 * 4 * 16
    x, y = one.get('train', one.plan(0)[0][0], 8)
    assert x.shape == y.shape == (1, 8) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(cli.ConfigError, match='gradient_accumulation_steps=4 is the global count'):
        Batches(str(data), 'test', cpu, rank=0, world_size=3, **common)


def test_train_py_reads_top_to_bottom():
    """The shape of train.py a reader relies on: about 400 lines of at most 100 characters; no
    function reads a variable the loop assigns, no `global`; the optimizer and compile knobs keep
    their meaning (never rebound to an object)."""
    import ast
    source = (REPO / 'train.py').read_text()
    lines = source.splitlines()
    assert len(lines) <= 430 and max(map(len, lines)) <= 100
    tree = ast.parse(source)
    assert not any(isinstance(node, (ast.Global, ast.Nonlocal)) for node in ast.walk(tree))
    loop = next(node for node in tree.body if isinstance(node, ast.While))
    assigned_in_loop = {n.id for n in ast.walk(loop) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    assert {'iter_num', 'lr', 'loss', 'best_val_loss'} <= assigned_in_loop
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))]:
        local = {a.arg for a in fn.args.args} | {n.id for n in ast.walk(fn)
                                                   if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        read = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert not (read - local) & assigned_in_loop, (getattr(fn, 'name', 'lambda'), (read - local) & assigned_in_loop)
    knob_block = {n.targets[0].id: n.lineno for n in tree.body if isinstance(n, ast.Assign)
                  and isinstance(n.targets[0], ast.Name) and n.targets[0].id in ('optimizer', 'compile')}
    for node in ast.walk(tree):
        for target in getattr(node, 'targets', [getattr(node, 'target', None)]):
            if isinstance(target, ast.Name) and target.id in knob_block:
                assert node.lineno == knob_block[target.id], f"{target.id} rebound at line {node.lineno}"
