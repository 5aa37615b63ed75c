"""
The GPT-2 language model, and only the model, in one file, leaf first: norms -> positions (learned,
rotary) and the added embeddings -> Dropout -> attention -> MLP -> Block -> GPTConfig -> KV cache
and sampling -> GPT (forward, generation, sizes, Hugging Face GPT-2 import).
Module names follow Hugging Face's GPT-2 (transformer.wte/wpe/h/ln_f, attn.c_attn, mlp.c_fc, c_proj)
so its weights map key for key (OpenAI's code: https://github.com/openai/gpt-2/blob/master/src/model.py).

    model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65))
    logits, loss = model(idx, targets)             # training
    out = model.generate(idx, max_new_tokens=100)  # KV-cached sampling
    model = GPT.from_pretrained(folder)            # a local Hugging Face GPT-2 folder

GPTConfig's defaults are GPT-2 exactly. Each modern knob is an opt-in field (its comment says what
it does; the code that uses it, its source), chosen once in a constructor: a module, or a function
that is `keep` (the identity) when off. No forward has an `if` on a knob. What forward does branch
on, and why: its input (a KV cache or none, the last position only, one position per row) and, in
two CPU speed paths each kept in one place, the hardware and the dropout rate: Dropout's cheaper
mask, and CausalSelfAttention.attend's explicit attention when training on a CPU with dropout or in
bfloat16 (also to record attention maps). A new knob is a GPTConfig field plus the code that uses it;
the scripts derive flags, checks and checkpoint records from the field (docs/hacking.md). This file
imports no other project file.
"""

import functools
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Literal, get_args, get_origin

import torch
import torch.nn as nn
from torch.nn import functional as F


def keep(x, *_):  # the identity, for a knob that is off (chosen once: forward needs no branch)
    return x


def rms_norm(x, eps=1e-6):
    """x / sqrt(mean(x^2, last dim) + eps), statistics in float32, result in x's dtype.
    eps 1e-6 as in Llama's RMSNorm (torch.nn.functional.rms_norm needs torch 2.4)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm (arXiv:1910.07467, as nanochat): no gain, no bias, no mean subtraction."""

    def forward(self, x):
        return rms_norm(x)


def make_norm(config):
    """The norm module of ln_1, ln_2 and ln_f for config.norm (eps 1e-5 is GPT-2's)."""
    return nn.LayerNorm(config.n_embd, 1e-5, bias=config.bias) if config.norm == "layernorm" else RMSNorm()


# ---------------------------------------------------------------- positions and added embeddings
# A position scheme is the module transformer.wpe, a class of POSITIONS picked by pos_emb:
# forward(x, past) -> (x with positions added, angles); rotate(qk, angles) for attention's queries
# and keys; rolls: may the KV cache roll past block_size (scores depend on offsets only) or must
# generation recompute the window; crop(block_size).

class LearnedPositions(nn.Embedding):
    """GPT-2's positions: a learned vector per position (transformer.wpe.weight, as in GPT-2),
    added to the token embeddings. Past block_size every position shifts each step: no rolling."""
    rolls = False
    rotate = staticmethod(keep)  # no angles

    def __init__(self, config):
        super().__init__(config.block_size, config.n_embd)

    def forward(self, x, past):
        """x (B, T, C) plus positions [past, past + T), or one per row (past a (B,) tensor, T = 1)."""
        if torch.is_tensor(past):
            return x + self.weight[past][:, None], None  # (B, 1, C)
        return x + self.weight[past:past + x.size(1)], None  # (T, C), the same for every row

    def crop(self, block_size):
        self.weight = nn.Parameter(self.weight[:block_size].detach().clone())
        self.num_embeddings = block_size


