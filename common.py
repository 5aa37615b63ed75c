"""
Small pieces shared by train.py, sample.py and bench.py:

- load_config: `python X.py [config/a.py ...] [--key=value ...]` overrides, every key checked
- setup_device: device and dtype chosen in one place, with the reason printed once
- ddp_ranks / ddp_setup / ddp_teardown / ddp_exit: joining and leaving the torchrun process group
- atomic_write / save_checkpoint / load_checkpoint / model_state_dict: files and checkpoints
- RunLock: one training run per out_dir
- os_error_message: an OSError as one line naming the path and the reason
- print_help / config_summary: --help from the knobs' trailing comments, and the knobs a run changed
- find_run_dir: the run folder to use when --out_dir is not given
- Progress: a progress line (a bar on a terminal) for work that takes more than a few seconds

User mistakes raise ConfigError. It is a SystemExit, so a script that does not catch it
prints its one-line message to stderr and exits with status 1, without a traceback.
"""

import ast
import difflib
import errno
import os
import socket
import sys
import tempfile
import textwrap
import time
import tokenize
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

# Marks checkpoints written by this repository, so model_state_dict can tell them from nanoGPT's.
CHECKPOINT_FORMAT = 'gpt-train-checkpoint/1'


class ConfigError(SystemExit):
    """A user error with a one-line message that says what to change."""

    def __init__(self, message):
        super().__init__(f"error: {message}")
        self.message = message


def die(message):
    """Stop the script with a one-line error on stderr and exit status 1."""
    raise ConfigError(message)


MIN_TORCH = (2, 3)  # torch.amp.GradScaler(device), torch.compiler; requirements.txt says the same


def torch_too_old(version):
    """The one-line complaint for a torch older than MIN_TORCH (e.g. '2.1.2+cu121'), else None."""
    major_minor = tuple(int(part) for part in version.split('+')[0].split('.')[:2])
    if major_minor < MIN_TORCH:
        return (f"torch {version} is too old: this project needs torch >= {'.'.join(map(str, MIN_TORCH))} "
                f"(pip install -U torch, or see requirements.txt)")
    return None


if torch_too_old(torch.__version__):  # every script imports common first: say it once, clearly
    die(torch_too_old(torch.__version__))


# -----------------------------------------------------------------------------
# config: config files, then --key=value flags

def load_config(defaults, argv, usage=None):
    """Return {key: value} for the keys that config files and flags in argv override.

    argv items are config files or --key=value flags. A config file is EXECUTED as Python (as in
    nanoGPT): it can run any code with your permissions, so only use config files you trust,
    exactly as you would a script. Files are applied in order; --key=value
    flags (applied after all files, in order; the later one wins). Every key must be in
    defaults. A value must have the type of its default: an int may stand for a float, bools
    are only True/False, and a string may be written without quotes. A default of None accepts
    any value; the script checks what it means. --help or -h prints the usage line (usage, or
    one made from the script's name) and every knob with its default and comment, then exits 0.
    """
    if '--help' in argv or '-h' in argv:
        # the caller's source file holds the defaults and their trailing comments
        caller = sys._getframe(1).f_globals
        print_help(defaults, caller.get('__file__'), usage, caller.get('__doc__'))
        sys.exit(0)
    current = dict(defaults)
    overrides = {}
    files = [a for a in argv if not a.startswith('--')]
    flags = [a for a in argv if a.startswith('--')]
    for path in files:
        for key, value in _read_config_file(path, current).items():
            value = _check_value(defaults, key, value, f"in {path}")
            current[key] = overrides[key] = value
    for flag in flags:
        key, sep, text = flag[2:].partition('=')
        if not sep or not key:
            raise ConfigError(f"cannot read flag {flag!r}: write it as --key=value")
        _check_key(defaults, key, f"(flag {flag})")
        value = _parse_flag_value(defaults[key], text)
        value = _check_value(defaults, key, value, f"(flag {flag})")
        current[key] = overrides[key] = value
    return overrides


def unknown_command(name, commands, script):
    """One line for an unknown subcommand, naming the nearest one."""
    nearest = difflib.get_close_matches(name, list(commands), n=1, cutoff=0.0)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    return f"unknown command {name!r}{hint} (commands: {', '.join(commands)}; python {script} --help)"


