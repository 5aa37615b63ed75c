"""
The whole GPT-2 language model in one file, leaf first: LayerNorm -> attention -> MLP
-> Block -> GPTConfig -> GPT.

Module names follow Hugging Face's GPT-2 (transformer.wte/wpe/h/ln_f, attn.c_attn,
mlp.c_fc, c_proj) so pretrained weights map key for key. References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face's PyTorch port: transformers/models/gpt2/modeling_gpt2.py

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65))
    logits, loss = model(idx, targets)            # training
    out = model.generate(idx, max_new_tokens=100)  # KV-cached sampling
    model = GPT.from_pretrained("gpt2")            # Hugging Face weights (local cache or folder)

GPTConfig's defaults are GPT-2 exactly; modern changes are opt-in fields (pos_emb='rope',
norm='rmsnorm', mlp_act='relu2', qk_norm, tie_embeddings=False, logit_softcap; see
docs/modern_model.md), each choosing its module or function once, in the constructor.

This file reads no files except weight files, parses no arguments and keeps no global state.
"""

import functools
import inspect
import json
import math
import mmap
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch.nn.LayerNorm has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        # eps 1e-5 is GPT-2's layer_norm_epsilon
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm, x / sqrt(mean(x^2) + eps) over the last dim, as nanochat and
    modded-nanogpt use: no gain, no bias, no mean subtraction (Zhang & Sennrich 2019,
    https://arxiv.org/abs/1910.07467, without its gain)."""

    def forward(self, x):
        return rms_norm(x)


def rms_norm(x, eps=1e-6):
    """x / sqrt(mean(x^2, last dim) + eps), statistics in float32, result in x's dtype.
    eps 1e-6 as in Llama's RMSNorm (torch.nn.functional.rms_norm needs torch 2.4)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x)


def keep(x, *_):
    """The identity, for the knobs that are off (chosen once, no branch in forward)."""
    return x


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer, https://arxiv.org/abs/2104.09864), half-split
    layout (GPT-NeoX, Llama, nanochat): channel j of a head pairs with channel j + hs/2 and
    the pair turns by angle pos * base^(-2j/hs). Tables for positions [0, block_size) are
    cached; later positions (the rolling KV cache) are computed on demand by the same formula,
    in float64 then rounded to float32, so both give identical values.

    The tables are full head width, (cos, cos) and (-sin, sin), so that apply_rotary is one
    multiply-add with x and x's halves swapped: 4 ops per call instead of 10 (decoding one
    token runs ~12 of these per step, each op a few microseconds of dispatch)."""

    def __init__(self, head_size, block_size, base):
        super().__init__()
        self.inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
        cos, sin = self.table(0, block_size)
        self.register_buffer("cos", cos, persistent=False)  # (block_size, 1, hs), not a weight
        self.register_buffer("sin", sin, persistent=False)

    def table(self, start, T):
        angle = torch.arange(start, start + T, dtype=torch.float64)[:, None] * self.inv_freq  # (T, hs/2)
        cos, sin = angle.cos().float(), angle.sin().float()
        # (T, 1, hs): broadcasts over the heads of x (B, T, nh, hs)
        return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]

    def forward(self, start, T):
        """(cos, sin), each (T, 1, hs), for positions [start, start + T)."""
        if start + T <= self.cos.size(0):
            return self.cos[start:start + T], self.sin[start:start + T]
        cos, sin = self.table(start, T)
        return cos.to(self.cos.device), sin.to(self.cos.device)


