"""
int8 weight-only inference: a trained GPT decodes about 2x faster on a CPU (sample.py,
evaluate.py and bench.py --quantize=int8).

Decoding reads every weight once per token, so it is bound by memory bandwidth: int8 weights
(1 byte instead of 4) cut the bytes 4x. Weights are quantized per output channel
(symmetric, scale = max|w_row| / 127); activations stay in floating point. Measurements and
the reasons behind each choice: docs/lora_int8.md.

Every layer width works. torch's CPU int8 kernel needs an input width that is a multiple of 16
(otherwise it returns garbage or crashes the process), so such a layer's int8 weight gets zero
columns up to the next multiple and its input as many zeros: exact, since the padding adds
zeros. The other way, dequantizing those layers' weights at every call, was measured 4-5x
slower (a 776-wide GPT-2-sized model, one thread of a busy 2-core Intel Xeon: 48-53 ms per token
padded, 221-290 dequantized, 85-89 in float32; docs/benchmarks.md).

    quantize_model(model, 'int8')   # in place: Linear -> Int8Linear, prints what runs

model.py knows nothing of this file: it swaps the Linear layers from outside.
"""

import mmap

import torch
import torch.nn as nn
from torch.nn import functional as F


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


# torch's CPU _weight_int8pack_mm reads a row of the input in blocks of 16 values: for an input
# width that is not a multiple of 16 it returns garbage or crashes the process (signal 11;
# torch 2.13, widths 8, 24, 40, 85 tried). Int8Linear pads such a layer's int8 weight with zero
# columns, and each input with as many zeros: the products of the padding are exact zeros.
KERNEL_WIDTH_MULTIPLE = 16


class Int8Linear(nn.Module):
    """A Linear with int8 weights and per-output-channel scales; activations in floating point.

    kernel=True: torch.ops.aten._weight_int8pack_mm(x (M, in), q (out, in) int8, scales (out,))
    in bfloat16. Its float32 variant is 3-20x slower than bfloat16 on our CPU (measured in
    docs/lora_int8.md), so activations go in as bfloat16; the bfloat16 result comes back in
    float32 through the bias add itself (float32 bias + bfloat16 -> float32: one op, not a
    conversion and an add). An input width that is not a multiple of KERNEL_WIDTH_MULTIPLE is
    padded with zeros up to one (weight_int8 is then (out, padded in); dequantized_weight is
    the real columns). kernel=False: dequantize the weight to x's dtype on every call and
    F.linear."""

    def __init__(self, layer, kernel):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        q, scale = quantize_per_channel(layer.weight)
        self.pad = -self.in_features % KERNEL_WIDTH_MULTIPLE if kernel else 0
        if self.pad:
            q = F.pad(q, (0, self.pad))  # (out, padded in): zero columns
        self.register_buffer("weight_int8", q.to(layer.weight.device))
        self.register_buffer("scale", scale.to(layer.weight.device))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.kernel = kernel
        if kernel:
            self.register_buffer("scale_bf16", scale.to(layer.weight.device, torch.bfloat16))
        self._forward = self._kernel_forward if kernel else self._dequant_forward  # chosen once

    def dequantized_weight(self, dtype=torch.float32):
        q = self.weight_int8[:, :self.in_features]  # without the kernel's padding
        return q.to(dtype) * self.scale[:, None].to(dtype)  # (out, in)

    def _kernel_forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (rows, in)
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))  # (rows, padded in): zeros meet the zero columns
        # torch._weight_int8pack_mm is torch.ops.aten._weight_int8pack_mm without the Python
        # dispatch wrapper (~1 us less per call, 49 calls per GPT-2 token)
        y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scale_bf16)  # (rows, out) bfloat16
        y = y.view(*x.shape[:-1], self.out_features)  # (..., out)
        # the promotion to float32 is the bias add's own (as y.float() + bias, bit for bit)
        return y.to(x.dtype) if self.bias is None else torch.add(self.bias, y)

    def _dequant_forward(self, x):
        y = F.linear(x, self.dequantized_weight(x.dtype))  # (..., out)
        return y if self.bias is None else y + self.bias

    def forward(self, x):
        return self._forward(x)

    def extra_repr(self):
        padded = f" (padded to {self.in_features + self.pad})" if self.pad else ""
        return f"in={self.in_features}{padded}, out={self.out_features}, kernel={self.kernel}"


class Int8Embedding(nn.Module):
    """Token embedding read from an int8 table: rows q[idx] * scale[idx]. Shares the lm_head's
    int8 weight when the two are tied (GPT-2), as the float model shares one matrix."""

    def __init__(self, head, dtype=torch.float32):
        super().__init__()
        self.head = [head]  # a list: not a submodule, so its buffers are not listed twice
        self.dtype = dtype  # the model's float dtype (bfloat16 where its weights were converted)

    def forward(self, idx):
        head = self.head[0]
        q = head.weight_int8[:, :head.in_features]  # (V, C): a view without the kernel's padding
        # int8 rows times float32 scales: the product promotes to float32 (no separate .float())
        return torch.mul(q[idx], head.scale[idx][..., None]).to(self.dtype)  # (..., C); float32: no copy


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
    dtype = model.transformer.wte.weight.dtype
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name in linears:  # wrapped from outside: model.py needs no `if int8:`
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8Linear(model.get_submodule(name), kernel))
    if tied:
        model.transformer.wte = Int8Embedding(model.lm_head, dtype)
    huge = pack and device_type == "cpu" and pack_int8_weights(model)
    if kernel:
        path = "torch.ops.aten._weight_int8pack_mm (int8 weights x bfloat16 activations)"
    else:
        why = "asked for" if int8_kernel_available(device_type) else f"no int8 kernel for {device_type} in this torch"
        path = f"dequantize-on-the-fly ({why})"
    pages = ", weights in one buffer, 2 MiB pages requested" if huge else ""
    return f"int8 weight-only: {len(linears)} Linear layers{' + tied embedding' if tied else ''}, matmul via {path}{pages}"


def weight_bytes(model):
    """Bytes held by the model's parameters and buffers, shared tensors counted once."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def quantize_model(model, quantize):
    """quantize 'none' or 'int8' (quantize_int8), in place; prints which matmul path runs and
    the weights' memory before and after. Returns model."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be 'none' or 'int8', got {quantize!r}")
    if quantize == 'int8':
        before = weight_bytes(model)
        quantize_int8(model)  # its technical description is for docs and tests; say it in plain words
        layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
        device = next(model.buffers()).device.type
        how = (f"multiplied by the fast int8 kernel of this {device.upper() if device != 'cpu' else 'CPU'}"
               if layers[0].kernel else f"turned back into floats at every use, no faster (this torch has no int8 "
               f"kernel for {device})")
        tied = " and the tied embedding" if isinstance(model.transformer.wte, Int8Embedding) else ""
        n_padded = sum(1 for m in layers if m.pad)
        padded = (f", {n_padded} of them padded to a multiple of {KERNEL_WIDTH_MULTIPLE} wide for it"
                  if n_padded else "")
        print(f"int8 weights: {len(layers)} layers{tied}, {before / 2**20:.1f} MiB -> {weight_bytes(model) / 2**20:.1f} "
              f"MiB, {how}{padded} (docs/lora_int8.md)")
    return model


QUANTIZE = ('none', 'int8')  # the values of the scripts' quantize knob
