"""
Benchmark what users wait for: a training step, and generation (prefill + per-token decode).

$ python bench.py config/bench_baby.py                                  # Shakespeare-char baby GPT
$ python bench.py config/bench_gpt2.py --device=cuda                    # GPT-2 124M on a GPU
$ python bench.py config/bench_gpt2.py --mode=generate --hf_compare=True  # + transformers' cached generate
$ python bench.py config/bench_baby.py --nanogpt_dir=/path/to/nanoGPT   # the same runs on nanoGPT's model
$ python bench.py --n_layer=2 --n_embd=64 --mode=train --json_out=bench.jsonl --profile=True

Every result is printed once: a readable line on a terminal, or one JSON line on stdout (lines
starting with '{') when stdout is a pipe or file (a readable copy goes to stderr); json_out, when
set, gets the JSON line too. Each phase shows a progress line when it takes more than a few seconds. With nanogpt_dir or hf_compare a table (ours, theirs, ratio) follows. The weights,
batches and seeds are the same for every implementation (with a modern knob such as
--pos_emb=rope, nanoGPT runs a GPT-2 of the same shape with its own weights). Config files and
--key=value flags are checked like train.py's.
"""

import copy
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time

from lib import cli  # first: a missing package is one line naming the fix, not a traceback

import numpy as np
import torch

from lib import files, hardware
from lib.export import save_hf
from lib.lora import apply_lora
from lib.optim import configure_optimizers
from lib.quantize import QUANTIZE, quantize_model
from lib.tokenfiles import PrepareError, open_tokens
from model import GPT, GPT2_FIELDS, GPTConfig

# -----------------------------------------------------------------------------
# defaults; config files (config/bench_*.py) and --key=value flags change them
# model: the baby GPT's shape here; every other GPTConfig field is a knob too (--pos_emb=rope,
# ...), GPT-2's by default; nanoGPT and HF always run a GPT-2 of the same shape
n_layer = 6  # transformer blocks
n_head = 6  # attention heads per block
n_embd = 384  # embedding width
block_size = 256  # context length; training batches are this long
vocab_size = 65  # vocabulary of the benchmarked model
bias = False  # biases in Linear and LayerNorm layers
dropout = 0.0  # dropout during the training step (the recipe's value makes the step realistic)
# what to run
mode = 'all'  # 'train', 'generate' or 'all'
dataset = ''  # batches from data/<dataset>/train.bin when it exists; otherwise synthetic random tokens
data_dir = ''  # a folder with train.bin instead of data/<dataset> (as in train.py)
batch_size = 12  # sequences per training step (gradient accumulation 1)
burn_in = 3  # untimed steps first (allocator warm-up, torch.compile, cache fills)
num_iters = 10  # timed training steps per repeat
repeats = 3  # repeats of each measurement; the median is reported
# generation
prompt_len = 1  # tokens of (random) prompt
max_new_tokens = 100  # tokens generated per sequence
gen_batch_sizes = [1, 8]  # sequences generated at once, one measurement each
gen_vocab_size = 0  # vocabulary of the generation model; 0 = vocab_size (GPT-2: 50257, its unpadded size)
temperature = 1.0  # sampling temperature
top_k = 200  # top-k sampling; 0 = none
# comparisons
nanogpt_dir = ''  # a nanoGPT checkout: also measure its model.py (same weights, batches and seeds)
hf_compare = False  # also measure transformers.GPT2LMHeadModel.generate (use_cache=True) for generation
lora_rank = 0  # train: LoRA adapters of rank r on c_attn, c_proj, c_fc, mlp.c_proj of a frozen model; 0 = full training
quantize = 'none'  # 'int8': also measure generation with int8 weights (model.quantize_int8), side by side
# output
json_out = ''  # append every JSON result line to this file
profile = False  # record the timed training steps with torch.profiler
trace_file = 'bench_trace.json'  # chrome trace written when profile=True (open in chrome://tracing or Perfetto)
# system
device = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto', 'float32', 'bfloat16' or 'float16'
compile = False  # torch.compile the model for the training step (generation runs eager)
seed = 1337  # weights, batches and sampling
globals().update(cli.model_knobs(globals()))  # the GPTConfig fields not set above
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str, list))}
RULES = dict(batch_size='>= 1', num_iters='>= 1', repeats='>= 1', prompt_len='>= 1', max_new_tokens='>= 1',
             burn_in='>= 0', gen_vocab_size='>= 0', seed='>= 0', temperature='>= 0', top_k='>= 0',
             lora_rank='>= 0', mode=('train', 'generate', 'all'), compile=(True, False),
             quantize=QUANTIZE)  # what each knob may be (cli.check_knobs); GPTConfig checks the model's
