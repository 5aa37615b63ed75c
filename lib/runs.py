"""
A training run's folder: checkpoints (saved atomically, kept, loaded safely), the run lock (one
run per out_dir), the log.jsonl writer (lines kept on resume), the summary a run ends with, and
which folder to use when --out_dir is not given. Turning a checkpoint back into a model:
lib/loading.py.

    runs.save_checkpoint(obj, 'out/ckpt.pt')  # the old file survives a crash mid-save
    ckpt = runs.load_checkpoint('out/ckpt.pt')  # a clear error for a truncated or foreign file
"""

import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import torch

from lib import hardware
from lib.cli import ConfigError, die, duration
from lib.files import atomic_write, os_error_message


# Marks checkpoints written by this repository, so model_state_dict can tell them from nanoGPT's.
CHECKPOINT_FORMAT = 'gpt-train-checkpoint/1'


# -----------------------------------------------------------------------------
# files and checkpoints

def save_checkpoint(obj, path, keep_last=1):
    """Write obj with torch.save atomically (see atomic_write): a crash or kill -9 during the
    save leaves the previous checkpoint intact. keep_last > 1 keeps that many checkpoints in
    the folder: the newest is always ckpt.pt, the older ones ckpt-ITER.pt (their iter_num)."""
    path = Path(path)
    if keep_last > 1 and path.is_file() and isinstance(obj.get('iter_num'), int):
        previous = _iter_of(path)
        if previous is not None and previous != obj['iter_num']:
            older = path.with_name(f"{path.stem}-{previous}.pt")
            older.unlink(missing_ok=True)
            try:
                os.link(path, older)  # ckpt.pt stays in place until the new one replaces it
            except OSError as e:
                die(os_error_message(e, older))
    atomic_write(path, lambda f: torch.save(obj, f))
    for old in older_checkpoints(path.parent)[max(0, keep_last - 1):]:
        old.unlink(missing_ok=True)


def older_checkpoints(folder):
    """The ckpt-ITER.pt files of a run folder, newest (highest ITER) first."""
    found = []
    for p in Path(folder).glob('ckpt-*.pt'):
        suffix = p.stem[len('ckpt-'):]
        if suffix.isdigit():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found, reverse=True)]


def delete_checkpoints(out_dir):
    """Remove ckpt.pt and ckpt-ITER.pt of out_dir (a run replaced with --overwrite=True); returns
    what was deleted, each as 'PATH (iteration N)'."""
    deleted = []
    for path in [Path(out_dir) / 'ckpt.pt'] + older_checkpoints(out_dir):
        if path.is_file():
            deleted.append(f"{path} (iteration {_iter_of(path)})")
        path.unlink(missing_ok=True)
    return deleted


def _iter_of(path):
    """iter_num of the checkpoint at path, read without loading its tensors' data; None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location='meta', weights_only=True, mmap=True)
        return ckpt.get('iter_num') if isinstance(ckpt, dict) else None
    except Exception:
        return None


def load_checkpoint(path, map_location='cpu'):
    """Read a checkpoint written by train.py (or nanoGPT) safely: weights_only=True runs no pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: train first, or point --out_dir at the run's folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch's warnings would repeat the one line below
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a plain "
                          f"PyTorch checkpoint ({_torch_load_reason(e)}); nothing in it was run") from None
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConfigError(f"{path} is not a training checkpoint: expected keys 'model' and "
                          f"'model_args', found {found}")
    return ckpt


def _torch_load_reason(error):
    """The gist of a torch.load failure, without torch's advice to retry with weights_only=False:
    that would run the file's pickled code, which is exactly what a refused checkpoint must not do."""
    text = ' '.join(str(error).split())
    if 'Unsupported global' in text or 'weights_only' in text.lower() or 'WeightsUnpickler' in text:
        import re
        found = re.search(r'GLOBAL ([\w.]+)', text) or re.search(r'global:? ([\w.]+)', text)
        return f"it asks to load {found.group(1)}, refused" if found else "it holds objects other than tensors, refused"
    return text[:200] or type(error).__name__


