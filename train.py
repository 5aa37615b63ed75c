"""
Train a GPT. One process on a CPU or one GPU, or many processes under torchrun (DDP).

CPU quick start (prepare the data first: python prepare.py shakespeare_char):
$ python train.py config/train_shakespeare_char_cpu.py

One GPU:
$ python train.py config/train_shakespeare_char.py

One node with 8 GPUs (gradient_accumulation_steps is global: it is split over the 8 processes):
$ torchrun --standalone --nproc_per_node=8 train.py config/gpt2.py

Two nodes with 8 GPUs each: the same command on both nodes, with the first node's address
(ranks are assigned at the rendezvous; without InfiniBand, prepend NCCL_IB_DISABLE=1):
$ torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29500 --rdzv_id=gpt2 train.py config/gpt2.py

Config files and flags override the defaults below, in order: train.py config/a.py --batch_size=32.
Resume: --init_from=resume (same out_dir). Ctrl-C or SIGTERM: the step finishes, ckpt.pt is saved, exit 0.
"""

import contextlib
import io
import json
import math
import os
import random
import signal
import sys
import time

from lib import cli  # first: a missing package is one line naming the fix, not a traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from lib import hardware, plotting, resume, runs
from lib.lora import apply_lora, check_lora_knobs, lora_state_dict
from lib.optim import configure_optimizers, crop_optimizer_state
from lib.tokenfiles import DATA_DIR, PrepareError, check_dataset, small_data_notice
from lib.tokenizers import token_bytes_of, tokenizer_record
from model import GPT, PRETRAINED

# -----------------------------------------------------------------------------
# defaults: a GPT-2 (124M) on OpenWebText; config/*.py and --key=value change them
# I/O
out_dir = 'out'  # checkpoint, config.json and log.jsonl go here
eval_interval = 2000  # evaluate (and maybe checkpoint) every this many iterations
log_interval = 1  # print and log the training loss every this many iterations
eval_iters = 200  # batches per split for each evaluation
eval_only = False  # evaluate once at the start, then exit
eval_at_start = True  # evaluate before the first step too; False saves one evaluation (a speedrun's ~4%)
always_save_checkpoint = True  # save after every evaluation, not only when val loss improves
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt), 'gpt2*', a local Hugging Face folder, or another run's ckpt.pt
auto_resume = True  # out_dir holds a checkpoint: resume it (the run's own knobs, flags on top) whatever init_from says
overwrite = False  # let a fresh start replace the run already in out_dir (its checkpoints are deleted)
checkpoint_interval_s = 0.0  # also save the training state every this many seconds; 0 = only at evaluations
keep_last = 1  # checkpoints kept in out_dir: the newest is ckpt.pt, older ones ckpt-ITER.pt
hellaswag_interval = 0  # HellaSwag acc_norm every this many iterations, logged and plotted (GPT-2 BPE data); 0: off
hellaswag_input = ''  # a HellaSwag .jsonl file; '' downloads hellaswag_val.jsonl into data/hellaswag/
# wandb logging
wandb_log = False  # log to Weights & Biases (needs `pip install wandb`)
wandb_project = 'owt'  # wandb project name
wandb_run_name = 'gpt2'  # wandb run name
# data
dataset = 'openwebtext'  # reads data/<dataset>/{train,val}.bin, written by `python prepare.py <dataset>`
data_dir = ''  # a folder with train.bin/val.bin/meta.json instead of data/<dataset>
gradient_accumulation_steps = 40  # micro-batches per optimizer step over ALL processes (5 per GPU on 8 GPUs)
batch_size = 12  # sequences per micro-batch (per process)
block_size = 1024  # tokens per sequence
batch_warmup = 0  # steps over which the batch grows from 1/4 of batch_size to all of it (in eighths); 0 = off
seq_warmup = 0  # steps over which sequences grow from 1/4 of block_size to all of it (in eighths); 0 = off
# model: its shape here; every other GPTConfig field is a knob too, with GPT-2's default
# (--pos_emb=rope, --qk_norm=True, ...: see model.py; `python train.py --help` lists them)
n_layer = 12  # transformer blocks
n_head = 12  # attention heads per block
n_embd = 768  # embedding width
dropout = 0.0  # 0 for pretraining; try 0.1+ for finetuning
bias = False  # biases in Linear and LayerNorm layers
globals().update(cli.model_knobs(globals()))  # the other GPTConfig fields (vocab_size comes from the data)
# LoRA: train low-rank adapters on a frozen pretrained model (needs init_from gpt2*, a folder or a ckpt.pt)
lora_rank = 0  # adapter rank r; 0 = off (full training)
lora_alpha = 16.0  # adapters are scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = 'c_attn,c_proj,c_fc,mlp.c_proj'  # c_attn, c_proj (attention output), c_fc, mlp.c_proj (MLP output)
# optimizer
learning_rate = 6e-4  # peak learning rate
max_iters = 600000  # optimizer steps to train for
weight_decay = 1e-1  # AdamW weight decay on matrices (not on biases and norms)
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 1.0  # clip the global gradient norm to this; 0.0 disables
optimizer = 'adamw'  # 'adamw', or 'muon': Muon on the blocks' matrices, AdamW (above) on the rest
muon_lr = 0.02  # Muon's peak learning rate; the schedule below scales it like learning_rate
muon_momentum = 0.95  # Muon's Nesterov momentum
muon_weight_decay = 0.0  # Muon's decoupled weight decay on the blocks' matrices
muon_ns_steps = 5  # Newton-Schulz iterations that orthogonalize each Muon update
muon_momentum_warmup = 0  # steps over which Muon's momentum rises from 0.85 to muon_momentum; 0 = off
embedding_lr = 0.0  # AdamW's peak lr for the token, position, value and bigram embeddings; 0 = learning_rate
head_lr = 0.0  # AdamW's peak lr for an untied output head (tie_embeddings=False); 0 = learning_rate
scalar_lr = 0.0  # AdamW's peak lr for gains, biases and x0_mix's scalars; 0 = learning_rate
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True  # False keeps learning_rate constant
warmup_iters = 2000  # warmup steps
lr_decay_iters = 600000  # step where the cosine reaches min_lr; ~max_iters per Chinchilla
min_lr = 6e-5  # floor of the schedule; ~learning_rate/10 per Chinchilla
# DDP
backend = 'auto'  # 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'
# system
device = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto', 'float32', 'bfloat16' or 'float16' (float16 adds a GradScaler)
compile = None  # torch.compile the model; None: only on CUDA; True/False to force
seed = 1337  # seeds model init, batch sampling and dropout

