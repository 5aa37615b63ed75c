"""
Runs that survive failures and mistakes: auto_resume (one process and torchrun's restarts),
resumes that take the run's own knobs, checkpoints by time with keep_last, a damaged newest
checkpoint, no silent overwrite of a run, a clock that goes on across resumes, and the chaos
tests: workers killed with SIGKILL at random moments, the run still ends as if uninterrupted.
"""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib import hardware, runs
from helpers import (ENV, REPO, TINY, assert_one_line_error, assert_same_losses, make_dataset, read_log, run_train,
                     torchrun)

# a run whose checkpoints come often: every 2 iterations, plus every step by time
ARGS = [*TINY, '--eval_interval=2', '--max_iters=8']


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / 'data')


def files_of(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def test_the_same_command_again_continues_the_run_exactly(tmp_path, data):
    """auto_resume (the default): a command that stopped at iteration 4 continues when run again,
    and the result equals a run that was never interrupted."""
    straight, twice = tmp_path / 'straight', tmp_path / 'twice'
    assert run_train(*ARGS, f'--data_dir={data}', f'--out_dir={straight}').returncode == 0
    assert run_train(*ARGS, f'--data_dir={data}', f'--out_dir={twice}', '--max_iters=4').returncode == 0
    proc = run_train(*ARGS, f'--data_dir={data}', f'--out_dir={twice}')
    assert proc.returncode == 0, proc.stderr
    assert 'resuming from' in proc.stdout and 'auto_resume' in proc.stdout
    assert_same_losses(straight, twice, rel=1e-6)
    a, b = runs.load_checkpoint(straight / 'ckpt.pt'), runs.load_checkpoint(twice / 'ckpt.pt')
    assert a['iter_num'] == b['iter_num'] == 8
    assert all(torch.allclose(a['model'][k], b['model'][k], rtol=1e-6, atol=0) for k in a['model'])
    # a finished run run again: nothing lost, nothing trained twice, and no evaluation that would only
    # repeat the last one; it says the run is finished and how to train it longer
    before = files_of(twice)
    again = run_train(*ARGS, f'--data_dir={data}', f'--out_dir={twice}')
    assert again.returncode == 0, again.stderr
    assert f'{twice} holds a finished run' in again.stdout and 'at iteration 8' in again.stdout, again.stdout
    longer = again.stdout.split('to train it longer: ', 1)[1].split(';')[0]
    assert longer == f'python train.py --out_dir={twice} --max_iters=16 --lr_decay_iters=16', again.stdout
    assert 'step 8:' not in again.stdout and 'done:' not in again.stdout  # no evaluation, no summary
    assert files_of(twice) == before
    assert_same_losses(straight, twice, rel=1e-6)
    # the command it printed trains it longer; eval_only still evaluates a finished run
    longer = subprocess.run(shlex.split(longer.replace('python', sys.executable, 1)), cwd=REPO, capture_output=True,
                            text=True, env=ENV, timeout=120)
    assert longer.returncode == 0 and 'resuming from' in longer.stdout, longer.stderr
    assert runs.load_checkpoint(twice / 'ckpt.pt')['iter_num'] == 16
    evaluated = run_train(*ARGS, f'--data_dir={data}', f'--out_dir={twice}', '--max_iters=16', '--eval_only=True')
    assert evaluated.returncode == 0 and 'step 16: train loss' in evaluated.stdout, evaluated.stderr


@pytest.mark.slow
def test_a_finished_run_run_again_under_torchrun_says_so_once_and_every_rank_exits_0(tmp_path, data):
    out = tmp_path / 'out'
    args = ['--standalone', '--nproc_per_node=2', '--max-restarts=1', 'train.py', *ARGS, f'--data_dir={data}',
            f'--out_dir={out}', '--gradient_accumulation_steps=2', '--max_iters=4']
    assert torchrun(*args).returncode == 0
    before = files_of(out)
    again = torchrun(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count('holds a finished run') == 1 and 'step 4:' not in again.stdout, again.stdout
    assert files_of(out) == before


def test_resume_takes_the_runs_own_knobs_and_the_printed_hint_works(tmp_path, data):
    """Ctrl-C prints how to continue; that command, run exactly as printed, finishes the run with
    the knobs it was started with (dataset, model, schedule), not train.py's defaults."""
    out = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, 'train.py', *TINY, f'--data_dir={data}', f'--out_dir={out}',
                             '--max_iters=400', '--eval_interval=1000', '--eval_at_start=False', '--n_layer=1'],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / 'log.jsonl').exists() and len(read_log(out, 'train')) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == hardware.STOPPED, stderr  # stopped, not finished: a job script can tell
    assert 'best val loss' not in stdout and 'sample.py' not in stdout  # no evaluation yet, nothing to sample
    hint = stdout.split('continue with: ', 1)[1].splitlines()[0]
    stopped_at = runs.load_checkpoint(out / 'ckpt.pt')['iter_num']
    assert 'loss curve' not in stdout and not (out / 'loss.png').exists()  # no evaluation drew it
    again = subprocess.run(shlex.split(hint.replace('python', sys.executable, 1)), cwd=REPO, capture_output=True,
                           text=True, env=ENV, timeout=120)
    assert again.returncode == 0, again.stderr
    ckpt = runs.load_checkpoint(out / 'ckpt.pt')
    assert ckpt['iter_num'] == 400 and ckpt['model_args']['n_layer'] == 1 and stopped_at < 400
    assert [row[0] for row in read_log(out, 'train')] == list(range(400))  # no duplicate, none missing
    times = [json.loads(line)['time'] for line in open(out / 'log.jsonl')]
    assert times == sorted(times)  # the clock goes on across the resume (plot.py --x=time)