def knob_comments(path):
    """[(name, comment, line)] for each line of a source file that assigns a name and ends in a
    comment: `name = value  # comment` at module level, or `name=value,  # comment` in a dict(...).
    Read with tokenize, so a '#' inside a string is not mistaken for a comment."""
    try:
        with open(path, encoding='utf-8') as f:
            tokens = list(tokenize.generate_tokens(f.readline))
    except (OSError, SyntaxError, tokenize.TokenError):
        return []
    found, line_tokens = [], []
    for tok in tokens:
        if tok.type in (tokenize.NL, tokenize.NEWLINE):
            line_tokens = []
        elif tok.type == tokenize.COMMENT:
            code = [t for t in line_tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
            if len(code) >= 2 and code[0].type == tokenize.NAME and code[1].string == '=':
                found.append((code[0].string, tok.string.lstrip('#').strip(), tok.start[0]))
        else:
            line_tokens.append(tok)
    return found


def _comments_for(keys, path):
    """{key: comment} for keys; a name commented on several lines (evaluate.py's data_dir in two
    sub-commands) takes the line nearest to its neighbours in keys, which sit in the same block."""
    lines = {}
    for name, comment, line in knob_comments(path) if path else []:
        lines.setdefault(name, []).append((line, comment))
    chosen = {k: lines[k][0] for k in keys if len(lines.get(k, [])) == 1}
    for i, key in enumerate(keys):
        if len(lines.get(key, [])) > 1:
            # the next key's line, else the previous key's: a block's knobs sit together
            near = [k for k in keys[i + 1:i + 2] + keys[max(0, i - 1):i] if k in chosen][:1]
            anchor = chosen[near[0]][0] if near else 0
            chosen[key] = min(lines[key], key=lambda lc: abs(lc[0] - anchor))
    return {k: comment for k, (_, comment) in chosen.items()}


def print_help(defaults, path=None, usage=None, doc=None):
    """Usage line, the first line of doc, then one line per knob: --key=default and its comment
    from the source file."""
    script = os.path.basename(path) if path else os.path.basename(sys.argv[0])
    usage = usage or f"python {script} [config/file.py ...] [--key=value ...]"
    comments = _comments_for(list(defaults), path)
    width = max((len(f"--{k}={v!r}") for k, v in defaults.items()), default=0)
    summary = next((line.strip() for line in (doc or '').splitlines() if line.strip()), '')
    lines = [f"usage: {usage}"] + ([summary] if summary else []) + ["",
             "knobs (--key=default, then what it does; config files set them the same way):"]
    for key, value in defaults.items():
        lines.append(f"  {f'--{key}={value!r}':<{width}}  {comments.get(key, '')}".rstrip())
    print_stdout('\n'.join(lines))


def print_stdout(text):
    """print(text) that ends quietly when the reader goes away (`python x.py --help | head`)."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader closed the pipe: point stdout at devnull so the exit flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


def source_defaults(path):
    """{name: value} of the module-level `name = literal` assignments of a script (its defaults)."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass  # not a literal: not a knob
    return out


def config_summary(config, defaults, saved_at=None, width=100):
    """The knobs whose value differs from the default, as readable wrapped lines."""
    changed = [f"{k}={v!r}" for k, v in config.items() if k not in defaults or defaults[k] != v]
    where = f"; every knob is in {saved_at}" if saved_at else ""
    head = f"config ({len(changed)} knobs differ from the defaults{where}):"
    if not changed:
        return head + " none"
    return head + "\n" + textwrap.fill(', '.join(changed), width=width, initial_indent='  ',
                                       subsequent_indent='  ', break_long_words=False, break_on_hyphens=False)


def _read_config_file(path, current):
    """Run a config file and return the knobs it assigns (names it adds or changes)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (flags must look like --key=value)")
    with open(path) as f:
        source = f.read()
    # The file sees the values so far, so `lr_decay_iters = max_iters` works as in nanoGPT.
    namespace = dict(current)
    try:
        exec(compile(source, path, 'exec'), namespace)
    except Exception as e:
        raise ConfigError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    assigned = {}
    for key, value in namespace.items():
        if key.startswith('_') or callable(value) or type(value).__name__ == 'module':
            continue  # __builtins__, imports and helper functions are not knobs
        if key not in current:
            _check_key(current, key, f"in {path}")
        if key not in current or value is not current[key]:
            assigned[key] = value
    return assigned


def _check_key(defaults, key, where):
    if key not in defaults:
        nearest = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.0)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        raise ConfigError(f"unknown config key {key!r} {where}{hint}")


def _parse_flag_value(default, text):
    """Python literal if it parses (1, 3e-4, True, 'x'), else the plain text for string knobs."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain word such as --device=cuda:1; the type check decides if that is fine
    if isinstance(default, str) and not isinstance(value, str):
        return text  # --wandb_run_name=2024 means the string '2024'
    return value


def _check_value(defaults, key, value, where):
    default = defaults[key]
    if default is None:
        ok, expected = True, "any"
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "bool (True or False)"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "int"
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "float"
        value = float(value) if ok else value
    else:
        ok, expected = isinstance(value, type(default)), type(default).__name__
    if not ok:
        raise ConfigError(f"config key {key!r} {where}: got {value!r} ({type(value).__name__}), "
                          f"expected {expected} like the default {default!r}")
    return value


# -----------------------------------------------------------------------------
# device and dtype

PTDTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


@dataclass
class DeviceSetup:
    device: str          # 'cpu', 'cuda:0', 'mps'
    device_type: str     # 'cpu', 'cuda' or 'mps': what torch.autocast wants
    dtype: str           # 'float32', 'bfloat16' or 'float16'
    reason: str          # why this device and dtype, as printed

    @property
    def ptdtype(self):
        return PTDTYPES[self.dtype]

    @property
    def use_grad_scaler(self):
        return self.dtype == 'float16'  # float16 gradients underflow without loss scaling

    def autocast(self):
        """Context for forward passes: mixed precision for bfloat16/float16, nothing for float32."""
        if self.dtype == 'float32':
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.ptdtype)


