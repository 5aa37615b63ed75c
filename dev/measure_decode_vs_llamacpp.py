"""
Decoding speed side by side with llama.cpp: the GPT-2 124M shape (config/bench_gpt2.py, random
weights), batch 1, the same number of threads on both sides, ms per generated token.

    pip install gguf llama-cpp-python
    python dev/measure_decode_vs_llamacpp.py                          # 3 rounds, 1 thread, prompts 16, 512
    python dev/measure_decode_vs_llamacpp.py --threads=1,2 --rounds=5
    python dev/measure_decode_vs_llamacpp.py --llama_builds=installed,/tmp/llama_native   # two builds
    python dev/measure_decode_vs_llamacpp.py --flash_attn=0,1         # llama.cpp without and with it
    python dev/measure_decode_vs_llamacpp.py --profile=1 --new_tokens=60   # ours: torch.profiler per op

First it makes a run folder (--run_dir, default out-decode-gpt2-random) holding random GPT-2 124M
weights as train.py saves them (bias as GPT-2, the real 50257-token vocabulary so that both sides
compute the same lm_head), then `python export.py --outtype=f32` and `--outtype=q8_0` write its
GGUF files; later runs reuse them. Then, in rounds, one fresh process per case and thread count
(the order rotates each round, so passing load falls on every case):

- ours float32 / int8: loading.load_model_on_device and lib.quantize.quantize_model, then
  model.generate_stream, as `python sample.py [--quantize=int8]` does (temperature 0.8, top_k 200).
- llama.cpp f32 / q8_0: llama-cpp-python's Llama on the exported file (n_threads and
  n_threads_batch = the thread count, its default float16 KV cache, flash attention off as
  llama-cpp-python defaults it, or on with --flash_attn=1; llama.cpp's own tools default to
  `auto`), the prompt through Llama.eval, then per token llama.cpp's own sampler chain (top_k 200,
  temperature 0.8, dist) and Llama.eval of that token.

Prefill and decode are separated by the clock at each new token: prefill is the time to the
first new token (prompt forward + its sampling), decode the mean time from the first new token to
the last (each step: one-token forward, lm_head, sampling, and for ours the token's .item()).
For llama.cpp the line also gives llama.cpp's own decode time (llama_perf_context: t_eval_ms /
n_eval, its one-token decode calls only, without sampling and Python). Each process first runs one
untimed short generation. A llama build is a folder put first on PYTHONPATH (pip install
--target=FOLDER llama_cpp_python-*.whl), or `installed`, the one this Python imports. Results:
dev/LOG.md, docs/benchmarks.md.
"""

import json
import os
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OPTIONS = dict(run_dir='out-decode-gpt2-random', rounds='3', threads='1', prompts='16,512',
               new_tokens='100', cases='ours-float32,ours-int8,llama-f32,llama-q8_0',
               llama_builds='installed', flash_attn='0', json_out='', profile='0', worker='')
TEMPERATURE, TOP_K, SEED = 0.8, 200, 1337  # sample.py's defaults
WARMUP_TOKENS = 8


CASES = ('ours-float32', 'ours-int8', 'llama-f32', 'llama-q8_0')
BLOCK_SIZE = 1024  # config/bench_gpt2.py's: a prompt and its new tokens must fit


def parse(argv):
    opts = dict(OPTIONS)
    for arg in argv:
        key, _, value = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or key not in opts or not value:
            sys.exit(f"error: {arg!r} not understood; options: "
                     + " ".join(f"--{k}={v}" for k, v in OPTIONS.items() if k != 'worker'))
        opts[key] = value
    numbers = {k: opts[k].split(',') for k in ('rounds', 'threads', 'prompts', 'new_tokens')}
    if not all(x.isdigit() and int(x) >= 1 for xs in numbers.values() for x in xs) \
            or int(opts['new_tokens']) < 2 or ',' in opts['rounds'] + opts['new_tokens']:
        sys.exit("error: --rounds and --new_tokens (>= 2) take one whole number, --threads and --prompts "
                 "whole numbers >= 1 separated by commas, e.g. --threads=1,2 --prompts=16,512")
    if max(map(int, numbers['prompts'])) + int(opts['new_tokens']) > BLOCK_SIZE:
        sys.exit(f"error: the longest prompt plus --new_tokens must fit the context of {BLOCK_SIZE} tokens")
    unknown = set(opts['cases'].split(',')) - set(CASES)
    if unknown or set(opts['flash_attn'].split(',')) - {'0', '1'}:
        sys.exit(f"error: --cases takes {','.join(CASES)} (any of them) and --flash_attn 0, 1 or 0,1; "
                 f"got --cases={opts['cases']} --flash_attn={opts['flash_attn']}")
    return opts