def test_a_fresh_start_never_replaces_a_run_silently(tmp_path, data):
    out = tmp_path / 'out'
    assert run_train(*ARGS, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=4').returncode == 0
    before = files_of(out)
    proc = run_train(*ARGS, f'--data_dir={data}', f'--out_dir={out}', '--auto_resume=False')
    assert_one_line_error(proc, str(out), 'already holds a run', '--overwrite=True', '--init_from=resume')
    assert files_of(out) == before
    # a command for another kind of run (here another model) does not continue this one either
    proc = run_train(*ARGS, f'--data_dir={data}', f'--out_dir={out}', '--n_layer=3')
    assert_one_line_error(proc, 'n_layer=2', 'n_layer=3', '--overwrite=True')
    assert files_of(out) == before
    # --overwrite=True replaces it: a new run from iteration 0, no checkpoint of the old one left
    proc = run_train(*ARGS, f'--data_dir={data}', f'--out_dir={out}', '--n_layer=3', '--overwrite=True',
                     '--max_iters=2', '--keep_last=3')
    assert proc.returncode == 0, proc.stderr
    assert [row[0] for row in read_log(out, 'train')] == [0, 1]
    assert runs.load_checkpoint(out / 'ckpt.pt')['model_args']['n_layer'] == 3
    deleted = [line for line in proc.stdout.splitlines() if 'deleted' in line]  # one line says what went
    assert len(deleted) == 1 and '--overwrite=True' in deleted[0], proc.stdout
    assert f"{out / 'ckpt.pt'} (iteration 4)" in deleted[0] and 'log.jsonl' in deleted[0], deleted[0]


def test_checkpoints_by_time_keep_the_last_ones(tmp_path, data):
    """checkpoint_interval_s saves between evaluations; keep_last keeps that many checkpoints,
    the newest always ckpt.pt."""
    out = tmp_path / 'out'
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=7', '--eval_interval=100',
                     '--checkpoint_interval_s=1e-9', '--keep_last=3')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count('s since the last save') == 6  # after steps 1..6; after 7 max_iters' evaluation saves
    assert sorted(p.name for p in out.glob('ckpt*.pt')) == ['ckpt-5.pt', 'ckpt-6.pt', 'ckpt.pt']
    assert [runs.load_checkpoint(out / n)['iter_num'] for n in ('ckpt.pt', 'ckpt-6.pt', 'ckpt-5.pt')] == [7, 6, 5]