IMPL_NAMES = {'ours': 'ours', 'int8': 'ours int8', 'nanogpt': 'nanoGPT', 'hf': 'HF cached'}


def sync(dev):
    """Wait for queued GPU work, so the clock measures the work and not just its launch."""
    if dev.device_type == 'cuda':
        torch.cuda.synchronize(dev.device)
    elif dev.device_type == 'mps':
        torch.mps.synchronize()


def timed(dev, fn):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def peak_memory(dev):
    """(MiB, what it measures): the CUDA allocator's peak, or the whole process's peak RSS on CPU."""
    if dev.device_type == 'cuda':
        return torch.cuda.max_memory_allocated(dev.device) / 2**20, 'cuda max_memory_allocated'
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == 'darwin' else 2**10), 'process peak RSS (whole run so far)'


def load_nanogpt(folder):
    """nanoGPT's model module, imported from folder/model.py under a name of its own so it
    cannot shadow (or be shadowed by) our model.py."""
    path = os.path.join(folder, 'model.py')
    if not os.path.isfile(path):
        cli.die(f"nanogpt_dir={folder} has no model.py; point it at a nanoGPT checkout")
    spec = importlib.util.spec_from_file_location(f'nanogpt_model_{os.getpid()}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_models(cfg, vocab, dev, impls):
    """{impl: model} with identical weights: ours is built from the seed, the others copy it."""
    config = cli.model_config(cfg, vocab_size=vocab)
    torch.manual_seed(cfg['seed'])
    ours = GPT(config)
    models = {'ours': ours}
    if 'nanogpt' in impls:
        nano = load_nanogpt(cfg['nanogpt_dir'])
        theirs = nano.GPT(nano.GPTConfig(**{k: getattr(config, k) for k in GPT2_FIELDS}))
        if config.modern():
            models['nanogpt'] = theirs  # a GPT-2 of the same shape, its own random weights
            return to_device(models, dev)
        # without flash attention nanoGPT keeps a causal-mask buffer; that is not a weight
        missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
        if unexpected or any(not k.endswith('.attn.bias') for k in missing):
            cli.die(f"nanoGPT's model does not take our weights: missing {missing[:4]}, unexpected {unexpected[:4]}")
        models['nanogpt'] = theirs
    if 'hf' in impls:
        import transformers
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(ours, tmp)
            models['hf'] = transformers.GPT2LMHeadModel.from_pretrained(tmp)
    return to_device(models, dev)


def to_device(models, dev):
    for m in models.values():
        m.to(dev.device)
        if dev.weights_cast:  # generation as sample.py runs it: bfloat16 weights, no autocast
            m.to(dev.ptdtype)
    return models


def ran_in(impl, dev):
    """The dtype a measurement ran in, as printed beside it: 'float32', 'bfloat16 weights'
    (converted once), 'bfloat16 autocast' (float32 weights), or int8 weights with the rest."""
    if impl == 'int8':
        return f"int8 weights, {dev.dtype} elsewhere"
    if dev.dtype == 'float32':
        return 'float32'
    return f"{dev.dtype} {'weights' if dev.weights_cast else 'autocast'}"


def make_batches(cfg, dev):
    """A function giving (x, y) for step i, and a description of the data. The same batches
    for every implementation: step i always draws from a generator seeded with (seed, i)."""
    B, T = cfg['batch_size'], cfg['block_size']
    here = os.path.dirname(os.path.abspath(__file__))
    folder = cfg['data_dir'] or (os.path.join(here, 'data', cfg['dataset']) if cfg['dataset'] else '')
    path = os.path.join(folder, 'train.bin') if folder else ''
    try:
        data = open_tokens(path) if path and os.path.isfile(path) else None
    except PrepareError as e:
        cli.die(str(e))
    if data is not None and len(data) <= T + 1:
        cli.die(f"{path} has {len(data)} tokens, too few for block_size={T}")
    if data is not None and int(data[:1_000_000].max()) >= cfg['vocab_size']:
        cli.die(f"{path} has token ids >= vocab_size={cfg['vocab_size']}; set --vocab_size to the dataset's")

    def get_batch(i):
        rng = np.random.default_rng([cfg['seed'], i])
        if data is None:
            tokens = rng.integers(0, cfg['vocab_size'], size=(B, T + 1))
        else:
            offsets = rng.integers(0, len(data) - T - 1, size=B)
            tokens = data[offsets[:, None] + np.arange(T + 1)].astype(np.int64)  # (B, T+1)
        tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(dev.device)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    what = path if data is not None else 'synthetic random tokens'
    if path and data is None:
        what += f" (no {path}: prepare it with `python prepare.py {cfg['dataset'] or 'NAME'}` for real data)"
    return get_batch, what


def bench_train(name, model, cfg, dev, get_batch, data_desc):
    """Median time of a training step: forward + backward + AdamW step, one micro-batch."""
    model.train()
    if cfg['lora_rank'] > 0:
        apply_lora(model, cfg['lora_rank'], 2.0 * cfg['lora_rank'], 0.0)
    optimizer = configure_optimizers(model, 0.1, 6e-4, (0.9, 0.95), dev.device_type)
    step_model = torch.compile(model) if cfg['compile'] else model
    scaler = torch.amp.GradScaler(dev.device_type, enabled=dev.use_grad_scaler)

    def step(i, bar=None):
        x, y = get_batch(i)
        with dev.autocast():
            _, loss = step_model(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if bar is not None:
            bar.update()  # the line is drawn at most every 0.5 s, so it does not slow the timing

    torch.manual_seed(cfg['seed'])  # the same dropout masks for every implementation
    bar = cli.Progress(f"train {IMPL_NAMES[name]}", total=cfg['burn_in'] + cfg['repeats'] * cfg['num_iters'],
                          unit='steps')
    for i in range(cfg['burn_in']):
        step(i)
        bar.update()
    if dev.device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev.device)
    profiler = None
    if cfg['profile']:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev.device_type == 'cuda':
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        profiler.__enter__()
    per_repeat = []
    for r in range(cfg['repeats']):
        first = cfg['burn_in'] + r * cfg['num_iters']
        seconds, _ = timed(dev, lambda: [step(first + i, bar) for i in range(cfg['num_iters'])])
        per_repeat.append(seconds / cfg['num_iters'])
    bar.close()
    if profiler is not None:
        profiler.__exit__(None, None, None)
        trace = cfg['trace_file'] if name == 'ours' else cfg['trace_file'].replace('.json', f'_{name}.json')
        profiler.export_chrome_trace(trace)
        print(f"profile: chrome trace of the timed {name} steps in {trace}", file=sys.stderr)
    dt = statistics.median(per_repeat)
    tokens_per_sec = cfg['batch_size'] * cfg['block_size'] / dt
    mem, mem_kind = peak_memory(dev)
    device_name = torch.cuda.get_device_name(dev.device) if dev.device_type == 'cuda' else dev.device_type
    mfu = estimate_mfu(cfg, tokens_per_sec, device_name, dev)
    # what the training state holds: every parameter; a gradient per trainable one; AdamW's moments
    params = list(model.parameters())
    state_bytes = dict(param_bytes=sum(p.numel() * p.element_size() for p in params),
                       grad_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
                       optimizer_bytes=sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                           for t in s.values() if torch.is_tensor(t)))
    return dict(bench='train', impl=name, ms_per_iter=1000 * dt, tokens_per_sec=tokens_per_sec,
                mfu=mfu, peak_memory_mib=mem, memory=mem_kind, lora_rank=cfg['lora_rank'], **state_bytes, batch_size=cfg['batch_size'],
                block_size=cfg['block_size'], data=data_desc, repeats=cfg['repeats'], num_iters=cfg['num_iters'])