_printed_device_lines = set()


def _cuda_has_native_bf16():
    """True on Ampere and newer; older GPUs only emulate bfloat16, slowly, so float16 is better there."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no including_emulation argument
        return torch.cuda.is_bf16_supported()


def setup_device(device='auto', dtype='auto', local_rank=None, verbose=True, default_reason=None):
    """Pick the device and the compute dtype; print the choice and the reason once per process.

    device 'auto': cuda (cuda:LOCAL_RANK under torchrun), then mps, then cpu.
    dtype 'auto': bfloat16 on a CUDA GPU that supports it, float16 with a GradScaler on an
    older CUDA GPU, float32 on CPU and MPS. An explicit dtype is honoured (bfloat16 on CPU works).
    default_reason: how to explain a fixed device/dtype that the user did not ask for (a script's
    own default), instead of "asked for".
    """
    if device == 'auto':
        if torch.cuda.is_available():
            device = 'cuda' if local_rank is None else f'cuda:{local_rank}'
            device_reason = "auto: CUDA is available"
        elif torch.backends.mps.is_available():
            device, device_reason = 'mps', "auto: no CUDA, Apple MPS is available"
        else:
            device, device_reason = 'cpu', "auto: no CUDA or MPS"
    else:
        device_reason = default_reason or "asked for"
    device_type = device.split(':')[0]
    if device_type not in ('cpu', 'cuda', 'mps'):
        raise ConfigError(f"device {device!r} not understood; use auto, cpu, cuda, cuda:N or mps")
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but this torch sees no CUDA GPU; use --device=cpu")
    if device_type == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} asked for but MPS is not available; use --device=cpu")
    if device == 'cuda' and local_rank is not None:
        device = f'cuda:{local_rank}'  # one GPU per torchrun process

    if dtype == 'auto':
        if device_type == 'cuda' and _cuda_has_native_bf16():
            dtype, dtype_reason = 'bfloat16', "auto: this GPU supports bfloat16"
        elif device_type == 'cuda':
            dtype, dtype_reason = 'float16', "auto: no bfloat16 on this GPU, float16 with a GradScaler"
        else:
            dtype, dtype_reason = 'float32', f"auto: full precision on {device_type}"
    elif dtype in PTDTYPES:
        dtype_reason = default_reason or "asked for"
    else:
        raise ConfigError(f"dtype {dtype!r} not understood; use auto, float32, bfloat16 or float16")

    if device_type == 'cuda':
        # TF32 matmuls for the float32 parts (about 3x faster on Ampere+, ~1e-3 relative error)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    reason = f"device {device} ({device_reason}), dtype {dtype} ({dtype_reason})"
    if verbose and reason not in _printed_device_lines:
        _printed_device_lines.add(reason)
        print(reason)
    return DeviceSetup(device, device_type, dtype, reason)


# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each process's environment

def ddp_ranks():
    """(rank, local_rank, world_size) under torchrun; None for a plain `python X.py` run."""
    if 'RANK' not in os.environ:
        return None
    return int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])


def ddp_setup(backend, device_type):
    """Join the process group. backend 'auto': nccl for CUDA, gloo for CPU."""
    import torch.distributed as dist
    if backend == 'auto':
        backend = 'nccl' if device_type == 'cuda' else 'gloo'
    if backend == 'nccl' and device_type != 'cuda':
        raise ConfigError(f"backend nccl needs CUDA GPUs but the device is {device_type}; use --backend=gloo")
    dist.init_process_group(backend=backend)
    return backend


@contextmanager
def errors_once_under_torchrun():
    """Under torchrun every rank runs the same checks on the same input, so a ConfigError here is
    every rank's: rank 0 prints it, the others exit with status 1 without repeating it."""
    try:
        yield
    except ConfigError:
        if os.environ.get('RANK', '0') != '0':
            raise SystemExit(1) from None
        raise