def check_llama_builds(builds):
    """One error line, before any run, for a build whose llama_cpp does not import."""
    for build in builds:
        if build != 'installed' and not (Path(build) / 'llama_cpp').is_dir():
            sys.exit(f"error: --llama_builds: {build} has no llama_cpp folder; make it with "
                     f"pip install --no-deps --target={build} llama_cpp_python-*.whl")
        env = dict(os.environ)
        if build != 'installed':
            env['PYTHONPATH'] = os.pathsep.join(p for p in (build, env.get('PYTHONPATH')) if p)
        check = subprocess.run([sys.executable, '-c', 'import llama_cpp'], env=env, capture_output=True)
        if check.returncode:
            where = "in this Python" if build == 'installed' else f"from {build}"
            sys.exit(f"error: llama_cpp does not import {where}: pip install llama-cpp-python, "
                     f"or leave out the llama cases (--cases=ours-float32,ours-int8)")


def prompt_ids(length, vocab):
    import torch
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()


# -----------------------------------------------------------------------------
# the run folder and its GGUF files

def make_run(run_dir):
    """Random GPT-2 124M weights saved as train.py saves a checkpoint, then its GGUF files."""
    import torch
    from lib import runs
    from model import GPT, GPTConfig
    run = REPO / run_dir if not Path(run_dir).is_absolute() else Path(run_dir)
    if not (run / 'ckpt.pt').exists():
        shape = runpy.run_path(str(REPO / 'config' / 'bench_gpt2.py'))
        torch.manual_seed(0)
        config = GPTConfig(n_layer=shape['n_layer'], n_head=shape['n_head'], n_embd=shape['n_embd'],
                           block_size=shape['block_size'], vocab_size=shape['gen_vocab_size'],
                           bias=shape['bias'], dropout=0.0)
        model = GPT(config)
        run.mkdir(parents=True, exist_ok=True)
        runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                              'model_args': config.checkpoint_args(), 'iter_num': 0, 'tokenizer': None,
                              'lora': None, 'config': {}}, run / 'ckpt.pt')
        print(f"wrote {run / 'ckpt.pt'}: random GPT-2 124M weights", flush=True)
    for outtype in ('f32', 'q8_0'):
        if not (run / f'model-{outtype}.gguf').exists():
            export = [sys.executable, 'export.py', f'--out_dir={run}', f'--outtype={outtype}']
            if subprocess.run(export, cwd=REPO).returncode:  # export.py has said why
                sys.exit(f"error: {' '.join(export[1:])} failed (its message is above)")
    return run


# -----------------------------------------------------------------------------
# one process: one case at one thread count, every prompt length

def decode_ours(run, quantize, prompt_lens, new_tokens):
    import contextlib
    import torch
    from lib import loading
    from lib.quantize import quantize_model
    with contextlib.redirect_stdout(sys.stderr):
        model, _, dev = loading.load_model_on_device('resume', str(run), 'cpu', 'auto')
        quantize_model(model, quantize)
    vocab = model.config.vocab_size

    def generate(length, n):
        x = torch.tensor(prompt_ids(length, vocab), dtype=torch.long)[None, :]  # (1, T)
        generator = torch.Generator().manual_seed(SEED)
        start, stamps, cpu = time.perf_counter(), [], []
        with dev.autocast():
            for token in model.generate_stream(x, n, temperature=TEMPERATURE, top_k=TOP_K,
                                               generator=generator):
                token.item()  # what sample.py's printer does with each token
                stamps.append(time.perf_counter())
                cpu.append(time.process_time())
        return start, stamps, cpu

    return run_all(generate, prompt_lens, new_tokens,
                   dict(torch=torch.__version__, torch_threads=torch.get_num_threads()))