def estimate_mfu(cfg, tokens_per_sec, device_name, dev):
    """MFU from our FLOP count for the configured shape (the same architecture in every
    implementation); None where the device's peak is unknown, CPUs included."""
    with torch.device('meta'):  # shapes only, no memory
        shape = GPT(cli.model_config(cfg))
    return hardware.estimate_mfu(shape, tokens_per_sec, device_name, dev.ptdtype)


def generate_fn(name, model, cfg):
    """generate(idx, n, generator) -> (B, T+n) for each implementation, with the same sampling."""
    top_k = cfg['top_k'] or None
    if name in ('ours', 'int8'):
        return lambda idx, n, g: model.generate(idx, n, temperature=cfg['temperature'], top_k=top_k, generator=g)
    if name == 'nanogpt':  # samples from the global RNG; seeded before each call
        return lambda idx, n, g: model.generate(idx, n, temperature=cfg['temperature'], top_k=top_k)
    # transformers: min_new_tokens stops an end-of-text token from ending the run early
    return lambda idx, n, g: model.generate(idx, do_sample=True, top_k=top_k or 0, temperature=cfg['temperature'],
                                            max_new_tokens=n, min_new_tokens=n, use_cache=True,
                                            pad_token_id=0, attention_mask=torch.ones_like(idx))