# what each knob may be, checked before anything is built or written (GPTConfig checks the model's)
RULES = dict(
    eval_interval='>= 1', log_interval='>= 1', eval_iters='>= 1', gradient_accumulation_steps='>= 1',
    batch_size='>= 1', max_iters='>= 0', warmup_iters='>= 0', lr_decay_iters='>= 0', seed='>= 0',
    hellaswag_interval='>= 0', checkpoint_interval_s='>= 0', keep_last='>= 1', learning_rate='> 0',
    min_lr='>= 0', weight_decay='>= 0', grad_clip='>= 0', beta1='[0, 1)', beta2='[0, 1)',
    optimizer=('adamw', 'muon'), muon_lr='> 0', muon_momentum='[0, 1)', muon_weight_decay='>= 0',
    muon_ns_steps='1..20', muon_momentum_warmup='>= 0', embedding_lr='>= 0', head_lr='>= 0', scalar_lr='>= 0',
    batch_warmup='>= 0', seq_warmup='>= 0', lora_rank='>= 0', lora_alpha='> 0', lora_dropout='[0, 1)',
    backend=('auto', 'nccl', 'gloo'), compile=(None, True, False),
)
# -----------------------------------------------------------------------------
# config overrides: config files, then --key=value flags (cli.load_config checks every key)
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and (v is None or isinstance(v, (bool, int, float, str)))]
defaults = {k: globals()[k] for k in config_keys}
overrides = cli.load_config(defaults, sys.argv[1:])
globals().update(overrides)
# A resume continues a run as it was configured: the knobs its checkpoint records, then config
# files and flags. auto_resume resumes whenever out_dir holds a checkpoint (resume.find_resume).
ckpt_path = os.path.join(out_dir, 'ckpt.pt')  # where this run saves; a resume may read an older ckpt-ITER.pt
checkpoint, resume_path, recorded = resume.find_resume(out_dir, init_from, auto_resume and not overwrite, overrides,
                                                     config_keys)
resuming = checkpoint is not None
globals().update({**recorded, **overrides})
config = {k: globals()[k] for k in config_keys}  # the resolved knobs: printed, saved, logged
cli.check_knobs(config, RULES)
cli.model_config(config)  # every GPTConfig field checked: n_embd divisible by n_head, pos_emb, norm, ...
if hellaswag_input and not hellaswag_interval:
    cli.die(f"hellaswag_input={hellaswag_input!r} is set but hellaswag_interval is 0 (off): "
            f"set --hellaswag_interval (e.g. 250) or drop --hellaswag_input")