def model_state_dict(ckpt):
    """The model weights of a checkpoint, with nanoGPT's '_orig_mod.' prefix removed.

    nanoGPT saves the state of the torch.compile wrapper, whose keys start with '_orig_mod.'.
    train.py saves the uncompiled model, so its checkpoints (marked by 'format') are returned as is.
    """
    state = ckpt['model']
    if ckpt.get('format') == CHECKPOINT_FORMAT:
        return state
    prefix = '_orig_mod.'
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}



# -----------------------------------------------------------------------------
# one training run per out_dir

class RunLock:
    """out_dir/run.lock holds 'PID HOST' of the run that writes out_dir; a second run stops.

    check() refuses a folder in use before any work is done, without writing anything;
    acquire() takes the lock before the first write. The file is created with O_EXCL (atomic).
    A lock whose process is gone (a run killed with kill -9) is taken over with a notice. A lock
    from another host cannot be checked from here: the message says to delete the file if that
    run is over. release() removes the file only if it is still ours (atexit calls it too).
    """

    NAME = 'run.lock'

    def __init__(self, out_dir):
        self.path = Path(out_dir) / self.NAME
        self.held = False
        self.made_dir = False

    def check(self):
        """Stop with one line if out_dir cannot be locked: not a folder, or in use by a live run.
        Returns the owner's PID of a lock that can be taken over, else None."""
        if self.path.parent.exists() and not self.path.parent.is_dir():
            die(f"out_dir {self.path.parent} is a file, not a folder; choose another --out_dir")
        if self.path.is_dir():
            die(f"{self.path} is a folder, not a lock file; remove it (rmdir {self.path}) or use another --out_dir")
        if not self.path.exists():
            return None
        pid, host = self._owner()
        if pid is not None and host != socket.gethostname():
            die(f"{self.path.parent} is in use by PID {pid} on host {host}; wait for that run, or "
                f"delete {self.path} if it is no longer running")
        if pid is not None and _pid_alive(pid):
            die(f"{self.path.parent} is in use by another run (PID {pid}); wait for it to finish, "
                f"stop it, or use another --out_dir")
        return pid

    def acquire(self, notice=print):
        mine = f"{os.getpid()} {socket.gethostname()}\n"
        self.check()
        for _ in range(3):  # a takeover can race with another takeover: retry a few times
            try:
                if not self.path.parent.is_dir():
                    self.path.parent.mkdir(parents=True)
                    self.made_dir = True  # removed again if the run ends before writing anything
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self.check()  # stops if a live run holds it
                if pid is None:
                    notice(f"notice: {self.path} is empty or unreadable (a run killed while starting); taking it over")
                else:
                    notice(f"notice: taking over {self.path} left by PID {pid}, which is no longer running")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                die(os_error_message(e, self.path))
            try:
                with os.fdopen(fd, 'w') as f:
                    f.write(mine)
            except OSError as e:
                self.path.unlink(missing_ok=True)
                die(os_error_message(e, self.path))
            self.held = True
            import atexit
            atexit.register(self.release)
            return self
        die(f"could not take {self.path}: another run keeps taking it; check which runs use {self.path.parent}")

    def _owner(self):
        try:
            pid, host = self.path.read_text().split()
            return int(pid), host
        except (OSError, ValueError):
            return None, None

    def release(self):
        if self.held and self._owner() == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)
            if self.made_dir:
                try:
                    self.path.parent.rmdir()  # only if empty: a run that failed at startup leaves no folder
                except OSError:
                    pass
        self.held = False


def read_log_lines(path, before_iter, notice=print):
    """The lines of a run's log.jsonl with iter < before_iter, for a resumed run that redoes the rest.
    A partial last line (a run killed while writing it) or a garbled line is dropped with a notice."""
    import json
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        die(f"cannot read {path}: {e.strerror}")
    kept, bad = [], []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            keep = int(record['iter']) < before_iter
        except (ValueError, KeyError, TypeError):
            bad.append(i + 1)
            continue
        if keep:
            kept.append(line if line.endswith('\n') else line + '\n')
    if bad == [len(lines)]:
        notice(f"notice: dropped the partial last line of {path} (a run stopped while writing it)")
    elif bad:
        notice(f"notice: dropped {len(bad)} unreadable line(s) of {path} (line {', '.join(map(str, bad[:5]))})")
    return kept


