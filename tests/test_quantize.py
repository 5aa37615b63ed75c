"""
Tests for int8 weight-only inference (quantize.py's quantize_int8, Int8Linear, Int8Embedding) and the
quantize knob of sample.py / evaluate.py. Tiny random models on CPU.
"""

import copy
import http.client
import json
import mmap
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import local_data  # noqa: F401  (TIKTOKEN_CACHE_DIR for offline GPT-2 BPE files)
import torch

from lib import quantize, runs
from lib.evaluation import perplexity
from lib.export import save_hf
from model import GPT, GPTConfig, KVCache
from lib.quantize import (Int8Linear, huge_page_buffer, int8_kernel_available, pack_int8_weights, quantize_int8,
                      quantize_per_channel)
from helpers import ENV, REPO

KERNEL = int8_kernel_available('cpu')


def random_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=256, bias=True)
    return GPT(GPTConfig(**{**args, **kw})).eval()


def test_round_trip_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(96, 80) * torch.logspace(-3, 1, 96)[:, None]  # rows of very different scales
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[torch.arange(96) != 5] == 127).all()  # full range per row
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()  # round to nearest: half a quantization step
    assert torch.equal(q[5], torch.zeros(80, dtype=torch.int8))
    # relative to each row's largest weight: at most 1/254
    assert (err.amax(dim=1) / w.abs().amax(dim=1).clamp(min=1e-12)).max() <= 1 / 254 + 1e-6


@pytest.mark.skipif(not KERNEL, reason="this torch has no _weight_int8pack_mm for CPU")
@pytest.mark.parametrize('rows', [1, 7, 64])
def test_kernel_matches_the_dequantized_reference(rows):
    """_weight_int8pack_mm vs x @ dequantized W^T: the kernel rounds x and its output to bfloat16,
    so they agree to bfloat16 precision (2^-8 relative), here 1e-2 of the output's scale."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 72)
    x = torch.randn(rows, 128)
    fast, ref = Int8Linear(layer, kernel=True), Int8Linear(layer, kernel=False)
    assert torch.equal(fast.weight_int8, ref.weight_int8)
    y, y_ref = fast(x), ref(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 72)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-2 * y_ref.abs().max().item())
    # the reference itself is the float layer up to the weight rounding
    torch.testing.assert_close(y_ref, layer(x), rtol=0, atol=2e-2 * y_ref.abs().max().item())


@pytest.mark.skipif(not KERNEL, reason="this torch has no _weight_int8pack_mm for CPU")
@pytest.mark.parametrize('bias', [True, False])
def test_kernel_path_is_the_kernel_plus_a_float32_bias(bias):
    """The fast path returns the kernel's bfloat16 product in float32 through the bias add's own
    type promotion: bit for bit kernel(x in bfloat16).float() + bias, for any leading shape."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 40, bias=bias)
    fast = Int8Linear(layer, kernel=True)
    x = torch.randn(2, 3, 96)
    y = fast(x)
    ref = torch.ops.aten._weight_int8pack_mm(x.reshape(6, 96).to(torch.bfloat16), fast.weight_int8,
                                             fast.scale.to(torch.bfloat16)).float().view(2, 3, 40)
    if bias:
        ref = ref + layer.bias
    assert y.dtype == torch.float32 and torch.equal(y, ref)


def test_int8_embedding_reads_the_dequantized_rows():
    """The tied token embedding of a quantized model is the lm_head's dequantized table, row by
    row, exactly (int8 rows times float32 scales)."""
    q = random_gpt()
    quantize_int8(q)
    idx = torch.randint(0, 256, (3, 5))
    rows = q.transformer.wte(idx)
    assert rows.dtype == torch.float32 and rows.shape == (3, 5, 64)
    assert torch.equal(rows, q.lm_head.dequantized_weight()[idx])


@pytest.mark.parametrize('kernel', [True, False] if KERNEL else [False])
def test_quantized_logits_close_to_float(kernel):
    """Logits of the int8 model within 5% of the float logits' spread (max error), and the
    loss within 1%."""
    model = random_gpt()
    q = copy.deepcopy(model)
    notice = quantize_int8(q, kernel=kernel)
    assert ('_weight_int8pack_mm' in notice) == kernel
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())  # every Linear converted
    idx = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        (ref, ref_loss), (out, loss) = model(idx, idx), q(idx, idx)
    assert (out - ref).abs().max() <= 0.05 * ref.std()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-2)
    # int8 matrices: about a quarter of the float bytes (position embeddings, biases and norms stay float32)
    assert quantize.weight_bytes(q) < 0.35 * quantize.weight_bytes(model)