run_ckpt = os.path.basename(init_from) == 'ckpt.pt' and os.path.isfile(init_from)  # another run's weights
if not (init_from in ('scratch', 'resume') or init_from.startswith('gpt2') or os.path.isdir(init_from) or run_ckpt):
    cli.die(f"init_from={init_from!r} not understood: use scratch, resume, gpt2, gpt2-medium, "
            f"gpt2-large, gpt2-xl, the path of a local Hugging Face model folder or of a run's ckpt.pt")
try:
    check_lora_knobs(lora_rank, lora_targets, init_from, optimizer)
except ValueError as e:
    cli.die(str(e))
if not out_dir.strip():  # '' would scatter ckpt.pt, config.json and log.jsonl into the working directory
    cli.die("out_dir is empty; name the run's folder, e.g. --out_dir=out-mine")
if not resuming and not overwrite and resume.holds_a_run(out_dir):  # never replace a run silently
    cli.die(f"{out_dir} already holds a run ({ckpt_path}): resume it (--auto_resume=True or --init_from=resume), "
            f"choose another --out_dir, or replace it with --overwrite=True")
if wandb_log:  # optional: checked now, not after the model is built (under torchrun, ranks would hang)
    wandb = cli.optional_import('wandb', "wandb_log=True needs wandb: pip install wandb (or set --wandb_log=False)")

# -----------------------------------------------------------------------------
# device, dtype and DDP: chosen once, printed once with the reason
ranks = hardware.ddp_ranks()  # None unless launched by torchrun
ddp = ranks is not None
rank, local_rank, world_size = ranks if ddp else (0, 0, 1)
master_process = rank == 0  # only rank 0 prints, logs and writes files
dev = hardware.setup_device(device, dtype, local_rank=local_rank if ddp else None, verbose=master_process, width=n_embd)
if dev.device_type == 'cuda' and ':' in dev.device:
    torch.cuda.set_device(dev.device)  # so that nccl and new tensors use this process's GPU
if ddp:
    hardware.ddp_join(backend, dev.device_type)  # and leave it on every exit, errors included
cli.quiet_interrupt("interrupted before training started; nothing was written")  # the loop saves on Ctrl-C

# one run per out_dir: a folder in use stops this run now (the lock is taken before the first write)
run_lock = runs.RunLock(out_dir)
hardware.on_master(run_lock.check, ddp, dev.device)

if gradient_accumulation_steps % world_size != 0:
    cli.die(f"gradient_accumulation_steps={gradient_accumulation_steps} is the global count and must "
            f"divide evenly over {world_size} processes; use a multiple of {world_size}")
accum_steps = gradient_accumulation_steps // world_size  # micro-steps per process per iteration
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size  # once the warmups are over


