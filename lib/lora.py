"""
LoRA: fine-tune a frozen GPT through small low-rank adapters (train.py --lora_rank=r).

Low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685): a frozen weight W
plus a trainable update (alpha / r) * B @ A, with A (r, in) and B (out, r). B starts at
zero, so an adapted model computes exactly what its base does until training moves B.

    apply_lora(model, rank=8, alpha=16)   # freeze model, wrap its Linear layers
    lora_state_dict(model)                 # the adapters only: what a LoRA checkpoint stores
    merge_lora(model)                      # plain Linear layers again, W + (alpha/r) B A

This file imports model.py; model.py knows nothing of it.
"""

import math
import os

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import Dropout

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


def check_lora_knobs(rank, targets, init_from, optimizer):
    """ValueError naming the fix when train.py's LoRA knobs cannot work (rank 0: LoRA is off)."""
    if rank == 0:
        return
    parse_lora_targets(targets)
    if init_from == 'scratch':
        raise ValueError("lora_rank > 0 adapts a trained model, not init_from='scratch': use --init_from=gpt2, "
                         "a Hugging Face folder or a run's ckpt.pt (or --lora_rank=0)")
    if optimizer == 'muon':  # Muon orthogonalizes whole weight matrices; low-rank factors were not tested
        raise ValueError("lora_rank > 0 trains its adapters with AdamW: use --optimizer=adamw (or --lora_rank=0)")


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


def start_lora(model, rank, alpha, dropout, targets, base):
    """train.py's lora_rank > 0: apply_lora, and return what the checkpoints record of it (rank,
    alpha, dropout, targets, and base: init_from, a path made absolute, from which the frozen part
    is loaded again)."""
    apply_lora(model, rank, alpha, dropout, targets)
    base = os.path.abspath(base) if os.path.exists(base) else base  # else a GPT-2 name
    return dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets, base=base)


def lora_summary(model, lora):
    """One line: the adapters (lora as start_lora returns it) and the trainable and frozen counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    return (f"LoRA rank {lora['rank']} on {lora['targets']} of {lora['base']}: {trainable:,} trainable "
            f"parameters, the other {frozen:,} frozen")


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

    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, merged(module))
    return model


def merged_state_dict(model):
    """model.state_dict() with each LoRA adapter folded into its weight and the lora_ keys dropped."""
    sd = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            sd[f"{name}.weight"] = module.merged_weight().detach()
            del sd[f"{name}.lora_A"], sd[f"{name}.lora_B"]
    return sd


# ---------------------------------------------------------------- int8 weight-only inference