def logged_evaluation(out_dir, iter_num):
    """Whether out_dir/log.jsonl records an evaluation at iter_num."""
    import json
    lines = read_log_lines(os.path.join(out_dir, 'log.jsonl'), iter_num + 1, notice=lambda line: None)
    return any(r.get('kind') == 'eval' and r.get('iter') == iter_num for r in map(json.loads, lines))


class RunLog:
    """A training run's out_dir/log.jsonl: one JSON object per line, each with 'time', the training
    seconds across resumes. Evaluations are also printed, and redraw out_dir/loss.png (with
    matplotlib); with wandb (the imported module) every record goes to Weights & Biases too."""

    def __init__(self, out_dir, wandb=None):
        self.out_dir, self.wandb = out_dir, wandb
        self.path = os.path.join(out_dir, 'log.jsonl')
        self.time_before, self.started = 0.0, time.time()

    def start(self, lock, config, resumed_iter=None, replace=False):
        """The run really starts (rank 0): the lock (a RunLock) is taken, the checkpoints of a run
        this one replaces are deleted, config.json and log.jsonl are (re)written. A resumed run
        keeps the log lines before resumed_iter (it redoes the rest); its clock goes on."""
        import json
        lock.acquire()  # released at the end, or at exit on an error
        if replace and (deleted := delete_checkpoints(self.out_dir)):
            print(f"--overwrite=True: deleted the run this one replaces: {', '.join(deleted)}; "
                  f"{self.path} and config.json start anew")
        kept = read_log_lines(self.path, resumed_iter) if resumed_iter is not None else []
        self.time_before = json.loads(kept[-1]).get('time', 0.0) if kept else 0.0
        atomic_write(self.path, lambda f: f.write(''.join(kept).encode()))
        text = json.dumps(config, indent=2) + '\n'
        atomic_write(os.path.join(self.out_dir, 'config.json'), lambda f: f.write(text.encode()))
        self.started = time.time()

    def write(self, **record):
        """Append record (iter, kind, ...) as one line."""
        import json
        record['time'] = round(self.time_before + time.time() - self.started, 3)
        try:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:
            raise ConfigError(os_error_message(e, self.path), this_rank_only=True) from None

    def evaluation(self, iter_num, losses, lr, tokens):
        """An evaluation's losses (estimate_loss): printed, logged, plotted."""
        bpb = f", val bpb {losses['val_bpb']:.4f}" if losses['val_bpb'] is not None else ""
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{bpb}")
        for split in ('train', 'val'):
            self.write(iter=iter_num, kind='eval', split=split, loss=losses[split], bpb=losses[f'{split}_bpb'],
                       lr=lr, tokens=tokens)
        self.wandb_log(iter_num, {'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr,
                                  **({'train/bpb': losses['train_bpb'], 'val/bpb': losses['val_bpb']} if bpb else {})})
        self.plot()

    def step(self, it, max_iters, loss, lr, tokens, seconds, tokens_per_sec, mfu, left, **more):
        """A training step's numbers (it: the step's index; seconds: per iteration): printed, logged.
        more: any other numbers to follow them everywhere, e.g. grad_norm=norm.item()."""
        mfu_text = f", mfu {mfu * 100:.2f}%" if mfu is not None else ""
        more_text = "".join(f", {k} {v:.4g}" for k, v in more.items())
        print(f"iter {it}/{max_iters}: loss {loss:.4f}, lr {lr:.2e}, {seconds * 1000:.2f}ms/iter, "
              f"{tokens_per_sec:,.0f} tokens/s{mfu_text}{more_text}, {duration(left)} left")
        self.write(iter=it, kind='train', split='train', loss=loss, lr=lr, tokens=tokens,
                   ms_per_iter=seconds * 1000, tokens_per_sec=tokens_per_sec, mfu=mfu, **more)
        self.wandb_log(it, {'train/loss_step': loss, 'lr': lr, 'mfu': mfu, **{f'train/{k}': v for k, v in more.items()}})

    def hellaswag(self, iter_num, hs, tokens):
        """A HellaSwag score (lib.evaluation.HellaSwagDuringTraining): printed, logged, plotted."""
        print(f"step {iter_num}: hellaswag acc_norm {hs['acc_norm']:.4f} ({hs['examples']} examples)")
        self.write(iter=iter_num, kind='hellaswag', tokens=tokens, **hs)
        self.wandb_log(iter_num, {'hellaswag/acc_norm': hs['acc_norm']})
        self.plot()

    def wandb_log(self, iter_num, values):
        """values at iter_num to Weights & Biases, when wandb_log is on."""
        if self.wandb is not None:
            self.wandb.log({'iter': iter_num, **values})

    def plot(self):
        from lib import plotting
        if plotting.have_matplotlib():  # out_dir/loss.png, redrawn at every evaluation
            plotting.plot_loss([self.out_dir], os.path.join(self.out_dir, 'loss.png'))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return True