def ramp(full, it, steps):
    """full, or during the first `steps` iterations 2/8, 3/8, ... 7/8 of it (few shapes: few recompiles)."""
    return full if it >= steps else max(1, full * (2 + 6 * it // steps) // 8)


def batch_shape(it):
    """(sequences per micro-batch, tokens per sequence) at iteration it (batch_warmup, seq_warmup)."""
    return ramp(batch_size, it, batch_warmup), ramp(block_size, it, seq_warmup)


warmup_tokens = [0]  # tokens of iterations [0, i) while a warmup lasts
for _it in range(max(batch_warmup, seq_warmup)):
    warmup_tokens.append(warmup_tokens[-1] + gradient_accumulation_steps * math.prod(batch_shape(_it)))


def tokens_through(it):
    """Tokens trained on in iterations [0, it)."""
    ramped = min(it, len(warmup_tokens) - 1)
    return warmup_tokens[ramped] + (it - ramped) * tokens_per_iter
use_compile = (dev.device_type == 'cuda') if compile is None else compile
if master_process:
    print(cli.config_summary(config, defaults, os.path.join(out_dir, 'config.json')))
    print(f"{world_size} process(es), {accum_steps} micro-steps each; tokens per iteration: {tokens_per_iter:,}")

# -----------------------------------------------------------------------------
# data: uint16 token files read through np.memmap
dataset_dir = data_dir or os.path.join(DATA_DIR, dataset)  # data/ beside the scripts
split_paths = {split: os.path.join(dataset_dir, f'{split}.bin') for split in ('train', 'val')}
try:  # sizes, metadata and token ids checked now; files over 256 MiB are checked batch by batch
    split_sizes, meta, check_per_batch = check_dataset(dataset_dir, split_paths, block_size, dataset)
except PrepareError as e:
    cli.die(str(e))
meta_vocab_size = meta.get('vocab_size')
# bits per byte, a loss every tokenizer can be compared on, need the bytes each token stands for
token_bytes, no_bpb = token_bytes_of(meta, dataset_dir)
tokenizer_info = tokenizer_record(meta, dataset_dir)  # what checkpoints keep of the tokenizer

def get_batch(split, offsets, T=block_size):
    """Inputs and targets (B, T) for the sequences starting at offsets (B,)."""
    # A fresh memmap per batch keeps the process's memory flat on huge files.
    data = np.memmap(split_paths[split], dtype=np.uint16, mode='r')
    tokens = data[offsets[:, None] + np.arange(T + 1)]  # (B, T+1)
    if split in check_per_batch and tokens.max() >= meta_vocab_size:
        raise cli.ConfigError(f"{split_paths[split]} holds token id {int(tokens.max())} >= the vocab_size "
                              f"{meta_vocab_size} of {dataset_dir}/meta.json: the file is corrupt or from "
                              f"another tokenizer; prepare the dataset again", this_rank_only=True)
    x = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1], dtype=np.int64))
    y = torch.from_numpy(np.ascontiguousarray(tokens[:, 1:], dtype=np.int64))
    if dev.device_type == 'cuda':
        # pinned memory lets the copy run asynchronously while the GPU is busy
        return x.pin_memory().to(dev.device, non_blocking=True), y.pin_memory().to(dev.device, non_blocking=True)
    return x.to(dev.device), y.to(dev.device)


def iteration_plan(it):
    """Sequence offsets (G, B) and dropout seeds (G,) for all G global micro-steps of iteration it.

    They come from a generator seeded by (seed, it) alone, so every process computes the same
    plan and takes its own rows: the batches do not depend on the number of processes, and a
    resumed run draws exactly the batches the uninterrupted run would have drawn.
    """
    rng = np.random.default_rng([seed, 0, it])
    offsets = rng.integers(0, split_sizes['train'] - block_size, size=(gradient_accumulation_steps, batch_size))
    dropout_seeds = rng.integers(0, 2**62, size=gradient_accumulation_steps)
    first = rank * accum_steps
    B = batch_shape(it)[0]  # a batch warmup takes the first B rows: the same draws either way
    return offsets[first:first + accum_steps, :B], dropout_seeds[first:first + accum_steps]


# A fixed evaluation set per split, so losses at different iterations are comparable.
eval_offsets = {split: np.random.default_rng([seed, 1, i]).integers(
                    0, split_sizes[split] - block_size, size=(eval_iters, batch_size))
                for i, split in enumerate(('train', 'val'))}

# -----------------------------------------------------------------------------
# model: from scratch, from a checkpoint (resume, or another run's weights), or pretrained GPT-2
iter_num = 0  # optimizer steps done so far
best_val_loss = float('inf')  # lowest val loss seen by an evaluation
best_val_bpb = None  # val bits per byte at that evaluation
torch.manual_seed(seed)  # the same initial weights on every rank
if resuming:
    best_val_loss = resume.check_resumable(checkpoint, resume_path)
    model = resume.resume_model(checkpoint, resume_path, config, overrides, meta, dataset_dir, dropout, lora_dropout,
                              notice=print if master_process else None)
    iter_num, best_val_bpb = checkpoint['iter_num'], checkpoint.get('best_val_bpb')
    if master_process:
        why = "" if init_from == 'resume' else " (auto_resume; --overwrite=True starts over instead)"
        print(f"resuming from {resume_path} at iteration {iter_num}{why}")
elif init_from == 'scratch':
    if meta_vocab_size is None and master_process:
        print(f"notice: no vocab_size in {dataset_dir}/meta.json; using GPT-2's 50257 padded to 50304")
    model = GPT(cli.model_config(config, vocab_size=meta_vocab_size or 50304))
elif init_from.startswith('gpt2') or os.path.isdir(init_from):
    if master_process:
        print(f"initializing from pretrained weights: {init_from}")
    try:
        model = GPT.from_pretrained(runs.pretrained_folder(init_from), dict(dropout=dropout))
    except FileNotFoundError as e:  # weights neither cached nor downloadable, or not a model folder
        cli.die(str(e))
else:  # another run's ckpt.pt: its weights start a fresh run
    if master_process:
        print(f"initializing from the weights of {init_from}")
    model = runs.load_base_model(init_from, dropout)