def decode_llama(run, outtype, prompt_lens, new_tokens, threads, flash_attn):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(run / f'model-{outtype}.gguf'), n_ctx=0, n_batch=512,
                          n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                          flash_attn=flash_attn, verbose=False)
    ctx = llm.ctx
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in (llama_cpp.llama_sampler_init_top_k(TOP_K),
                    llama_cpp.llama_sampler_init_temp(TEMPERATURE), llama_cpp.llama_sampler_init_dist(SEED)):
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    def generate(length, n):
        ids = prompt_ids(length, llm.n_vocab())
        llm.reset()
        llama_cpp.llama_perf_context_reset(ctx)
        start, stamps, cpu = time.perf_counter(), [], []
        llm.eval(ids)  # prefill
        for step in range(n):
            token = llama_cpp.llama_sampler_sample(chain, ctx, -1)
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            if step < n - 1:
                llm.eval([token])  # one new position
        perf = llama_cpp.llama_perf_context(ctx)
        own = dict(llama_eval_ms=perf.t_eval_ms / max(perf.n_eval, 1), llama_n_eval=perf.n_eval)
        return start, stamps, cpu, own

    info = dict(llama_cpp=llama_cpp.__version__, llama_cpp_path=os.path.dirname(llama_cpp.__file__),
                system_info=llama_cpp.llama_print_system_info().decode().strip(), flash_attn=flash_attn)
    return run_all(generate, prompt_lens, new_tokens, info)


def run_all(generate, prompt_lens, new_tokens, info):
    generate(prompt_lens[0], WARMUP_TOKENS)  # untimed: first-call allocations
    results = []
    for length in prompt_lens:
        start, stamps, cpu, *extra = generate(length, new_tokens)
        per_token = 1000 / (len(stamps) - 1)
        results.append(dict(prompt=length, prefill_ms=1000 * (stamps[0] - start),
                            decode_ms=per_token * (stamps[-1] - stamps[0]),
                            decode_cpu_ms=per_token * (cpu[-1] - cpu[0]), **(extra[0] if extra else {})))
    return dict(info, results=results)


def profile(opts):
    """Where ours spends a decoded token: torch.profiler over the decode steps of one generation
    per case and prompt (from the first new token on), ops by self CPU time, per token."""
    import torch
    from torch.profiler import ProfilerActivity
    from lib import loading
    from lib.quantize import quantize_model
    run = make_run(opts['run_dir'])
    torch.set_num_threads(int(opts['threads'].split(',')[0]))
    n = int(opts['new_tokens'])
    for case in [c for c in opts['cases'].split(',') if c.startswith('ours')]:
        model, _, _ = loading.load_model_on_device('resume', str(run), 'cpu', 'auto')
        quantize_model(model, 'int8' if case == 'ours-int8' else 'none')
        for length in [int(p) for p in opts['prompts'].split(',')]:
            ms = []
            for profiled in (False, True):  # the first: warm-up and the same steps without the profiler
                x = torch.tensor(prompt_ids(length, model.config.vocab_size))[None, :]  # (1, T)
                prof = torch.profiler.profile(activities=[ProfilerActivity.CPU])
                stream = model.generate_stream(x, n, temperature=TEMPERATURE, top_k=TOP_K,
                                               generator=torch.Generator().manual_seed(SEED))
                next(stream).item()
                start = time.perf_counter()
                if profiled:
                    prof.start()
                for token in stream:
                    token.item()
                if profiled:
                    prof.stop()
                ms.append(1000 * (time.perf_counter() - start) / (n - 1))
            events = prof.key_averages()
            busy = sum(e.self_cpu_time_total for e in events) / 1000 / (n - 1)
            print(f"\n{case}, {length}-token prompt, {torch.get_num_threads()} thread(s): decode {ms[0]:.2f} "
                  f"ms/token ({ms[1]:.2f} under the profiler; its ops' self time {busy:.2f})")
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]:
                print(f"  {e.key[:44]:44s} {e.self_cpu_time_total / 1000 / (n - 1):7.3f} ms/token "
                      f"{e.count / (n - 1):6.1f} calls/token")


def worker(opts):
    case, threads = opts['worker'], int(opts['threads'])
    run = REPO / opts['run_dir'] if not Path(opts['run_dir']).is_absolute() else Path(opts['run_dir'])
    prompts, new_tokens = [int(p) for p in opts['prompts'].split(',')], int(opts['new_tokens'])
    import torch
    torch.set_num_threads(threads)
    side, kind = case.split('-', 1)
    if side == 'ours':
        out = decode_ours(run, 'int8' if kind == 'int8' else 'none', prompts, new_tokens)
    else:
        out = decode_llama(run, kind, prompts, new_tokens, threads, opts['flash_attn'] == '1')
    print(json.dumps(out))


# -----------------------------------------------------------------------------
# the rounds