def all_ranks_ok(ok, ddp, device):
    """True when ok holds on every rank (one all-reduce under DDP): a check that only rank 0 makes
    (the run lock, its files) then stops all ranks together instead of leaving them in a collective."""
    if not ddp:
        return ok
    import torch.distributed as dist
    flag = torch.tensor(float(ok), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def die_on_this_rank(message, rank=0):
    """die() for a problem only this process sees (its own batch, its own file): printed even on a
    rank other than 0, with the rank named."""
    error = ConfigError(message if rank == 0 else f"rank {rank}: {message}")
    error.this_rank_only = True
    raise error


def stop_with_parent():
    """Linux: SIGTERM this process when its parent (the torchrun agent) dies, even by kill -9, so
    that workers save and exit instead of living on as orphans holding memory and GPUs."""
    if not sys.platform.startswith('linux'):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(__import__('signal').SIGTERM))
    except (OSError, AttributeError):
        pass  # no prctl: torchrun still stops its workers when it exits normally


def ddp_teardown():
    """Leave the process group if this process joined one (safe to call more than once)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def ddp_exit():
    """End a torchrun worker now, with the status the exception in flight (if any) would give, without
    the interpreter's finalization. Call it last, from a `finally:`, once every file is closed.

    Why: gloo's worker threads release a finished collective a moment after the caller's wait()
    returns, and the last one holds tensors whose Python objects must be freed with the GIL held.
    If that moment falls after the interpreter began to finalize (a loaded machine), Python ends
    the thread with pthread_exit, which unwinds through a C++ destructor and aborts the process:
    "terminate called without an active exception", SIGABRT, after a run that had finished
    (seen in ~1 of 10 torchrun runs on a busy 2-core machine; the core dump shows the gloo thread
    in ~AsyncBarrierWork -> decref_pyobject -> take_gil -> pthread_exit). destroy_process_group()
    does not prevent it: DistributedDataParallel's reducer keeps the group and its threads alive.
    multiprocessing ends its workers with os._exit for the same kind of reason."""
    error = sys.exc_info()[1]
    if error is None:
        code = 0
    elif isinstance(error, SystemExit):
        code = error.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)  # what Python prints for SystemExit('error: ...')
            code = 1
    else:
        import traceback
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# -----------------------------------------------------------------------------
# checkpoints

def atomic_write(path, write):
    """Create path by calling write(binary file) so that path holds either the old or the new
    file, never half of one.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    renamed over path (os.replace is atomic on POSIX and Windows); then the folder entry is
    flushed too, so the rename survives a power cut. Temporary files of a writer that was
    killed mid-write ('.NAME.*.tmp') are removed first (one run per folder: see RunLock).
    An OSError (disk full, read-only folder) becomes a one-line ConfigError naming path; the
    temporary file is removed and the old file is left as it was.
    """
    path = Path(path)
    try:
        _atomic_write(path, write)
    except OSError as e:  # disk full, read-only folder, no permission: one line, old file intact
        raise ConfigError(os_error_message(e, path)) from None


def _atomic_write(path, write):
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f'.{path.name}.*.tmp'):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it normal permissions
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, 'O_DIRECTORY'):  # POSIX: make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(obj, path):
    """Write obj with torch.save atomically (see atomic_write): a crash or kill -9 during the
    save leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(obj, f))


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


