"""
float32 vs bfloat16 vs int8 for inference on this CPU: decode ms/token (sample.py's path),
serve.py tokens/s with 1 and 16 clients, evaluate.py's perplexity time. Random weights at the
baby GPT's shape (config/bench_baby.py) and GPT-2 124M's (config/bench_gpt2.py). Every mode
runs once per round, rounds alternate, so load that comes and goes hits all; prints each
round's numbers and the range per mode. Results: docs/benchmarks.md ("dtype for inference").

    python dev/measure_inference_dtype.py                      # both shapes, 2 rounds
    python dev/measure_inference_dtype.py --shapes=baby --rounds=3
    OMP_NUM_THREADS=1 python dev/measure_inference_dtype.py   # a busy machine: 2 threads stall

On a machine shared with other work, two threads wait for each other at every small op of a
decoding step whenever one is descheduled: per-token times then spread 5-50x. One thread
(OMP_NUM_THREADS=1) is steadier; the decode median per token ignores the stalls.

Modes: float32; bfloat16 weights (what --dtype=bfloat16 loads now: converted once, no
autocast); bfloat16 autocast (float32 weights under torch.autocast: what --dtype=bfloat16, and
dtype=auto on a CPU with bfloat16 hardware, ran before; decode and perplexity only, serve.py no
longer has it); int8 (--quantize=int8, float32 elsewhere).
"""

import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from lib import loading, runs  # noqa: E402
from lib.evaluation import perplexity  # noqa: E402
from lib.quantize import quantize_model  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

args = dict(shapes='baby,gpt2', rounds='2')
for a in sys.argv[1:]:
    key, _, value = a.removeprefix('--').partition('=')
    if key not in args:
        sys.exit(f"error: unknown option --{key}; known: {', '.join('--' + k for k in args)}")
    args[key] = value
SHAPES = {  # shape, prompt, new tokens to decode, tokens to score, serve's max_tokens
    'baby': dict(config=dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False),
                 prompt_len=1, new_tokens=200, score=4096, batch=8, max_tokens=100, prompt='ROMEO:'),
    'gpt2': dict(config=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True),
                 prompt_len=16, new_tokens=30, score=2048, batch=8, max_tokens=30,
                 prompt='The meaning of life is'),
}
MODES = ['float32', 'bfloat16 weights', 'bfloat16 autocast', 'int8']
SERVE_FLAGS = {'float32': ['--dtype=float32'], 'bfloat16 weights': ['--dtype=bfloat16'],
               'int8': ['--dtype=float32', '--quantize=int8']}


def make_run(root, shape):
    """A run folder with random weights, its tokenizer's metadata and a val.bin of random ids."""
    s = SHAPES[shape]
    data = os.path.join(root, 'data')
    os.makedirs(data)
    if shape == 'baby':
        text = open('/work/shared/data/tinyshakespeare/input.txt').read() if os.path.exists(
            '/work/shared/data/tinyshakespeare/input.txt') else ''.join(map(chr, range(32, 97)))
        chars = sorted(set(text))[:65]
        meta = {'vocab_size': len(chars), 'tokenizer': 'char', 'chars': chars}
    else:
        meta = {'vocab_size': 50257, 'tokenizer': 'gpt2'}
    with open(os.path.join(data, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    np.random.default_rng(0).integers(0, meta['vocab_size'], s['score']).astype(np.uint16).tofile(
        os.path.join(data, 'val.bin'))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**s['config']))
    run = os.path.join(root, 'run')
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                          'model_args': model.config.checkpoint_args(), 'iter_num': 0, 'best_val_loss': 9.9,
                          'config': {'dataset': shape, 'data_dir': data}}, os.path.join(run, 'ckpt.pt'))
    return run, data


def load(run, mode):
    """The model and the forward context as sample.py and evaluate.py would have them."""
    dtype = 'bfloat16' if mode == 'bfloat16 weights' else 'float32'
    model, _, dev = loading.load_model_on_device('resume', run, 'cpu', dtype)
    quantize_model(model, 'int8' if mode == 'int8' else 'none')
    if mode == 'bfloat16 autocast':
        return model, lambda: torch.autocast('cpu', dtype=torch.bfloat16)
    return model, dev.autocast


