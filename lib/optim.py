"""
The optimizers: AdamW, or Muon on the blocks' matrices with AdamW on the rest, and the
grouping of the GPT's parameters by role that decides who gets what (train.py, bench.py).

    optimizer = configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2), "cpu", "muon")

Each param group carries "lr_ratio", its peak learning rate over learning_rate, so one
schedule scales every group (train.py sets group["lr"] = lr * group["lr_ratio"]).
This file imports nothing from the project; model.py knows nothing of it.
"""

import inspect
import math

import torch


def role(name, p):
    """Which AdamW learning rate a parameter gets: 'embedding' (token, position, value and
    bigram tables), 'head' (an untied output head), 'scalar' (gains, biases, x0_mix's lambdas:
    anything below 2-D) or 'matrix' (the blocks' matrices, when AdamW trains them)."""
    if p.dim() < 2:
        return "scalar"
    if name.startswith(("transformer.wte", "transformer.wpe", "value_embeds.", "bigram.")):
        return "embedding"
    return "head" if name.startswith("lm_head.") else "matrix"


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                          muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0, muon_ns_steps=5,
                          role_lrs=None, dtype=torch.float32):
    """optimizer="adamw": AdamW with weight decay on matrices and embeddings (2-D) only, not on
    biases and norm gains; the fused kernel where this torch has it for device_type.

    optimizer="muon": Muon (see MuonAdamW) on the 2-D matrices inside the blocks, AdamW as above
    on everything else (embeddings, lm_head, gains, biases).

    role_lrs: {'embedding', 'head', 'scalar': peak lr} for AdamW's parameters of that role (see
    role); a role left out, or 0, gets learning_rate.

    dtype: the training's compute dtype (hardware.setup_device's choice); Muon's Newton-Schulz
    runs in bfloat16 when it is bfloat16, else in float32."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optimizer == "muon":
        hidden = [p for n, p in named if n.startswith("transformer.h.") and p.dim() == 2]
        named = [(n, p) for n, p in named if not (n.startswith("transformer.h.") and p.dim() == 2)]
    if learning_rate <= 0:
        raise ValueError(f"the lr_ratio of each group needs learning_rate > 0, got {learning_rate}")
    # one group per (decayed?, lr): the 2 groups decayed and not, unless role_lrs splits them
    buckets = {}
    for decayed in (True, False):
        for n, p in named:
            if (p.dim() >= 2) == decayed:
                lr = (role_lrs or {}).get(role(n, p)) or learning_rate
                buckets.setdefault((decayed, lr), []).append(p)
    groups = [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lr,
               "lr_ratio": lr / learning_rate} for (decayed, lr), params in buckets.items()]
    decay = [p for (decayed, _), params in buckets.items() if decayed for p in params]
    no_decay = [p for (decayed, _), params in buckets.items() if not decayed for p in params]
    n_decay = sum(p.numel() for p in decay)
    n_no_decay = sum(p.numel() for p in no_decay)
    print(f"optimizer: {len(decay)} decayed tensors ({n_decay:,} parameters), "
          f"{len(no_decay)} non-decayed tensors ({n_no_decay:,} parameters) with AdamW"
          + "".join(f"; {kind} lr {lr:g}" for kind, lr in sorted((role_lrs or {}).items()) if lr))
    if optimizer == "muon":
        adam = dict(kind="adamw", betas=betas, eps=1e-8)
        groups = [dict(adam, **g) for g in groups]
        groups.append(dict(kind="muon", params=hidden, lr=muon_lr, lr_ratio=muon_lr / learning_rate,
                           momentum=muon_momentum, weight_decay=muon_weight_decay, ns_steps=muon_ns_steps))
        # bfloat16 as in Keller Jordan's Muon when training in bfloat16 (so where the device has
        # it, or was asked for it): 1.7x faster than float32 on the CPU quick start's matrices
        # (AVX512-BF16, docs/faster_cpu.md); --dtype=float32 keeps everything in float32
        ns_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
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