def os_error_message(error, path=None):
    """One line for an OSError: the path and the reason, e.g. 'cannot write out/ckpt.pt: No space left on device'."""
    path = path or error.filename
    reason = error.strerror or str(error)
    hint = {errno.ENOSPC: "; free some space or use another --out_dir",
            errno.EACCES: "; check the folder's permissions",
            errno.EROFS: "; the filesystem is read-only, choose a writable folder",
            errno.EDQUOT: "; free some space"}.get(error.errno, '')
    return f"cannot write {path}: {reason}{hint}"


# -----------------------------------------------------------------------------
# one training run per out_dir

class RunLock:
    """out_dir/run.lock holds 'PID HOST' of the run that writes out_dir; a second run stops at once.

    The file is created with O_EXCL (atomic). A lock whose process is gone (a run killed with
    kill -9) is taken over with a notice. A lock from another host cannot be checked from here:
    the message says to delete the file if that run is over. release() removes the file only if
    it is still ours; call it on every exit path (train.py's finally; atexit as a backstop).
    """

    NAME = 'run.lock'

    def __init__(self, out_dir):
        self.path = Path(out_dir) / self.NAME
        self.held = False
        self.made_dir = False

    def acquire(self, notice=print):
        mine = f"{os.getpid()} {socket.gethostname()}\n"
        if self.path.parent.exists() and not self.path.parent.is_dir():
            die(f"out_dir {self.path.parent} is a file, not a folder; choose another --out_dir")
        if self.path.is_dir():
            die(f"{self.path} is a folder, not a lock file; remove it (rmdir {self.path}) or use another --out_dir")
        for _ in range(3):  # a takeover can race with another takeover: retry a few times
            try:
                if not self.path.parent.is_dir():
                    self.path.parent.mkdir(parents=True)
                    self.made_dir = True  # removed again if the run ends before writing anything
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = self._owner()
                if pid is None:
                    notice(f"notice: {self.path} is empty or unreadable (a run killed while starting); taking it over")
                elif host != socket.gethostname():
                    die(f"{self.path.parent} is in use by PID {pid} on host {host}; wait for that run, or "
                        f"delete {self.path} if it is no longer running")
                elif _pid_alive(pid):
                    die(f"{self.path.parent} is in use by another run (PID {pid}); wait for it to finish, "
                        f"stop it, or use another --out_dir")
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


def token_count(path, allow_empty=True):
    """The number of uint16 tokens in a token file, after checking that it is one: an odd byte
    size (or, with allow_empty=False, an empty file) is a one-line error."""
    try:
        n_bytes = os.path.getsize(path)
    except OSError as e:
        die(f"cannot read {path}: {e.strerror}")
    if n_bytes % 2 or (n_bytes == 0 and not allow_empty):
        die(f"{path} has {'an odd size' if n_bytes else 'no tokens'} ({n_bytes:,} bytes) but should hold "
            f"uint16 tokens: it is truncated or not a token file; prepare the dataset again")
    return n_bytes // 2


def open_tokens(path):
    """np.memmap of a uint16 token file that holds tokens (token_count's checks) instead of
    numpy's ValueError."""
    import numpy as np
    token_count(path, allow_empty=False)
    return np.memmap(path, dtype=np.uint16, mode='r')


def check_token_ids(path, vocab_size, chunk=1 << 24):
    """Stop with one line naming path and the largest id if a uint16 token file holds an id >=
    vocab_size. Reads the file in chunks of 16M tokens (about 0.05 s each), so memory stays flat."""
    import numpy as np
    data = np.memmap(path, dtype=np.uint16, mode='r')
    for start in range(0, len(data), chunk):
        largest = int(data[start:start + chunk].max())
        if largest >= vocab_size:
            largest = max(largest, *(int(data[i:i + chunk].max()) for i in range(start, len(data), chunk)))
            die(f"{path} holds token id {largest} but vocab_size is {vocab_size} (meta.json): the file is "
                f"corrupt or from another tokenizer; prepare the dataset again")


