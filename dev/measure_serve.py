"""
Concurrent clients against serve.py (or dev/serve_fastapi.py): total tokens/s, and p50/p95 time
to first token and per request, for 1, 4, 8 and 16 clients. The server is started here on
127.0.0.1 and the machine should be otherwise idle; results: dev/LOG.md.

    python dev/measure_serve.py --model=baby                   # the quick start's trained run
    python dev/measure_serve.py --model=gpt2 --quantize=int8   # GPT-2 124M shape, random weights
    python dev/measure_serve.py --model=gpt2 --server=fastapi  # the same engine behind FastAPI + uvicorn

Each level sends the same requests (streamed, max_tokens new tokens, temperature 1, one seed
each); a fixed number of client threads take them from a queue, one at a time each. Tokens are
counted by the server (/health's tokens_generated), so a sample that ends early counts right.
One untimed request first warms the server up. 1 client is the one-after-the-other baseline.
Options: --clients=1,4,8,16 --requests=N --max_tokens=N --out_dir=RUN (--model=baby's run folder).
"""

import http.client
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

args = dict(model='baby', quantize='none', server='stdlib', clients='1,4,8,16', requests='', max_tokens='',
            out_dir='out-shakespeare-char-cpu')
for a in sys.argv[1:]:
    key, _, value = a.removeprefix('--').partition('=')
    if key not in args:
        sys.exit(f"error: unknown option --{key}; known: {', '.join('--' + k for k in args)}")
    args[key] = value
baby = args['model'] == 'baby'
requests = int(args['requests'] or (32 if baby else 16))
max_tokens = int(args['max_tokens'] or (128 if baby else 64))
levels = [int(c) for c in args['clients'].split(',')]
prompts = (["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nWe are", "KING HENRY:"] if baby else
           ["The meaning of life is", "Once upon a time, in a small village by the sea,",
            "In machine learning, a transformer is", "The weather today"])

if baby:
    run = args['out_dir']
else:  # GPT-2 124M's shape with random weights (the weights are not needed to time it)
    import torch

    import runs
    from model import GPT, GPTConfig
    run = tempfile.mkdtemp(prefix='gpt2-shape-')
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                          'model_args': model.config.checkpoint_args(), 'iter_num': 0, 'best_val_loss': 0.0,
                          'config': {'dataset': None}}, os.path.join(run, 'ckpt.pt'))
    del model

with socket.socket() as s:  # a free port for the server
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
script = 'serve.py' if args['server'] == 'stdlib' else 'dev/serve_fastapi.py'
server = subprocess.Popen([sys.executable, script, f'--out_dir={run}', f'--port={port}', '--device=cpu',
                           f"--quantize={args['quantize']}", '--max_batch=16'], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
for _ in range(600):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        break
    except OSError:
        time.sleep(0.1)


def tokens_generated():
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
    conn.request('GET', '/health')
    return json.loads(conn.getresponse().read())['tokens_generated']


def one(i):
    """(seconds to the first text, seconds to the end) of one streamed request."""
    body = json.dumps({'prompt': prompts[i % len(prompts)], 'max_tokens': max_tokens, 'temperature': 1.0,
                       'seed': i, 'stream': True})
    start = time.perf_counter()
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
    conn.request('POST', '/v1/completions', body, {'Content-Type': 'application/json'})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    first = None
    for line in r:
        if line.startswith(b'data: {') and first is None and json.loads(line[6:])['choices'][0]['text']:
            first = time.perf_counter() - start
        if line.startswith(b'data: [DONE]'):
            break
    return first, time.perf_counter() - start


def level(clients):
    work, results = queue.Queue(), []
    for i in range(requests):
        work.put(i)

    def client():
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            results.append(one(i))
    before, start = tokens_generated(), time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, tokens = time.perf_counter() - start, tokens_generated() - before
    return tokens / seconds, [r[0] for r in results], [r[1] for r in results]


def p(values, q):
    return statistics.quantiles(values, n=100, method='inclusive')[q - 1] if len(values) > 1 else values[0]


try:
    one(10 ** 6)  # warm-up
    import torch
    print(f"{args['model']} ({'int8' if args['quantize'] == 'int8' else 'float32'}), {args['server']} server, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; {requests} requests of {max_tokens} tokens per level")
    print("| clients | total tokens/s | first token p50 / p95 (s) | request p50 / p95 (s) |")
    print("|---|---|---|---|")
    for clients in levels:
        rate, ttft, latency = level(clients)
        print(f"| {clients} | {rate:.1f} | {p(ttft, 50):.3f} / {p(ttft, 95):.3f} | "
              f"{p(latency, 50):.2f} / {p(latency, 95):.2f} |", flush=True)
finally:
    server.terminate()
    server.wait(timeout=60)
    if not baby:
        shutil.rmtree(run)
