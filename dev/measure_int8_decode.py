"""
Where a decoded token's time goes, float32 vs int8, GPT-2 124M shape (random weights), batch 1.

    python dev/measure_int8_decode.py            # 5 rounds, ~1 minute on a 2-core CPU
    python dev/measure_int8_decode.py --rounds=9

Three models in one process, timed in rounds (each once per round, so passing load hits all):
float32, int8 as quantize_int8 leaves it (weights in one buffer on 2 MiB pages, where the OS
grants them) and the same int8 layers without that packing step (one tensor per matrix, on
ordinary 4 KiB pages). Prints the
median decode time per token and the median per-round ratio to float32, then the time spent
inside each kind of Linear (forward hooks: they add ~2 us per call) and everything else
(attention, norms, sampling, embeddings). Results: dev/LOG.md.
"""

import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402
from lib.quantize import Int8Linear, quantize_int8  # noqa: E402

rounds = int(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--rounds=")), 5))
new_tokens = 100
torch.manual_seed(0)
float_model = GPT(GPTConfig(vocab_size=50257)).eval()  # GPT-2 124M shape
packed = copy.deepcopy(float_model)
notice = quantize_int8(packed)
loose = copy.deepcopy(float_model)
quantize_int8(loose, pack=False)  # one tensor per matrix
models = {"float32": float_model, "int8": packed, "int8, 4 KiB pages": loose}
print(notice)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds of {new_tokens} tokens")

# time inside each Linear kind, summed over a generation
spent = {}


def kind(name):
    return ".".join(name.split(".")[-2:])  # transformer.h.3.attn.c_attn -> attn.c_attn; lm_head


def add_hooks(model):
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, Int8Linear)):
            m.register_forward_pre_hook(lambda mod, args: setattr(mod, "_t0", time.perf_counter()))
            m.register_forward_hook(lambda mod, args, out, k=kind(name):
                                    spent.__setitem__(k, spent.get(k, 0.0) + time.perf_counter() - mod._t0))


def decode_ms(model):
    """Mean ms per decoded token (time between the first and the last new token)."""
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    stamps = []
    for _ in model.generate_stream(idx, new_tokens, top_k=200, generator=torch.Generator().manual_seed(0)):
        stamps.append(time.perf_counter())
    return 1000 * (stamps[-1] - stamps[0]) / (new_tokens - 1)


for model in models.values():
    decode_ms(model)  # burn in
times = {name: [] for name in models}
for _ in range(rounds):
    for name, model in models.items():
        times[name].append(decode_ms(model))
print(f"\n{'model':20s} {'ms/token':>9s} {'x float32':>10s}  per round")
for name, t in times.items():
    ratio = statistics.median(a / b for a, b in zip(times["float32"], t))
    print(f"{name:20s} {statistics.median(t):9.2f} {ratio:9.2f}x  " + " ".join(f"{x:.2f}" for x in t))

# one more generation per model with hooks: where the decode time goes (from the first new token on)
parts = {}
for name, model in models.items():
    add_hooks(model)
    for step, _ in enumerate(model.generate_stream(torch.randint(0, 50257, (1, 16)), new_tokens, top_k=200)):
        if step == 0:  # the prefill is done: start counting
            spent.clear()
            t0 = time.perf_counter()
    total = 1000 * (time.perf_counter() - t0) / (new_tokens - 1)
    parts[name] = {k: 1000 * v / (new_tokens - 1) for k, v in sorted(spent.items())}
    parts[name]["everything else"] = total - sum(parts[name].values())
    parts[name]["total (with hooks)"] = total
print(f"\n{'ms per token':20s}" + "".join(f"{n:>20s}" for n in models))
for row in parts["float32"]:
    print(f"{row:20s}" + "".join(f"{parts[n][row]:20.2f}" for n in models))