def crop_optimizer_state(optimizer):
    """After a resume that cropped a parameter (the position embedding, to a shorter block_size),
    crop its optimizer state tensors (AdamW's moments, momentum buffers) the same way, so that
    the state matches its parameter and the next checkpoint is consistent."""
    for group in optimizer.param_groups:
        for p in group['params']:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if (torch.is_tensor(value) and value.dim() == p.dim() and value.dim() > 0
                        and value.shape[1:] == p.shape[1:] and value.shape[0] > p.shape[0]):
                    state[key] = value[:p.shape[0]].clone()  # (block_size, n_embd) rows kept


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
# loading a trained or pretrained model, and its tokenizer (sample.py, bench.py, evaluation)

def load_model(init_from, out_dir, device='cpu', dropout=None):
    """(model, info) for init_from 'resume' (out_dir/ckpt.pt from train.py or nanoGPT's train.py),
    'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', or a local Hugging Face model folder.

    The model is on device, in eval mode. dropout=None keeps the checkpoint's value (HF: 0).
    info: source (a description), dataset (name or None), data_dir (folder with meta.json or
    meta.pkl, or None: GPT-2 BPE), vocab_size, iter_num and best_val_loss (checkpoints only).
    """
    from dataclasses import fields
    from model import GPT, GPTConfig, PRETRAINED
    if init_from == 'resume':
        path = Path(out_dir) / 'ckpt.pt'
        ckpt = load_checkpoint(path, map_location='cpu')  # to the device after the shapes are checked
        known = {f.name for f in fields(GPTConfig)}
        # nanoGPT writes the same model_args keys; anything else is ignored rather than fatal
        args = {k: v for k, v in dict(ckpt['model_args']).items() if k in known}
        missing = sorted({'n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'} - set(args))
        if missing:
            raise ConfigError(f"{path}: model_args lacks {missing}; it was not written by train.py")
        if dropout is not None:
            args['dropout'] = dropout
        try:
            model = GPT(GPTConfig(**args))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: model_args {args} do not make a GPT ({e})") from None
        state = model_state_dict(ckpt)
        # nanoGPT without flash attention saves its causal-mask buffer as '<block>.attn.bias'
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.endswith('.attn.bias')}
        if ckpt.get('lora'):  # a LoRA run stores only its adapters: its base plus them, merged
            model = load_lora_model(ckpt, path, dropout)
        else:
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise ConfigError(f"{path}: weights do not fit model_args {args}: "
                                  f"{' '.join(str(e).split())[:300]}") from None
        config = ckpt.get('config') if isinstance(ckpt.get('config'), dict) else {}
        dataset = config.get('dataset')
        info = dict(source=f"checkpoint {path} (iteration {ckpt.get('iter_num', '?')})",
                    dataset=dataset, data_dir=_find_data_dir(config.get('data_dir'), dataset),
                    iter_num=ckpt.get('iter_num'), best_val_loss=ckpt.get('best_val_loss'))
    elif init_from in PRETRAINED or os.path.isdir(init_from):
        try:
            model = GPT.from_pretrained(init_from, dict(dropout=dropout or 0.0))
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise ConfigError(f"cannot load {init_from}: {e}") from None
        info = dict(source=f"pretrained {init_from}", dataset=None, data_dir=None,
                    iter_num=None, best_val_loss=None)
    else:
        raise ConfigError(f"init_from={init_from!r} not understood: use resume (out_dir/ckpt.pt), "
                          f"{', '.join(PRETRAINED)}, or the path of a local Hugging Face model folder")
    # NaN or inf weights would sample garbage (or fail deep inside sampling): say so here. A sum
    # is NaN or inf exactly when an element is (weights are far too small to overflow it), and
    # takes 0.03 s for GPT-2 124M where isfinite(t).all() takes 0.5 s
    broken = next((name for name, t in model.state_dict().items()
                   if t.is_floating_point() and not torch.isfinite(t.sum())), None)
    if broken is not None:
        raise ConfigError(f"{info['source']}: {broken} holds NaN or inf values, so the model cannot "
                          f"predict anything; these weights come from a run that diverged: use an earlier checkpoint")
    info['vocab_size'] = model.config.vocab_size
    model.to(device)
    model.eval()
    return model, info