@pytest.mark.parametrize('damage', ['truncated', 'not_a_checkpoint'])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, data, damage):
    straight, out = tmp_path / 'straight', tmp_path / 'out'
    assert run_train(*ARGS, f'--data_dir={data}', f'--out_dir={straight}').returncode == 0
    assert run_train(*ARGS, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=6', '--keep_last=2').returncode == 0
    ckpt = out / 'ckpt.pt'
    if damage == 'truncated':
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    else:
        torch.save({'weights': torch.zeros(2)}, ckpt)
    proc = run_train(*ARGS, f'--data_dir={data}', f'--out_dir={out}', '--keep_last=2')
    assert proc.returncode == 0, proc.stderr
    assert 'passing over' in proc.stdout and 'resuming from' in proc.stdout and 'ckpt-4.pt' in proc.stdout
    assert_same_losses(straight, out, rel=1e-6)  # iterations 4, 5 redone exactly; none twice in the log
    # only damaged checkpoints left: one line, no fresh start over them
    for path in out.glob('ckpt*.pt'):
        path.write_bytes(b'not a checkpoint')
    before = files_of(out)
    assert_one_line_error(run_train(*ARGS, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=10'), 'ckpt')
    assert files_of(out) == before


def kill_at_random_moments(start, out, kills, victims, seed):
    """Start the run with start(); `kills` times, once the train.py processes of the moment have
    trained and saved a checkpoint, SIGKILL one of them (victims()) after a random pause of
    0-0.5 s. Returns the process."""
    rng = random.Random(seed)
    proc, killed, since = start(), set(), time.time()
    for _ in range(kills):
        deadline = time.time() + 180
        while time.time() < deadline:
            pids = [p for p in victims(proc) if p not in killed and 'train.py' in cmdline(p)]
            ckpt = out / 'ckpt.pt'
            if pids and ckpt.exists() and ckpt.stat().st_mtime > since:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
        pids = [p for p in victims(proc) if p not in killed and 'train.py' in cmdline(p)]
        assert pids, "nothing to kill: the run ended before the chaos"
        victim = rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        killed.add(victim)
        since = time.time()
    return proc


def cmdline(pid):
    try:
        return Path(f'/proc/{pid}/cmdline').read_bytes().decode(errors='replace')
    except OSError:
        return ''


CHAOS = [*TINY, '--max_iters=400', '--eval_interval=50', '--checkpoint_interval_s=0.3',
         '--gradient_accumulation_steps=2', '--dropout=0.1']


def assert_same_run(straight, chaotic):
    """The same log rows (no duplicate or missing iteration) with the same losses, and the same final weights."""
    assert_same_losses(straight, chaotic, rel=1e-5)
    a, b = runs.load_checkpoint(straight / 'ckpt.pt'), runs.load_checkpoint(chaotic / 'ckpt.pt')
    assert a['iter_num'] == b['iter_num'] == 400
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_chaos_one_process_restarted_by_a_loop_after_kill_9(tmp_path, data):
    straight, chaotic = tmp_path / 'straight', tmp_path / 'chaotic'
    assert run_train(*CHAOS, f'--data_dir={data}', f'--out_dir={straight}', timeout=300).returncode == 0
    # what a job script does: run the same command until it succeeds
    loop = (f"until {shlex.quote(sys.executable)} train.py {' '.join(map(shlex.quote, CHAOS))} "
            f"--data_dir={shlex.quote(str(data))} --out_dir={shlex.quote(str(chaotic))}; do sleep 0.1; done")

    def workers(loop):  # the loop's child: the train.py of the moment
        found = subprocess.run(['pgrep', '-P', str(loop.pid)], capture_output=True, text=True)
        return [int(p) for p in found.stdout.split()]

    proc = kill_at_random_moments(lambda: subprocess.Popen(['bash', '-c', loop], cwd=REPO, env=ENV, text=True,
                                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE),
                                  chaotic, kills=2, victims=workers, seed=0)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert stdout.count('resuming from') >= 2, stdout  # both kills hit a running train.py
    assert_same_run(straight, chaotic)
    assert not (chaotic / 'run.lock').exists()


@pytest.mark.slow
def test_chaos_torchrun_restarts_workers_killed_with_sigkill(tmp_path, data):
    straight, chaotic = tmp_path / 'straight', tmp_path / 'chaotic'
    assert run_train(*CHAOS, f'--data_dir={data}', f'--out_dir={straight}', timeout=300).returncode == 0

    def start():
        return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                                 '--max-restarts=3', 'train.py', *CHAOS, f'--data_dir={data}', f'--out_dir={chaotic}'],
                                cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)

    def workers(proc):  # torchrun's children: its worker processes
        found = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True)
        return [int(p) for p in found.stdout.split()]

    proc = kill_at_random_moments(start, chaotic, kills=2, victims=workers, seed=1)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count('resuming from') >= 2, stdout
    assert_same_run(straight, chaotic)
    assert not (chaotic / 'run.lock').exists()


@pytest.mark.slow
def test_torchrun_error_line_reaches_the_user_every_time(tmp_path):
    """A bad input under torchrun: the `error:` line is in the output 10 times out of 10 (rank 0's
    own line, or torchrun's failure summary when torchrun stopped rank 0 first), and no lock or
    folder is left behind."""
    out = tmp_path / 'out'
    for _ in range(10):
        proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                               'train.py', *TINY, '--gradient_accumulation_steps=2', f'--data_dir={tmp_path / "no-data"}',
                               f'--out_dir={out}'],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert f"error: no {tmp_path / 'no-data' / 'train.bin'}" in proc.stderr, proc.stderr[-3000:]
        assert not out.exists()