def apply_rotary(x, rope):
    """Rotate x (B, T, nh, hs) by the angles of rope = Rotary(...)(start, T): the pair
    (x1, x2) = (x[..., j], x[..., j + hs/2]) becomes (x1 cos - x2 sin, x1 sin + x2 cos),
    i.e. (x1 + i x2) * e^(i angle). Written as x * (cos, cos) + (x2, x1) * (-sin, sin):
    the same products and sums, so the same float results."""
    cos, sin = rope[0].to(x.dtype), rope[1].to(x.dtype)
    swapped = x.roll(x.size(-1) // 2, dims=-1)  # (x2, x1)
    return x * cos + swapped * sin  # (B, T, nh, hs)


def gelu_tanh(x):
    # GPT-2 uses the tanh approximation of GELU ("gelu_new" in Hugging Face)
    return F.gelu(x, approximate="tanh")


def relu_squared(x):
    # relu(x)^2 (So et al., Primer, https://arxiv.org/abs/2109.08668; modded-nanogpt, nanochat)
    return F.relu(x).square()


def softcap(logits, cap):
    # cap * tanh(logits / cap): near the identity for |logits| << cap, bounded by +-cap
    return cap * torch.tanh(logits / cap)


def make_norm(config):
    """The norm module of ln_1, ln_2 and ln_f for config.norm."""
    return LayerNorm(config.n_embd, bias=config.bias) if config.norm == "layernorm" else RMSNorm()


class Dropout(nn.Module):
    """Dropout: zero each element with probability p, scale the rest by 1/(1-p).

    On CPU the random numbers come from a serial generator, and the baby GPT needs ~44M
    mask elements per training step, so nn.Dropout's bernoulli_ (one 32-bit draw per
    element, ~10 ns) was the largest cost after the matmuls. Here an element is kept iff
    16 random bits >= a threshold: one 64-bit draw gives four elements, ~3x cheaper. The
    keep probability is round((1-p) * 65536) / 65536, within 2^-17 of 1-p. Other devices
    use F.dropout's fused kernels."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
        bits = bits.view(torch.int16)[:n].view(x.shape)  # uniform in [-32768, 32767]
        threshold = -32768 + round(self.p * 65536)
        # in place on a float32 copy (exact for int16): 1.0 where kept, 0.0 where dropped, scaled
        mask = bits.float().ge_(threshold).mul_(1.0 / (1.0 - self.p))
        return x * mask.to(x.dtype)


class KVCache:
    """Keys and values of every layer for positions [0, pos), preallocated up to max_len.

    Allocated lazily on the first write so the cache takes the dtype the attention
    produces (bfloat16 under autocast, float32 otherwise).

    rolling (RoPE models only): once full, a single new position overwrites the oldest
    slot (a ring buffer: slot pos % max_len, no copy) and the query attends to the last
    max_len keys. Their order in the buffer does not matter: one query sees all of them,
    and RoPE already rotated each key by its own absolute position.
    """

    def __init__(self, n_layer, max_len, rolling=False):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.max_len = max_len
        self.pos = 0  # number of positions already fed (the next one's absolute position)
        self.rolling = rolling

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) at [pos, pos+T) and return the keys/values to attend to."""
        T = k.size(2)
        end = self.pos + T
        if self.k[layer] is None:
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_empty(B, nh, self.max_len, hs)  # (B, nh, max_len, hs)
            self.v[layer] = v.new_empty(B, nh, self.max_len, hs)
        if end <= self.max_len:
            self.k[layer][:, :, self.pos:end] = k
            self.v[layer][:, :, self.pos:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, pos+T, hs)
        if not self.rolling or T != 1:
            raise ValueError(f"KV cache overflow: {self.pos} + {T} > max_len {self.max_len}")
        slot = self.pos % self.max_len  # the oldest position's slot
        self.k[layer][:, :, slot:slot + 1] = k
        self.v[layer][:, :, slot:slot + 1] = v
        return self.k[layer], self.v[layer]  # (B, nh, max_len, hs): the last max_len positions


# ---------------------------------------------------------------- LoRA adapters
# Low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685): a frozen weight W
# plus a trainable update (alpha / r) * B @ A, with A (r, in) and B (out, r). B starts at
# zero, so an adapted model computes exactly what its base does until training moves B.

# lora_targets names -> module paths inside each Block. The attention output projection and
# the MLP output projection are both called c_proj: "c_proj" (or "attn.c_proj") means the
# attention one, "mlp.c_proj" the MLP one.
LORA_TARGETS = {"c_attn": "attn.c_attn", "attn.c_attn": "attn.c_attn", "c_proj": "attn.c_proj",
                "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_fc": "mlp.c_fc",
                "mlp.c_proj": "mlp.c_proj"}


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T, with W and b frozen.

    It keeps the wrapped Linear's weight and bias under the same names, so a state dict has
    the base keys unchanged plus `lora_A` and `lora_B` (sample.py and evaluate.py merge the
    adapters before inference)."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: the base keeps its storage
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        # A like nn.Linear's default init (the LoRA reference code, loralib, does the same), B = 0
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
        self.lora_dropout = Dropout(dropout)

    def forward(self, x):
        low = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out) through rank r
        return F.linear(x, self.weight, self.bias) + self.scaling * low

    def merged_weight(self):
        """W + (alpha / r) B A: the plain weight that computes the same function."""
        return self.weight + self.scaling * (self.lora_B @ self.lora_A).to(self.weight.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def parse_lora_targets(targets):
    """'c_attn,mlp.c_proj' -> sorted unique Block-relative module paths; ValueError if unknown."""
    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"lora_targets {targets!r}: unknown {unknown or 'empty'}; use a comma-separated "
                         f"subset of c_attn, c_proj (attention output), c_fc, mlp.c_proj")
    return sorted({LORA_TARGETS[t] for t in names})


def apply_lora(model, rank, alpha, dropout=0.0, targets="c_attn,c_proj,c_fc,mlp.c_proj"):
    """Freeze every parameter of model (a GPT) and wrap the target Linear layers of every block
    in LoRALinear; only the adapters' A and B train. Returns the wrapped module names."""
    paths = parse_lora_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for i, block in enumerate(model.transformer.h):
        for path in paths:
            parent_name, child = path.split(".")
            parent = getattr(block, parent_name)
            layer = getattr(parent, child)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"transformer.h.{i}.{path} is {type(layer).__name__}, not a Linear: already adapted?")
            setattr(parent, child, LoRALinear(layer, rank, alpha, dropout))
            wrapped.append(f"transformer.h.{i}.{path}")
    return wrapped