if meta_vocab_size is not None and meta_vocab_size > model.config.vocab_size:
    cli.die(f"the dataset has vocab_size {meta_vocab_size} but the model only {model.config.vocab_size}")
if block_size < model.config.block_size:
    if master_process:
        print(f"notice: cropping the model's {model.config.block_size} positions to block_size={block_size}")
    model.crop_block_size(block_size)  # e.g. GPT-2's 1024 positions down to a shorter context
elif block_size > model.config.block_size:
    cli.die(f"block_size={block_size} is longer than the model's {model.config.block_size} positions")
model_args = model.config.checkpoint_args()  # nanoGPT's keys, plus the modern knobs that are on
# LoRA: freeze the model, wrap the target layers in adapters (a resumed LoRA run has them already)
lora = checkpoint.get('lora') if checkpoint is not None else None  # what ckpt.pt records
if lora is not None and lora_rank not in (0, lora['rank']):
    cli.die(f"lora_rank={lora_rank} but {resume_path} has rank {lora['rank']}: resume with its settings")
if lora is None and lora_rank > 0:
    if resuming:
        cli.die(f"lora_rank > 0 but {resume_path} is a full-training run: resume it with --lora_rank=0, "
                f"or adapt it in a new out_dir with --init_from={resume_path}")
    apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
    base = init_from if init_from in PRETRAINED else os.path.abspath(init_from)
    lora = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets, base=base)
if lora is not None and master_process:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA rank {lora['rank']} on {lora['targets']} of {lora['base']}: {n_train:,} trainable parameters, "
          f"the other {sum(p.numel() for p in model.parameters()) - n_train:,} frozen")
model.train()  # loaded bases come in eval mode; dropout must run from the first step
model.to(dev.device)
if hellaswag_interval:
    from lib.evaluation import HellaSwagDuringTraining  # each rank scores its share; the counts are summed
    hellaswag = HellaSwagDuringTraining(meta, hellaswag_input, model.config.vocab_size, rank, world_size)
if master_process:
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {model_args}")
    print(model.param_table())
    notice = small_data_notice(split_sizes['train'], model.get_num_params(), tokens_through(max_iters))
    if notice:
        print(notice)

# -----------------------------------------------------------------------------
# optimizer, and the rest of the state a resume restores
scaler = torch.amp.GradScaler(dev.device_type, enabled=dev.use_grad_scaler)  # no-op unless float16
with contextlib.nullcontext() if master_process else contextlib.redirect_stdout(io.StringIO()):  # it prints a summary
    # from here on `optimizer` is the optimizer object; config['optimizer'] keeps the knob
    optimizer = configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2), dev.device_type,
                                     config['optimizer'], muon_lr, muon_momentum, muon_weight_decay, muon_ns_steps,
                                     dict(embedding=embedding_lr, head=head_lr, scalar=scalar_lr), dev.ptdtype)
if checkpoint is not None:
    resume.restore_training_state(checkpoint, resume_path, optimizer, scaler, config['optimizer'], dev)
    crop_optimizer_state(optimizer)  # a cropped position embedding: its moments are cropped too
    checkpoint = None  # free the memory

# bytes of text per token id, on the device (ids a padded vocabulary adds have none)
bytes_table = None
if token_bytes is not None:
    bytes_table = torch.zeros(model.config.vocab_size, dtype=torch.float64, device=dev.device)
    bytes_table[:len(token_bytes)] = torch.tensor(token_bytes, dtype=torch.float64)
elif master_process:
    print(f"bits per byte: not computed ({no_bpb})")

# The uncompiled `model` is what gets saved; the others share its parameters.
fast_model = torch.compile(model) if use_compile else model
train_model = DDP(fast_model, device_ids=[torch.device(dev.device).index] if dev.device_type == 'cuda' else None) \
    if ddp else fast_model


def get_lr(it):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)  # 0 .. 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def get_muon_momentum(it):
    """Muon's momentum: from 0.85 up to muon_momentum over muon_momentum_warmup steps (modded-nanogpt)."""
    if it >= muon_momentum_warmup:
        return muon_momentum
    return 0.85 + (muon_momentum - 0.85) * it / muon_momentum_warmup


