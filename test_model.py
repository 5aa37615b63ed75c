"""Tests of model.py against references: Hugging Face GPT-2 (tiny configs, nothing
downloaded), full recomputation for the KV cache, and plain PyTorch for the samplers.
Everything runs on CPU in float32."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import GPT, CausalSelfAttention, GPTConfig, KVCache, sample_next
from lib.export import save_hf
from lib.optim import configure_optimizers

ROOT = Path(__file__).resolve().parent

# float32 logits of the same weights through two implementations agree to ~1e-6;
# 1e-4 absolute is the stated tolerance
ATOL = 1e-4

# odd sizes on purpose: nothing divisible by 64, heads of size 5 and 7
HF_CONFIGS = [
    dict(vocab_size=97, n_positions=37, n_embd=15, n_layer=2, n_head=3),
    dict(vocab_size=211, n_positions=29, n_embd=49, n_layer=3, n_head=7),
]


def tiny(**kw):
    cfg = dict(block_size=16, vocab_size=53, n_layer=2, n_head=2, n_embd=24, dropout=0.0, bias=True)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


def hf_model(cfg, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0, **cfg)
    model = transformers.GPT2LMHeadModel(config).eval()
    # GPT-2 init leaves biases and LayerNorms trivial: randomise them so a swapped or
    # untransposed tensor cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0.0, 0.3)
    return model


# ------------------------------------------------------------------ Hugging Face parity

@pytest.mark.parametrize("cfg", HF_CONFIGS, ids=["v97-e15-h3", "v211-e49-h7"])
def test_logits_and_loss_match_huggingface(cfg, tmp_path):
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.block_size == cfg["n_positions"] and ours.config.vocab_size == cfg["vocab_size"]
    torch.manual_seed(1)
    idx = torch.randint(0, cfg["vocab_size"], (3, cfg["n_positions"]))
    targets = torch.randint(0, cfg["vocab_size"], (3, cfg["n_positions"]))
    targets[0, :5] = -1  # ignored positions
    with torch.no_grad():
        ref = hf(idx).logits
        logits, loss = ours(idx, targets)
        ref_loss = F.cross_entropy(ref.view(-1, ref.size(-1)), targets.view(-1), ignore_index=-1)
        last, none = ours(idx)
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(last, ref[:, -1:], atol=ATOL, rtol=0)
    assert none is None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cfg", HF_CONFIGS, ids=["v97-e15-h3", "v211-e49-h7"])
def test_export_loads_in_transformers(cfg, bias, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = GPT(GPTConfig(block_size=cfg["n_positions"], vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"],
                         n_head=cfg["n_head"], n_embd=cfg["n_embd"], bias=bias)).eval()
    with torch.no_grad():  # non-trivial norms and biases, as above
        for name, p in ours.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0.0, 0.3)
    save_hf(ours, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, cfg["vocab_size"], (2, cfg["n_positions"]))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx, idx)[0], atol=ATOL, rtol=0)
    # and back: our loader reads our export
    again = GPT.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx, idx)[0], ours(idx, idx)[0], atol=ATOL, rtol=0)


def test_from_pretrained_pytorch_bin_and_bare_gpt2model(tmp_path):
    """Older folders hold pytorch_model.bin; a GPT2Model saves keys without 'transformer.'."""
    hf = hf_model(HF_CONFIGS[0])
    sd = {k[len("transformer."):]: v for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    ours = GPT.from_pretrained(str(tmp_path), override_args=dict(dropout=0.1))
    assert ours.config.dropout == 0.1
    ours.eval()
    idx = torch.randint(0, 97, (1, 37))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, idx)[0], hf(idx).logits, atol=ATOL, rtol=0)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="'gpt3' is not a folder"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(FileNotFoundError, match="'gpt2' is not a folder .*pretrained_folder"):
        GPT.from_pretrained("gpt2")  # a name: lib/loading.py resolves it, model.py reads folders only
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(str(tmp_path))
    hf = hf_model(HF_CONFIGS[0])
    hf.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path))
    sd = dict(hf.state_dict())
    del sd["transformer.h.1.mlp.c_fc.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.mlp.c_fc.weight'\]"):
        GPT.from_pretrained(str(tmp_path))
    sd = dict(hf.state_dict())
    sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(15, 14)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"c_proj.weight has shape \(14, 15\), expected \(15, 15\)"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="may only set 'dropout'"):
        GPT.from_pretrained(str(tmp_path), override_args=dict(n_layer=3))


# ------------------------------------------------------------------ architecture

def test_gpt2_124m_parameter_count():
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True))
    assert model.get_num_params(non_embedding=False) == 124_439_808
    assert model.get_num_params() == 124_439_808 - 1024 * 768
    parts = model.param_breakdown()
    assert parts["total"] == 124_439_808
    assert parts["embeddings"] == 50257 * 768 + 1024 * 768
    assert parts["attention"] == 12 * (768 * 3 * 768 + 3 * 768 + 768 * 768 + 768)
    assert parts["mlp"] == 12 * (768 * 4 * 768 + 4 * 768 + 4 * 768 * 768 + 768)
    assert parts["norms"] == (2 * 12 + 1) * 2 * 768


def test_init_statistics():
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4, vocab_size=1000, block_size=64))
    std = lambda name: dict(model.named_parameters())[name].std().item()
    assert abs(std("transformer.h.0.mlp.c_fc.weight") - 0.02) < 0.002
    assert abs(std("transformer.h.0.attn.c_proj.weight") - 0.02 / math.sqrt(16)) < 0.0005
    assert abs(std("transformer.h.3.mlp.c_proj.weight") - 0.02 / math.sqrt(16)) < 0.0005
    assert model.lm_head.weight is model.transformer.wte.weight
    assert float(model.transformer.h[0].attn.c_attn.bias.detach().abs().max()) == 0.0


def test_no_bias_drops_every_bias():
    model = tiny(bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert model.transformer.h[0].ln_1.bias is None


def test_causality():
    model = tiny()
    idx = torch.randint(0, 53, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % 53
    with torch.no_grad():
        a = model(idx, idx)[0]
        b = model(changed, changed)[0]
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=0, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


def test_loss_at_init_is_near_uniform():
    model = tiny(vocab_size=500, n_embd=64, n_layer=2, n_head=4, block_size=32)
    idx = torch.randint(0, 500, (8, 32))
    targets = torch.randint(0, 500, (8, 32))  # independent of idx: tied embeddings favour idx itself
    with torch.no_grad():
        loss = model(idx, targets)[1].item()
    assert abs(loss - math.log(500)) < 0.1, (loss, math.log(500))


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 40, (4, 16))
    y = torch.randint(0, 40, (4, 16))
    opt = configure_optimizers(model, 0.0, 3e-3, (0.9, 0.99), "cpu")
    for _ in range(300):
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()


def test_non_contiguous_targets():
    model = tiny()
    chunk = torch.randint(0, 53, (2, 17))
    x, y = chunk[:, :-1], chunk[:, 1:]  # views into one tensor, y not contiguous
    with torch.no_grad():
        torch.testing.assert_close(model(x, y)[1], model(x.contiguous(), y.contiguous())[1])


def test_cpu_dropout_has_the_right_distribution():
    """Our Dropout draws uniforms instead of bernoulli_: check rate, scale and that the
    expectation is preserved, as nn.Dropout guarantees."""
    from model import Dropout
    drop = Dropout(0.2).train()
    torch.manual_seed(0)
    out = drop(torch.ones(1_000_000))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.002
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1.25))
    assert abs(out.mean().item() - 1.0) < 0.005
    x = torch.ones(10, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient passes where kept, scaled alike
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("T", [16, 515], ids=["one-chunk", "four-chunks"])
def test_explicit_attention_matches_sdpa(T):
    """The explicit (chunked for long sequences) CPU attention used under dropout equals
    the fused kernel when nothing is dropped: switch the rates after construction to take
    both paths, forward and backward."""
    model = tiny(dropout=0.1, block_size=520).train()
    idx = torch.randint(0, 53, (2, T))
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.0  # explicit path, no dropping
    for m in model.modules():
        if type(m).__name__ == "Dropout":
            m.p = 0.0
    explicit, loss = model(idx, idx)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for block in model.transformer.h:
        block.attn.dropout = 0.0  # fused path
    fused, loss = model(idx, idx)
    loss.backward()
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_cpu_bfloat16_training_attention_is_as_accurate_as_sdpa(monkeypatch):
    """Training in bfloat16 on the CPU takes the explicit attention (torch's flash backward is
    slower there); against float32 its logits and gradients err no more than SDPA's bfloat16."""
    calls = []
    explicit_attention = CausalSelfAttention.explicit_attention
    monkeypatch.setattr(CausalSelfAttention, "explicit_attention",
                        lambda self, *a: calls.append(1) or explicit_attention(self, *a))
    model = tiny(block_size=256, n_embd=64, n_head=4, pos_emb="rope", qk_norm=True)
    idx = torch.randint(0, 53, (4, 200))

    def run(training, dtype):
        model.train(training).zero_grad()
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits, loss = model(idx, idx)
        loss.backward()
        return [logits.float()] + [p.grad.clone() for p in model.parameters()], len(calls)

    reference, n_reference = run(True, torch.float32)  # float32 trains through SDPA
    explicit, n_explicit = run(True, torch.bfloat16)
    fused, n_fused = run(False, torch.bfloat16)  # eval mode keeps SDPA (dropout is 0: same function)
    assert (n_reference, n_explicit, n_fused) == (0, 2, 0)
    for ref, a, b in zip(reference, explicit, fused):
        err_explicit, err_fused = [((x - ref).norm() / ref.norm()).item() for x in (a, b)]
        assert err_explicit < 0.02  # bfloat16 keeps 8 bits: ~0.4% per rounding
        assert err_explicit <= 1.25 * err_fused + 1e-3, (err_explicit, err_fused)


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, 53, (2, 16))
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(idx, idx)[0], model(idx, idx)[0], atol=0, rtol=0)
        model.train()
        assert (model(idx, idx)[0] - model(idx, idx)[0]).abs().max() > 1e-3


