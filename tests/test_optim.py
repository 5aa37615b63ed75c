"""
Tests for the Muon optimizer (model.orthogonalize, model.MuonAdamW, train.py --optimizer=muon) on CPU.

The references: an SVD of the same matrix (Newton-Schulz acts on singular values only),
torch.optim.Muon configured alike (where this torch has it), and torch.optim.AdamW for the
AdamW groups. train.py runs as a subprocess with test_train.py's helpers.
"""

import json
import re

import pytest
import torch

from model import GPT, GPTConfig
from lib.optim import NS_COEFFICIENTS, MuonAdamW, configure_optimizers, orthogonalize
from helpers import REPO, TINY, assert_ddp_matches_single_process, assert_exact_resume, assert_one_line_error, read_log, run_train


def ns_on_singular_values(s, steps):
    """The scalar quintic a s + b s^3 + c s^5 applied `steps` times: what Newton-Schulz does to each singular value."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


@pytest.mark.parametrize('shape', [(48, 160), (160, 48), (64, 64)])
def test_orthogonalize_matches_svd_reference(shape):
    """orthogonalize(G) = U f(S / |G|_F) V^T for G = U S V^T, f the iterated quintic: 1e-4 in float32.

    And it is close to the exact U V^T: every singular value that was not tiny lands in [0.6, 1.25]
    (Keller Jordan's coefficients trade exactness for speed; 5 steps give ~0.68..1.2 here)."""
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    expected = u @ torch.diag(ns_on_singular_values(s / g.norm(), 5)) @ vh
    ours = orthogonalize(g.float(), steps=5, dtype=torch.float32)
    assert ours.dtype == torch.float32 and ours.shape == shape
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-4)
    sv = torch.linalg.svdvals(ours.double())  # descending, like s
    lifted = s / g.norm() > 1e-2  # tiny singular values (square random matrices have some) stay small after 5 steps
    assert sv[lifted].min() > 0.6 and sv.max() < 1.25, sv
    # the singular vectors are G's own: U^T O V is diagonal
    inner = u.T @ ours.double() @ vh.T
    torch.testing.assert_close(inner, torch.diag(torch.diagonal(inner)), rtol=0, atol=1e-4)


def two_groups(seed=0):
    """Fresh parameters with gradients: two matrices for Muon, a vector and a matrix for AdamW."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(24, 40), (40, 24), (16,), (8, 12)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]  # 3 steps
    return params, grads


def run_steps(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params]


@pytest.mark.skipif(not hasattr(torch.optim, 'Muon'), reason='torch.optim.Muon needs torch >= 2.9')
def test_muon_and_adamw_groups_match_torch_optimizers():
    """3 steps of MuonAdamW equal torch.optim.Muon (Newton-Schulz in bfloat16 on both sides, as torch
    does; 1e-6) on the matrices and torch.optim.AdamW (1e-6) on the rest, weight decay on both."""
    params, grads = two_groups()
    ours = MuonAdamW([
        dict(kind='muon', params=params[:2], lr=0.05, momentum=0.9, weight_decay=0.1, ns_steps=5),
        dict(kind='adamw', params=params[2:], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1),
    ], ns_dtype=torch.bfloat16)
    got = run_steps(ours, params, grads)

    ref_params, _ = two_groups()
    muon = torch.optim.Muon(ref_params[:2], lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True, ns_steps=5)
    adamw = torch.optim.AdamW(ref_params[2:], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for step_grads in grads:
        for p, g in zip(ref_params, step_grads):
            p.grad = g.clone()
        muon.step()
        adamw.step()
    for a, b in zip(got, ref_params):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)


def test_muon_update_matches_plain_formula():
    """Two steps by hand: Nesterov momentum (1-mu) g + mu buf with buf = mu buf + (1-mu) g, orthogonalize, scale sqrt(max(1, rows/cols)), in float32."""
    params, grads = two_groups()
    start = [p.detach().clone() for p in params]
    opt = MuonAdamW([dict(kind='muon', params=params[:2], lr=0.05, momentum=0.9, weight_decay=0.0, ns_steps=5)])
    got = run_steps(opt, params[:2], [g[:2] for g in grads[:2]])
    for i in range(2):
        scale = 0.05 * max(1, start[i].size(0) / start[i].size(1)) ** 0.5  # 0.05 * sqrt(40/24) for the tall one
        buf = 0.1 * grads[0][i]  # step 1: buf = 0.9 * 0 + 0.1 * g
        p = start[i] - scale * orthogonalize(0.1 * grads[0][i] + 0.9 * buf)
        buf = 0.9 * buf + 0.1 * grads[1][i]
        p = p - scale * orthogonalize(0.1 * grads[1][i] + 0.9 * buf)
        torch.testing.assert_close(got[i], p, rtol=0, atol=1e-6)


def test_configure_optimizers_puts_block_matrices_in_muon():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon', muon_lr=0.03)
    muon_group = [g for g in opt.param_groups if g['kind'] == 'muon']
    assert len(muon_group) == 1 and muon_group[0]['lr_ratio'] == pytest.approx(30.0)
    in_muon = {id(p) for p in muon_group[0]['params']}
    for name, p in model.named_parameters():
        inside = name.startswith('transformer.h.') and p.dim() == 2
        assert (id(p) in in_muon) == inside, name
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="'adam'"):
        configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', 'adam')


def test_newton_schulz_runs_in_bfloat16_only_when_training_does():
    """The training's dtype picks Newton-Schulz's (bfloat16 is native there, or was asked for),
    and a bfloat16 orthogonalization stays within bfloat16's rounding of the float32 one."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    for dtype, ns_dtype in [(torch.float32, torch.float32), (torch.float16, torch.float32),
                            (torch.bfloat16, torch.bfloat16)]:
        opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon', dtype=dtype)
        assert opt.ns_dtype == ns_dtype, dtype
    assert configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon').ns_dtype == torch.float32
    torch.manual_seed(0)
    g = torch.randn(192, 576)
    full, half = orthogonalize(g, 5, torch.float32), orthogonalize(g, 5, torch.bfloat16)
    assert half.dtype == torch.float32  # returned in the gradient's dtype
    assert ((half - full).norm() / full.norm()).item() < 0.02  # bfloat16 keeps 8 bits: ~0.4% per rounding