def stop_requested():
    """True once Ctrl-C/SIGTERM arrived on any rank (under DDP one tiny all-reduce, so that every
    rank leaves an evaluation at the same batch and nobody waits in a collective)."""
    if not ddp:
        return stop_signal is not None
    flag = torch.tensor(float(stop_signal is not None), device=dev.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def estimate_loss():
    """Mean loss over the fixed eval batches of each split, and bits per byte (the targets' total
    loss in bits over their UTF-8 bytes; <|endoftext|> has none and is left out of both): 'train',
    'val', 'train_bpb', 'val_bpb'. Ranks share the batches, then all-reduce. None when a stop was
    requested meanwhile (a long evaluation must not delay Ctrl-C/SIGTERM)."""
    model.eval()
    losses = {}
    # silent unless it takes more than a few seconds (the first evaluation of a big model)
    bar = cli.Progress('evaluating', total=2 * len(range(rank, eval_iters, world_size)), unit='batches',
                       stream=None if master_process else io.StringIO(), keep=False)
    for split in ('train', 'val'):
        total = torch.zeros(3, device=dev.device, dtype=torch.float64)  # loss sum, nats of text, bytes of text
        for j in range(-(-eval_iters // world_size)):  # every rank checks as often, even with no batch left
            if stop_requested():
                model.train()
                return None
            k = rank + j * world_size
            if k >= eval_iters:
                continue
            x, y = get_batch(split, eval_offsets[split][k])
            with dev.autocast():
                logits, loss = fast_model(x, y)
            total[0] += loss.float()
            if bytes_table is not None:
                nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction='none')  # (B*T,)
                size = bytes_table[y.flatten()]
                total[1:] += torch.stack([(nats * (size > 0)).sum(), size.sum()])
            bar.update()
        if ddp:
            dist.all_reduce(total)
        losses[split] = total[0].item() / eval_iters
        losses[f'{split}_bpb'] = total[1].item() / math.log(2) / total[2].item() if bytes_table is not None else None
    bar.close()
    model.train()
    return losses


def last_good_state():
    """'; out/ckpt.pt keeps the last good state' when there is one (not on a fresh run's first steps)."""
    return f"; {ckpt_path} keeps the last good state" if os.path.isfile(ckpt_path) else "; no checkpoint was saved yet"


def save_training_state(reason):
    """Rank 0 writes out_dir/ckpt.pt with everything an exact resume needs."""
    global last_save
    np_state = np.random.get_state()
    runs.save_checkpoint({
        'format': runs.CHECKPOINT_FORMAT,
        'model': lora_state_dict(model) if lora else model.state_dict(),  # LoRA: adapters only
        'lora': lora,  # None, or rank, alpha, dropout, targets and the base they adapt
        'optimizer': optimizer.state_dict(),
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'best_val_bpb': best_val_bpb,
        'tokenizer': tokenizer_info,  # rebuilds the tokenizer without the data folder
        'config': config,
        'scaler': scaler.state_dict(),
        'rng': {'python': random.getstate(),
                'numpy': (np_state[0], np_state[1].tolist(), *np_state[2:]),
                'torch': torch.get_rng_state(),
                'cuda': torch.cuda.get_rng_state_all() if dev.device_type == 'cuda' else []},
        # batches and dropout masks are a pure function of (seed, iteration): see iteration_plan
        'data': {'sampler': 'numpy default_rng([seed, 0, iter_num])', 'seed': seed, 'iter_num': iter_num},
    }, ckpt_path, keep_last)
    print(f"saved checkpoint to {ckpt_path} at iteration {iter_num} ({reason})")
    last_save = time.time()


def save_between_evaluations(reason):
    """Save the last step's state (a stop, checkpoint_interval_s), unless its loss is not finite:
    no log line may have checked it."""
    if not math.isfinite(loss.item()):
        cli.die(f"training loss is not finite at iteration {iter_num - 1}; not saving it{last_good_state()}")
    if master_process:
        save_training_state(reason)


# The run really starts here: only now is out_dir locked (a second run would interleave log
# lines and delete the first's temporary files) and are config.json and log.jsonl (re)written,
# so a run that fails before (missing data, a refused resume) leaves the run's files as they
# were. log.jsonl: one JSON object per line; a resumed run drops the lines it will redo.
log_path = os.path.join(out_dir, 'log.jsonl')


def start_run_files():
    global time_before
    run_lock.acquire()  # released at the end, or at exit on an error
    if overwrite and not resuming:
        resume.delete_checkpoints(out_dir)  # the run this one replaces
    kept = runs.read_log_lines(log_path, iter_num) if resuming else []
    time_before = json.loads(kept[-1]).get('time', 0.0) if kept else 0.0  # a resumed run's clock goes on
    runs.atomic_write(log_path, lambda f: f.write(''.join(kept).encode()))
    runs.atomic_write(os.path.join(out_dir, 'config.json'), lambda f: f.write((json.dumps(config, indent=2) + '\n').encode()))


time_before = 0.0  # training seconds of the earlier parts of a resumed run (log.jsonl's 'time' continues)
hardware.on_master(start_run_files, ddp, dev.device)
run_start = time.time()


def log_jsonl(**record):
    record['time'] = round(time_before + time.time() - run_start, 3)  # training seconds, across resumes
    try:
        with open(log_path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        raise cli.ConfigError(runs.os_error_message(e, log_path), this_rank_only=True) from None


def log_eval(**values):
    """Print, log and plot the numbers of an evaluation (master process only)."""
    if 'loss' in values:
        losses = values['loss']
        bpb = f", val bpb {losses['val_bpb']:.4f}" if losses['val_bpb'] is not None else ""
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{bpb}")
        for split in ('train', 'val'):
            log_jsonl(iter=iter_num, kind='eval', split=split, loss=losses[split], bpb=losses[f'{split}_bpb'], lr=lr,
                      tokens=tokens_through(iter_num))
        wandb_values = {'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr,
                        **({'train/bpb': losses['train_bpb'], 'val/bpb': losses['val_bpb']} if bpb else {})}
    else:
        hs = values['hellaswag']
        print(f"step {iter_num}: hellaswag acc_norm {hs['acc_norm']:.4f} ({hs['examples']} examples)")
        log_jsonl(iter=iter_num, kind='hellaswag', tokens=tokens_through(iter_num), **hs)
        wandb_values = {'hellaswag/acc_norm': hs['acc_norm']}
    if plotting.have_matplotlib():  # out_dir/loss.png, redrawn at every evaluation
        plotting.plot_loss([out_dir], os.path.join(out_dir, 'loss.png'))
    if wandb_log:
        wandb.log({'iter': iter_num, **wandb_values})


if wandb_log and master_process:
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)  # imported when checked above

# Ctrl-C / SIGTERM: remember it, finish the current step, save, exit 0. A second signal kills.
stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL)


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)