@pytest.mark.parametrize('kernel', [True, False] if KERNEL else [False])
def test_quantized_kv_cache_equals_recomputation(kernel):
    """Decoding one token at a time through the KV cache gives the logits of a full forward
    over the same prefix."""
    q = random_gpt()
    quantize_int8(q, kernel=kernel)
    idx = torch.randint(0, 256, (2, 20))
    tol = 2e-2 if kernel else 1e-4  # bfloat16 activations round differently for 1 row and for 20
    with torch.inference_mode():
        cache = KVCache(q.config.n_layer, q.config.block_size)
        h = q._hidden(idx[:, :8], cache)
        for t in range(8, 20):
            h = q._hidden(idx[:, t:t + 1], cache)
            cached = q.lm_head(h[:, -1])
            full = q(idx[:, :t + 1])[0][:, -1]
            torch.testing.assert_close(cached, full, rtol=0, atol=tol * full.abs().max().item())
        # and greedy generation matches step-by-step recomputation
        out = q.generate(idx[:1, :4], 10, temperature=0)
        seq = idx[:1, :4]
        for _ in range(10):
            logits = q(seq)[0][:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    if not kernel:
        assert torch.equal(out, seq)
    else:  # a token may differ only where two logits are within the rounding tolerance
        assert (out == seq).float().mean() >= 0.9


# Linux with transparent huge pages built in (madvise then marks the mapping)
HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE") and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")