# -----------------------------------------------------------------------------
# train.py with --optimizer=muon

MUON = [*TINY, '--optimizer=muon', '--muon_lr=0.05']


def test_train_muon_loss_decreases_and_bad_knobs(tmp_path, data):
    out = tmp_path / 'out'
    proc = run_train(*MUON, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=30', '--eval_interval=30',
                     '--eval_iters=8')
    assert proc.returncode == 0, proc.stderr
    assert 'Muon on 8 block matrices' in proc.stdout
    evals = [loss for it, kind, split, loss in read_log(out, 'eval') if split == 'val']
    assert evals[-1] < evals[0] - 1.0, evals
    assert_one_line_error(run_train(*TINY, f'--data_dir={data}', '--optimizer=sgd'), "optimizer must be", "'sgd'")
    assert_one_line_error(run_train(*MUON, f'--data_dir={data}', '--muon_momentum=1.5'), 'muon_momentum', '1.5')
    assert_one_line_error(run_train(*MUON, f'--data_dir={data}', '--muon_lr=-1'), 'muon_lr must be > 0')
    assert_one_line_error(run_train(*MUON, f'--data_dir={data}', '--muon_ns_steps=0'), 'muon_ns_steps')
    assert_one_line_error(run_train(*MUON, f'--data_dir={data}', '--muon_momentum=fast'), "'muon_momentum'",
                          'expected float')
    assert_one_line_error(run_train(*MUON, f'--data_dir={data}', '--lora_rank=4', '--init_from=gpt2'),
                          'lora_rank > 0', '--optimizer=adamw')
    # a checkpoint trained with Muon does not resume with AdamW's state layout (a resume takes the
    # run's own optimizer unless a flag asks for another one)
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=31', '--init_from=resume',
                     '--optimizer=adamw')
    assert_one_line_error(proc, "optimizer='muon'", '--optimizer=muon')


@pytest.mark.slow
def test_muon_exact_resume(tmp_path, data):
    """8 iterations straight give the same losses as 4, stop, resume for 4 more (momentum and Adam state saved)."""
    args = [*MUON, f'--data_dir={data}', '--dropout=0.1', '--gradient_accumulation_steps=2', '--eval_interval=4']
    assert_exact_resume(args, tmp_path, iters=8)


@pytest.mark.slow
def test_muon_ddp_matches_single_process(tmp_path, data):
    """torchrun with 2 processes and Muon gives the losses of 1 process to 1e-5 relative: each rank
    orthogonalizes the same all-reduced gradient, so only the order of floating-point sums differs."""
    assert_ddp_matches_single_process(tmp_path, *MUON, f'--data_dir={data}')