def lora_state_dict(model):
    """Only the adapter tensors (what a LoRA checkpoint stores besides the name of its base)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def merge_lora(model):
    """Replace every LoRALinear in model by an nn.Linear with the merged weight W + (alpha/r) B A
    (same outputs, no adapter cost at inference). In place; returns model."""
    def merged(child):
        layer = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                          device=child.weight.device, dtype=child.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(child.merged_weight())
            if child.bias is not None:
                layer.bias.copy_(child.bias)
        return layer

    replace_modules(model, LoRALinear, merged)
    return model


def replace_modules(model, kind, make):
    """Replace, in place, every submodule of type kind by make(submodule); returns how many."""
    n = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, kind):
                setattr(module, child_name, make(child))
                n += 1
    return n


def merged_state_dict(model):
    """model.state_dict() with each LoRA adapter folded into its weight and the lora_ keys dropped."""
    sd = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            sd[f"{name}.weight"] = module.merged_weight().detach()
            del sd[f"{name}.lora_A"], sd[f"{name}.lora_B"]
    return sd


# ---------------------------------------------------------------- int8 weight-only inference
# Decoding reads every weight once per token, so it is bound by memory bandwidth: int8 weights
# (1 byte instead of 4) cut the bytes 4x. Weights are quantized per output channel
# (symmetric, scale = max|w_row| / 127); activations stay in floating point.

def quantize_per_channel(w):
    """(q int8 (out, in), scale float32 (out,)) with w ~= q * scale[:, None], |error| <= scale / 2."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,); the floor keeps all-zero rows finite
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def int8_kernel_available(device_type):
    """True where torch has a fused int8-weight x float-activation matmul for the device
    (aten._weight_int8pack_mm: CPU in torch 2.x; MPS in recent releases)."""
    return device_type in ("cpu", "mps") and hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A Linear with int8 weights and per-output-channel scales; activations in floating point.

    kernel=True: torch.ops.aten._weight_int8pack_mm(x (M, in), q (out, in) int8, scales (out,))
    in bfloat16. Its float32 variant is 3-20x slower than bfloat16 on our CPU (measured in
    docs/lora_int8.md), so activations go in as bfloat16; the bfloat16 result comes back in
    float32 through the bias add itself (float32 bias + bfloat16 -> float32: one op, not a
    conversion and an add). kernel=False: dequantize the weight to x's dtype on every call
    and F.linear."""

    def __init__(self, layer, kernel):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        q, scale = quantize_per_channel(layer.weight)
        self.register_buffer("weight_int8", q.to(layer.weight.device))
        self.register_buffer("scale", scale.to(layer.weight.device))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.kernel = kernel
        if kernel:
            self.register_buffer("scale_bf16", scale.to(layer.weight.device, torch.bfloat16))
        self._forward = self._kernel_forward if kernel else self._dequant_forward  # chosen once

    def dequantized_weight(self, dtype=torch.float32):
        return self.weight_int8.to(dtype) * self.scale[:, None].to(dtype)  # (out, in)

    def _kernel_forward(self, x):
        # torch._weight_int8pack_mm is torch.ops.aten._weight_int8pack_mm without the Python
        # dispatch wrapper (~1 us less per call, 49 calls per GPT-2 token)
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                      self.weight_int8, self.scale_bf16)  # (rows, out) bfloat16
        y = y.view(*x.shape[:-1], self.out_features)  # (..., out)
        # the promotion to float32 is the bias add's own (as y.float() + bias, bit for bit)
        return y.to(x.dtype) if self.bias is None else torch.add(self.bias, y)

    def _dequant_forward(self, x):
        y = F.linear(x, self.dequantized_weight(x.dtype))  # (..., out)
        return y if self.bias is None else y + self.bias

    def forward(self, x):
        return self._forward(x)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


class Int8Embedding(nn.Module):
    """Token embedding read from an int8 table: rows q[idx] * scale[idx]. Shares the lm_head's
    int8 weight when the two are tied (GPT-2), as the float model shares one matrix."""

    def __init__(self, head):
        super().__init__()
        self.head = [head]  # a list: not a submodule, so its buffers are not listed twice

    def forward(self, idx):
        head = self.head[0]
        # int8 rows times float32 scales: the product promotes to float32 (no separate .float())
        return torch.mul(head.weight_int8[idx], head.scale[idx][..., None])  # (..., C)


def huge_page_buffer(nbytes):
    """A uint8 CPU tensor of nbytes starting at a 2 MiB boundary, in memory that Linux is asked
    to back with 2 MiB transparent huge pages (madvise MADV_HUGEPAGE); None where the OS has no
    such request. Private anonymous memory: a shared mapping would need shmem huge pages."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    huge = 2 << 20
    try:
        buf = mmap.mmap(-1, nbytes + huge, flags=mmap.MAP_PRIVATE)  # page-aligned, untouched
        whole = torch.frombuffer(buf, dtype=torch.uint8)  # shares buf's memory and keeps buf alive
        start = -whole.data_ptr() % huge
        buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes)  # before the first write, which faults the pages in
    except OSError:  # no memory for the mapping, or a kernel built without transparent huge pages
        return None
    return whole[start:start + nbytes]