def spawn(opts, case, threads, build, flash_attn):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if case.startswith('llama') and build != 'installed':
        env['PYTHONPATH'] = os.pathsep.join(p for p in (build, env.get('PYTHONPATH')) if p)
    args = [sys.executable, __file__, f'--worker={case}', f'--threads={threads}',
            f"--run_dir={opts['run_dir']}", f"--prompts={opts['prompts']}",
            f"--new_tokens={opts['new_tokens']}", f"--flash_attn={flash_attn}"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"error: {case} ({threads} threads, build {build}) failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load():
    return Path('/proc/loadavg').read_text().split()[:3] if Path('/proc/loadavg').exists() else ['?'] * 3


def main(opts):
    cases = opts['cases'].split(',')
    builds = opts['llama_builds'].split(',')
    if any(c.startswith('llama') for c in cases):
        check_llama_builds(builds)
    run = make_run(opts['run_dir'])
    flash = opts['flash_attn'].split(',')
    # a llama build, with flash attention on ('build fa') or off: one label per variant
    jobs = [(c, b, f) for c in cases for b in (builds if c.startswith('llama') else ['-'])
            for f in (flash if c.startswith('llama') else ['0'])]
    builds = [b + (' fa' if f == '1' else '') for b in builds for f in flash]
    threads = [int(t) for t in opts['threads'].split(',')]
    print(f"{run}: {len(jobs)} cases x threads {threads}, {opts['rounds']} rounds, prompts "
          f"{opts['prompts']}, {opts['new_tokens']} new tokens", flush=True)
    rows = []
    for r in range(int(opts['rounds'])):
        for n in threads:
            order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]  # rotate: each case leads some round
            before = load()
            for case, build, fa in order:
                out = spawn(opts, case, n, build, fa)
                build = build + (' fa' if fa == '1' else '')
                for res in out['results']:
                    rows.append(dict(round=r, threads=n, case=case, build=build, load=load(),
                                     **{k: v for k, v in out.items() if k != 'results'}, **res))
                    extra = (f", llama.cpp's own {res['llama_eval_ms']:.2f}"
                             if 'llama_eval_ms' in res else '')
                    print(f"round {r} threads {n} load {' '.join(before)}  {case:13s} {build[-20:]:>20s} "
                          f"prompt {res['prompt']:4d}: decode {res['decode_ms']:7.2f} ms/token "
                          f"(CPU {res['decode_cpu_ms']:.2f}){extra} "
                          f"(prefill {res['prefill_ms']:.0f} ms)", flush=True)
    if opts['json_out']:
        Path(opts['json_out']).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summarize(rows, builds)


def summarize(rows, builds):
    def series(n, prompt, case, build, key):
        return [r[key] for r in rows
                if (r['threads'], r['prompt'], r['case'], r['build']) == (n, prompt, case, build)]

    def spread(xs):
        return f"{statistics.median(xs):6.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else '-'

    print("\ndecode ms per token, wall clock and the process's CPU time: median (min-max over rounds)")
    for n, prompt in sorted({(r['threads'], r['prompt']) for r in rows}):
        print(f"\n{n} thread(s), {prompt}-token prompt")
        for case, build in sorted({(r['case'], r['build']) for r in rows}):
            own = series(n, prompt, case, build, 'llama_eval_ms') if case.startswith('llama') else []
            wall, cpu = (series(n, prompt, case, build, k) for k in ('decode_ms', 'decode_cpu_ms'))
            print(f"  {case:13s} {build[-24:]:>24s}  wall {spread(wall)}  CPU {spread(cpu)}"
                  + (f"  llama.cpp's own {spread(own)}" if own else ''))
        for ours, theirs in (('ours-int8', 'llama-q8_0'), ('ours-float32', 'llama-f32')):
            for build in builds:
                ratios = {}
                for key in ('decode_ms', 'decode_cpu_ms'):
                    a, b = series(n, prompt, ours, '-', key), series(n, prompt, theirs, build, key)
                    if a and len(a) == len(b):
                        ratios[key] = spread([x / y for x, y in zip(a, b)])
                if ratios:
                    print(f"  {ours} / {theirs} ({build[-24:]}), per round: wall {ratios['decode_ms']}x, "
                          f"CPU {ratios['decode_cpu_ms']}x")


if __name__ == '__main__':
    options = parse(sys.argv[1:])
    if options['worker']:
        worker(options)
    elif options['profile'] == '1':
        profile(options)
    else:
        main(options)
