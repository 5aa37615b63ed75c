"""
What several test modules share: the repository's root, a quiet environment for subprocesses, a
tiny model's flags, a learnable random dataset, running train.py and torchrun, and assertions on
their logs and errors, serve.py in a child process and the browser that drives its playground. A
helper module, not a test module (tests import this, never each other).
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
# One thread per process: tiny models gain nothing from more, and the runs stay fast on a busy machine.
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
# A model small enough that an iteration takes milliseconds.
TINY = ['--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4',
        '--eval_iters=2', '--log_interval=1', '--warmup_iters=2', '--lr_decay_iters=20',
        '--learning_rate=1e-2', '--min_lr=1e-3', '--compile=False', '--gradient_accumulation_steps=1']


def make_dataset(folder, n_tokens=4000, vocab_size=16):
    """A learnable token stream: a repeating 0..vocab-1 ramp with 10% random tokens mixed in."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens = np.arange(n_tokens, dtype=np.uint16) % vocab_size
    noise = rng.random(n_tokens) < 0.1
    tokens[noise] = rng.integers(0, vocab_size, noise.sum())
    tokens.tofile(folder / 'train.bin')
    tokens[: n_tokens // 4].tofile(folder / 'val.bin')
    (folder / 'meta.json').write_text(json.dumps({'vocab_size': vocab_size}))
    return folder


def run_train(*args, timeout=120):
    """Run train.py with args; return the CompletedProcess (text output captured)."""
    return subprocess.run([sys.executable, 'train.py', *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def read_log(out_dir, kind=None):
    """[(iter, kind, split, loss)] from out_dir/log.jsonl, optionally only one kind ('train' or 'eval')."""
    rows = [json.loads(line) for line in open(Path(out_dir) / 'log.jsonl')]
    return [(r['iter'], r['kind'], r['split'], r['loss']) for r in rows if kind in (None, r['kind'])]


def assert_same_losses(a_dir, b_dir, rel):
    """Two runs logged the same (iteration, kind, split) rows with losses equal to rel (relative):
    1e-6 for a resume (bit-for-bit up to summation order), 1e-5 for DDP (sums in another order)."""
    a, b = read_log(a_dir), read_log(b_dir)
    assert [row[:3] for row in a] == [row[:3] for row in b]
    assert [row[3] for row in a] == pytest.approx([row[3] for row in b], rel=rel, abs=0)


def assert_exact_resume(args, tmp_path, iters):
    """`iters` iterations straight give the losses of iters // 2, a stop and a resume to `iters`
    (into tmp_path/'straight' and tmp_path/'resumed'). Returns the straight run's folder and the
    resuming process."""
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    proc = run_train(*args, f'--out_dir={straight}', f'--max_iters={iters}')
    assert proc.returncode == 0, proc.stderr
    assert run_train(*args, f'--out_dir={resumed}', f'--max_iters={iters // 2}').returncode == 0
    proc = run_train(*args, f'--out_dir={resumed}', f'--max_iters={iters}', '--init_from=resume')
    assert proc.returncode == 0, proc.stderr
    assert_same_losses(straight, resumed, rel=1e-6)
    return straight, proc


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0, proc.stdout
    assert 'Traceback' not in proc.stderr, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(error_lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(*args, timeout=180):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def assert_ddp_matches_single_process(tmp_path, *args):
    """Train 6 iterations (4 micro-steps each, dropout on) in 1 process and under torchrun with 2:
    the losses agree to 1e-5 relative. Returns torchrun's CompletedProcess."""
    args = ['train.py', *args, '--gradient_accumulation_steps=4', '--max_iters=6', '--eval_interval=3', '--dropout=0.1']
    single = run_train(*args[1:], f'--out_dir={tmp_path / "single"}')
    assert single.returncode == 0, single.stderr
    ddp = torchrun('--standalone', '--nproc_per_node=2', *args, f'--out_dir={tmp_path / "ddp"}')
    assert ddp.returncode == 0, ddp.stderr
    assert_same_losses(tmp_path / 'single', tmp_path / 'ddp', rel=1e-5)
    return ddp


def train_defaults():
    """The knobs at the top of train.py: its module-level `name = literal` assignments up to the
    RULES table, plus the GPTConfig fields it takes from model.py (cli.model_knobs)."""
    import ast
    tree = ast.parse((REPO / 'train.py').read_text())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', None) == 'RULES':
            break  # the knobs end here
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass  # not a knob (e.g. config_keys)
    from lib import cli
    return {**defaults, **cli.model_knobs(defaults)}


def modern_knobs(**numbers):
    """[(id, {knob: value})]: every value away from GPT-2's of each modern GPTConfig knob (every
    field but GPT-2's), derived from the fields so that a new knob is covered with no edit here:
    the other options of a Literal, the other bool, and for a number numbers[knob] if given, else
    twice its default (37 for an int whose default 0 means off, 0.5 for such a float)."""
    from dataclasses import fields
    from typing import Literal, get_args, get_origin

    from model import GPT2_FIELDS, GPTConfig
    knobs = []
    for f in fields(GPTConfig):
        if f.name in GPT2_FIELDS:
            continue
        if get_origin(f.type) is Literal:
            values = [v for v in get_args(f.type) if v != f.default]
        elif f.type is bool:
            values = [not f.default]
        elif f.name in numbers:
            values = [numbers[f.name]]
        else:
            values = [f.type(2 * f.default if f.default else 37 if f.type is int else 0.5)]
        knobs += [(f"{f.name}={v}", {f.name: v}) for v in values]
    return knobs


def every_knob(**numbers):
    """Every modern knob away from GPT-2 at once: the first value modern_knobs gives each."""
    merged = {}
    for _, kw in modern_knobs(**numbers):
        for name, value in kw.items():
            merged.setdefault(name, value)
    return merged


# ----------------------------------------------------------------------------- serve.py

class Server:
    """serve.py in a child process on a free port of 127.0.0.1 (argv: its flags); post() and get()
    one request each, on a connection of their own; errors() what it has logged; stop() SIGTERM.
    As a context manager (a module's fixture), it kills the child on leaving if it still runs."""

    def __init__(self, *argv):
        self.log = tempfile.TemporaryFile('w+')  # one line per request: a pipe nobody reads would fill up
        self.proc = subprocess.Popen([sys.executable, 'serve.py', '--port=0', '--device=cpu', *map(str, argv)],
                                     cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=self.log, text=True)
        for line in self.proc.stdout:
            found = re.search(r"at (http://127\.0\.0\.1:(\d+))$", line.strip())
            if found:
                self.url, self.port = found.group(1), int(found.group(2))
                break
        else:
            raise RuntimeError(self.errors())

    def post(self, path, body, raw=False):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=60)
        conn.request('POST', path, body if raw else json.dumps(body), {'Content-Type': 'application/json'})
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    def get(self, path):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=60)
        conn.request('GET', path)
        r = conn.getresponse()
        return r.status, r.read()

    def health_when_idle(self, timeout=30):
        """GET /health once no request is running any more (or after timeout seconds)."""
        deadline = time.time() + timeout
        while json.loads(self.get('/health')[1])['running'] and time.time() < deadline:
            time.sleep(0.05)
        return json.loads(self.get('/health')[1])

    def errors(self):
        self.log.seek(0)
        return self.log.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, self.errors()


def chromium():
    """(Debian's chromium, None) where it and playwright are here, else (None, how to get them)."""
    path = shutil.which('chromium') or shutil.which('chromium-browser')
    if path is None:
        return None, "no chromium here: apt-get install chromium (.ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "playwright drives the browser: pip install playwright (in requirements-dev.txt)"
    return path, None


CHROMIUM, NO_CHROMIUM = chromium()
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