def test_crop_block_size():
    model = tiny(block_size=16)
    idx = torch.randint(0, 53, (1, 8))
    with torch.no_grad():
        before = model(idx, idx)[0]
        model.crop_block_size(8)
        torch.testing.assert_close(model(idx, idx)[0], before, atol=0, rtol=0)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape == (8, 24)
    with pytest.raises(ValueError, match="length 9: block_size is 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_recorded_attention_is_the_forward_weights():
    """attn_record (how lib/plotting.py draws attention maps): the explicit path's probabilities,
    and that path reproduces the fused kernel's output."""
    model = tiny()
    idx = torch.randint(0, 53, (2, 11))
    records = []
    for block in model.transformer.h:
        block.attn.attn_record = records
    with torch.no_grad():
        explicit = model(idx, idx)[0]
    for block in model.transformer.h:
        block.attn.attn_record = None
    assert len(records) == 2 and records[0].shape == (2, 2, 11, 11)
    for att in records:
        torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, 11))
        assert float(att.triu(diagonal=1).abs().max()) == 0.0  # causal
    with torch.no_grad():
        torch.testing.assert_close(explicit, model(idx, idx)[0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ bad inputs

def test_bad_inputs_give_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="length 17: block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 53\), got min 0 max 53"):
        model(torch.tensor([[0, 53]]))
    with pytest.raises(ValueError, match="got min -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer tensor.*torch.float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="integer tensor.*list"):
        model([[1, 2]])
    with pytest.raises(ValueError, match=r"shape \(batch, sequence\), got \(4,\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets shape \(1, 3\) must equal idx shape \(1, 4\)"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="n_embd 10 must be divisible by n_head 3"):
        GPT(GPTConfig(n_embd=10, n_head=3))
    with pytest.raises(ValueError, match="GPTConfig.n_layer must be a positive int, got 0"):
        GPT(GPTConfig(n_layer=0))
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(idx, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(idx, 2, top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        model.generate(idx, 2, top_k=0)
    with pytest.raises(ValueError, match="vocab_limit must be in"):
        model.generate(idx, 2, vocab_limit=54)
    with pytest.raises(ValueError, match=r"use idx\[None\]"):
        model.generate(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="token ids must be in"):
        model.generate(torch.tensor([[99]]), 2)
    with pytest.raises(TypeError, match="integer tensor.*torch.float32"):  # not silently cast to ids
        model.generate(torch.tensor([[1.7, 2.0]]), 2)
    with pytest.raises(ValueError, match="at least one token per row"):
        model(torch.zeros(2, 0, dtype=torch.long))
    long_prompt = torch.zeros(1, 40, dtype=torch.long)  # longer than block_size 16: generation takes it
    assert model.generate(long_prompt, 2).shape == (1, 42)


# ------------------------------------------------------------------ generation

def uncached_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                      vocab_limit=None, generator=None):
    """The reference: full recomputation every step over the last block_size tokens."""
    for _ in range(max_new_tokens):
        cond = idx[:, -model.config.block_size:]
        with torch.no_grad():
            logits = model(cond)[0][:, -1, :]
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
    return idx


@pytest.mark.parametrize("batch,prompt_len,new", [(1, 1, 10), (3, 5, 10), (2, 4, 30), (1, 16, 5), (2, 20, 8)],
                         ids=["b1", "batch3", "past-block", "full-prompt", "long-prompt"])
@pytest.mark.parametrize("mode", ["greedy", "sampled", "top_k", "top_p"])
def test_kv_cache_matches_full_recomputation(batch, prompt_len, new, mode):
    model = tiny(block_size=16)
    kw = dict(greedy=dict(temperature=0.0), sampled=dict(temperature=1.0),
              top_k=dict(temperature=0.8, top_k=5), top_p=dict(temperature=1.2, top_p=0.7))[mode]
    torch.manual_seed(3)
    idx = torch.randint(0, 53, (batch, prompt_len))
    ours = model.generate(idx, new, generator=torch.Generator().manual_seed(7), **kw)
    ref = uncached_generate(model, idx, new, generator=torch.Generator().manual_seed(7), **kw)
    assert ours.shape == (batch, prompt_len + new)
    assert torch.equal(ours, ref), (ours, ref)


def test_cached_logits_match_uncached():
    model = tiny(block_size=16)
    idx = torch.randint(0, 53, (2, 12))
    cache = KVCache(model.config.n_layer, 16)
    with torch.no_grad():
        h = model._hidden(idx[:, :7], cache)
        steps = [h[:, -1]] + [model._hidden(idx[:, t:t + 1], cache)[:, -1] for t in range(7, 12)]
        chunked = KVCache(model.config.n_layer, 16)
        model._hidden(idx[:, :4], chunked)
        tail = model._hidden(idx[:, 4:12], chunked)  # a chunk after a prefix uses the explicit mask
        full = model._hidden(idx)
    for i, hs in enumerate(steps):
        torch.testing.assert_close(hs, full[:, 6 + i], atol=1e-5, rtol=0)
    torch.testing.assert_close(tail, full[:, 4:], atol=1e-5, rtol=0)


def test_generate_stream_equals_generate_and_restores_mode():
    model = tiny(dropout=0.1)
    model.train()
    idx = torch.randint(0, 53, (2, 3))
    streamed = [t for t in model.generate_stream(idx, 12, generator=torch.Generator().manual_seed(1))]
    assert model.training, "generation must restore training mode"
    assert all(t.shape == (2,) for t in streamed)
    full = model.generate(idx, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(full, torch.cat([idx, torch.stack(streamed, dim=1)], dim=1))
    assert torch.is_grad_enabled()


def test_padded_vocab_is_never_sampled():
    model = tiny(vocab_size=64)
    with torch.no_grad():  # make the padded ids the likeliest by far
        model.lm_head.weight[50:] = model.lm_head.weight[:50].mean(0) * 0 + 5.0
    idx = torch.randint(0, 50, (4, 2))
    free = model.generate(idx, 10, generator=torch.Generator().manual_seed(0))
    assert (free[:, 2:] >= 50).any(), "test needs padded ids to be likely without the limit"
    for kw in (dict(), dict(temperature=0.0), dict(top_k=20), dict(top_p=0.9), dict(temperature=3.0)):
        out = model.generate(idx, 40, vocab_limit=50, generator=torch.Generator().manual_seed(0), **kw)
        assert int(out.max()) < 50, kw


# ------------------------------------------------------------------ samplers on crafted logits

def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 4.99]])
    assert sample_next(logits, temperature=0.0).tolist() == [1, 0]


def empirical(logits, n=20000, **kw):
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(n, -1), generator=g, **kw)
    return torch.bincount(draws, minlength=logits.size(-1)).float() / n