def pack_int8_weights(model):
    """Move the int8 weights of every Int8Linear into one huge-page buffer, in forward order.
    Decoding reads all of them every token: GPT-2's 124 MB span 31k pages of 4 KiB but 62 of
    2 MiB, and the int8 kernel, which prefetches little, then waits less on address
    translation (our reading; measured: ~10% faster decoding, docs/lora_int8.md). Returns
    False, changing nothing, where the OS has no huge pages to ask for."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    starts = [0]
    for m in layers:  # each matrix at a 64-byte (cache line) boundary
        starts.append(starts[-1] + -(-m.weight_int8.numel() // 64) * 64)
    buffer = huge_page_buffer(starts[-1])
    if buffer is None:
        return False
    for m, start in zip(layers, starts):
        q = m.weight_int8
        m.weight_int8 = buffer[start:start + q.numel()].view(torch.int8).view(q.shape).copy_(q)  # (out, in)
    return True


def quantize_int8(model, kernel=None, pack=True):
    """Replace every nn.Linear of model (blocks and lm_head) by Int8Linear, and a tied token
    embedding by Int8Embedding over the same int8 table. In place, for inference. kernel None:
    the fused int8 kernel where int8_kernel_available for the model's device. pack: on CPU, the
    int8 weights then go into one huge-page buffer (pack_int8_weights). Returns a one-line
    description of the path that runs."""
    device_type = next(model.parameters()).device.type
    if kernel is None:
        kernel = int8_kernel_available(device_type)
    tied = model.transformer.wte.weight is model.lm_head.weight
    n = replace_modules(model, nn.Linear, lambda layer: Int8Linear(layer, kernel))
    if tied:
        model.transformer.wte = Int8Embedding(model.lm_head)
    huge = pack and device_type == "cpu" and pack_int8_weights(model)
    if kernel:
        path = "torch.ops.aten._weight_int8pack_mm (int8 weights x bfloat16 activations)"
    else:
        why = "asked for" if int8_kernel_available(device_type) else f"no int8 kernel for {device_type} in this torch"
        path = f"dequantize-on-the-fly ({why})"
    pages = ", weights in one buffer, 2 MiB pages requested" if huge else ""
    return f"int8 weight-only: {n} Linear layers{' + tied embedding' if tied else ''}, matmul via {path}{pages}"


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        # key, query, value projections for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        self.attn_dropout = Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # the knobs, chosen once: parameter-free RMS norm of q and k per head, and RoPE
        self.qk_norm = rms_norm if config.qk_norm else keep
        self.rotate = apply_rotary if config.pos_emb == "rope" else keep
        self.layer_idx = None  # set by GPT, indexes the KV cache
        self.attn_record = None  # a list while GPT.attention_maps runs; probabilities are appended

    def forward(self, x, rope=None, cache=None, last_only=False):
        """rope: (cos, sin) of x's positions for RoPE models, None for learned positions."""
        B, T, C = x.size()  # batch, sequence length, n_embd
        hs = C // self.n_head
        nh = self.n_head
        qkv = self.c_attn(x).view(B, T, 3 * nh, hs)  # (B, T, 3 nh, hs): q, k, v heads
        # norm and rotate queries and keys in one call each (same per-head arithmetic, half the ops)
        qk = self.rotate(self.qk_norm(qkv[:, :, :2 * nh]), rope)  # (B, T, 2 nh, hs)
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hs)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, nh, T, hs)
        v = qkv[:, :, 2 * nh:].transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, past+T, hs)
        if last_only:
            # inference wants the last position only: one query row, all keys and values
            q = q[:, :, -1:]  # (B, nh, 1, hs)
        Tq, Tk = q.size(2), k.size(2)  # query i (of the last Tq positions) sees keys [0, Tk - Tq + i]

        # SDPA has no fused dropout on CPU (it falls back to the same explicit math with a
        # slower mask), and attention_maps needs the probabilities: compute them here
        cpu_dropout = self.training and self.dropout > 0.0 and x.device.type == "cpu"
        if self.attn_record is not None or cpu_dropout:
            # Causal queries never see later keys: in chunks, each block of queries scores only
            # the keys up to its own end (4 chunks do 5/8 of the full Tq x Tk work)
            n_chunks = 1 if self.attn_record is not None else max(1, min(4, Tq // 64))
            bounds = [Tq * i // n_chunks for i in range(n_chunks + 1)]
            ys = [self.explicit_attention(q[:, :, a:b], k[:, :, :Tk - Tq + b], v[:, :, :Tk - Tq + b])
                  for a, b in zip(bounds, bounds[1:])]
            y = ys[0] if n_chunks == 1 else torch.cat(ys, dim=2)  # (B, nh, Tq, hs)
        else:
            # flash / memory-efficient kernels where the hardware has them
            if Tq == Tk or Tq == 1:
                causal = dict(is_causal=Tq > 1)  # plain causal, or one query that sees every key
            else:
                causal = dict(attn_mask=torch.ones(Tq, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - Tq))
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **causal)  # (B, nh, Tq, hs)
        y = y.transpose(1, 2).contiguous().view(B, Tq, C)  # (B, Tq, C): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def explicit_attention(self, q, k, v):
        """softmax(q k^T / sqrt(hs) + causal mask) @ v with dropout on the probabilities, where
        q (B, nh, Tq, hs) are the last Tq of the Tk positions in k, v (B, nh, Tk, hs)."""
        B, nh, Tq, hs = q.shape
        Tk = k.size(2)
        # scores plus 0 where allowed and -inf in the future, in one fused call
        future = torch.full((Tq, Tk), float("-inf"), dtype=q.dtype, device=q.device).triu(diagonal=Tk - Tq + 1)
        att = torch.baddbmm(future, q.reshape(B * nh, Tq, hs), k.reshape(B * nh, Tk, hs).transpose(1, 2),
                            alpha=1.0 / math.sqrt(hs)).view(B, nh, Tq, Tk).softmax(dim=-1)
        if self.attn_record is not None:
            self.attn_record.append(att)  # test_model.py checks this path against SDPA
        return self.attn_dropout(att) @ v  # (B, nh, Tq, hs)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        self.act = gelu_tanh if config.mlp_act == "gelu" else relu_squared

    def forward(self, x):
        h = self.act(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, last_only=False):
        a = self.attn(self.ln_1(x), rope, cache, last_only)  # (B, 1, C) when last_only
        x = (x[:, -1:] if last_only else x) + a
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (context length)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining, try 0.1+ for finetuning
    bias: bool = True  # biases in Linear and LayerNorm, like GPT-2; False is a bit better and faster
    # modern opt-in knobs (docs/modern_model.md); the defaults are GPT-2
    pos_emb: str = "learned"  # 'learned' (GPT-2's wpe) or 'rope' (rotary, no wpe)
    norm: str = "layernorm"  # 'layernorm' (GPT-2) or 'rmsnorm' (parameter-free)
    mlp_act: str = "gelu"  # 'gelu' (GPT-2's tanh GELU) or 'relu2' (relu(x)^2)
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention
    tie_embeddings: bool = True  # lm_head shares wte's weight (GPT-2); False: a separate head
    logit_softcap: float = 0.0  # logits -> c * tanh(logits / c); 0 = off
    rope_base: float = 10000.0  # RoPE's base (RoFormer's value); used with pos_emb='rope' only


# the knobs' allowed values; GPT-2 is the first of each
CHOICES = dict(pos_emb=("learned", "rope"), norm=("layernorm", "rmsnorm"), mlp_act=("gelu", "relu2"))


# Hugging Face names of the four OpenAI GPT-2 checkpoints and their shapes
# (from the GPT-2 paper, table 2; all use vocab 50257 and context 1024).
PRETRAINED = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# Hugging Face GPT-2 stores these Linear layers as Conv1D, weight shape (in, out): transpose.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

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


def peak_flops(device_name, dtype=torch.bfloat16):
    """Peak FLOP/s of a known accelerator for dtype, or None when we do not know it."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    for key, table in PEAK_FLOPS:
        if key.lower() in (device_name or "").lower():
            return table.get(dtype)
    return None


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, V): greedy, or sampled after temperature,
    top-k and top-p (nucleus) filtering. Returns (B,) token ids."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    ids = None  # candidate ids when the candidates are a subset, (B, k)
    if top_k is not None and top_k < logits.size(-1):
        # a temperature > 0 keeps the order: pick the k candidates, then scale, softmax, sort
        # and draw over k entries only (each of those over 50k entries costs more than topk)
        logits, ids = torch.topk(logits, top_k)  # (B, k), sorted descending
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None:
        if ids is None:
            probs, ids = probs.sort(dim=-1, descending=True)  # (B, V)
        # drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token is always kept
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p, 0.0)
    # one draw from probs: the index of the largest probs / Exp(1) noise (an exponential race,
    # how torch.multinomial draws one sample, without its validity checks: a softmax needs none)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)  # (B, 1)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(config, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {config.dropout}")
        check_knobs(config)
        self.config = config
        rope = config.pos_emb == "rope"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({} if rope else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        # one table of angles for all layers; None with learned positions
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size, config.rope_base) if rope else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying (GPT-2 does it; https://paperswithcode.com/method/weight-tying)
            self.transformer.wte.weight = self.lm_head.weight
        c = config.logit_softcap
        # smooth cap of the logits at +-c (Gemma 2; modded-nanogpt records, nanochat: c = 15)
        self.softcap = functools.partial(softcap, cap=float(c)) if c > 0 else keep
        for i, block in enumerate(self.transformer.h):
            block.attn.layer_idx = i
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: residual projections scaled by 1/sqrt(N), N = 2 per block
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---------------------------------------------------------------- forward

    def _check_idx(self, idx, past=0):
        if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            what = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise TypeError(f"idx must be an integer tensor of token ids, got {what}; use torch.long")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, sequence), got {tuple(idx.shape)}")
        T = idx.size(1)
        if past + T > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {past + T}: block_size is "
                             f"{self.config.block_size}; crop the input to its last {self.config.block_size} tokens")
        if T == 0:
            raise ValueError("idx is empty: need at least one token per row")
        # Range check costs a device sync, so CUDA training skips it (its data was checked
        # when prepared) and compiled graphs skip it (data-dependent branches break graphs).
        if not torch.compiler.is_compiling() and not (idx.is_cuda and self.training):
            lo, hi = torch.aminmax(idx)
            if lo.item() < 0 or hi.item() >= self.config.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got min {lo.item()} "
                                 f"max {hi.item()}; the data or prompt does not match this model's vocabulary")

    def _hidden(self, idx, cache=None, last_only=False):
        """Final-LayerNorm hidden states (B, T, C) of idx placed after the cache's positions;
        last_only: of the last position only, (B, 1, C), sparing the last block the rest."""
        past = cache.pos if cache is not None else 0
        # a rolling cache (RoPE) holds the last block_size positions however many came before
        self._check_idx(idx, past if cache is None or not cache.rolling else min(past, self.config.block_size - 1))
        T = idx.size(1)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.rotary is None:
            x = x + self.transformer.wpe.weight[past:past + T]  # learned positions (T, C)
        else:
            rope = self.rotary(past, T)  # angles of the absolute positions [past, past + T)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, last_only and i == len(self.transformer.h) - 1)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """With targets (B, T): logits (B, T, V) and the mean cross-entropy over targets != -1.
        Without: logits of the last position only, (B, 1, V), and loss None."""
        if targets is None:
            # inference needs only the last position: spare the last block and lm_head the rest
            return self.softcap(self.lm_head(self._hidden(idx, last_only=True))), None
        x = self._hidden(idx)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        logits = self.softcap(self.lm_head(x))  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def attention_maps(self, idx):
        """Attention probabilities of every layer for idx: a list of n_layer tensors (B, nh, T, T).

        They are the weights the forward pass itself multiplies the values with: each
        attention layer switches from the fused kernel to its explicit softmax path."""
        was_training = self.training
        self.eval()
        records = []
        try:
            for block in self.transformer.h:
                block.attn.attn_record = records
            self._hidden(idx)
        finally:
            for block in self.transformer.h:
                block.attn.attn_record = None
            self.train(was_training)
        return records

    # ---------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        vocab_limit=None, generator=None):
        """Yield max_new_tokens new tokens, each a (B,) tensor, continuing the prompts idx (B, T).

        One forward over the prompt fills a KV cache, then each step feeds one token.
        vocab_limit: only ids below it are sampled (set it to the tokenizer's size when
        vocab_size is padded, e.g. 50257 for 50304).

        Past block_size, learned positions (GPT-2): the model conditions on the last
        block_size tokens, exactly as without a cache; positions then shift every step, so
        the cache no longer applies and each step recomputes the window.

        Past block_size, RoPE: scores depend only on relative positions, so the cache rolls
        (the oldest position leaves, a ring buffer) and each step stays one token. Every
        query then sees the last block_size keys, but in layers 2.. the cached keys/values of
        older tokens were computed when their own window reached further back. The result
        equals exactly (up to float rounding) a full forward of the whole sequence with
        sliding-window causal attention (each query sees at most block_size keys, RoPE
        positions 0..N-1), not a recomputation on the last block_size tokens; the two agree
        for n_layer == 1. A prompt longer than block_size is fed the same way: its first
        block_size tokens at once, the rest one by one."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if vocab_limit is not None and not 0 < vocab_limit <= self.config.vocab_size:
            raise ValueError(f"vocab_limit must be in [1, {self.config.vocab_size}], got {vocab_limit}")
        if isinstance(idx, torch.Tensor) and idx.dim() == 1:
            raise ValueError(f"idx must have shape (batch, sequence), got {tuple(idx.shape)}; use idx[None] for one prompt")
        block_size = self.config.block_size
        B, T = idx.shape
        # the running sequence; only its last block_size tokens are ever looked at
        seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
        seq[:, :T] = idx
        was_training = self.training
        self.eval()  # generation never uses dropout
        try:
            rolling = self.rotary is not None  # see the docstring
            cache = KVCache(self.config.n_layer, block_size, rolling=rolling)
            if rolling:
                hidden = self._hidden(seq[:, :min(T, block_size)], cache, last_only=True)[:, -1, :]  # (B, C)
                for t in range(block_size, T):  # the rest of a long prompt through the rolling cache
                    hidden = self._hidden(seq[:, t:t + 1], cache)[:, -1, :]
            else:
                start = max(0, T - block_size)
                hidden = self._hidden(seq[:, start:T], cache, last_only=True)[:, -1, :]  # (B, C)
            for step in range(max_new_tokens):
                logits = self.softcap(self.lm_head(hidden))  # (B, V)
                if vocab_limit is not None:
                    logits = logits[:, :vocab_limit]
                nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
                L = T + step + 1  # sequence length including nxt
                seq[:, L - 1] = nxt
                yield nxt
                if step == max_new_tokens - 1:
                    break
                if L <= block_size or rolling:
                    hidden = self._hidden(nxt[:, None], cache)[:, -1, :]  # one new position
                else:
                    hidden = self._hidden(seq[:, L - block_size:L], last_only=True)[:, -1, :]  # sliding window
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 vocab_limit=None, generator=None):
        """Continue the prompts idx (B, T): returns (B, T + max_new_tokens) token ids.
        temperature 0 is greedy; top_k keeps the k likeliest; top_p keeps the nucleus of
        mass top_p; generator (torch.Generator) makes sampling reproducible."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, vocab_limit, generator))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    # ---------------------------------------------------------------- size, FLOPs, MFU

    def get_num_params(self, non_embedding=True):
        """Parameter count, tied weights once. non_embedding leaves out the lookup tables:
        the position embeddings (none with RoPE), and the token embedding only when the
        head is untied (tied, it is also the lm_head's matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for name, m in self.transformer.items() if name == "wpe")
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def param_breakdown(self):
        """Parameter counts by kind: embeddings (token + position + output head, a tied
        head once), attention, mlp, norms (0 with the parameter-free RMSNorm), total."""
        counts = dict(embeddings=0, attention=0, mlp=0, norms=0)
        for name, p in self.named_parameters():  # named_parameters yields tied weights once
            if ".attn." in name:
                kind = "attention"
            elif ".mlp." in name:
                kind = "mlp"
            elif "ln_" in name:
                kind = "norms"
            else:
                kind = "embeddings"
            counts[kind] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def param_table(self):
        """The parameter breakdown as a small printable table."""
        counts = self.param_breakdown()
        lines = [f"{'parameters':<12}{'count':>14}{'share':>8}"]
        for kind, n in counts.items():
            lines.append(f"{kind:<12}{n:>14,}{100 * n / counts['total']:>7.1f}%")
        return "\n".join(lines)

    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to fine-tune GPT-2 (1024) with a smaller block."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in [1, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        if self.rotary is None:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())
        # RoPE has no weights to crop: its cached angles simply go unused past block_size

    def flops_per_token(self):
        """Training FLOPs (forward + backward) per token at full context: 6N for the
        matmuls with the weights plus 12 * n_layer * n_embd * block_size for attention
        (PaLM paper, appendix B: https://arxiv.org/abs/2204.02311)."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_sec, device_name, dtype=torch.bfloat16):
        """Model FLOPs utilisation: achieved FLOP/s over the device's peak for dtype.
        None when the peak is unknown (CPUs and unlisted GPUs): no made-up number."""
        peak = peak_flops(device_name, dtype)
        if peak is None:
            return None
        return self.flops_per_token() * tokens_per_sec / peak

    # ---------------------------------------------------------------- optimizer

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                             muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0, muon_ns_steps=5):
        """optimizer="adamw": AdamW with weight decay on matrices and embeddings (2-D) only, not on
        biases and norm gains; the fused kernel where this torch has it for device_type.

        optimizer="muon": Muon (see MuonAdamW) on the 2-D matrices inside the blocks, AdamW as above
        on everything else (embeddings, lm_head, gains, biases). Each group's "lr_ratio" is its peak
        learning rate over learning_rate, so that one schedule scales both (train.py sets
        group["lr"] = lr * group["lr_ratio"])."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if optimizer == "muon":
            hidden = [p for n, p in named if n.startswith("transformer.h.") and p.dim() == 2]
            named = [(n, p) for n, p in named if not (n.startswith("transformer.h.") and p.dim() == 2)]
        params = [p for _, p in named]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        n_decay = sum(p.numel() for p in decay)
        n_no_decay = sum(p.numel() for p in no_decay)
        print(f"optimizer: {len(decay)} decayed tensors ({n_decay:,} parameters), "
              f"{len(no_decay)} non-decayed tensors ({n_no_decay:,} parameters) with AdamW")
        if optimizer == "muon":
            if learning_rate <= 0:
                raise ValueError(f"Muon's lr_ratio needs learning_rate > 0, got {learning_rate}")
            adam = dict(kind="adamw", lr=learning_rate, lr_ratio=1.0, betas=betas, eps=1e-8)
            groups = [dict(adam, **g) for g in groups]
            groups.append(dict(kind="muon", params=hidden, lr=muon_lr, lr_ratio=muon_lr / learning_rate,
                               momentum=muon_momentum, weight_decay=muon_weight_decay, ns_steps=muon_ns_steps))
            # bfloat16 matmuls are native on GPUs; CPUs without AMX emulate them (much slower than float32)
            ns_dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
            print(f"optimizer: Muon on {len(hidden)} block matrices ({sum(p.numel() for p in hidden):,} "
                  f"parameters), Newton-Schulz in {str(ns_dtype).replace('torch.', '')}")
            return MuonAdamW(groups, ns_dtype=ns_dtype)
        if optimizer != "adamw":
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}")
        # fused AdamW exists for CUDA (torch 2.0+) and CPU (torch 2.4+); MPS in recent releases
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        extra = dict(fused=True) if fused else dict()
        try:  # copies: AdamW writes its defaults (fused=True) into the group dicts it is given
            optimizer = torch.optim.AdamW([dict(g) for g in groups], lr=learning_rate, betas=betas, **extra)
        except RuntimeError:  # an older torch without the fused kernel for this device (CPU before 2.4)
            fused = False
            optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
        print(f"optimizer: AdamW, fused kernel: {fused}")
        return optimizer

    # ---------------------------------------------------------------- Hugging Face GPT-2

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """GPT-2 weights from Hugging Face: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'
        (from the local Hugging Face cache, downloaded when online and huggingface_hub is
        installed), or a local folder with config.json and model.safetensors or
        pytorch_model.bin. override_args may set dropout only."""
        override_args = dict(override_args or {})
        unknown = set(override_args) - {"dropout"}
        if unknown:
            raise ValueError(f"override_args may only set 'dropout', got {sorted(unknown)}")
        folder = _find_pretrained_folder(name_or_path)
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{folder}: activation_function {hf['activation_function']!r} is not GPT-2's "
                             f"tanh GELU; this model cannot represent it")
        if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
            raise ValueError(f"{folder}: n_inner {hf['n_inner']} is not 4 * n_embd; this model cannot represent it")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                           dropout=override_args.get("dropout", 0.0))
        model = cls(config)
        hf_sd = _read_weights(folder)
        sd = model.state_dict()
        # GPT2LMHeadModel prefixes "transformer."; a bare GPT2Model does not
        hf_sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
                 for k, v in hf_sd.items()}
        # causal-mask buffers of older transformers versions are not weights
        hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        hf_sd.setdefault("lm_head.weight", hf_sd.get("transformer.wte.weight"))  # tied
        missing = sorted(set(sd) - set(hf_sd))
        unexpected = sorted(set(hf_sd) - set(sd))
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not match GPT-2: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        with torch.no_grad():
            for k, target in sd.items():
                w = hf_sd[k]
                if k.endswith(_CONV1D):
                    w = w.t()
                if w.shape != target.shape:
                    raise ValueError(f"{folder}: {k} has shape {tuple(w.shape)}, expected {tuple(target.shape)}")
                target.copy_(w)
        return model

    def save_pretrained(self, folder):
        """Write a folder that transformers.GPT2LMHeadModel.from_pretrained loads with the
        same logits. Models without biases get zero biases (the same function). Only GPT-2
        models export: a modern knob (pos_emb, norm, ...) has no GPT-2 equivalent."""
        cfg = self.config
        for name, value in GPT2_KNOBS.items():
            if getattr(cfg, name) != value:
                raise ValueError(f"save_pretrained exports GPT-2 only, and GPT-2 has no {name}={getattr(cfg, name)!r} "
                                 f"(it needs {name}={value!r}); keep this model as a train.py checkpoint")
        hf_config = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
            "bos_token_id": min(50256, cfg.vocab_size - 1), "eos_token_id": min(50256, cfg.vocab_size - 1),
        }
        out = {}
        for k, v in merged_state_dict(self).items():  # LoRA adapters folded into the weights
            if k == "lm_head.weight":
                continue  # tied to transformer.wte.weight; transformers re-ties it on load
            out[k] = (v.t() if k.endswith(_CONV1D) else v).detach().to("cpu", torch.float32).contiguous()
        if not cfg.bias:
            for k, v in list(out.items()):
                if k.endswith(".weight") and (".c_" in k or ".ln_" in k or k.startswith("transformer.ln_f")):
                    n = v.shape[1] if k.endswith(_CONV1D) else v.shape[0]
                    out[k[:-len("weight")] + "bias"] = torch.zeros(n)
        os.makedirs(folder, exist_ok=True)
        _atomic_write(os.path.join(folder, "config.json"), lambda f: f.write(json.dumps(hf_config, indent=2).encode()))
        try:
            from safetensors.torch import save
        except ImportError:
            _atomic_write(os.path.join(folder, "pytorch_model.bin"), lambda f: torch.save(out, f))
        else:
            _atomic_write(os.path.join(folder, "model.safetensors"), lambda f: f.write(save(out, {"format": "pt"})))