def vm_flags(address):
    """The VmFlags of the mapping that holds address, from /proc/self/smaps (Linux)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not HUGE_PAGES, reason="this OS has no transparent huge pages to ask for")
def test_huge_page_buffer_is_aligned_and_advised():
    """The buffer starts at a 2 MiB boundary, is writable, and its mapping is marked for huge
    pages ('hg' in smaps' VmFlags: madvise(MADV_HUGEPAGE) took effect)."""
    buf = huge_page_buffer(5 << 20)
    assert buf.dtype == torch.uint8 and buf.numel() == 5 << 20
    assert buf.data_ptr() % (2 << 20) == 0
    buf.fill_(7)
    assert int(buf[-1]) == 7
    assert "hg" in vm_flags(buf.data_ptr())


@pytest.mark.skipif(not HUGE_PAGES, reason="this OS has no transparent huge pages to ask for")
def test_packed_int8_weights_share_one_buffer_and_compute_the_same():
    """quantize_int8 on CPU moves every int8 matrix into one buffer, in forward order, each at a
    64-byte boundary, without changing a value: logits equal those of the unpacked model."""
    model = random_gpt()
    loose = copy.deepcopy(model)
    assert "pages" not in quantize_int8(loose, pack=False)
    packed = copy.deepcopy(loose)
    assert pack_int8_weights(packed)
    weights = [m.weight_int8 for m in packed.modules() if isinstance(m, Int8Linear)]
    assert len(weights) == 4 * 2 + 1
    base = weights[0].untyped_storage().data_ptr()
    assert all(w.untyped_storage().data_ptr() == base for w in weights)  # one buffer
    offsets = [w.data_ptr() - weights[0].data_ptr() for w in weights]
    assert offsets == sorted(offsets) and all(o % 64 == 0 for o in offsets)
    assert weights[0].data_ptr() % (2 << 20) == 0
    for a, b in zip(weights, (m.weight_int8 for m in loose.modules() if isinstance(m, Int8Linear))):
        assert a.is_contiguous() and torch.equal(a, b)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(packed(idx)[0], loose(idx)[0])
    # quantize_int8 packs them itself and says so
    q = copy.deepcopy(model)
    assert "2 MiB pages requested" in quantize_int8(q)
    assert q.lm_head.weight_int8.untyped_storage().data_ptr() == q.transformer.h[0].attn.c_attn.weight_int8.untyped_storage().data_ptr()


def refuse_mapping(*args, **kwargs):
    raise OSError(12, "Cannot allocate memory")


@pytest.mark.parametrize("why", ["no MADV_HUGEPAGE", "mapping refused"])
def test_no_huge_pages_leaves_the_weights_where_they_are(monkeypatch, why):
    """Where the OS has no huge-page request (no mmap.MADV_HUGEPAGE: macOS, Windows) or refuses
    the mapping, quantize_int8 keeps one tensor per matrix and its notice does not claim huge pages."""
    if why == "no MADV_HUGEPAGE":
        monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    else:
        monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 14, raising=False)
        monkeypatch.setattr(mmap, "mmap", refuse_mapping)
    q = random_gpt()
    notice = quantize_int8(q)
    assert "pages" not in notice
    a, b = q.lm_head.weight_int8, q.transformer.h[0].attn.c_attn.weight_int8
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_sample_py_int8_notice_and_output(tmp_path):
    """sample.py --quantize=int8 on a local folder: it says which matmul path runs and samples."""
    folder = tmp_path / 'hf'
    save_hf(GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)), folder)
    env = dict(ENV)  # TIKTOKEN_CACHE_DIR, when set (tests/local_data.py), reaches the child
    proc = subprocess.run([sys.executable, 'sample.py', f'--init_from={folder}', '--quantize=int8', '--device=cpu',
                           '--max_new_tokens=5', '--start=Hello'], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert 'int8 weights: ' in proc.stderr and 'MiB' in proc.stderr and 'kernel' in proc.stderr
    assert proc.stdout.startswith('Hello')
    bad = subprocess.run([sys.executable, 'sample.py', f'--init_from={folder}', '--quantize=int4', '--device=cpu'],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode != 0 and 'Traceback' not in bad.stderr
    assert "error: quantize must be 'none' or 'int8'" in bad.stderr


# -----------------------------------------------------------------------------
# every width: the CPU kernel needs input widths that are multiples of 16 (padded for it)

WIDTH_CHECK = '''
import json, sys, torch
from lib.quantize import Int8Linear, quantize_int8
from model import GPT, GPTConfig
worst = {}
torch.manual_seed(0)
for n_in in (16, 32, 40, 85, 341):
    for n_out in (40, 85):
        layer = torch.nn.Linear(n_in, n_out)
        fast, ref = Int8Linear(layer, kernel=True), Int8Linear(layer, kernel=False)
        for rows in (1, 5):
            x = torch.randn(rows, n_in)
            y, y_ref = fast(x), ref(x)
            worst[f"{n_in}x{n_out} rows={rows}"] = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
# a GPT whose MLPs are 85 and 341 wide: the hidden widths of no multiple of 16
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=40, block_size=32, vocab_size=50)).eval()
for block, hidden in zip(model.transformer.h, (85, 341)):
    block.mlp.c_fc, block.mlp.c_proj = torch.nn.Linear(40, hidden), torch.nn.Linear(hidden, 40)
idx = torch.randint(0, 50, (3, 12))
with torch.no_grad():
    ref = model(idx, idx)[0]
    quantize_int8(model)
    assert all(m.kernel for m in model.modules() if isinstance(m, Int8Linear))
    out = model(idx, idx)[0]
    worst["GPT logits"] = ((out - ref).abs().max() / ref.std()).item()
    for rows in (1, 3):
        out = model.generate(idx[:rows, :4], 20, temperature=0)
        worst[f"GPT generate rows={rows}"] = float(out.shape == (rows, 24))
print(json.dumps(worst))
'''


@pytest.mark.skipif(not KERNEL, reason="this torch has no _weight_int8pack_mm for CPU")
def test_the_kernel_path_takes_every_width():
    """Input widths that are and are not multiples of 16 (16, 32; 40, 85, 341), 1 and 5 rows: the
    kernel path agrees with the dequantized reference to bfloat16 precision; a GPT with MLPs 85
    and 341 wide decodes. In a child process: the unpadded kernel crashed with signal 11."""
    r = subprocess.run([sys.executable, '-c', WIDTH_CHECK], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=ENV)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    worst = json.loads(r.stdout.splitlines()[-1])
    for case, error in worst.items():
        if case.startswith('GPT generate'):
            assert error == 1.0, case
        elif case == 'GPT logits':
            assert error <= 0.05, (case, error)
        else:
            assert error <= 1e-2, (case, error)


def test_padded_layer_keeps_its_width_for_the_dequantized_weight_and_the_embedding():
    """A 40-wide tied model: the lm_head's int8 table is padded for the kernel, but the tied
    embedding and dequantized_weight read the 40 real columns."""
    q = random_gpt(n_embd=40, n_head=2)
    quantize_int8(q, kernel=KERNEL)
    head = q.lm_head
    assert head.weight_int8.shape == ((256, 48) if KERNEL else (256, 40))
    assert head.dequantized_weight().shape == (256, 40)
    idx = torch.randint(0, 256, (2, 3))
    assert torch.equal(q.transformer.wte(idx), head.dequantized_weight()[idx])


CHAR_VOCAB = sorted(set("ROMEO: JULIET\nthe quick brown fox, jumps over lazy dogs.!?"))


def char_run(root, n_embd, n_head):
    """A run folder of a random character model n_embd wide, its data folder with val.bin."""
    data = root / 'data'
    data.mkdir(parents=True)
    (data / 'meta.json').write_text(json.dumps({'vocab_size': len(CHAR_VOCAB), 'tokenizer': 'char',
                                                 'chars': CHAR_VOCAB}))
    np.random.default_rng(0).integers(0, len(CHAR_VOCAB), 600).astype(np.uint16).tofile(data / 'val.bin')
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=n_head, n_embd=n_embd, block_size=64, vocab_size=len(CHAR_VOCAB)))
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                          'model_args': model.config.checkpoint_args(), 'iter_num': 0, 'best_val_loss': 9.9,
                          'config': {'dataset': 'chars', 'data_dir': str(data)}}, root / 'run' / 'ckpt.pt')
    return root / 'run', data, model.eval()