def apply_rotary(x, angles):
    """Rotate x (B, T, nh, hs) by RotaryPositions.angles: the pair x1 = x[..., j], x2 = x[..., j + hs/2]
    becomes (x1 cos - x2 sin, x1 sin + x2 cos), computed as x * (cos, cos) + (x2, x1) * (-sin, sin)."""
    cos, sin = angles[0].to(x.dtype), angles[1].to(x.dtype)
    swapped = x.roll(x.size(-1) // 2, dims=-1)  # (x2, x1)
    return x * cos + swapped * sin  # (B, T, nh, hs)


class RotaryPositions(nn.Module):
    """Rotary positions (RoPE, RoFormer arXiv:2104.09864), half-split: channel j of a head pairs with
    channel j + hs/2 and the pair turns by pos * base^(-2j/hs). No weights: angles below block_size
    are cached, later ones (the rolling KV cache) computed alike, in float64. Full-width tables make
    apply_rotary one multiply-add: 4 ops instead of 10, which decoding notices (~12 calls a token)."""
    rolls = True  # each key keeps the rotation of its absolute position
    rotate = staticmethod(apply_rotary)

    def __init__(self, config):
        super().__init__()
        hs = config.n_embd // config.n_head
        self.inv_freq = config.rope_base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
        cos, sin = self.table(0, config.block_size)
        self.register_buffer("cos", cos, persistent=False)  # (block_size, 1, hs), not a weight
        self.register_buffer("sin", sin, persistent=False)

    def table(self, start, T):
        angle = torch.arange(start, start + T, dtype=torch.float64)[:, None] * self.inv_freq  # (T, hs/2)
        cos, sin = angle.cos().float(), angle.sin().float()
        # (T, 1, hs): broadcasts over the heads of x (B, T, nh, hs)
        return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]

    def forward(self, x, past):
        return x, self.angles(past, x.size(1))  # nothing added to the embeddings

    def angles(self, start, T):
        """(cos, sin), each (T, 1, hs), for positions [start, start + T); (B, 1, 1, hs) for one
        position per row (start a (B,) tensor, T = 1)."""
        if torch.is_tensor(start):
            return self.cos[start][:, None], self.sin[start][:, None]
        if start + T <= self.cos.size(0):
            return self.cos[start:start + T], self.sin[start:start + T]
        cos, sin = self.table(start, T)
        return cos.to(self.cos.device), sin.to(self.cos.device)

    def crop(self, block_size):
        pass  # no weights: the cached angles past block_size simply go unused


POSITIONS = {"learned": LearnedPositions, "rope": RotaryPositions}  # GPTConfig.pos_emb's values


class BigramHash(nn.Embedding):
    """bigram_vocab (modded-nanogpt): row hash(previous, token) of N rows (row 0: no previous token)
    added to the token embeddings; a KV cache remembers each row's last token."""

    def forward(self, x, idx, cache=None):
        return x + super().forward(self.rows(idx, cache))  # (B, T, C)

    def rows(self, idx, cache=None):
        prev = torch.roll(idx, 1, dims=1)  # (B, T): column 0 is fixed below
        prev[:, 0] = cache.prev if cache is not None and cache.prev is not None else -1
        rows = (prev * 1_000_003 + idx) % (self.num_embeddings - 1) + 1  # a large prime spreads the pairs
        if cache is not None:  # each row's last token, in place once there (serve.py's batch views share it)
            cache.prev = idx[:, -1].clone() if cache.prev is None else cache.prev.copy_(idx[:, -1])
        return torch.where(prev < 0, 0, rows)


class Absent(nn.Module):
    """Stands in for the value embeddings of a block that has none: no weights, looks up None."""

    def forward(self, idx):
        return None


class Dropout(nn.Dropout):
    """Dropout: zero each element with probability p, scale the rest by 1/(1-p). On CPU, nn.Dropout's
    bernoulli_ (a 32-bit draw per element, ~10 ns, ~44M a step for the baby GPT) cost most after the
    matmuls: here one 64-bit draw decides four elements (kept iff 16 bits >= a threshold), ~3x cheaper,
    keep probability within 2^-17 of 1-p. Other devices and torch.compile use F.dropout's kernels."""

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            # fused kernels; under torch.compile inductor fuses its own draw (the int16 trick
            # below crashed compiled CPU training in 3 of 5 runs: a view of random int64 as int16)
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
        bits = bits.view(torch.int16)[:n].view(x.shape)  # uniform in [-32768, 32767]
        threshold = -32768 + round(self.p * 65536)
        # in place on a float32 copy (exact for int16): 1.0 where kept, 0.0 where dropped, scaled
        mask = bits.float().ge_(threshold).mul_(1.0 / (1.0 - self.p))
        return x * mask.to(x.dtype)