def load_base_model(base, dropout=None):
    """The model a LoRA run adapts, on the CPU: a train.py checkpoint file (a run's ckpt.pt),
    'gpt2'..'gpt2-xl', or a local Hugging Face folder."""
    if os.path.isfile(base):
        if Path(base).name != 'ckpt.pt':
            raise ConfigError(f"base {base} must be a run's ckpt.pt (or gpt2* or a Hugging Face folder)")
        return load_model('resume', str(Path(base).parent), 'cpu', dropout)[0]
    return load_model(base, '', 'cpu', dropout)[0]


def load_lora_model(ckpt, path, dropout=None, merge=True, lora_dropout=None):
    """The model of a LoRA checkpoint: its base (ckpt['lora']['base']) cropped to the run's
    block_size, with the saved adapters; merged into plain Linear layers unless merge=False
    (train.py resumes the adapters themselves). lora_dropout None keeps the run's value."""
    from model import apply_lora, merge_lora
    lora = ckpt['lora']
    try:
        model = load_base_model(lora['base'], dropout)
    except ConfigError as e:
        raise ConfigError(f"{path} adapts the base {lora['base']!r}, which cannot be loaded: {e.message}") from None
    block_size = ckpt['model_args']['block_size']
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    apply_lora(model, lora['rank'], lora['alpha'], lora['dropout'] if lora_dropout is None else lora_dropout,
               lora['targets'])
    try:
        missing, unexpected = model.load_state_dict(ckpt['model'], strict=False)
    except RuntimeError as e:  # shapes: the base changed since the run
        raise ConfigError(f"{path}: adapters do not fit the base {lora['base']!r}: {' '.join(str(e).split())[:300]}") from None
    missing = [k for k in missing if k.endswith(('.lora_A', '.lora_B'))]
    if missing or unexpected:
        raise ConfigError(f"{path}: adapters do not match lora_targets {lora['targets']!r}: "
                          f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    return merge_lora(model) if merge else model


def weight_bytes(model):
    """Bytes held by the model's parameters and buffers, shared tensors counted once."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def quantize_model(model, quantize):
    """quantize 'none' or 'int8' (model.quantize_int8: int8 weights, float activations), in
    place; prints which matmul path runs and the weights' memory before and after."""
    from model import quantize_int8
    if quantize not in ('none', 'int8'):
        raise ConfigError(f"quantize must be 'none' or 'int8', got {quantize!r}")
    if quantize == 'int8':
        before = weight_bytes(model)
        description = quantize_int8(model)
        print(f"{description}; weights {before / 2**20:.1f} MiB -> {weight_bytes(model) / 2**20:.1f} MiB")
    return model


def _find_data_dir(data_dir, dataset):
    """The folder holding a run's tokenizer metadata: the run's data_dir, else data/<dataset> under
    the working directory (where nanoGPT keeps it), else data/<dataset> next to this file. From
    this repository's root the last two are the same folder."""
    candidates = [data_dir] if data_dir else []
    if dataset:
        candidates += [Path('data') / dataset, Path(__file__).resolve().parent / 'data' / dataset]
    for folder in candidates:
        if (Path(folder) / 'meta.json').is_file() or (Path(folder) / 'meta.pkl').is_file():
            return str(folder)
    return None


def load_tokenizer_for(info, data_dir=None):
    """The tokenizer a loaded model was trained with (prepare.Tokenizer).

    From data_dir if given, else info['data_dir'] (meta.json, or nanoGPT's meta.pkl read by a
    restricted unpickler); GPT-2 BPE when there is no metadata, as for pretrained GPT-2. A model
    whose vocabulary is too small for GPT-2 and has no metadata is an error, not gibberish.
    """
    import prepare
    folder = data_dir or info.get('data_dir')
    try:
        if folder:
            if not Path(folder).is_dir():
                raise ConfigError(f"data_dir {folder} is not a folder")
            tokenizer = prepare.load_tokenizer(folder)
        else:
            if info.get('vocab_size', 50257) < 50257:
                where = f"data/{info['dataset']}/" if info.get('dataset') else "the dataset folder"
                raise ConfigError(f"the model has vocab_size {info['vocab_size']} but no tokenizer metadata was "
                                  f"found (meta.json or meta.pkl in {where}); prepare the dataset again "
                                  f"or pass --data_dir=FOLDER")
            tokenizer = prepare.gpt2_tokenizer()
    except prepare.PrepareError as e:
        raise ConfigError(str(e)) from None
    if tokenizer.vocab_size > info.get('vocab_size', tokenizer.vocab_size):
        raise ConfigError(f"the tokenizer ({tokenizer.name}, {tokenizer.vocab_size} ids) does not fit the "
                          f"model's vocab_size {info['vocab_size']}: wrong data_dir for this checkpoint?")
    return tokenizer


# -----------------------------------------------------------------------------
# which run folder, and progress of long work

def find_run_dir(out_dir, given, what="use"):
    """The run folder to read: out_dir when it was given (flag or config file) or holds ckpt.pt;
    else the folder in the working directory whose ckpt.pt is newest, with a notice on stderr
    naming it; else a one-line error saying what to do."""
    if given or (Path(out_dir) / 'ckpt.pt').is_file():
        return out_dir
    runs = sorted((p for p in Path('.').iterdir() if p.is_dir() and (p / 'ckpt.pt').is_file()),
                  key=lambda p: (p / 'ckpt.pt').stat().st_mtime)
    if not runs:
        raise ConfigError(f"no trained model to {what}: {out_dir}/ckpt.pt does not exist and no folder here has a "
                          f"ckpt.pt. Train one (python train.py config/train_shakespeare_char_cpu.py), pass "
                          f"--out_dir=RUN_FOLDER, or use --init_from=gpt2")
    chosen = runs[-1].name
    stamp = time.strftime('%Y-%m-%d %H:%M', time.localtime((runs[-1] / 'ckpt.pt').stat().st_mtime))
    print(f"notice: no {out_dir}/ckpt.pt; using the most recently trained run, {chosen}/ (saved {stamp}); "
          f"pass --out_dir to choose another", file=sys.stderr, flush=True)
    return chosen


class Progress:
    """Progress of a long loop on stderr, silent for work that ends within `after` seconds.

    On a terminal, a bar redrawn in place; otherwise (a log file, CI) a plain line every `every`
    seconds. close() (or leaving a `with` block) prints a last line if anything was shown; with
    keep=False it erases the bar instead (the caller prints its own result line).

        with common.Progress('perplexity', total=len(batches), unit='windows') as bar:
            for b in batches:
                ...
                bar.update(len(b))
    """

    def __init__(self, label, total=None, unit='', after=3.0, every=10.0, stream=None, keep=True):
        self.label, self.total, self.unit, self.keep = label, total, unit, keep
        self.after, self.every = after, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
        self.done, self.start, self.shown_at = 0, time.monotonic(), None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _text(self, now):
        elapsed = now - self.start
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            frac = min(self.done / self.total, 1.0)
            left = f", ~{_duration(elapsed / frac - elapsed)} left" if 0 < frac < 1 else ""
            count = f"{self.done:,}/{self.total:,}{unit} ({100 * frac:.0f}%)"
            bar = f"[{'#' * int(20 * frac):<20}] " if self.tty else ""
            return f"{self.label}: {bar}{count}, {_duration(elapsed)}{left}"
        return f"{self.label}: {self.done:,}{unit}, {_duration(elapsed)}"

    def update(self, n=1):
        self.done += n
        now = time.monotonic()
        if now - self.start < self.after:
            return
        wait = 0.5 if self.tty else self.every
        if self.shown_at is not None and now - self.shown_at < wait:
            return
        self.shown_at = now
        self.stream.write(('\r' + self._text(now) + '\033[K') if self.tty else self._text(now) + '\n')
        self.stream.flush()

    def close(self):
        if self.shown_at is None:
            return  # quick work stays silent
        text = self._text(time.monotonic())
        if not self.keep:
            self.stream.write('\r\033[K' if self.tty else '')
        else:
            self.stream.write(('\r' + text + '\033[K\n') if self.tty else text + '\n')
        self.stream.flush()
        self.shown_at = None


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