def run_script(*argv, timeout=180):
    """A script in a child process: a crash (signal 11) is a non-zero return code, a hang a timeout."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize('n_embd', [32, 40])  # a multiple of 16, and not
def test_sample_and_evaluate_run_int8_at_any_width(tmp_path, n_embd):
    """sample.py (1 and 3 samples) and evaluate.py perplexity with --quantize=int8 on a model
    n_embd wide: they finish, and the int8 perplexity is the float model's within 2%."""
    run, data, model = char_run(tmp_path, n_embd, 2)
    for samples in (1, 3):
        r = run_script('sample.py', f'--out_dir={run}', '--device=cpu', '--quantize=int8', '--start=ROMEO:',
                       '--max_new_tokens=20', f'--num_samples={samples}', '--temperature=0')
        assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-1500:]}"
        assert ('padded to a multiple of 16 wide' in r.stderr) == (n_embd % 16 != 0) or not KERNEL, r.stderr
        texts = r.stdout.split('-' * 40 + '\n')[:samples]
        # a character model has no end-of-text token: the prompt, 20 characters, a newline
        assert len(texts) == samples and all(t.startswith('ROMEO:') and len(t) == 6 + 20 + 1 for t in texts), texts
    r = run_script('evaluate.py', 'perplexity', f'--out_dir={run}', '--device=cpu', '--quantize=int8',
                   '--batch_size=4')
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-1500:]}"
    got = float(r.stdout.split('perplexity ')[-1].split()[0].rstrip(','))
    want = perplexity(model, np.fromfile(data / 'val.bin', dtype=np.uint16), batch_size=4)['perplexity']
    assert got == pytest.approx(want, rel=0.02), (got, want)


@pytest.mark.parametrize('n_embd', [32, 40])
def test_serve_runs_int8_at_any_width(tmp_path, n_embd):
    """serve.py --quantize=int8 on a model n_embd wide answers one choice and three decoded
    together; the server is still up afterwards."""
    run, _, _ = char_run(tmp_path, n_embd, 2)
    log = tmp_path / 'serve.log'
    with open(log, 'w') as err:
        proc = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={run}', '--port=0', '--device=cpu',
                                 '--quantize=int8'], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=err,
                                text=True)
    try:
        port = None
        for line in proc.stdout:
            found = re.search(r"at http://127\.0\.0\.1:(\d+)$", line.strip())
            if found:
                port = int(found.group(1))
                break
        assert port, log.read_text()[-1500:]
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
        for n in (1, 3):
            conn.request('POST', '/v1/completions', json.dumps(dict(prompt='the', max_tokens=10, n=n, seed=1)),
                         {'Content-Type': 'application/json'})
            r = conn.getresponse()
            answer = json.loads(r.read())
            assert r.status == 200, answer
            assert [len(c['text']) for c in answer['choices']] == [10] * n, answer
        assert proc.poll() is None
    except (ConnectionError, http.client.HTTPException) as e:
        raise AssertionError(f"the server died ({proc.poll()}): {e}: {log.read_text()[-1500:]}") from None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