def summary(out_dir, dataset, iterations, seconds, best_val_loss, best_val_bpb, tokens, stopped_by=None,
            iter_num=None, max_iters=None, chat=False):
    """The end of a training run in a few lines: what it did, its files (those that exist), and
    the next commands (a chat run's: chatting and scoring). A run stopped by a signal (stopped_by,
    at iter_num of max_iters) says so, with its exit status (hardware.STOPPED) and how to continue,
    instead of what to sample."""
    bpb = f" ({best_val_bpb:.4f} bits per byte)" if best_val_bpb is not None else ""
    best = f"best val loss {best_val_loss:.4f}{bpb}" if math.isfinite(best_val_loss) else "no evaluation yet"
    did = (f"{iterations:,} iterations in {seconds / 60:.1f} min ({seconds:.0f} s); {best}; "
           f"{tokens:,} tokens seen in total")
    ckpt, log, picture = (os.path.join(out_dir, name) for name in ('ckpt.pt', 'log.jsonl', 'loss.png'))
    saved = os.path.isfile(ckpt)
    curve = f", loss curve: {picture}" if os.path.isfile(picture) else ""
    files = f"checkpoint: {ckpt} (log: {log}{curve})"
    if stopped_by:
        head = (f"\nstopped by {stopped_by} at iteration {iter_num:,} of {max_iters:,}, exit status "
                f"{hardware.STOPPED} (stopped, not finished): {did}")
        if not saved:
            return head + "\nnothing was saved (no step had finished): the same command starts the run again"
        return f"{head}\n{files}\ncontinue with: python train.py --init_from=resume --out_dir={out_dir}"
    head = f"\ndone: {did}"
    if not saved:
        return head + ("\nno checkpoint was written (no evaluation since the start); "
                       "lower --eval_interval to save one")
    if chat:
        sample, then = " --chat", f"python evaluate.py chat --out_dir={out_dir}"
    else:
        sample = ' --start="ROMEO:"' if 'shakespeare' in dataset else ''
        then = f"python plot.py loss {out_dir}"
    return f"{head}\n{files}\nnext: python sample.py --out_dir={out_dir}{sample}\n      {then}"


# -----------------------------------------------------------------------------
# which run folder

def find_run_dir(out_dir, given, what="use", otherwise="pass --out_dir=RUN_FOLDER, or use --init_from=gpt2"):
    """The run folder to read: out_dir when it was given (flag or config file) or holds ckpt.pt;
    else the folder in the working directory whose ckpt.pt is newest, with a notice on stderr
    naming it; else a one-line error saying what to do (otherwise: the caller's other ways)."""
    if given or (Path(out_dir) / 'ckpt.pt').is_file():
        return out_dir
    runs = sorted((p for p in Path('.').iterdir() if p.is_dir() and (p / 'ckpt.pt').is_file()),
                  key=lambda p: (p / 'ckpt.pt').stat().st_mtime)
    if not runs:
        raise ConfigError(f"no trained model to {what}: {out_dir}/ckpt.pt does not exist and no folder here has a "
                          f"ckpt.pt. Train one (python train.py config/train_shakespeare_char_cpu.py), {otherwise}")
    chosen = runs[-1].name
    stamp = time.strftime('%Y-%m-%d %H:%M', time.localtime((runs[-1] / 'ckpt.pt').stat().st_mtime))
    print(f"notice: no {out_dir}/ckpt.pt; using the most recently trained run, {chosen}/ (saved {stamp}); "
          f"pass --out_dir to choose another", file=sys.stderr, flush=True)
    return chosen