def test_speedrun_config_decreases_loss(tmp_path, data):
    """config/speedrun_shakespeare_char_cpu.py (Muon and the modern knobs) trains: a few steps on tiny data."""
    out = tmp_path / 'out'
    proc = run_train(REPO / 'config' / 'speedrun_shakespeare_char_cpu.py', f'--data_dir={data}', f'--out_dir={out}',
                     '--max_iters=20', '--eval_interval=20', '--eval_iters=4', '--batch_size=8', '--block_size=16',
                     '--warmup_iters=2', '--lr_decay_iters=20')
    assert proc.returncode == 0, proc.stderr
    assert 'Muon on' in proc.stdout and "'pos_emb': 'rope'" in proc.stdout
    evals = [(it, loss) for it, kind, split, loss in read_log(out, 'eval') if split == 'val']
    assert [it for it, _ in evals] == [20]  # eval_at_start=False: one evaluation, at the end
    train = [loss for it, kind, split, loss in read_log(out, 'train')]
    assert evals[-1][1] < train[0] - 0.5, (train[0], evals)


def test_configure_optimizers_decays_only_matrices(capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=53, n_layer=2, n_head=2, n_embd=24, bias=True))
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.get_num_params(non_embedding=False)
    out = capsys.readouterr().out
    assert re.search(r"\d+ decayed tensors \([\d,]+ parameters\)", out) and "fused kernel" in out


def test_role_learning_rates_split_adamw_groups():
    """embedding_lr, head_lr and scalar_lr: each AdamW parameter gets its role's peak lr (lr_ratio
    times the schedule's learning_rate); without them the two groups of GPT-2 stay as they were."""
    from lib.optim import role
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, tie_embeddings=False,
                          value_embeds=True, x0_mix=True, bigram_vocab=11))
    roles = {name: role(name, p) for name, p in model.named_parameters()}
    assert roles['transformer.wte.weight'] == roles['value_embeds.1.weight'] == roles['bigram.weight'] == 'embedding'
    assert roles['lm_head.weight'] == 'head' and roles['transformer.h.0.lambdas'] == 'scalar'
    assert roles['transformer.h.0.ln_1.weight'] == 'scalar' and roles['transformer.h.0.mlp.c_fc.weight'] == 'matrix'
    lrs = dict(embedding=0.3, head=0.002, scalar=0.05)
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon', role_lrs=lrs)
    group_of = {id(p): g for g in opt.param_groups for p in g['params']}
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        want = 0.02 if roles[name] == 'matrix' else lrs[roles[name]]  # Muon's default lr on the block matrices
        assert g['lr'] == pytest.approx(want) and g['lr_ratio'] == pytest.approx(want / 1e-3), name
        assert g['weight_decay'] == (0.1 if p.dim() >= 2 and g['kind'] == 'adamw' else 0.0), name
    plain = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', role_lrs=dict(embedding=0, head=0, scalar=0))
    assert [g['weight_decay'] for g in plain.param_groups] == [0.1, 0.0]  # 0: the learning_rate, one group each


def test_batch_and_sequence_warmups_and_muon_momentum_warmup(tmp_path, data):
    """batch_warmup and seq_warmup train on 2/8 .. 7/8 of the shape at first (the log's token
    counts say so), then all of it; muon_momentum_warmup ends at muon_momentum; both resume exactly."""
    args = [*MUON, f'--data_dir={data}', '--batch_warmup=4', '--seq_warmup=8', '--muon_momentum_warmup=6',
            '--log_interval=1', '--eval_interval=5', '--batch_size=8']
    straight, _ = assert_exact_resume(args, tmp_path, iters=10)
    rows = [json.loads(line) for line in open(straight / 'log.jsonl')]
    tokens = {r['iter']: r['tokens'] for r in rows if r['kind'] == 'train'}
    # iteration i trains on B(i) x T(i) tokens: B = 8 * (2 + 6i // 4) // 8 while i < 4, T = 16 * (2 + 6i // 8) // 8 while i < 8
    shapes = [(8 * (2 + 6 * i // 4) // 8 if i < 4 else 8, 16 * (2 + 6 * i // 8) // 8 if i < 8 else 16) for i in range(10)]
    assert [tokens[i] for i in range(10)] == [sum(b * t for b, t in shapes[:i + 1]) for i in range(10)]
    ckpt = torch.load(straight / 'ckpt.pt', map_location='cpu', weights_only=False)
    muon = [g for g in ckpt['optimizer']['param_groups'] if g.get('kind') == 'muon']
    assert muon and muon[0]['momentum'] == pytest.approx(0.95)
    for knob in ('--batch_warmup=-1', '--seq_warmup=1.5', '--muon_momentum_warmup=-2', '--embedding_lr=-1'):
        assert_one_line_error(run_train(*MUON, f'--data_dir={data}', knob), knob[2:].split('=')[0])
