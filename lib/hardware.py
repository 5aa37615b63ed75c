"""
Where the work runs: the device and compute dtype (chosen in one place, the reason printed
once), the torchrun process group (joining, agreeing, leaving on every exit), a training run's
stop signal (Ctrl-C, SIGTERM), and the peak FLOP/s of known accelerators for MFU.

    dev = hardware.setup_device('auto', 'auto')     # prints e.g. "device cpu (auto: ...), dtype float32 (...)"
    with dev.autocast(): logits, loss = model(x, y)
    hardware.estimate_mfu(model, tokens_per_sec, 'NVIDIA H100 80GB HBM3', torch.bfloat16)
"""

import atexit
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from lib.cli import ConfigError, config_file_knobs

# -----------------------------------------------------------------------------
# device and dtype

PTDTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


@dataclass
class DeviceSetup:
    device: str          # 'cpu', 'cuda:0', 'mps'
    device_type: str     # 'cpu', 'cuda' or 'mps': what torch.autocast wants
    dtype: str           # 'float32', 'bfloat16' or 'float16'
    reason: str          # why this device and dtype, as printed
    weights_cast: bool = False  # inference: the weights themselves are in dtype, autocast is off

    @property
    def ptdtype(self):
        return PTDTYPES[self.dtype]

    @property
    def use_grad_scaler(self):
        return self.dtype == 'float16'  # float16 gradients underflow without loss scaling

    def autocast(self):
        """Context for forward passes: mixed precision for bfloat16/float16, nothing for float32
        or for weights already in dtype (weights_cast)."""
        if self.dtype == 'float32' or self.weights_cast:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.ptdtype)


_printed_device_lines = set()


def _cuda_has_native_bf16():
    """True on Ampere and newer; older GPUs only emulate bfloat16, slowly, so float16 is better there."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no including_emulation argument
        return torch.cuda.is_bf16_supported()


def cpu_bf16():
    """'AMX' or 'AVX512-BF16' where this CPU computes bfloat16 in hardware, else None (there
    torch emulates it, slower than float32). Asks torch, then the kernel's CPU flags."""
    try:
        if torch.cpu._is_amx_tile_supported():
            return 'AMX'
        if torch.cpu._is_avx512_bf16_supported():
            return 'AVX512-BF16'
        return None
    except AttributeError:  # a torch without these probes
        try:
            flags = open('/proc/cpuinfo').read()
        except OSError:
            return None
        return 'AMX' if ' amx_bf16' in flags else 'AVX512-BF16' if ' avx512_bf16' in flags else None


# bfloat16 autocast on the CPU pays for its casts only on wide enough matrices: the narrowest
# model width (n_embd) where it was measured faster than float32, per kind of hardware support
# (docs/faster_cpu.md, "bfloat16 on the CPU")
CPU_BF16_MIN_WIDTH = {'AMX': 192, 'AVX512-BF16': 192}


def _cpu_auto_dtype(width):
    native = cpu_bf16()
    if native is None:
        return 'float32', "auto: this CPU has no bfloat16 hardware (AMX or AVX512-BF16)"
    low = CPU_BF16_MIN_WIDTH[native]
    if width is not None and width >= low:
        return 'bfloat16', f"auto: this CPU has {native}, faster than float32 from {low} wide; this model is {width}"
    model = "the model's width is unknown" if width is None else f"this model is {width}"
    return 'float32', f"auto: this CPU has {native}, but bfloat16 is slower below {low} wide; {model}"


# Inference (sample.py, serve.py, evaluate.py, bench.py's generation) decides its dtype apart
# from training: decoding is one small matmul per weight per token, and bfloat16 autocast re-casts
# every weight at every token. On a 2-core AMD EPYC with AVX512-BF16, GPT-2 124M decoded at 49-60
# ms/token under bfloat16 autocast against 38-41 in float32 (docs/benchmarks.md, "dtype for
# inference"), so 'auto' keeps float32 on every CPU, and bfloat16 asked for converts the weights once.
CPU_INFERENCE_REASON = ("auto: float32 for inference on a CPU, bfloat16 decoded slower even with AVX512-BF16 "
                        "(docs/benchmarks.md)")


