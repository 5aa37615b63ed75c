"""Tests of the modern opt-in GPTConfig knobs (every field but GPT-2's, taken from GPTConfig, so
a new knob joins these tests by itself) against plain references: the formulas, a direct complex
rotation for RoPE, a hand-written forward pass with sliding-window attention for the rolling
KV cache, and full recomputation for generation. Tiny models, CPU, float32."""

import math
from dataclasses import fields
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from helpers import every_knob, modern_knobs
from lib import loading, plotting, runs
from lib.export import save_hf
from model import (GPT, GPT2_FIELDS, POSITIONS, GPTConfig, KVCache, LearnedPositions, RMSNorm, apply_rotary,
                   sample_next)
from lib.optim import configure_optimizers

# float32 through two implementations of the same arithmetic agrees to ~1e-6
ATOL = 1e-5

# every value away from GPT-2 of every modern knob, alone ("pos_emb=rope", ...), and all at once;
# init logits are ~0.1: a small soft-cap really bends them
NUMBERS = dict(logit_softcap=0.05, bigram_vocab=37)
KNOBS = {**dict(modern_knobs(**NUMBERS)), "all": every_knob(**NUMBERS)}
ROPE = dict(pos_emb="rope")


def tiny(**kw):
    cfg = dict(block_size=16, vocab_size=53, n_layer=2, n_head=2, n_embd=24, dropout=0.0, bias=True)
    cfg.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():  # non-trivial gains, biases, mixing scalars (every 1-D parameter, a new
        for name, p in model.named_parameters():  # knob's too) and added tables (zero at init),
            if p.dim() < 2:                       # so a skipped one cannot hide
                p.normal_(0.0, 0.3)
            if name.startswith(("value_embeds.", "bigram.")) or (cfg.get("zero_init_proj") and "c_proj" in name):
                p.normal_(0.0, 0.1)
    return model


# ------------------------------------------------------------------ plain references

def rms_ref(x, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def norm_ref(x, module, cfg):
    if cfg.norm == "rmsnorm":
        return rms_ref(x)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + 1e-5) * module.weight
    return y if module.bias is None else y + module.bias