# GPT-2's values of the modern knobs (rope_base matters only with pos_emb='rope')
GPT2_KNOBS = dict(pos_emb="learned", norm="layernorm", mlp_act="gelu", qk_norm=False,
                  tie_embeddings=True, logit_softcap=0.0)


def check_knobs(config):
    """ValueError naming the GPTConfig field and its allowed values for a bad knob: the heads'
    split of n_embd and the modern knobs (train.py and bench.py check flags with it up front)."""
    if config.n_embd % config.n_head:
        raise ValueError(f"GPTConfig.n_embd {config.n_embd} must be divisible by n_head {config.n_head}")
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"GPTConfig.{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(config, name)!r}")
    for name in ("qk_norm", "tie_embeddings"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(config, name)!r}")
    c = config.logit_softcap
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < math.inf:
        raise ValueError(f"GPTConfig.logit_softcap must be a float >= 0 (0 = off), got {c!r}")
    b = config.rope_base
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 1 < b < math.inf:
        raise ValueError(f"GPTConfig.rope_base must be a float > 1, got {b!r}")
    if config.pos_emb == "rope" and (config.n_embd // config.n_head) % 2:
        raise ValueError(f"GPTConfig.pos_emb='rope' needs an even head size, got n_embd {config.n_embd} / "
                         f"n_head {config.n_head} = {config.n_embd // config.n_head}")


def _atomic_write(path, write):
    """Write a file through a temporary name so a crash never leaves it half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _first_sentence(error, limit=200):
    """The error's text on one line, cut at its first sentence and at a word boundary, never mid-word."""
    text = ' '.join(str(error).split())
    end = text.find('. ')
    if 0 < end < limit:
        return text[:end + 1]
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(' ', 1)[0] + ' ...'


def _find_pretrained_folder(name_or_path):
    """A folder holding config.json and weights for a model name or path, or a clear error."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError(f"{name_or_path} has no config.json: not a Hugging Face model folder")
        return name_or_path
    if name_or_path not in PRETRAINED:
        raise FileNotFoundError(f"{name_or_path!r} is neither a folder nor one of {sorted(PRETRAINED)}")
    repo_id = name_or_path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        snapshot_download = None
    if snapshot_download is not None:
        patterns = ["config.json", "model.safetensors", "pytorch_model.bin"]
        try:  # the local cache first, so no network is touched when the files are here
            folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
        except Exception:
            try:
                folder = snapshot_download(repo_id, allow_patterns=patterns)
            except Exception as e:
                raise FileNotFoundError(
                    f"GPT-2 weights {repo_id!r} are not in the local Hugging Face cache and could not be "
                    f"downloaded ({type(e).__name__}: {_first_sentence(e)}). Download them once where there is "
                    f"network (`hf download {repo_id} config.json model.safetensors`) or pass a local folder."
                ) from None
        return folder
    # without huggingface_hub, look in the cache layout it would have written
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    snapshots = os.path.join(hub, f"models--{repo_id}", "snapshots")
    if os.path.isdir(snapshots):
        for snap in sorted(os.listdir(snapshots)):
            folder = os.path.join(snapshots, snap)
            if os.path.isfile(os.path.join(folder, "config.json")):
                return folder
    raise FileNotFoundError(f"GPT-2 weights {repo_id!r} not found under {snapshots}; install huggingface_hub "
                            f"(`pip install huggingface_hub`) to download them, or pass a local folder")


def _read_weights(folder):
    """The state dict in a Hugging Face folder: model.safetensors, else pytorch_model.bin."""
    st = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{st} needs the safetensors package: pip install safetensors") from None
        return load_file(st)
    pt = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


# ---------------------------------------------------------------- Muon

# Keller Jordan's quintic Newton-Schulz coefficients (https://kellerjordan.github.io/posts/muon/):
# they maximise the slope at zero, so 5 steps push all singular values into roughly [0.7, 1.2]
# instead of exactly 1, which trains as well as the exact U V^T.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g, steps=5, dtype=torch.float32):
    """Approximately U V^T for g = U S V^T (g: (m, n)), by the quintic Newton-Schulz iteration
    x <- a x + b (x x^T) x + c (x x^T)^2 x, which maps each singular value s to a s + b s^3 + c s^5."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T  # (n, m): iterate on the wide side, so the Gram matrix is the small one
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm = 1: inside the iteration's range
    for _ in range(steps):
        gram = x @ x.T  # (min, min)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b gram + c gram^2) x
    return (x.T if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for param groups with kind="muon", AdamW for kind="adamw": one optimizer object,
    so learning-rate schedules, GradScaler, gradient clipping and checkpoints treat it like AdamW.

    Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/): Nesterov momentum, then the
    update is orthogonalized (every singular value ~1) and scaled by sqrt(max(1, rows/cols)) so
    tall and wide matrices get updates of similar size per element (Keller's "original" scale, as
    torch.optim.Muon's adjust_lr_fn=None). Weight decay is decoupled (p -= lr * wd * p), as in AdamW.
    """

    def __init__(self, param_groups, ns_dtype=torch.float32):
        super().__init__(param_groups, defaults={})
        self.ns_dtype = ns_dtype  # float32 on CPUs, bfloat16 on GPUs

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if group["kind"] == "muon":
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.lerp_(g, 1 - group["momentum"])  # an average of past gradients
                    nesterov = g.lerp(buf, group["momentum"])  # look one step ahead along the momentum
                    update = orthogonalize(nesterov, group["ns_steps"], self.ns_dtype)
                    p.mul_(1 - lr * wd)
                    p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                else:  # AdamW, as torch.optim.AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101)
                    beta1, beta2 = group["betas"]
                    if not state:
                        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    state["step"] += 1
                    m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                    p.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                    p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        return loss