def decode_ms(model, context, shape):
    s = SHAPES[shape]
    idx = torch.randint(0, s['config']['vocab_size'], (1, s['prompt_len']),
                        generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    stamps = []
    with torch.inference_mode(), context():
        for _ in model.generate_stream(idx, s['new_tokens'], temperature=1.0, top_k=200, generator=g):
            stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return 1000 * sum(steps) / len(steps), 1000 * statistics.median(steps)  # a stall moves the mean only


def perplexity_s(model, context, data, shape):
    tokens = np.fromfile(os.path.join(data, 'val.bin'), dtype=np.uint16)
    t0 = time.perf_counter()
    perplexity(model, tokens, batch_size=SHAPES[shape]['batch'], autocast=context)
    return time.perf_counter() - t0


def serve_tokens_per_s(run, mode, shape, clients):
    """serve.py started with mode's flags: tokens/s for 1 client (2 requests one after the
    other) and for clients at once (one request each)."""
    s = SHAPES[shape]
    proc = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={run}', '--port=0', '--device=cpu',
                             *SERVE_FLAGS[mode]], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        port = next(int(m.group(1)) for line in proc.stdout if (m := re.search(r":(\d+)$", line.strip())))

        def ask(seed, out):
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
            body = json.dumps(dict(prompt=s['prompt'], max_tokens=s['max_tokens'], seed=seed))
            conn.request('POST', '/v1/completions', body, {'Content-Type': 'application/json'})
            out.append(json.loads(conn.getresponse().read())['usage']['completion_tokens'])
        ask(0, [])  # warm-up
        results = {}
        for n in clients:
            done = []
            t0 = time.perf_counter()
            if n == 1:
                for seed in (1, 2):
                    ask(seed, done)
            else:
                threads = [threading.Thread(target=ask, args=(seed, done)) for seed in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            results[n] = sum(done) / (time.perf_counter() - t0)
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main():
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                if line.startswith('model name')), platform.processor())
    flags = open('/proc/cpuinfo').read()
    bf16 = 'AMX' if ' amx_bf16' in flags else 'AVX512-BF16' if ' avx512_bf16' in flags else 'none (emulated)'
    print(f"CPU {cpu}, {os.cpu_count()} cores, bfloat16 hardware: {bf16}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    table = {}  # (shape, measurement, mode): [values]
    with tempfile.TemporaryDirectory() as tmp:
        folders = {shape: make_run(os.path.join(tmp, shape), shape) for shape in args['shapes'].split(',')}
        for r in range(int(args['rounds'])):
            for shape, (run, data) in folders.items():
                print(f"round {r + 1}, {shape}, load average {os.getloadavg()[0]:.1f}", flush=True)
                for mode in MODES:
                    model, context = load(run, mode)
                    decode_ms(model, context, shape)  # warm-up
                    mean, median = decode_ms(model, context, shape)
                    got = {'decode ms/token': mean, 'decode median ms/token': median,
                           'perplexity s': perplexity_s(model, context, data, shape)}
                    del model
                    if mode in SERVE_FLAGS:
                        served = serve_tokens_per_s(run, mode, shape, (1, 16))
                        got['serve 1 client tokens/s'] = served[1]
                        got['serve 16 clients tokens/s'] = served[16]
                    for key, value in got.items():
                        table.setdefault((shape, key, mode), []).append(value)
                    print(f"  {mode}: " + ', '.join(f"{k} {v:.2f}" for k, v in got.items()), flush=True)
    print(f"\nrange over rounds (load average now {os.getloadavg()[0]:.1f}):")
    for (shape, key, mode), values in table.items():
        print(f"{shape:5} {key:26} {mode:18} {min(values):9.2f} - {max(values):9.2f} "
              f"(median {statistics.median(values):.2f})")


if __name__ == '__main__':
    main()