# -----------------------------------------------------------------------------
# training loop
start_iter = iter_num
last_save = time.time()  # for checkpoint_interval_s
device_name = torch.cuda.get_device_name(dev.device) if dev.device_type == 'cuda' else dev.device_type
if master_process and hardware.peak_flops(device_name, dev.ptdtype) is None:
    print(f"mfu: not shown (no known peak FLOP/s for {device_name} in {dev.dtype})")
time_left = cli.TimeLeft(max_iters, eval_interval)  # for the progress lines


t_log, last_log_iter = time.time(), iter_num
loss_sum = torch.zeros((), device=dev.device)  # sum of micro-step losses since the last log line
stopped_in_eval = False
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_ratio', 1.0)  # Muon's groups: muon_lr / learning_rate
        if group.get('kind') == 'muon':
            group['momentum'] = get_muon_momentum(iter_num)

    # evaluate, and checkpoint when val improved (or always_save_checkpoint)
    if (iter_num % eval_interval == 0 and (iter_num > 0 or eval_at_start)) or iter_num == max_iters or eval_only:
        t_eval = time.time()
        losses = estimate_loss()
        if losses is None:  # Ctrl-C/SIGTERM during the evaluation: stop now, saving below
            stopped_in_eval = True
            break
        if master_process:
            log_eval(loss=losses)
        if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
            cli.die(f"evaluation loss is not finite at iteration {iter_num} (train {losses['train']}, "
                    f"val {losses['val']}){last_good_state()}")
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        best_val_bpb = losses['val_bpb'] if improved else best_val_bpb  # bits per byte at the best val loss
        if master_process and iter_num > start_iter and (improved or always_save_checkpoint):
            save_training_state('val loss improved' if improved else 'always_save_checkpoint')
        time_left.evaluation_took(time.time() - t_eval)
        t_log += time.time() - t_eval  # keep evals and saves out of ms/iter
    if hellaswag_interval and (iter_num % hellaswag_interval == 0 or iter_num == max_iters or eval_only):
        t_eval = time.time()
        hs = hellaswag(model, dev)  # the uncompiled model: example lengths vary, no recompiles
        if master_process:
            log_eval(hellaswag=hs)
        t_log += time.time() - t_eval
    if eval_only or iter_num >= max_iters:
        break

    # one optimizer step over accum_steps micro-batches (this rank's share of the global batch)
    log_now = iter_num % log_interval == 0
    offsets, dropout_seeds = iteration_plan(iter_num)
    for micro_step in range(accum_steps):
        x, y = get_batch('train', offsets[micro_step], batch_shape(iter_num)[1])
        torch.manual_seed(int(dropout_seeds[micro_step]))  # dropout masks fixed by (seed, iteration, micro-step)
        # gradients are all-reduced only after the last micro-step
        last = micro_step == accum_steps - 1
        with train_model.no_sync() if ddp and not last else contextlib.nullcontext():
            with dev.autocast():
                _, loss = train_model(x, y)
            scaler.scale(loss / accum_steps).backward()
        if log_now:
            loss_sum += loss.detach().float()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    # log: the mean loss over all micro-steps of all ranks (the only sync point outside evals)
    if log_now:
        if ddp:
            dist.all_reduce(loss_sum)
        lossf = loss_sum.item() / gradient_accumulation_steps
        loss_sum.zero_()
        now = time.time()
        dt = (now - t_log) / (iter_num - last_log_iter)  # seconds per iteration since the last log line
        tokens_per_sec = (tokens_through(iter_num) - tokens_through(last_log_iter)) / (now - t_log)
        t_log, last_log_iter = now, iter_num
        if not math.isfinite(lossf):
            cli.die(f"training loss is not finite ({lossf}) at iteration {iter_num - 1}{last_good_state()} "
                    f"(try a lower learning_rate or grad_clip)")
        if master_process:
            mfu = hardware.estimate_mfu(model, tokens_per_sec / world_size, device_name, dev.ptdtype)
            left = time_left.after_step(iter_num, dt)
            print(f"iter {iter_num - 1}/{max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.2f}ms/iter, "
                  f"{tokens_per_sec:,.0f} tokens/s" + (f", mfu {mfu * 100:.2f}%" if mfu is not None else "")
                  + f", {cli.duration(left)} left")
            if iter_num - start_iter >= 5 and time_left.long_run_once(left, 1800):  # said once, with what to do
                print(f"notice: at {time_left.pace:.2f} s per iteration, the {max_iters - iter_num:,} iterations left "
                      f"take about {cli.duration(left)}" + hardware.smaller_run_hint(dev.device_type, dataset))
            log_jsonl(iter=iter_num - 1, kind='train', split='train', loss=lossf, lr=lr,
                      tokens=tokens_through(iter_num), ms_per_iter=dt * 1000,
                      tokens_per_sec=tokens_per_sec, mfu=mfu)
            if wandb_log:
                wandb.log({'iter': iter_num - 1, 'train/loss_step': lossf, 'lr': lr, 'mfu': mfu})

    # a stop request takes effect between steps; under DDP ranks agree at log intervals
    if ddp and log_now:
        stop_signal = stop_signal or ('SIGTERM' if stop_requested() else None)
    if stop_signal is not None and (log_now or not ddp):
        save_between_evaluations(f"stopped by {stop_signal}")
        if master_process:
            print(f"stopped by {stop_signal}; continue with: python train.py --init_from=resume --out_dir={out_dir}")
        break
    evaluation_next = iter_num % eval_interval == 0 or iter_num >= max_iters  # which saves anyway
    if checkpoint_interval_s and master_process and time.time() - last_save >= checkpoint_interval_s and not evaluation_next:
        save_between_evaluations(f"{checkpoint_interval_s:g} s since the last save")

# -----------------------------------------------------------------------------
# what happened, what to do next; then leave together
if stopped_in_eval:  # the model and optimizer hold the last finished step: save that
    stop_signal = stop_signal or 'SIGTERM'  # under DDP another rank may have received it
    if master_process:
        if iter_num > start_iter:
            save_training_state(f"stopped by {stop_signal}")
        saved = os.path.isfile(ckpt_path)
        print(f"stopped by {stop_signal} during the evaluation at iteration {iter_num}; " + (
            f"continue with: python train.py --init_from=resume --out_dir={out_dir}" if saved else "nothing to save yet"))
if master_process and not eval_only:
    print(runs.summary(out_dir, dataset, iter_num - start_iter, time.time() - run_start, best_val_loss, best_val_bpb,
                       tokens_through(iter_num)))
run_lock.release()
if wandb_log and master_process:
    wandb.finish()
if ddp:
    # finish together: rank 0's torchrun agent may host the rendezvous store, and a node that
    # exits while another is still saving or leaving the group aborts that one
    dist.barrier()
    hardware.ddp_exit()  # no interpreter finalization: it races gloo's threads (see its docstring)