def test_top_k_keeps_only_k_likeliest():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]]))
    freq = empirical(logits, top_k=2)
    assert freq[[0, 3, 4]].sum() == 0
    expected = torch.tensor([0.4, 0.3]) / 0.7  # renormalised over the two kept
    torch.testing.assert_close(freq[[1, 2]], expected, atol=0.015, rtol=0)


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = torch.log(probs)
    # 0.5 + 0.25 = 0.75 < 0.8, so the third token (0.15) is needed: nucleus {0, 1, 2}
    freq = empirical(logits, top_p=0.8)
    assert freq[[3, 4]].sum() == 0
    torch.testing.assert_close(freq[:3], probs[0, :3] / 0.9, atol=0.015, rtol=0)
    # a tiny top_p keeps only the likeliest token
    assert empirical(logits, top_p=0.01)[0] == 1.0
    # top_p=1 is plain sampling
    torch.testing.assert_close(empirical(logits, top_p=1.0), probs[0], atol=0.015, rtol=0)


def test_temperature_sharpens_and_flattens():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    cold = empirical(logits, temperature=0.5)
    hot = empirical(logits, temperature=2.0)
    exact_cold = F.softmax(logits / 0.5, dim=-1)[0]
    exact_hot = F.softmax(logits / 2.0, dim=-1)[0]
    torch.testing.assert_close(cold, exact_cold, atol=0.015, rtol=0)
    torch.testing.assert_close(hot, exact_hot, atol=0.015, rtol=0)


# ------------------------------------------------------------------ FLOPs

def test_flops_per_token():
    model = tiny()
    cfg = model.config
    assert model.flops_per_token() == 6 * model.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


# ------------------------------------------------------------------ torch.compile

@pytest.mark.slow
def test_compiles_without_graph_breaks():
    """fullgraph=True raises on any graph break; run in a subprocess so the compile
    caches do not leak into other tests."""
    code = (
        "import torch\n"
        "from model import GPT, GPTConfig\n"
        "torch.manual_seed(0)\n"
        "m = GPT(GPTConfig(block_size=16, vocab_size=53, n_layer=2, n_head=2, n_embd=24))\n"
        "c = torch.compile(m, fullgraph=True)\n"
        "x = torch.randint(0, 53, (2, 16))\n"
        "logits, loss = c(x, x)\n"
        "loss.backward()\n"
        "ref = m(x, x)[0]\n"
        "assert (logits - ref).abs().max() < 1e-4, (logits - ref).abs().max()\n"
        "print('compiled ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled ok" in r.stdout, r.stderr[-3000:]