def generate_runner(name, model, cfg, dev, batch):
    """After a burn-in, a function that times one generation: (prefill, decode per token, total) seconds.
    Prefill = prompt forward + first token."""
    model.eval()
    vocab = cfg['gen_vocab_size'] or cfg['vocab_size']
    rng = np.random.default_rng([cfg['seed'], 1, batch])
    idx = torch.from_numpy(rng.integers(0, vocab, size=(batch, cfg['prompt_len']))).to(dev.device)
    generate = generate_fn(name, model, cfg)
    n = cfg['max_new_tokens']

    def run(new_tokens):
        g = torch.Generator(device=dev.device).manual_seed(cfg['seed'])
        torch.manual_seed(cfg['seed'])
        with dev.autocast():
            out = generate(idx, new_tokens, g)
        if out.shape != (batch, cfg['prompt_len'] + new_tokens):
            raise RuntimeError(f"{name} generated shape {tuple(out.shape)}, expected {(batch, cfg['prompt_len'] + new_tokens)}")

    @torch.no_grad()
    def measure():
        if name in ('ours', 'int8'):
            # our generate_stream yields each token: time to the first one is the prefill,
            # the steps between tokens are the decode
            g = torch.Generator(device=dev.device).manual_seed(cfg['seed'])
            stamps = []
            sync(dev)
            t0 = time.perf_counter()
            with dev.autocast():
                for _ in model.generate_stream(idx, n, temperature=cfg['temperature'], top_k=cfg['top_k'] or None,
                                               generator=g):
                    sync(dev)
                    stamps.append(time.perf_counter())
            decode = (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else 0.0  # mean, as for the others
            return stamps[0] - t0, decode, stamps[-1] - t0
        # generate returns only at the end: prefill = a run for one new token, decode =
        # the rest of a full run, per token
        prefill = timed(dev, lambda: run(1))[0]
        total = timed(dev, lambda: run(n))[0]
        return prefill, max(total - prefill, 0.0) / max(n - 1, 1), total

    with torch.no_grad():
        run(min(n, 4))  # burn in
    return measure


def bench_generate(models, cfg, dev, batch):
    """Prefill time, per-token decode time and tokens/s of each model in models ({impl: model}),
    one result each. The repeats run in rounds (each implementation once per round), so load
    that comes and goes on a shared machine hits all of them alike and their ratios stay fair;
    decode_ms_all holds every round's decode time."""
    measures = {name: generate_runner(name, model, cfg, dev, batch) for name, model in models.items()}
    times = {name: [] for name in models}
    peaks = {name: 0.0 for name in models}
    bar = cli.Progress(f"generate {', '.join(IMPL_NAMES[n] for n in models)} B={batch}", total=cfg['repeats'],
                          unit='rounds')
    for _ in range(cfg['repeats']):
        for name, measure in measures.items():
            if dev.device_type == 'cuda':
                torch.cuda.reset_peak_memory_stats(dev.device)
            times[name].append(measure())
            peaks[name] = max(peaks[name], peak_memory(dev)[0])
        bar.update()
    bar.close()
    results = []
    n = cfg['max_new_tokens']
    for name in models:
        prefill, decode, total = (statistics.median(t[i] for t in times[name]) for i in range(3))
        results.append(dict(bench='generate', impl=name, batch_size=batch, prompt_len=cfg['prompt_len'],
                            max_new_tokens=n, prefill_ms=1000 * prefill, decode_ms_per_token=1000 * float(decode),
                            decode_ms_all=[round(1000 * t[1], 3) for t in times[name]],
                            tokens_per_sec=batch * n / total, total_s=total, peak_memory_mib=peaks[name],
                            memory=peak_memory(dev)[1], repeats=cfg['repeats'],
                            timing='per-token stream' if name in ('ours', 'int8') else 'two generate calls'))
    return results


def comparison_table(results):
    """Text table of the results measured by more than one implementation: one row per
    measurement, one column per implementation, and ours over each other implementation."""
    impls = [i for i in IMPL_NAMES if any(r['impl'] == i for r in results)]
    rows = {}
    for r in results:
        if r['bench'] == 'train':
            key = f"train B={r['batch_size']} T={r['block_size']}  tokens/s"
        else:
            key = f"generate B={r['batch_size']} {r['max_new_tokens']} new  tokens/s"
        rows.setdefault(key, {})[r['impl']] = r['tokens_per_sec']
    others = [i for i in impls if i not in ('ours', 'int8')]
    header = [f"{'measurement':<40}"] + [f"{IMPL_NAMES[i]:>12}" for i in impls] + \
             [f"{'ours/' + IMPL_NAMES[i]:>18}" for i in others] + (["    int8/ours"] if 'int8' in impls else [])
    lines = [''.join(header)]
    for key, values in rows.items():
        if len(values) < 2:
            continue
        cells = [f"{key:<40}"] + [f"{values[i]:>12,.1f}" if i in values else f"{'-':>12}" for i in impls]
        for i in others:
            ratio = values['ours'] / values[i] if 'ours' in values and values.get(i) else None
            cells.append(f"{ratio:>17.2f}x" if ratio is not None else f"{'-':>18}")
        if 'int8' in impls:  # the speedup of int8 weights over our float model
            ratio = values['int8'] / values['ours'] if values.get('int8') and values.get('ours') else None
            cells.append(f"{ratio:>12.2f}x" if ratio is not None else f"{'-':>13}")
        lines.append(''.join(cells))
    for r in results:  # int8 and ours ran in the same rounds: each round's decode speed ratio, for the spread
        ours = next((o for o in results if o['impl'] == 'ours' and o['bench'] == 'generate'
                     and o['batch_size'] == r['batch_size']), None)
        if r['impl'] == 'int8' and ours and r.get('decode_ms_all') and ours.get('decode_ms_all'):
            ratios = sorted(a / b for a, b in zip(ours['decode_ms_all'], r['decode_ms_all']) if b > 0)
            lines.append(f"decode int8/ours B={r['batch_size']}, per round: {' '.join(f'{x:.2f}' for x in ratios)} "
                         f"(median {statistics.median(ratios):.2f}x; ours in {ours.get('ran_in', '?')}, int8 in "
                         f"{r.get('ran_in', '?')})")
    dtypes = {}  # every ratio above compares runs in these dtypes
    for r in results:
        dtypes.setdefault(f"{r['bench']} {IMPL_NAMES[r['impl']]}", r.get('ran_in', '?'))
    lines.append('ran in: ' + '; '.join(f"{k} = {v}" for k, v in dtypes.items()))
    return '\n'.join(lines)


def emit(result, cfg, dev):
    """Print one JSON line (and append it to json_out); result gains the dtype it ran in."""
    result.update(dtype=dev.dtype, ran_in=ran_in(result['impl'], dev))
    result = dict(result, device=dev.device, compile=cfg['compile'],
                  model={f: cfg[f] for f in GPTConfig.__dataclass_fields__},
                  torch=torch.__version__, time=time.strftime('%Y-%m-%dT%H:%M:%S'))
    line = json.dumps(result)
    if result['bench'] == 'train':
        mfu = 'n/a (device peak unknown)' if result['mfu'] is None else f"{100 * result['mfu']:.1f}%"
        summary = (f"train {result['impl']} ({result['ran_in']}): {result['ms_per_iter']:.1f} ms/iter, {result['tokens_per_sec']:,.0f} "
                   f"tokens/s, MFU {mfu}, peak memory {result['peak_memory_mib']:,.0f} MiB ({result['memory']}); "
                   f"parameters {result['param_bytes'] / 2**20:,.1f} MiB, gradients {result['grad_bytes'] / 2**20:,.1f} MiB, "
                   f"optimizer state {result['optimizer_bytes'] / 2**20:,.1f} MiB")
    else:
        summary = (f"generate {result['impl']} B={result['batch_size']} ({result['ran_in']}): prefill {result['prefill_ms']:.1f} ms, "
                   f"decode {result['decode_ms_per_token']:.2f} ms/token, {result['tokens_per_sec']:,.1f} tokens/s")
    if sys.stdout.isatty():  # a person reads this: the readable line only
        print(summary, flush=True)
    else:  # a pipe or file gets the JSON; the person watching stderr the readable line
        print(summary, file=sys.stderr, flush=True)
        print(line, flush=True)
    if cfg['json_out']:
        try:
            with open(cfg['json_out'], 'a') as f:
                f.write(line + '\n')
        except OSError as e:
            cli.die(files.os_error_message(e, cfg['json_out']))


def check_writable(path, key):
    """Fail now, not after minutes of measuring, if path cannot be written (without creating it)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        cli.die(f"{key}={path} is a folder; name a file")
    if not os.path.isdir(folder):
        cli.die(f"cannot write {key}={path}: folder {folder} does not exist")
    target = path if os.path.exists(path) else folder
    if not os.access(target, os.W_OK):
        cli.die(f"cannot write {key}={path}: permission denied or read-only")


def main(argv):
    cfg = dict(DEFAULTS)
    cfg.update(cli.load_config(DEFAULTS, argv))
    cli.check_knobs(cfg, RULES)
    config = cli.model_config(cfg)  # n_embd divisible by n_head, pos_emb, norm, ...
    if not (isinstance(cfg['gen_batch_sizes'], list) and cfg['gen_batch_sizes']
            and all(isinstance(b, int) and b > 0 for b in cfg['gen_batch_sizes'])):
        cli.die(f"gen_batch_sizes must be a list of positive ints like [1, 8], got {cfg['gen_batch_sizes']!r}")
    # an explicit data_dir is a request for real data; only --dataset may fall back to synthetic tokens
    if cfg['data_dir'] and not os.path.isfile(os.path.join(cfg['data_dir'], 'train.bin')):
        cli.die(f"data_dir={cfg['data_dir']} has no train.bin: name a folder that `python prepare.py NAME` "
                   f"filled (e.g. data/NAME), or leave out --data_dir for synthetic random tokens")
    for key in ('json_out', 'trace_file'):
        if cfg[key] and (key == 'json_out' or cfg['profile']):
            check_writable(cfg[key], key)
    if cfg['prompt_len'] + cfg['max_new_tokens'] > cfg['block_size'] and cfg['hf_compare']:
        cli.die("hf_compare needs prompt_len + max_new_tokens <= block_size (transformers has no sliding window)")
    if cfg['hf_compare'] and config.modern():
        cli.die(f"hf_compare needs GPT-2's architecture: leave {', '.join(config.modern())} at the default")
    if cfg['lora_rank'] and cfg['nanogpt_dir']:
        cli.die(f"lora_rank cannot be combined with nanogpt_dir, got {cfg['lora_rank']}")
    # training picks its dtype as train.py does; generation as sample.py does (inference: float32 on
    # a CPU for 'auto', bfloat16 weights converted once): each measures what a user waits for
    dev = gen_dev = None
    if cfg['mode'] in ('train', 'all'):
        dev = hardware.setup_device(cfg['device'], cfg['dtype'], width=cfg['n_embd'], verbose=False)
        print(f"train: {dev.reason}")
    if cfg['mode'] in ('generate', 'all'):
        gen_dev = hardware.setup_device(cfg['device'], cfg['dtype'], inference=True, verbose=False)
        print(f"generate: {gen_dev.reason}")
    torch.manual_seed(cfg['seed'])
    if cfg['nanogpt_dir'] and not os.path.isdir(cfg['nanogpt_dir']):
        cli.die(f"nanogpt_dir={cfg['nanogpt_dir']} is not a folder")
    impls = ['ours'] + (['nanogpt'] if cfg['nanogpt_dir'] else [])
    results = []
    if cfg['mode'] in ('train', 'all'):
        get_batch, data_desc = make_batches(cfg, dev)
        print(f"train: {data_desc}", file=sys.stderr)
        models = build_models(cfg, cfg['vocab_size'], dev, impls)
        for name, model in models.items():
            results.append(bench_train(name, model, cfg, dev, get_batch, data_desc))
            emit(results[-1], cfg, dev)
        del models
    if cfg['mode'] in ('generate', 'all'):
        gen_impls = impls + (['hf'] if cfg['hf_compare'] else [])
        models = build_models(cfg, cfg['gen_vocab_size'] or cfg['vocab_size'], gen_dev, gen_impls)
        if cfg['quantize'] != 'none':  # the same weights, quantized: measured right after ours
            ours = models.pop('ours')
            models = dict(ours=ours, int8=copy.deepcopy(ours), **models)
            quantize_model(models['int8'], cfg['quantize'])
        for batch in cfg['gen_batch_sizes']:
            for result in bench_generate(models, cfg, gen_dev, batch):
                results.append(result)
                emit(result, cfg, gen_dev)
    if len({r['impl'] for r in results}) > 1:
        print(comparison_table(results))
    return results


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
