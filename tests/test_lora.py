"""
Tests for LoRA fine-tuning: lora.py's LoRALinear / apply_lora / merge_lora, train.py's lora_*
knobs and adapter-only checkpoints, and loading them back (loading.load_model, export.save_hf).
Tiny models on CPU; train.py runs as a subprocess like in test_train.py.
"""

import copy

import pytest
import torch

from lib import loading, runs
from lib.export import save_hf
from lib.lora import LoRALinear, apply_lora, merge_lora, merged_state_dict
from model import GPT, GPTConfig
from lib.optim import configure_optimizers
from helpers import TINY, assert_exact_resume, assert_one_line_error, assert_same_losses, make_dataset, read_log, run_train, torchrun

ALL = 'c_attn,c_proj,c_fc,mlp.c_proj'


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=16, dropout=0.0)
    return GPT(GPTConfig(**{**args, **kw}))


def randomize_adapters(model, seed=1):
    """Give every B a non-zero value, as training would (B = 0 makes the adapters invisible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))


def test_targets_name_the_intended_modules():
    model = tiny_gpt()
    wrapped = apply_lora(model, 4, 8.0, 0.0, 'c_proj,mlp.c_proj')
    # 'c_proj' is the attention output projection, 'mlp.c_proj' the MLP's
    assert wrapped == ['transformer.h.0.attn.c_proj', 'transformer.h.0.mlp.c_proj',
                       'transformer.h.1.attn.c_proj', 'transformer.h.1.mlp.c_proj']
    assert isinstance(model.transformer.h[0].attn.c_proj, LoRALinear)
    assert not isinstance(model.transformer.h[0].attn.c_attn, LoRALinear)
    assert not isinstance(model.transformer.h[0].mlp.c_fc, LoRALinear)
    with pytest.raises(ValueError, match='c_fcc'):
        apply_lora(tiny_gpt(), 4, 8.0, 0.0, 'c_attn,c_fcc')


@pytest.mark.parametrize('targets', ['c_attn', ALL])
def test_adapted_model_equals_base_at_init(targets):
    """B = 0: the adapted model's logits are exactly the base's, in train mode with LoRA dropout too."""
    base = tiny_gpt()
    model = copy.deepcopy(base)
    apply_lora(model, 4, 16.0, 0.1, targets)
    idx = torch.randint(0, 16, (3, 16))
    base.eval(), model.eval()
    assert torch.equal(base(idx, idx)[0], model(idx, idx)[0])
    base.train(), model.train()
    assert torch.equal(base(idx, idx)[0], model(idx, idx)[0])


def test_gradients_reach_only_the_adapters():
    model = tiny_gpt()
    apply_lora(model, 4, 16.0, 0.0, ALL)
    randomize_adapters(model)  # with B = 0 the gradient of A is exactly zero
    idx = torch.randint(0, 16, (2, 16))
    model(idx, idx)[1].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(('.lora_A', '.lora_B'))}
    assert len(trainable) == 2 * 4 * 2  # A and B, 4 targets, 2 layers
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name  # frozen: no gradient is even allocated
    # the optimizer holds state for the adapters only
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu')
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == \
        sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_merge_gives_the_same_logits():
    model = tiny_gpt()
    apply_lora(model, 4, 16.0, 0.1, ALL)
    randomize_adapters(model)
    model.eval()
    idx = torch.randint(0, 16, (3, 16))
    adapted = model(idx, idx)[0]
    sd = merged_state_dict(model)
    assert not any('lora_' in k for k in sd)
    plain = tiny_gpt(seed=5)
    plain.load_state_dict(sd)
    plain.eval()
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(idx, idx)[0], adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain(idx, idx)[0], adapted, rtol=1e-5, atol=1e-5)
    # the adapters did change the function: the test above is not trivially true
    assert (adapted - tiny_gpt().eval()(idx, idx)[0]).abs().max() > 1e-3


def test_lora_cached_generation_equals_recomputation():
    """KV-cached greedy decoding of a LoRA model equals full recomputation."""
    model = tiny_gpt(vocab_size=64, block_size=32)
    apply_lora(model, 4, 16.0, 0.0, ALL)
    randomize_adapters(model)
    model.eval()
    idx = torch.randint(0, 64, (1, 4))
    out = model.generate(idx, 12, temperature=0)
    seq = idx
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_save_hf_writes_the_merged_model_transformers_loads(tmp_path):
    transformers = pytest.importorskip('transformers')
    model = tiny_gpt(vocab_size=64, block_size=32, bias=True)
    apply_lora(model, 4, 16.0, 0.0, ALL)
    randomize_adapters(model)
    model.eval()
    save_hf(merge_lora(copy.deepcopy(model)), tmp_path / 'hf')  # the adapters folded in
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / 'hf').eval()
    idx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx, idx)[0], rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# train.py with lora_rank > 0

LORA = ['--lora_rank=4', '--lora_alpha=8', f'--lora_targets={ALL}', '--learning_rate=3e-2']


@pytest.fixture
def base_folder(tmp_path):
    """A local Hugging Face folder holding a small GPT-2-shaped model (the base to adapt)."""
    folder = tmp_path / 'base'
    save_hf(GPT(GPTConfig(block_size=32, vocab_size=16, n_layer=2, n_head=2, n_embd=32)), folder)
    return folder


def test_train_lora_from_a_folder_saves_adapters_and_loads_back(tmp_path, base_folder):
    data = make_dataset(tmp_path / 'data')
    out = tmp_path / 'out'
    proc = run_train(*TINY, *LORA, f'--data_dir={data}', f'--out_dir={out}', f'--init_from={base_folder}',
                     '--max_iters=12', '--eval_interval=6', '--lora_dropout=0.1')
    assert proc.returncode == 0, proc.stderr
    assert 'LoRA rank 4' in proc.stdout and 'trainable parameters' in proc.stdout
    evals = [loss for it, kind, split, loss in read_log(out, 'eval') if split == 'val']
    assert evals[-1] < evals[0] - 0.1, evals  # the adapters learn
    ckpt = runs.load_checkpoint(out / 'ckpt.pt')
    assert ckpt['lora']['base'] == str(base_folder.resolve()) and ckpt['lora']['rank'] == 4
    assert ckpt['model'] and all(k.endswith(('.lora_A', '.lora_B')) for k in ckpt['model'])
    # only the adapters have optimizer state
    n_state = sum(s['exp_avg'].numel() for s in ckpt['optimizer']['state'].values())
    assert n_state == sum(v.numel() for v in ckpt['model'].values())
    # sample.py / evaluate.py path: base + adapters, merged; same val loss as training reported
    model, info = loading.load_model('resume', str(out))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    unmerged = loading.load_lora_model(ckpt, out / 'ckpt.pt', merge=False).eval()
    idx = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, idx)[0], unmerged(idx, idx)[0], rtol=1e-5, atol=1e-5)
        base = GPT.from_pretrained(str(base_folder)).eval()
        assert (model(idx, idx)[0] - base(idx, idx)[0]).abs().max() > 1e-2  # the adapters are in there
    # the base weights were not touched: the frozen part of the unmerged model is the base's
    base_sd = base.state_dict()
    for k, v in unmerged.state_dict().items():
        if 'lora_' not in k and k != 'transformer.wpe.weight':
            assert torch.equal(v, base_sd[k]), k


def test_lora_needs_a_trained_base(tmp_path):
    data = make_dataset(tmp_path / 'data')
    proc = run_train(*TINY, *LORA, f'--data_dir={data}', f'--out_dir={tmp_path / "o"}')
    assert_one_line_error(proc, 'lora_rank > 0', "init_from='scratch'")
    proc = run_train(*TINY, '--lora_rank=2', '--lora_targets=c_att', f'--data_dir={data}',
                     f'--out_dir={tmp_path / "o"}', f'--init_from={tmp_path}')
    assert_one_line_error(proc, "'c_att'", 'mlp.c_proj')
    assert not (tmp_path / 'o').exists()  # checked before anything is written


@pytest.mark.slow
def test_lora_on_a_run_checkpoint_exact_resume_and_ddp(tmp_path):
    """A run's ckpt.pt as the base; 2N iterations straight equal N + resume N (LoRA dropout on);
    2 DDP processes equal 1 process."""
    data = make_dataset(tmp_path / 'data')
    pre = tmp_path / 'pre'
    assert run_train(*TINY, f'--data_dir={data}', f'--out_dir={pre}', '--max_iters=4',
                     '--eval_interval=4').returncode == 0
    args = [*TINY, *LORA, f'--data_dir={data}', f'--init_from={pre / "ckpt.pt"}', '--lora_dropout=0.1',
            '--dropout=0.1', '--gradient_accumulation_steps=2', '--eval_interval=3']
    straight, _ = assert_exact_resume(args, tmp_path, iters=6)
    assert runs.load_checkpoint(straight / 'ckpt.pt')['lora']['base'] == str((pre / 'ckpt.pt').resolve())
    ddp = torchrun('--standalone', '--nproc_per_node=2', 'train.py', *args, f'--out_dir={tmp_path / "ddp"}',
                   '--max_iters=6')
    assert ddp.returncode == 0, ddp.stderr
    assert_same_losses(straight, tmp_path / 'ddp', rel=1e-5)


def test_lora_merge_and_int8_with_the_modern_knobs():
    """The adapters and int8 weights wrap the same Linear layers under rope, rmsnorm, relu2, qk_norm,
    an untied head and a logit soft-cap: B = 0 is exact, merging keeps the logits, int8 stays close."""
    from lib.quantize import quantize_int8
    model = tiny_gpt(vocab_size=64, block_size=32, pos_emb='rope', norm='rmsnorm', mlp_act='relu2', qk_norm=True,
                     tie_embeddings=False, logit_softcap=15.0).eval()
    idx = torch.randint(0, 64, (2, 20))
    adapted = copy.deepcopy(model)
    apply_lora(adapted, 4, 8.0, 0.0, ALL)
    with torch.no_grad():
        ref = model(idx, idx)[0]
        assert torch.equal(adapted(idx, idx)[0], ref)
        randomize_adapters(adapted)
        before = adapted(idx, idx)[0]
        torch.testing.assert_close(merge_lora(adapted)(idx, idx)[0], before, rtol=1e-5, atol=1e-5)
        quantize_int8(model)
        assert (model(idx, idx)[0] - ref).abs().max() <= 0.05 * ref.std()