def setup_device(device='auto', dtype='auto', local_rank=None, verbose=True, default_reason=None, width=None,
                 inference=False):
    """Pick the device and the compute dtype; print the choice and the reason once per process.

    device 'auto': cuda (cuda:LOCAL_RANK under torchrun), then mps, then cpu.
    dtype 'auto': bfloat16 on a CUDA GPU that supports it, float16 with a GradScaler on an
    older CUDA GPU; on a CPU bfloat16 where it computes bfloat16 natively (cpu_bf16) and the
    model is at least CPU_BF16_MIN_WIDTH wide (width: its n_embd), else float32; float32 on
    MPS. An explicit dtype is honoured (bfloat16 on any CPU works, emulated where not native).
    default_reason: how to explain a fixed device/dtype that the user did not ask for (a script's
    own default), instead of "asked for".
    inference=True (loading a model to decode or score): dtype 'auto' on a CPU is float32
    whatever the CPU (CPU_INFERENCE_REASON); bfloat16 sets weights_cast, the caller converts the
    weights once (loading.load_model_on_device) and autocast() is off.
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
        elif device_type == 'cpu' and inference:
            dtype, dtype_reason = 'float32', CPU_INFERENCE_REASON
        elif device_type == 'cpu':
            dtype, dtype_reason = _cpu_auto_dtype(width)
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
    weights_cast = inference and dtype == 'bfloat16'  # float16 keeps autocast: its range is too narrow
    if weights_cast:
        dtype_reason += "; weights converted to bfloat16 once, no autocast"
    reason = f"device {device} ({device_reason}), dtype {dtype} ({dtype_reason})"
    if verbose and reason not in _printed_device_lines:
        _printed_device_lines.add(reason)
        print(reason)
    return DeviceSetup(device, device_type, dtype, reason, weights_cast)


# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each process's environment

def ddp_ranks():
    """(rank, local_rank, world_size) under torchrun; None for a plain `python X.py` run."""
    if 'RANK' not in os.environ:
        return None
    return int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])


def ddp_join(backend, device_type):
    """Join the process group (backend 'auto': nccl for CUDA, gloo for CPU), and leave it on
    every exit: the script's normal end calls ddp_exit(); an error on its way out runs
    _leave_after_error (atexit) instead. Also stop this worker when torchrun dies."""
    import torch.distributed as dist
    if backend == 'auto':
        backend = 'nccl' if device_type == 'cuda' else 'gloo'
    if backend == 'nccl' and device_type != 'cuda':
        raise ConfigError(f"backend nccl needs CUDA GPUs but the device is {device_type}; use --backend=gloo")
    restart = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))
    if restart and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        # torchrun restarted the workers (--max-restarts) and they share its store with the attempt
        # that failed, whose gloo addresses are still there: a worker that reads its dead peer's
        # address waits, then fails ("connectFullMesh ... Connection refused"). Keys per attempt.
        rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world_size, is_master=False)
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"attempt_{restart}", store), rank=rank,
                                world_size=world_size)
    else:
        dist.init_process_group(backend=backend)
    stop_with_parent()
    atexit.register(_leave_after_error)
    return backend


def _leave_after_error():
    """atexit under DDP: the script did not reach ddp_exit(), so an error is leaving it (its line
    or traceback is already printed). Leave the group and end with status 1, 130 after Ctrl-C,
    skipping finalization for the reason ddp_exit gives.

    The error also goes to torchrun's error file, on every rank: torchrun's failure summary then
    shows it even when torchrun stopped rank 0 before rank 0 could print its line."""
    from lib import cli
    error = getattr(sys, 'last_value', None)  # an uncaught exception; None after SystemExit
    message = f"{type(error).__name__}: {error}" if error is not None else cli.last_error and f"error: {cli.last_error}"
    if message and os.environ.get('TORCHELASTIC_ERROR_FILE'):
        import json
        try:
            with open(os.environ['TORCHELASTIC_ERROR_FILE'], 'w') as f:
                json.dump({'message': {'message': message, 'extraInfo': {
                    'py_callstack': message, 'timestamp': str(int(time.time()))}}}, f)
        except OSError:
            pass  # the line on stderr is all there is
    if error is None and cli.last_error_quiet:
        # an error every rank found, which rank 0 prints: a rank that leaves first makes torchrun
        # SIGTERM the others, rank 0 too, before its line is out. Give it 3 s; torchrun's SIGTERM,
        # once rank 0 has left, ends this wait at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(3)
    ddp_teardown()
    _flush()
    os._exit(130 if isinstance(error, KeyboardInterrupt) else 1)


def setup_device_and_ddp(device, dtype, backend, width=None):
    """(ddp, rank, world_size, dev) of a training process: under torchrun one GPU per process
    (cuda:LOCAL_RANK) and the process group joined (see ddp_join); else one process, rank 0.
    Only rank 0 prints the device line."""
    ranks = ddp_ranks()  # None unless launched by torchrun
    rank, local_rank, world_size = ranks if ranks is not None else (0, None, 1)
    dev = setup_device(device, dtype, local_rank=local_rank, verbose=rank == 0, width=width)
    if dev.device_type == 'cuda' and ':' in dev.device:
        torch.cuda.set_device(dev.device)  # so that nccl and new tensors use this process's GPU
    if ranks is not None:
        ddp_join(backend, dev.device_type)  # and leave it on every exit, errors included
    return ranks is not None, rank, world_size, dev


def all_ranks_ok(ok, ddp, device):
    """True when ok holds on every rank (one all-reduce under DDP): a check that only rank 0 makes
    (the run lock, its files) then stops all ranks together instead of leaving them in a collective."""
    if not ddp:
        return ok
    import torch.distributed as dist
    flag = torch.tensor(float(ok), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def on_master(work, ddp, device):
    """Run work() on rank 0 only (the run lock, the run's files); should it fail with a one-line
    error, every rank stops together (rank 0 prints it) instead of waiting in a collective."""
    error = None
    if os.environ.get('RANK', '0') == '0':
        try:
            work()
        except ConfigError as e:
            error = e
    if not all_ranks_ok(error is None, ddp, device):
        raise error or SystemExit(1)


# The exit status of a training run stopped by Ctrl-C or SIGTERM once it saved: not 0 (a job script
# must not read success), not 1 (an error), not 128+N (killed by a signal, maybe before saving):
# sysexits.h's EX_TEMPFAIL, "try again later", since the same command continues the run. torchrun
# never restarts workers after a signal of its own; a worker stopped alone is restarted (a failure
# to torchrun) and resumes. docs/reliability.md, 'Signals and torchrun'.
STOPPED = 75


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM ask a training run to stop: the signal is remembered (name), the
    current step finishes, the caller saves and exits with STOPPED. A second signal kills, as usual.

    requested() says whether any process received one; under DDP it is one tiny all-reduce that
    every rank must call at the same point (so that every rank stops at the same batch and
    nobody waits in a collective); ranks that received nothing then take the name SIGTERM."""

    def __init__(self, ddp=False, device='cpu'):
        self.ddp, self.device, self.name = ddp, device, None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._remember)

    def _remember(self, signum, frame):
        self.name = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def requested(self):
        if not self.ddp:
            return self.name is not None
        import torch.distributed as dist
        flag = torch.tensor(float(self.name is not None), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        # the answer is the reduced flag, never self.name read again: a signal that lands during
        # the all-reduce would make this rank stop while the others go on and wait for it forever
        # in their next collective; it counts at the next check, on every rank at once
        if not flag.item():
            return False
        if self.name is None:
            self.name = 'SIGTERM'  # another rank received it (torchrun forwards SIGTERM to all)
        return True


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


def ddp_exit(status=0):
    """End a torchrun worker now, with the status the exception in flight (if any) would give, else
    status, without the interpreter's finalization. Call it last, once every file is closed (from a
    `finally:`, an error on its way out keeps its status).

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
        code = status
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
    _flush()
    os._exit(code)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


# -----------------------------------------------------------------------------
# MFU: model FLOPs utilisation

# Dense peak FLOP/s per device and dtype, from the vendors' datasheets (no sparsity).
# float32 is the plain (non-tensor-core) rate. Anything not listed is "unknown", CPUs included.
PEAK_FLOPS = [
    # (substring of torch.cuda.get_device_name(), {dtype: FLOP/s}); first match wins
    ("H100 PCIe", {torch.bfloat16: 756e12, torch.float16: 756e12, torch.float32: 51e12}),
    ("H100 NVL", {torch.bfloat16: 835e12, torch.float16: 835e12, torch.float32: 60e12}),
    ("H100", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),  # SXM
    ("H200", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    ("B200", {torch.bfloat16: 2250e12, torch.float16: 2250e12, torch.float32: 75e12}),
    ("A100", {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12}),
    ("L40S", {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 91.6e12}),
    ("A10G", {torch.bfloat16: 70e12, torch.float16: 70e12, torch.float32: 31.2e12}),
    ("A10", {torch.bfloat16: 125e12, torch.float16: 125e12, torch.float32: 31.2e12}),
    ("L4", {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 30.3e12}),
    ("V100", {torch.float16: 125e12, torch.float32: 15.7e12}),
]


def device_name(dev):
    """The GPU's name (what PEAK_FLOPS is keyed on), else the device type ('cpu', 'mps')."""
    return torch.cuda.get_device_name(dev.device) if dev.device_type == 'cuda' else dev.device_type


def peak_flops(device_name, dtype=torch.bfloat16):
    """Peak FLOP/s of a known accelerator for dtype, or None when we do not know it."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    for key, table in PEAK_FLOPS:
        if key.lower() in (device_name or "").lower():
            return table.get(dtype)
    return None


CPU_RECIPE = 'config/train_shakespeare_char_cpu.py'  # the quick start
STEP_SIZE_KNOBS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'gradient_accumulation_steps')


def smaller_run_hint(device_type, dataset, config, config_files=()):
    """What to run instead when a run will take hours: on a CPU, the CPU recipe (or a smaller model).
    Never the recipe already running: a config file of the run (config_files, as given) is a CPU
    recipe, or its knobs (config) give the quick start's steps (a resume names no file); then the
    likely causes."""
    if device_type != 'cpu':
        return ""
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), CPU_RECIPE)
    if any(os.path.basename(f).endswith('_cpu.py') for f in config_files) or (
            os.path.isfile(recipe) and _same_steps(config, recipe)):
        return ("; this is already a CPU recipe (the quick start's 1,500 steps take about 5 minutes on "
                "a quiet 2-core CPU with bfloat16): this CPU is slower or busy (other programs on its "
                "cores? see top); fewer steps: --max_iters=N --lr_decay_iters=N")
    if dataset == 'shakespeare_char':
        return ("; this is a GPU-sized run: on a CPU, config/train_shakespeare_char_cpu.py trains a "
                "Shakespeare model in minutes")
    return ("; this is a GPU-sized run: on a CPU, shrink it (--n_layer, --n_embd, --batch_size, --block_size, "
            "--max_iters) or start from config/train_shakespeare_char_cpu.py")


def _same_steps(config, recipe):
    """Whether config's model and batch are those of the config file recipe."""
    knobs = config_file_knobs(recipe, config)
    return all(config.get(k) == knobs.get(k) for k in STEP_SIZE_KNOBS)


def estimate_mfu(model, tokens_per_sec, device_name, dtype=torch.bfloat16):
    """Model FLOPs utilisation: the model's training FLOP/s over the device's peak for dtype.
    None when the peak is unknown (CPUs and unlisted GPUs): no made-up number."""
    peak = peak_flops(device_name, dtype)
    if peak is None:
        return None
    return model.flops_per_token() * tokens_per_sec / peak