def rope_ref(x, positions, base=10000.0):
    """Rotate x (..., T, hs) as complex numbers x[j] + i x[j + hs/2] times e^(i pos theta_j),
    theta_j = base^(-2j/hs), in float64."""
    hs = x.size(-1)
    theta = base ** (-torch.arange(0, hs // 2, dtype=torch.float64) * 2 / hs)
    angle = positions.double()[:, None] * theta  # (T, hs/2)
    z = torch.complex(x[..., :hs // 2].double(), x[..., hs // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def linear_ref(x, layer):
    y = x @ layer.weight.t()
    return y if layer.bias is None else y + layer.bias


def forward_ref(model, idx, window=None):
    """Logits (B, T, V) and attention probabilities of model on idx, written out by hand.
    window: each query sees at most this many keys (itself included); RoPE positions are
    0..T-1 however long T is: the rolling KV cache's semantics."""
    cfg = model.config
    B, T = idx.shape
    nh, hs = cfg.n_head, cfg.n_embd // cfg.n_head
    x = model.transformer.wte.weight[idx]
    if cfg.bigram_vocab:  # row 0 for the first token, else the hash of (previous, current)
        rows = [[0] + [(a * 1_000_003 + b) % (cfg.bigram_vocab - 1) + 1 for a, b in zip(r[:-1], r[1:])]
                for r in idx.tolist()]
        x = x + model.bigram.weight[torch.tensor(rows)]
    if cfg.pos_emb == "learned":
        x = x + model.transformer.wpe.weight[:T]
    pos = torch.arange(T)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    atts = []
    x0 = x
    for i, block in enumerate(model.transformer.h):
        if cfg.x0_mix:
            x = block.lambdas[0] * x + block.lambdas[1] * x0
        h = norm_ref(x, block.ln_1, cfg)
        q, k, v = linear_ref(h, block.attn.c_attn).split(cfg.n_embd, dim=2)
        if cfg.value_embeds and (cfg.n_layer - 1 - i) % 2 == 0:  # every other block, the last included
            v = v + model.value_embeds[i].weight[idx]
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cfg.qk_norm:
            q, k = rms_ref(q), rms_ref(k)
        if cfg.pos_emb == "rope":
            q, k = rope_ref(q, pos, cfg.rope_base), rope_ref(k, pos, cfg.rope_base)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        atts.append(att)
        y = (att @ v).transpose(1, 2).reshape(B, T, cfg.n_embd)
        x = x + linear_ref(y, block.attn.c_proj)
        h = linear_ref(norm_ref(x, block.ln_2, cfg), block.mlp.c_fc)
        if cfg.mlp_act == "relu2":
            h = torch.clamp(h, min=0) ** 2
        else:  # GPT-2's tanh GELU, written out
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        x = x + linear_ref(h, block.mlp.c_proj)
    logits = norm_ref(x, model.transformer.ln_f, cfg) @ model.lm_head.weight.t()
    if cfg.logit_softcap:
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
    return logits, atts


def generate_ref(next_logits, idx, n, generator, **kw):
    """Sampling loop over a logits function of the whole sequence so far."""
    for _ in range(n):
        with torch.no_grad():
            logits = next_logits(idx)
        nxt = sample_next(logits, generator=generator, **kw)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
    return idx


def recompute_window(model):
    """Full recomputation on the last block_size tokens (what learned positions do)."""
    return lambda idx: model(idx[:, -model.config.block_size:])[0][:, -1]


def sliding_window(model):
    """A full forward of the whole sequence with sliding-window attention (the rolling cache)."""
    return lambda idx: forward_ref(model, idx, window=model.config.block_size)[0][:, -1]


# ------------------------------------------------------------------ each knob vs its formula

def test_rmsnorm_is_the_formula_and_has_no_parameters():
    x = torch.randn(3, 5, 24) * 4 + 1
    torch.testing.assert_close(RMSNorm()(x), rms_ref(x), atol=ATOL, rtol=0)
    model = tiny(norm="rmsnorm")
    assert not [n for n, _ in model.named_parameters() if ".ln_" in n or "ln_f" in n]
    assert model.param_breakdown()["norms"] == 0
    assert type(model.transformer.h[1].ln_2).__name__ == "RMSNorm"


def test_relu2_is_the_formula():
    mlp = tiny(mlp_act="relu2").transformer.h[0].mlp
    x = torch.randn(50)
    torch.testing.assert_close(mlp.act(x), torch.where(x > 0, x * x, torch.zeros_like(x)), atol=0, rtol=0)


def test_rope_is_a_complex_rotation_and_relative():
    model = tiny(pos_emb="rope", n_embd=32, n_head=2)  # head size 16
    assert "transformer.wpe.weight" not in model.state_dict()
    assert not any("cos" in k or "sin" in k for k in model.state_dict())  # cached, not weights
    x = torch.randn(2, 40, 2, 16)  # (B, T, nh, hs), as the attention rotates them
    pos = torch.arange(5, 45)  # past block_size 16: the rolling cache's positions
    expected = rope_ref(x.transpose(1, 2), pos).transpose(1, 2)  # rope_ref wants (..., T, hs)
    rotary = model.transformer.wpe  # the position scheme
    torch.testing.assert_close(apply_rotary(x, rotary.angles(5, 40)), expected, atol=ATOL, rtol=0)
    # the cached table and the on-demand one are the same numbers
    inside, beyond = rotary.angles(3, 10), rotary.table(3, 10)
    assert torch.equal(inside[0], beyond[0]) and torch.equal(inside[1], beyond[1])
    # scores depend on the offset only: q at m, k at n equals q at m+s, k at n+s
    q, k = torch.randn(16), torch.randn(16)
    rot = lambda t, p: apply_rotary(t.view(1, 1, 1, 16), rotary.angles(p, 1)).flatten()
    assert abs(rot(q, 9) @ rot(k, 4) - rot(q, 109) @ rot(k, 104)) < 1e-4
    assert abs(rot(q, 9) @ rot(k, 4) - rot(q, 9) @ rot(k, 5)) > 1e-3  # and the offset matters


def test_softcap_is_the_formula():
    capped, plain = tiny(logit_softcap=0.05), tiny()
    idx = torch.randint(0, 53, (2, 16))
    with torch.no_grad():
        a, b = capped(idx, idx)[0], plain(idx, idx)[0]
    torch.testing.assert_close(a, 0.05 * torch.tanh(b / 0.05), atol=ATOL, rtol=0)
    assert a.abs().max() < 0.05 and b.abs().max() > 0.07  # the cap bends these logits


def test_untied_head_has_its_own_weights():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert tied.lm_head.weight is tied.transformer.wte.weight
    n_tied = tied.get_num_params(non_embedding=False)
    assert untied.get_num_params(non_embedding=False) == n_tied + 53 * 24
    assert untied.get_num_params() == n_tied - 16 * 24  # less wpe; the head counted, wte not
    assert untied.param_breakdown()["embeddings"] == 2 * 53 * 24 + 16 * 24
    untied.lm_head.weight.data.zero_()  # the head alone moves the logits
    with torch.no_grad():
        assert untied(torch.zeros(1, 3, dtype=torch.long))[0].abs().max() == 0
    assert len(configure_optimizers(untied, 0.1, 1e-3, (0.9, 0.95), "cpu").param_groups[0]["params"]) == \
        len(configure_optimizers(tied, 0.1, 1e-3, (0.9, 0.95), "cpu").param_groups[0]["params"]) + 1


@pytest.mark.parametrize("knob", list(KNOBS) + ["gpt2"])
def test_forward_matches_the_hand_written_reference(knob):
    """Every knob alone and all together (qk_norm included) against forward_ref."""
    model = tiny(**KNOBS.get(knob, {}))
    idx = torch.randint(0, 53, (2, 16))
    with torch.no_grad():
        logits, loss = model(idx, idx)
        ref, _ = forward_ref(model, idx)
        last = model(idx)[0]
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(last, ref[:, -1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, F.cross_entropy(ref.view(-1, 53), idx.view(-1)), atol=ATOL, rtol=0)


def test_default_config_is_gpt2():
    gpt2 = dict(pos_emb="learned", norm="layernorm", mlp_act="gelu", qk_norm=False, tie_embeddings=True,
                logit_softcap=0.0, rope_base=10000.0, value_embeds=False, x0_mix=False, zero_init_proj=False,
                bigram_vocab=0)
    knobs = [f.name for f in fields(GPTConfig) if f.name not in GPT2_FIELDS]
    assert sorted(gpt2) == sorted(knobs), f"state GPT-2's value of {sorted(set(knobs) - set(gpt2))} here"
    assert all(getattr(GPTConfig(), k) == v for k, v in gpt2.items())
    with torch.device("meta"):  # shapes only
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, bias=True))
    assert model.get_num_params(non_embedding=False) == 124_439_808
    assert isinstance(model.transformer.wpe, LearnedPositions) and "transformer.wpe.weight" in model.state_dict()


def allowed(field):  # a Literal's options as the error lists them
    return ", ".join(map(repr, get_args(GPTConfig.__dataclass_fields__[field].type)))


@pytest.mark.parametrize("field,value,allowed", [
    ("pos_emb", "not-a-scheme", allowed("pos_emb")), ("norm", "not-a-norm", allowed("norm")),
    ("mlp_act", "not-an-activation", allowed("mlp_act")), ("qk_norm", 1, "True or False"),
    ("tie_embeddings", "yes", "True or False"), ("logit_softcap", -1.0, ">= 0"), ("rope_base", 0.5, "> 1"),
    ("bigram_vocab", -3, "an int >= 0"), ("value_embeds", "yes", "True or False")])
def test_bad_knob_values_name_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=f"GPTConfig.{field} must .*{allowed}"):
        GPT(GPTConfig(n_layer=1, n_embd=8, n_head=2, block_size=4, vocab_size=5, **{field: value}))
    with pytest.raises(ValueError, match="GPTConfig.n_layer must be a positive int"):  # 0 is no "off" for it
        GPT(GPTConfig(n_layer=0, n_embd=8, n_head=2, block_size=4, vocab_size=5))
    with pytest.raises(ValueError, match="bigram_vocab must be 0 .off. or >= 2, got 1"):
        GPT(GPTConfig(n_layer=1, n_embd=8, n_head=2, block_size=4, vocab_size=5, bigram_vocab=1))
    with pytest.raises(ValueError, match="pos_emb='rope' needs an even head size"):
        GPT(GPTConfig(n_layer=1, n_embd=9, n_head=3, block_size=4, vocab_size=5, pos_emb="rope"))


def test_added_parts_start_as_the_model_without_them():
    """value_embeds, x0_mix and bigram_vocab start as the identity: same logits as GPT-2 with the
    same seed; zero_init_proj starts every block as the identity, so the logits are the
    embedding's alone."""
    cfg = dict(block_size=16, vocab_size=53, n_layer=3, n_head=2, n_embd=24, dropout=0.0)
    idx = torch.randint(0, 53, (2, 16))

    torch.manual_seed(0)
    gpt2 = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():
        want = gpt2(idx, idx)[0]
    for kw in (dict(value_embeds=True), dict(x0_mix=True), dict(bigram_vocab=37)):
        model = GPT(GPTConfig(**cfg, **kw)).eval()
        missing, unexpected = model.load_state_dict(gpt2.state_dict(), strict=False)
        assert missing and not unexpected, kw  # GPT-2's weights, the knob's parts as initialized
        with torch.no_grad():
            torch.testing.assert_close(model(idx, idx)[0], want, atol=0, rtol=0)
    model = GPT(GPTConfig(**cfg, zero_init_proj=True))
    assert all(not p.any() for n, p in model.named_parameters() if n.endswith("c_proj.weight"))
    assert not [k for k in model.state_dict() if k.startswith(("value_embeds.", "bigram."))]
    tables = [k for k in GPT(GPTConfig(**cfg, value_embeds=True)).state_dict() if k.startswith("value_embeds.")]
    assert tables == ["value_embeds.0.weight", "value_embeds.2.weight"]  # every other block, the last included
    with torch.device("meta"):  # lookup tables are not counted as the model's size, as wpe is not
        a, b = (GPT(GPTConfig(**cfg, **kw)).get_num_params() for kw in ({}, dict(value_embeds=True, bigram_vocab=99)))
    assert a == b


def test_bigram_rows_hash_the_previous_token_and_carry_across_cache_calls():
    model = tiny(bigram_vocab=37)
    idx = torch.tensor([[5, 9, 9, 2], [1, 1, 0, 52]])
    rows = model.bigram.rows(idx)
    assert rows[:, 0].tolist() == [0, 0]  # no previous token: row 0
    assert rows[0, 1] == (5 * 1_000_003 + 9) % 36 + 1 and rows[1, 3] == (0 * 1_000_003 + 52) % 36 + 1
    cache = KVCache(2, 16)
    first, second = model.bigram.rows(idx[:, :2], cache), model.bigram.rows(idx[:, 2:], cache)
    assert torch.equal(torch.cat([first, second], 1), rows)  # the cache remembers each row's last token


# ------------------------------------------------------------------ every path sees the knobs

@pytest.mark.parametrize("knob", list(KNOBS))
def test_causality(knob):
    model = tiny(**KNOBS[knob])
    idx = torch.randint(0, 53, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % 53
    with torch.no_grad():
        a, b = model(idx, idx)[0], model(changed, changed)[0]
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=0, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


def test_explicit_cpu_attention_matches_sdpa_with_every_knob():
    """The explicit (dropout) CPU path, chunked, sees the knobs as the fused kernel does."""
    model = tiny(dropout=0.1, block_size=256, **KNOBS["all"]).train()
    idx = torch.randint(0, 53, (2, 203))
    for m in model.modules():
        if type(m).__name__ == "Dropout":
            m.p = 0.0  # nothing dropped, but attn.dropout > 0 still takes the explicit path
    explicit, _ = model(idx, idx)
    for block in model.transformer.h:
        block.attn.dropout = 0.0
    fused, _ = model(idx, idx)
    torch.testing.assert_close(explicit, fused, atol=ATOL, rtol=0)


def test_attention_maps_with_rope_and_qk_norm():
    model = tiny(pos_emb="rope", qk_norm=True)
    idx = torch.randint(0, 53, (2, 11))
    maps = plotting.attention_maps(model.train(), idx)
    assert model.training and all(block.attn.attn_record is None for block in model.transformer.h)  # as it was
    _, ref = forward_ref(model.eval(), idx)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 11, 11)
    for att, r in zip(maps, ref):
        torch.testing.assert_close(att, r, atol=ATOL, rtol=0)


def test_crop_block_size_with_rope():
    model = tiny(block_size=16, **KNOBS["all"])
    idx = torch.randint(0, 53, (1, 8))
    with torch.no_grad():
        before = model(idx, idx)[0]
        model.crop_block_size(8)
        torch.testing.assert_close(model(idx, idx)[0], before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="length 9: block_size is 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("knob", [k for k in KNOBS if k != "all"])
def test_save_hf_refuses_modern_knobs(knob, tmp_path):
    (name, value), = KNOBS[knob].items()
    with pytest.raises(ValueError, match=f"GPT-2 has no {name}={value!r}"):
        save_hf(tiny(**KNOBS[knob]), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_checkpoint_with_knobs_round_trips_through_load_model(tmp_path):
    model = tiny(**KNOBS["all"])
    args = dict(n_layer=2, n_head=2, n_embd=24, block_size=16, vocab_size=53, bias=True, dropout=0.0,
                **KNOBS["all"])
    torch.save({"format": runs.CHECKPOINT_FORMAT, "model": model.state_dict(), "model_args": args,
                "iter_num": 7, "best_val_loss": 1.0, "config": {}}, tmp_path / "ckpt.pt")
    loaded, info = loading.load_model("resume", str(tmp_path))
    assert all(getattr(loaded.config, k) == v for k, v in KNOBS["all"].items())
    idx = torch.randint(0, 53, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, idx)[0], model(idx, idx)[0], atol=0, rtol=0)
    # an old checkpoint (no knob keys) is GPT-2
    plain = tiny()
    old = {k: v for k, v in args.items() if k not in KNOBS["all"]}
    torch.save({"format": runs.CHECKPOINT_FORMAT, "model": plain.state_dict(), "model_args": old,
                "iter_num": 7, "best_val_loss": 1.0, "config": {}}, tmp_path / "ckpt.pt")
    loaded, _ = loading.load_model("resume", str(tmp_path))
    assert loaded.config.pos_emb == "learned" and loaded.lm_head.weight is loaded.transformer.wte.weight


# ------------------------------------------------------------------ generation

MODES = dict(greedy=dict(temperature=0.0), sampled=dict(temperature=1.0), top_k=dict(temperature=0.8, top_k=5))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("knob", list(KNOBS))
def test_kv_cache_matches_recomputation_within_block(knob, mode):
    model = tiny(**KNOBS[knob])
    idx = torch.randint(0, 53, (2, 5))
    ours = model.generate(idx, 11, generator=torch.Generator().manual_seed(7), **MODES[mode])
    ref = generate_ref(recompute_window(model), idx, 11, torch.Generator().manual_seed(7), **MODES[mode])
    assert torch.equal(ours, ref), (ours, ref)


@pytest.mark.parametrize("knob", [k for k, kw in KNOBS.items()
                                  if k != "all" and not POSITIONS[kw.get("pos_emb", "learned")].rolls])
def test_learned_positions_past_block_still_recompute(knob):
    model = tiny(**KNOBS[knob])
    idx = torch.randint(0, 53, (2, 4))
    ours = model.generate(idx, 30, generator=torch.Generator().manual_seed(7))
    ref = generate_ref(recompute_window(model), idx, 30, torch.Generator().manual_seed(7))
    assert torch.equal(ours, ref), (ours, ref)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("prompt_len", [3, 21], ids=["short-prompt", "long-prompt"])
def test_rolling_cache_one_layer_equals_window_recomputation(prompt_len, mode):
    """One layer: the rolled cache is exactly recomputation on the last block_size tokens
    (without the bigram embedding, whose first window token still sees its previous token in
    the rolling cache, as in the sliding-window forward checked below)."""
    model = tiny(n_layer=1, **dict(KNOBS["all"], bigram_vocab=0))
    idx = torch.randint(0, 53, (2, prompt_len))
    ours = model.generate(idx, 40, generator=torch.Generator().manual_seed(5), **MODES[mode])
    ref = generate_ref(recompute_window(model), idx, 40, torch.Generator().manual_seed(5), **MODES[mode])
    assert torch.equal(ours, ref), (ours, ref)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("knobs,prompt_len", [(ROPE, 3), (KNOBS["all"], 21)], ids=["rope", "all-long-prompt"])
def test_rolling_cache_equals_sliding_window_forward(knobs, prompt_len, mode):
    """Several layers: the rolled cache is exactly a full forward with sliding-window attention
    (and not recomputation on the last block_size tokens, which differs: checked too)."""
    model = tiny(n_layer=3, **knobs)
    idx = torch.randint(0, 53, (2, prompt_len))
    ours = model.generate(idx, 24, generator=torch.Generator().manual_seed(5), **MODES[mode])
    ref = generate_ref(sliding_window(model), idx, 24, torch.Generator().manual_seed(5), **MODES[mode])
    assert torch.equal(ours, ref), (ours, ref)
    # the logits themselves, step by step through the rolling cache
    seq = ours[:1]
    cache = KVCache(3, 16, rolling=True)
    with torch.no_grad():
        full = forward_ref(model, seq, window=16)[0]
        h = model._hidden(seq[:, :16], cache)
        steps = [model.softcap(model.lm_head(model._hidden(seq[:, t:t + 1], cache)))[:, -1] for t in range(16, seq.size(1))]
        torch.testing.assert_close(model.softcap(model.lm_head(h)), full[:, :16], atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.stack(steps, 1), full[:, 16:], atol=ATOL, rtol=0)


def test_sliding_window_is_not_window_recomputation():
    """With several layers the two semantics differ (deeper layers of old tokens saw older
    context): the rolled cache follows the sliding window. Larger weights than at init, so
    that context matters."""
    model = tiny(n_layer=3, pos_emb="rope")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    seq = torch.randint(0, 53, (1, 30))
    cache = KVCache(3, 16, rolling=True)
    with torch.no_grad():
        model._hidden(seq[:, :16], cache)
        for t in range(16, 30):
            h = model._hidden(seq[:, t:t + 1], cache)
        rolled = model.lm_head(h)[:, -1]
        full = forward_ref(model, seq, window=16)[0][:, -1]
        window = model(seq[:, -16:])[0][:, -1]
    torch.testing.assert_close(rolled, full, atol=1e-4, rtol=1e-4)
    assert (window - full).abs().max() > 3e-4  # ~1e-3 here, 10x the rolled cache's error


def test_rolling_cache_refuses_chunks_and_learned_positions_overflow():
    model = tiny(pos_emb="rope")
    cache = KVCache(2, 16, rolling=True)
    with torch.no_grad():
        model._hidden(torch.zeros(1, 16, dtype=torch.long), cache)
        model._hidden(torch.zeros(1, 1, dtype=torch.long), cache)  # rolls
        with pytest.raises(ValueError, match="block_size is 16"):  # only single steps roll
            model._hidden(torch.zeros(1, 2, dtype=torch.long), cache)
    plain = KVCache(2, 16)
    with torch.no_grad():
        tiny()._hidden(torch.zeros(1, 16, dtype=torch.long), plain)
        with pytest.raises(ValueError, match="block_size is 16"):
            tiny()._hidden(torch.zeros(1, 1, dtype=torch.long), plain)