def add_values(v, ve):  # ResFormer's value residual (arXiv:2410.17897): token identity into the values
    return v + ve.view_as(v)  # (B, T, nh, hs)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        # key, query, value projections for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        self.attn_dropout = Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # indexes the KV cache
        # the knobs, chosen once: RMS norm of q and k per head (arXiv:2302.05442, as nanochat), the
        # position scheme's rotation, and whether this block adds value embeddings (GPT looks them up)
        self.qk_norm = rms_norm if config.qk_norm else keep
        self.rotate = POSITIONS[config.pos_emb].rotate
        self.add_values = add_values if config.has_value_embeds(layer_idx) else keep
        self.attn_record = None  # a list: the explicit path appends its probabilities (lib/plotting.py)

    def forward(self, x, angles=None, cache=None, last_only=False, ve=None):
        """angles: the position scheme's for x; ve: value embeddings of x's tokens (B, T, C) or None;
        last_only: attend from the last position only (inference), returning (B, 1, C)."""
        B, T, C = x.size()  # batch, sequence length, n_embd
        nh, hs = self.n_head, C // self.n_head
        qkv = self.c_attn(x).view(B, T, 3 * nh, hs)  # (B, T, 3 nh, hs): q, k, v heads
        # norm and rotate queries and keys in one call each (same per-head arithmetic, half the ops)
        qk = self.rotate(self.qk_norm(qkv[:, :, :2 * nh]), angles)  # (B, T, 2 nh, hs)
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hs)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, nh, T, hs)
        v = self.add_values(qkv[:, :, 2 * nh:], ve).transpose(1, 2)  # (B, nh, T, hs)
        mask = None  # the keys each row may see, when rows differ in length (KVCache)
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, k, v)  # (B, nh, past+T, hs)
        if last_only:
            q = q[:, :, -1:]  # (B, nh, 1, hs): one query row, all keys and values
        y = self.attend(q, k, v, mask)  # (B, nh, Tq, hs)
        y = y.transpose(1, 2).contiguous().view(B, q.size(2), C)  # (B, Tq, C): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, mask=None):
        """Causal attention of queries q (B, nh, Tq, hs), the last Tq of the Tk positions of k, v
        (B, nh, Tk, hs): the fused kernel (SDPA), or the explicit path to record attention and for
        CPU training with dropout (SDPA's CPU fallback is the same math with a slower mask) or in
        bfloat16 (torch's CPU flash backward is ~2x slower there, docs/faster_cpu.md)."""
        Tq, Tk = q.size(2), k.size(2)  # query i (of the last Tq positions) sees keys [0, Tk - Tq + i]
        cpu_training = self.training and q.device.type == "cpu"
        if self.attn_record is not None or (cpu_training and (self.dropout > 0 or q.dtype == torch.bfloat16)):
            # Causal queries never see later keys: in chunks, each block of queries scores only
            # the keys up to its own end (4 chunks do 5/8 of the full Tq x Tk work; below 128
            # queries a chunk, the extra calls cost more than the skipped work saves)
            n_chunks = 1 if self.attn_record is not None else max(1, min(4, Tq // 128))
            bounds = [Tq * i // n_chunks for i in range(n_chunks + 1)]
            ys = [self.explicit_attention(q[:, :, a:b], k[:, :, :Tk - Tq + b], v[:, :, :Tk - Tq + b])
                  for a, b in zip(bounds, bounds[1:])]
            return ys[0] if n_chunks == 1 else torch.cat(ys, dim=2)  # (B, nh, Tq, hs)
        if mask is None and Tq not in (1, Tk):  # a chunk after a cached prefix: causal, offset
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        # flash / memory-efficient kernels where the hardware has them; one query sees every key
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and Tq > 1,
                                              dropout_p=self.dropout if self.training else 0.0)

    def explicit_attention(self, q, k, v):
        """softmax(q k^T / sqrt(hs) + causal mask) @ v with dropout on the probabilities, where
        q (B, nh, Tq, hs) are the last Tq of the Tk positions in k, v (B, nh, Tk, hs)."""
        (B, nh, Tq, hs), Tk = q.shape, k.size(2)
        # scores plus 0 where allowed and -inf in the future, in one fused call
        future = torch.full((Tq, Tk), float("-inf"), dtype=q.dtype, device=q.device).triu(diagonal=Tk - Tq + 1)
        att = torch.baddbmm(future, q.reshape(B * nh, Tq, hs), k.reshape(B * nh, Tk, hs).transpose(1, 2),
                            alpha=1.0 / math.sqrt(hs)).view(B, nh, Tq, Tk).softmax(dim=-1)
        if self.attn_record is not None:
            self.attn_record.append(att)  # test_model.py checks this path against SDPA
        return self.attn_dropout(att) @ v  # (B, nh, Tq, hs)


def gelu_tanh(x):  # GPT-2's GELU is the tanh approximation ("gelu_new" in Hugging Face)
    return F.gelu(x, approximate="tanh")


def relu_squared(x):  # Primer (arXiv:2109.08668), as modded-nanogpt
    return F.relu(x).square()


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        self.act = gelu_tanh if config.mlp_act == "gelu" else relu_squared

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


def mix_x0(x, x0, lambdas):  # x0_mix (modded-nanogpt): the block reads lambdas[0] x + lambdas[1] x0
    return lambdas[0] * x + lambdas[1] * x0


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if config.x0_mix else None  # the identity
        self.mix = mix_x0 if config.x0_mix else keep

    def forward(self, x, x0, ve=None, angles=None, cache=None, last_only=False):
        x = self.mix(x, x0, self.lambdas)
        a = self.attn(self.ln_1(x), angles, cache, last_only, ve)  # (B, 1, C) when last_only
        x = (x[:, -1:] if last_only else x) + a
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    """The model's knobs. Each annotation gives the allowed values (int: >= 1, or >= 0 where
    the default is 0, meaning off; float: finite and >= 0 unless __post_init__ says otherwise;
    bool; Literal: the listed strings), checked when a config is made."""
    block_size: int = 1024  # longest sequence (context length)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; must divide n_embd
    n_embd: int = 768  # embedding width
    dropout: float = 0.0  # in [0, 1): 0 for pretraining, try 0.1+ for finetuning
    bias: bool = True  # biases in Linear and LayerNorm, like GPT-2; False is a bit better and faster
    # modern opt-in knobs, GPT-2 by default (the code that uses each names its source)
    pos_emb: Literal[tuple(POSITIONS)] = "learned"  # positions: 'learned' (GPT-2's wpe) or 'rope' (rotary, no wpe)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # 'layernorm' (GPT-2) or 'rmsnorm' (parameter-free)
    mlp_act: Literal["gelu", "relu2"] = "gelu"  # MLP activation: 'gelu' (GPT-2's tanh GELU) or 'relu2' (relu(x)^2)
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention
    tie_embeddings: bool = True  # the output head shares the token embedding (GPT-2); False: a separate head
    logit_softcap: float = 0.0  # logits -> c * tanh(logits / c); 0 = off (nanochat uses 15)
    rope_base: float = 10000.0  # RoPE's base, > 1 (RoFormer's value); used with pos_emb='rope' only
    value_embeds: bool = False  # add a token embedding (zero at the start) to the values of every other block
    x0_mix: bool = False  # each block's input is a x + b x0 (x0: the embedding), a = 1 and b = 0 at the start, learned
    zero_init_proj: bool = False  # attention and MLP output projections start at zero (blocks start as the identity)
    bigram_vocab: int = 0  # rows of a hashed (previous, current) token-pair embedding added to the input; 0 = off

    def __post_init__(self):
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            low = 0 if f.default == 0 else 1  # an int default of 0 means off
            if get_origin(kind) is Literal:
                ok, want = value in get_args(kind), "one of " + ", ".join(map(repr, get_args(kind)))
            elif kind is bool:
                ok, want = isinstance(value, bool), "True or False"
            elif kind is int:
                ok = number and isinstance(value, int) and value >= low
                want = "an int >= 0" if low == 0 else "a positive int"
            elif f.name == "dropout":  # the floats with a narrower range than >= 0
                ok, want = number and 0 <= value < 1, "in [0, 1)"
            elif f.name == "rope_base":
                ok, want = number and 1 < value < math.inf, "a float > 1"
            else:
                ok, want = number and 0 <= value < math.inf, "a finite number >= 0"
            if not ok:
                raise ValueError(f"GPTConfig.{f.name} must be {want}, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig.pos_emb='rope' needs an even head size, got n_embd {self.n_embd} / "
                             f"n_head {self.n_head} = {self.n_embd // self.n_head}")
        if self.bigram_vocab == 1:  # row 0 is for the first token, the pairs need at least one more
            raise ValueError("GPTConfig.bigram_vocab must be 0 (off) or >= 2, got 1")

    def has_value_embeds(self, layer_idx):  # every other block, the last included
        return self.value_embeds and (self.n_layer - 1 - layer_idx) % 2 == 0

    def modern(self):
        """The knobs set away from GPT-2's behaviour, {name: value}; {} for a GPT-2."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in GPT2_FIELDS and getattr(self, f.name) != f.default}

    def checkpoint_args(self):
        """model_args for a checkpoint: nanoGPT's keys, plus each modern knob that differs from
        GPT-2, so nanoGPT's own model.py loads a GPT-2-shaped checkpoint of ours."""
        return {**{k: getattr(self, k) for k in GPT2_FIELDS}, **self.modern()}


# The fields GPT-2 and nanoGPT's GPTConfig have; every other field is a modern opt-in knob.
GPT2_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
# Hugging Face names of OpenAI's GPT-2 checkpoints, 124M to 1558M parameters (lib/loading.py finds them)
PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Hugging Face GPT-2 stores these Linear layers as Conv1D, weight shape (in, out): transpose.
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class KVCache:
    """Keys and values of every layer for positions [0, pos), up to max_len, allocated on the first
    write in the attention's dtype. rolling (position schemes that roll): once full, a new position
    overwrites the oldest slot (a ring buffer, no copy) and the query attends to the last max_len
    keys in any order. (lib/serving.py's RowCache: rows of different lengths, pos a (B,) tensor.)"""

    def __init__(self, n_layer, max_len, rolling=False):
        self.prev = None  # each row's last token id, (B,): the bigram embedding's previous token
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.max_len, self.rolling = max_len, rolling
        self.pos = 0  # number of positions already fed (the next one's absolute position)

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) at [pos, pos+T); return the keys and values to attend to and
        a mask of the keys each row may see (None: all of them, causally)."""
        T, end = k.size(2), self.pos + k.size(2)
        if self.k[layer] is None:
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_empty(B, nh, self.max_len, hs)  # (B, nh, max_len, hs)
            self.v[layer] = v.new_empty(B, nh, self.max_len, hs)
        if end <= self.max_len:
            self.k[layer][:, :, self.pos:end] = k
            self.v[layer][:, :, self.pos:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end], None  # (B, nh, pos+T, hs)
        if not self.rolling or T != 1:
            raise ValueError(f"KV cache overflow: {self.pos} + {T} > max_len {self.max_len}")
        slot = self.pos % self.max_len  # the oldest position's slot
        self.k[layer][:, :, slot:slot + 1] = k
        self.v[layer][:, :, slot:slot + 1] = v
        return self.k[layer], self.v[layer], None  # (B, nh, max_len, hs): the last max_len positions


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


def softcap(logits, cap):  # Gemma 2: near the identity for |logits| << cap, bounded by +-cap
    return cap * torch.tanh(logits / cap)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=POSITIONS[config.pos_emb](config),  # the position scheme
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # per block, its value embeddings (value_embeds.<block>.weight) or an Absent stand-in
        self.value_embeds = nn.ModuleList([
            nn.Embedding(config.vocab_size, config.n_embd) if config.has_value_embeds(i) else Absent()
            for i in range(config.n_layer)])
        self.bigram = BigramHash(config.bigram_vocab, config.n_embd) if config.bigram_vocab else keep
        if config.tie_embeddings:  # weight tying, as GPT-2 does
            self.transformer.wte.weight = self.lm_head.weight
        cap = config.logit_softcap
        self.softcap = functools.partial(softcap, cap=float(cap)) if cap > 0 else keep
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # GPT-2 paper, section 2.3: residual projections scaled by 1/sqrt(N), N = 2 per block
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
                if config.zero_init_proj:  # as modded-nanogpt and nanochat
                    torch.nn.init.zeros_(p)
            if name.startswith(("value_embeds.", "bigram.")):
                torch.nn.init.zeros_(p)  # the added embeddings start at zero: the model without them

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---------------------------------------------------------------- forward

    def _check_idx(self, idx, past=0, any_length=False):
        if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point or idx.dtype.is_complex \
                or idx.dtype == torch.bool:
            what = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise TypeError(f"idx must be an integer tensor of token ids, got {what}; use torch.long")
        if idx.dim() != 2 or idx.numel() == 0:
            hint = "use idx[None] for one prompt" if idx.dim() == 1 else "at least one token per row"
            raise ValueError(f"idx must have shape (batch, sequence), got {tuple(idx.shape)}; {hint}")
        T, block_size, V = idx.size(1), self.config.block_size, self.config.vocab_size
        if past + T > block_size and not any_length:
            raise ValueError(f"cannot forward a sequence of length {past + T}: block_size is "
                             f"{block_size}; crop the input to its last {block_size} tokens")
        # Range check costs a device sync, so CUDA training skips it (its data was checked
        # when prepared) and compiled graphs skip it (data-dependent branches break graphs).
        if not torch.compiler.is_compiling() and not (idx.is_cuda and self.training):
            lo, hi = (t.item() for t in torch.aminmax(idx))
            if lo < 0 or hi >= V:
                raise ValueError(f"token ids must be in [0, {V}), got min {lo} max {hi}; the data "
                                 f"or prompt does not match this model's vocabulary")

    def _hidden(self, idx, cache=None, last_only=False):
        """Final-norm hidden states (B, T, C) of idx placed after the cache's positions;
        last_only: of the last position only, (B, 1, C), sparing the last block the rest."""
        past = cache.pos if cache is not None else 0  # an int, or one per row (B,)
        longest = int(past.max()) if torch.is_tensor(past) else past
        # a rolling cache holds the last block_size positions however many came before
        rolled = cache is not None and cache.rolling
        self._check_idx(idx, min(longest, self.config.block_size - 1) if rolled else longest)
        x = self.bigram(self.transformer.wte(idx), idx, cache)  # (B, T, C)
        x, angles = self.transformer.wpe(x, past)  # positions [past, past + T)
        x = x0 = self.transformer.drop(x)
        last = len(self.transformer.h) - 1
        for i, (block, ve) in enumerate(zip(self.transformer.h, self.value_embeds)):
            x = block(x, x0, ve(idx), angles, cache, last_only and i == last)
        if cache is not None:
            cache.pos += idx.size(1)
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

    # ---------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        vocab_limit=None, generator=None):
        """Yield max_new_tokens new tokens, each a (B,) tensor, continuing the prompts idx (B, T): one
        forward over the prompt fills a KV cache, then each step feeds one token. vocab_limit: sample
        ids below it only (the tokenizer's 50257 of a padded 50304). Past block_size, learned positions
        recompute the last block_size tokens each step, as without a cache; RoPE rolls the cache, which
        equals sliding-window attention (docs/modern_model.md), and feeds a long prompt the same way."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if vocab_limit is not None and not 0 < vocab_limit <= self.config.vocab_size:
            raise ValueError(f"vocab_limit must be in [1, {self.config.vocab_size}], got {vocab_limit}")
        self._check_idx(idx, any_length=True)  # before the prompt is copied; it may exceed block_size
        block_size, rolling = self.config.block_size, self.transformer.wpe.rolls
        B, T = idx.shape
        # the running sequence; only its last block_size tokens are ever looked at
        seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
        seq[:, :T] = idx
        was_training = self.training
        self.eval()  # generation never uses dropout
        try:
            cache = KVCache(self.config.n_layer, block_size, rolling=rolling)
            start = 0 if rolling else max(0, T - block_size)  # a rolling cache takes the whole prompt
            prompt = seq[:, start:min(T, start + block_size)]
            hidden = self._hidden(prompt, cache, last_only=True)[:, -1]  # (B, C)
            for t in range(start + block_size, T):  # the rest of a long prompt, one by one (rolling)
                hidden = self._hidden(seq[:, t:t + 1], cache)[:, -1]
            for step in range(max_new_tokens):
                logits = self.softcap(self.lm_head(hidden))  # (B, V)
                nxt = sample_next(logits[:, :vocab_limit], temperature, top_k, top_p, generator)  # (B,)
                L = T + step + 1  # sequence length including nxt
                seq[:, L - 1] = nxt
                yield nxt
                if step == max_new_tokens - 1:
                    break
                if L <= block_size or rolling:
                    hidden = self._hidden(nxt[:, None], cache)[:, -1]  # one new position
                else:
                    hidden = self._hidden(seq[:, L - block_size:L], last_only=True)[:, -1]  # sliding window
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 vocab_limit=None, generator=None):
        """Continue the prompts idx (B, T): (B, T + max_new_tokens) token ids. temperature 0 is greedy;
        top_k keeps the k likeliest, top_p the nucleus of mass top_p; generator makes it reproducible."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, vocab_limit, generator))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    # ---------------------------------------------------------------- size and FLOPs

    def get_num_params(self, non_embedding=True):
        """Parameter count, tied weights once. non_embedding leaves out the lookup tables (positions,
        value and bigram tables; the token embedding only when untied: tied, it is the head's matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            lookups = ("transformer.wpe.", "value_embeds.", "bigram.")
            n -= sum(p.numel() for name, p in self.named_parameters() if name.startswith(lookups))
            n -= 0 if self.config.tie_embeddings else self.transformer.wte.weight.numel()
        return n

    def param_breakdown(self):
        """Parameter counts by kind: embeddings (token, position, value, bigram, output head; a tied
        head once), attention, mlp, norms (with x0_mix's scalars; RMSNorm has none), total."""
        counts = dict(embeddings=0, attention=0, mlp=0, norms=0)
        for name, p in self.named_parameters():  # named_parameters yields tied weights once
            kind = ("attention" if ".attn." in name else "mlp" if ".mlp." in name
                    else "norms" if "ln_" in name or name.endswith("lambdas") else "embeddings")
            counts[kind] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def flops_per_token(self):
        """Training FLOPs (forward + backward) per token at full context: 6N for the weight matmuls plus
        12 * n_layer * n_embd * block_size for attention (PaLM, appendix B: arXiv:2204.02311)."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to fine-tune GPT-2 (1024) with a smaller block."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in [1, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.crop(block_size)

    # ---------------------------------------------------------------- Hugging Face GPT-2 import

    @classmethod
    def from_pretrained(cls, folder, override_args=None):
        """GPT-2 from a local Hugging Face folder: config.json and model.safetensors or
        pytorch_model.bin (lib/loading.py's pretrained_folder finds 'gpt2', 'gpt2-medium', ... in
        the Hugging Face cache). override_args may set dropout only."""
        override_args = dict(override_args or {})
        if set(override_args) - {"dropout"}:
            raise ValueError(f"override_args may only set 'dropout', got {sorted(override_args)}")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder"
                                    if os.path.isdir(folder) else f"{folder!r} is not a folder (for a GPT-2 "
                                    f"name, lib/loading.py's pretrained_folder finds its folder)")
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        act, inner = hf.get("activation_function", "gelu_new"), hf.get("n_inner")
        if act not in ("gelu_new", "gelu_pytorch_tanh") or inner not in (None, 4 * hf["n_embd"]):
            raise ValueError(f"{folder}: activation_function {act!r} and n_inner {inner} are not GPT-2's "
                             f"(tanh GELU, 4 * n_embd); this model cannot represent them")
        model = cls(GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                              n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                              dropout=override_args.get("dropout", 0.0)))
        sd = model.state_dict()
        # GPT2LMHeadModel prefixes "transformer."; a bare GPT2Model does not; the causal-mask
        # buffers of older transformers versions are not weights
        hf_sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
                 for k, v in _read_weights(folder).items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        hf_sd.setdefault("lm_head.weight", hf_sd.get("transformer.wte.weight"))  # tied
        missing, unexpected = sorted(set(sd) - set(hf_sd)), sorted(set(hf_sd) - set(sd))
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not match GPT-2: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        with torch.no_grad():
            for k, target in sd.items():
                w = hf_sd[k].t() if k.endswith(HF_CONV1D) else hf_sd[k]
                if w.shape != target.shape:
                    raise ValueError(f"{folder}: {k} has shape {tuple(w.shape)}, expected {tuple(target.shape)}")
                target.copy_(w)
        return model


def _read_weights(folder):
    """The state dict in a Hugging Face folder: model.safetensors, else pytorch_model.bin."""
    st, pt = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{st} needs the safetensors package: pip install safetensors") from None
        return load_file(st)
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")

