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
$ torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29500 \\
    --rdzv_id=gpt2 train.py config/gpt2.py

Config files and flags override the defaults below, in order: train.py config/a.py --batch_size=32.
Resume: --init_from=resume (same out_dir). Ctrl-C or SIGTERM: the step finishes, ckpt.pt is saved,
exit status 75 (0: finished). `python train.py --help` lists every knob.
"""

import contextlib
import io
import math
import os
import sys
import time

from lib import cli  # first: a missing package is one line naming the fix, not a traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lib import chat, hardware, loading, resume, runs
from lib.batches import Batches
from lib.evaluation import HellaSwagDuringTraining, bytes_per_token, estimate_loss
from lib.lora import lora_summary, start_lora
from lib.optim import configure_optimizers, crop_optimizer_state
from lib.tokenfiles import DATA_DIR, small_data_notice
from lib.tokenizers import token_bytes_of, tokenizer_record
from model import GPT

# -----------------------------------------------------------------------------
# defaults: a GPT-2 (124M) on OpenWebText; config/*.py and --key=value change them

# run: its folder, evaluations and checkpoints
out_dir = 'out'  # checkpoint, config.json and log.jsonl go here
eval_interval = 2000  # evaluate (and maybe checkpoint) every this many iterations
log_interval = 1  # print and log the training loss every this many iterations
eval_iters = 200  # batches per split for each evaluation
eval_only = False  # evaluate once at the start, then exit
eval_at_start = True  # evaluate before the first step too; False saves one evaluation
always_save_checkpoint = True  # save after every evaluation, not only when val loss improves
init_from = 'scratch'  # 'scratch', 'resume', 'gpt2*', a Hugging Face folder or a run's ckpt.pt
auto_resume = True  # out_dir holds a checkpoint: resume it, whatever init_from says
overwrite = False  # let a fresh start replace the run in out_dir (its checkpoints are deleted)
checkpoint_interval_s = 0.0  # also save every this many seconds; 0 = only at evaluations
keep_last = 1  # checkpoints kept: the newest is ckpt.pt, older ones ckpt-ITER.pt
hellaswag_interval = 0  # HellaSwag accuracy every this many steps, logged (GPT-2 BPE data); 0 = off
hellaswag_input = ''  # a HellaSwag .jsonl file; '' downloads it into data/hellaswag/
# logging to Weights & Biases
wandb_log = False  # log to Weights & Biases (needs `pip install wandb`)
wandb_project = 'owt'  # wandb project name
wandb_run_name = 'gpt2'  # wandb run name
# data
dataset = 'openwebtext'  # reads data/<dataset>/{train,val}.bin: `python prepare.py <dataset>`
data_dir = ''  # a folder with train.bin/val.bin/meta.json instead of data/<dataset>
gradient_accumulation_steps = 40  # micro-batches per step over ALL processes (5 per GPU on 8)
batch_size = 12  # sequences per micro-batch (per process)
block_size = 1024  # tokens per sequence
batch_warmup = 0  # steps over which the batch grows from 1/4 of batch_size to all; 0 = off
seq_warmup = 0  # steps over which sequences grow from 1/4 of block_size to all; 0 = off
# model: its shape; then every other field of model.py's GPTConfig, GPT-2's values by default
n_layer = 12  # transformer blocks
n_head = 12  # attention heads per block
n_embd = 768  # embedding width
dropout = 0.0  # 0 for pretraining; try 0.1+ for finetuning
bias = False  # biases in Linear and LayerNorm layers
# The other model knobs (pos_emb, norm, qk_norm, ...) are declared once, as GPTConfig fields in
# model.py, with GPT-2's values as defaults; this line makes each a knob here (`--help` lists them):
globals().update(cli.model_knobs(globals()))  # every GPTConfig field not set above, but vocab_size
# LoRA: low-rank adapters on a frozen trained model (init_from gpt2*, a folder or a ckpt.pt)
lora_rank = 0  # adapter rank r; 0 = off (full training)
lora_alpha = 16.0  # adapters are scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = 'c_attn,c_proj,c_fc,mlp.c_proj'  # attention in/out, MLP in/out (a subset of these)
# optimizer
learning_rate = 6e-4  # peak learning rate
max_iters = 600000  # optimizer steps to train for
weight_decay = 1e-1  # AdamW weight decay on matrices (not on biases and norms)
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 1.0  # clip the global gradient norm to this; 0.0 disables
optimizer = 'adamw'  # 'adamw', or 'muon': Muon on the blocks' matrices, AdamW on the rest
muon_lr = 0.02  # Muon's peak learning rate; the schedule scales it like learning_rate
muon_momentum = 0.95  # Muon's momentum (the look-ahead kind, Nesterov's)
muon_weight_decay = 0.0  # Muon's (decoupled) weight decay on the blocks' matrices
muon_ns_steps = 5  # iterations that make each Muon update an orthogonal matrix (Newton-Schulz)
muon_momentum_warmup = 0  # steps over which Muon's momentum rises from 0.85; 0 = off
embedding_lr = 0.0  # AdamW's peak lr for token, position, value, bigram tables; 0 = learning_rate
head_lr = 0.0  # AdamW's peak lr for an untied output head; 0 = learning_rate
scalar_lr = 0.0  # AdamW's peak lr for gains, biases and x0_mix's scalars; 0 = learning_rate
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True  # False keeps learning_rate constant
warmup_iters = 2000  # warmup steps
lr_decay_iters = 600000  # step where the cosine reaches min_lr; usually max_iters
min_lr = 6e-5  # floor of the schedule; usually learning_rate / 10
# system
backend = 'auto'  # torchrun's: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'
device = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto', 'float32', 'bfloat16' or 'float16' (float16 adds a GradScaler)
compile = None  # torch.compile the model; None: only on CUDA; True/False to force
seed = 1337  # seeds model init, batch sampling and dropout

# what each knob may be, checked before anything is built or written (GPTConfig checks the model's)
RULES = dict(
    eval_interval='>= 1', log_interval='>= 1', eval_iters='>= 1', batch_size='>= 1', seed='>= 0',
    gradient_accumulation_steps='>= 1', max_iters='>= 0', warmup_iters='>= 0', min_lr='>= 0',
    lr_decay_iters='>= 0', hellaswag_interval='>= 0', checkpoint_interval_s='>= 0',
    keep_last='>= 1', learning_rate='> 0', weight_decay='>= 0', grad_clip='>= 0', beta1='[0, 1)',
    beta2='[0, 1)', optimizer=('adamw', 'muon'), muon_lr='> 0', muon_momentum='[0, 1)',
    muon_weight_decay='>= 0', muon_ns_steps='1..20', muon_momentum_warmup='>= 0',
    embedding_lr='>= 0', head_lr='>= 0', scalar_lr='>= 0', batch_warmup='>= 0', seq_warmup='>= 0',
    lora_rank='>= 0', lora_alpha='> 0', lora_dropout='[0, 1)', backend=('auto', 'nccl', 'gloo'),
    compile=(None, True, False),
)
# -----------------------------------------------------------------------------
# config: config files, then --key=value flags (cli.load_config checks every key). A resume
# continues a run as it was configured: the knobs its checkpoint records, then files and flags;
# auto_resume resumes whenever out_dir holds a checkpoint (resume.find_resume).
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and (v is None or isinstance(v, (bool, int, float, str)))]
defaults = {k: globals()[k] for k in config_keys}
overrides = cli.load_config(defaults, sys.argv[1:])
globals().update(overrides)
checkpoint, resume_path, recorded = resume.find_resume(
    out_dir, init_from, auto_resume and not overwrite, overrides, config_keys)
resuming = checkpoint is not None
globals().update({**recorded, **overrides})
config = {k: globals()[k] for k in config_keys}  # the resolved knobs: printed, saved, logged
init_kind = resume.check_run_config(config, RULES, checkpoint, resume_path)  # all knobs checked
ckpt_path = os.path.join(out_dir, 'ckpt.pt')  # where this run saves; a resume may read an older one
# optional: checked now, not after the model is built (under torchrun, ranks would hang)
wandb = cli.optional_import('wandb', "wandb_log=True needs wandb: pip install wandb "
                            "(or set --wandb_log=False)") if wandb_log else None

# -----------------------------------------------------------------------------
# device, dtype and DDP: chosen once, printed once with the reason
ddp, rank, world_size, dev = hardware.setup_device_and_ddp(device, dtype, backend, width=n_embd)
master_process = rank == 0  # only rank 0 prints, logs and writes files
cli.quiet_interrupt("interrupted before training started; nothing was written")  # the loop saves


def print0(*args):
    """print, on rank 0 only (one copy of each line under torchrun)."""
    if master_process:
        print(*args)


# one run per out_dir: a folder in use stops this run now (the lock is taken before the first write)
run_lock = runs.RunLock(out_dir)
hardware.on_master(run_lock.check, ddp, dev.device)

# -----------------------------------------------------------------------------
# data: uint16 token files, checked now; this process's batches of each iteration (lib/batches.py)
batches = Batches(data_dir or os.path.join(DATA_DIR, dataset), dataset, dev, seed=seed,
                  batch_size=batch_size, block_size=block_size, eval_iters=eval_iters,
                  accumulation=gradient_accumulation_steps, batch_warmup=batch_warmup,
                  seq_warmup=seq_warmup, rank=rank, world_size=world_size)
accum_steps, meta = batches.accum_steps, batches.meta  # micro-steps per process; meta.json
meta_vocab_size = meta.get('vocab_size')
print0(cli.config_summary(config, defaults, os.path.join(out_dir, 'config.json')))
print0(f"{world_size} process(es), {accum_steps} micro-steps each; "
       f"tokens per iteration: {batches.tokens_per_iter:,}")
if batches.mask_share is not None:  # chat data: losses, bits per byte, evaluations count these only
    print0(f"loss: on the assistant's tokens only, {batches.mask_share:.1%} of the training tokens")
# bits per byte, a loss every tokenizer can be compared on, need the bytes each token stands for
token_bytes, no_bpb = token_bytes_of(meta, batches.folder)
tokenizer_info = tokenizer_record(meta, batches.folder)  # what checkpoints keep of the tokenizer

# -----------------------------------------------------------------------------
# model: a new one, the resumed run's, pretrained GPT-2 (a name or a Hugging Face folder) or the
# weights of another run's ckpt.pt (loading.init_kind tells which init_from names)
iter_num, best_val_loss, best_val_bpb = 0, float('inf'), None  # steps done, best val loss, its bpb
torch.manual_seed(seed)  # the same initial weights on every rank
if resuming:
    best_val_loss = resume.check_resumable(checkpoint, resume_path)
    model = resume.resume_model(checkpoint, resume_path, config, overrides, meta, batches.folder,
                                dropout, lora_dropout, notice=print0)
    iter_num, best_val_bpb = checkpoint['iter_num'], checkpoint.get('best_val_bpb')
    why = "" if init_from == 'resume' else " (auto_resume; --overwrite=True starts over instead)"
    print0(f"resuming from {resume_path} at iteration {iter_num}{why}")
elif init_kind == 'scratch':
    if meta_vocab_size is None:
        print0(f"notice: no vocab_size in {batches.folder}/meta.json; "
               f"using GPT-2's 50257 padded to 50304")
    model = GPT(cli.model_config(config, vocab_size=meta_vocab_size or 50304))
else:  # pretrained weights, or another run's: a fresh run starts from them
    what = 'pretrained weights: ' if init_kind == 'pretrained' else 'the weights of '
    print0(f"initializing from {what}{init_from}")
    model, base_info = loading.load_model(init_from, out_dir, 'cpu', dropout)
    if meta.get('chat'):  # chat data: the template's tokens get rows of their own
        chat.fit_base_model(model, base_info, meta, lora_rank, notice=print0)
loading.fit_model(model, meta_vocab_size, block_size, notice=print0)  # vocabulary; crop the block
# LoRA: freeze the model, wrap the target layers in adapters (a resumed LoRA run has them already)
lora = checkpoint.get('lora') if resuming else None  # what ckpt.pt records
if lora is None and lora_rank > 0:
    lora = start_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets, base=init_from)
if lora is not None:
    print0(lora_summary(model, lora))
model.train()  # loaded bases come in eval mode; dropout must run from the first step
model.to(dev.device)
if hellaswag_interval:
    # each rank scores its share of the examples; the counts are summed
    hellaswag = HellaSwagDuringTraining(meta, hellaswag_input, model.config.vocab_size, rank,
                                        world_size)
n_params = model.param_breakdown()['total']  # the table's total; MFU counts without lookup tables
print0(f"model: {n_params:,} parameters ({model.get_num_params():,} without the embedding lookup "
       f"tables), {model.config.checkpoint_args()}")
print0(cli.param_table(model.param_breakdown()))
notice = small_data_notice(batches.sizes['train'], model.get_num_params(),
                           batches.tokens_through(max_iters))
if notice:
    print0(notice)

# -----------------------------------------------------------------------------
# optimizer, and the rest of the state a resume restores
scaler = torch.amp.GradScaler(dev.device_type, enabled=dev.use_grad_scaler)  # no-op unless float16
with contextlib.nullcontext() if master_process else contextlib.redirect_stdout(io.StringIO()):
    opt = configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2), dev.device_type,
                               optimizer, muon_lr, muon_momentum, muon_weight_decay, muon_ns_steps,
                               dict(embedding=embedding_lr, head=head_lr, scalar=scalar_lr),
                               dev.ptdtype)
if resuming:
    resume.restore_training_state(checkpoint, resume_path, opt, scaler, optimizer, dev)
    crop_optimizer_state(opt)  # a cropped position embedding: its moments are cropped too
resume.exit_if_finished(checkpoint, resume_path, config, ddp, dev.device)  # at max_iters: exits 0
checkpoint = None  # free the memory
bytes_table = bytes_per_token(token_bytes, model.config.vocab_size, dev.device)  # (vocab,) or None
if bytes_table is None:
    print0(f"bits per byte: not computed ({no_bpb})")

# The uncompiled `model` is what gets saved; the others share its parameters.
use_compile = (dev.device_type == 'cuda') if compile is None else compile
fast_model = torch.compile(model) if use_compile else model
device_ids = [torch.device(dev.device).index] if dev.device_type == 'cuda' else None
train_model = DDP(fast_model, device_ids=device_ids) if ddp else fast_model


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
    """Muon's momentum, up from 0.85 in muon_momentum_warmup steps (as in modded-nanogpt)."""
    if it >= muon_momentum_warmup:
        return muon_momentum
    return 0.85 + (muon_momentum - 0.85) * it / muon_momentum_warmup


def save_training_state(reason, iter_num, best_val_loss, best_val_bpb):
    """Rank 0 writes ckpt.pt with everything an exact resume needs; returns when it was saved."""
    state = resume.training_state(model, opt, scaler, lora, iter_num, best_val_loss, best_val_bpb,
                                  tokenizer_info, config, dev.device_type)
    runs.save_checkpoint(state, ckpt_path, keep_last)  # atomic: a crash keeps the previous one
    print(f"saved checkpoint to {ckpt_path} at iteration {iter_num} ({reason})")
    return time.time()


def last_good_state():
    """'; out/ckpt.pt keeps the last good state' when there is one (not on a fresh run's start)."""
    saved = os.path.isfile(ckpt_path)
    return f"; {ckpt_path} keeps the last good state" if saved else "; no checkpoint was saved yet"


# The run really starts here: only now is out_dir locked and are config.json and log.jsonl
# (re)written, so a run that fails before (missing data, a refused resume) leaves them as they were.
start_iter = iter_num
run_log = runs.RunLog(out_dir, wandb if master_process else None)
hardware.on_master(lambda: run_log.start(run_lock, config, start_iter if resuming else None,
                                         replace=overwrite and not resuming), ddp, dev.device)
run_start = time.time()
if wandb_log and master_process:
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
stop = hardware.StopSignal(ddp, dev.device)  # Ctrl-C/SIGTERM: finish the step, save, exit 75

# -----------------------------------------------------------------------------
# training loop
device_name = hardware.device_name(dev)  # the peak FLOP/s for MFU are known per GPU model
if hardware.peak_flops(device_name, dev.ptdtype) is None:
    print0(f"mfu: not shown (no known peak FLOP/s for {device_name} in {dev.dtype})")
time_left = cli.TimeLeft(max_iters, eval_interval,  # time left; what to run instead of hours
                         hardware.smaller_run_hint(dev.device_type, dataset, config, sys.argv[1:]))
t_log, last_log_iter, last_save = time.time(), iter_num, time.time()
loss_sum = torch.zeros((), device=dev.device)  # sum of micro-step losses since the last log line
stopped_in_eval = stopping = False  # a stop request ended the loop: in an evaluation, between steps
while True:
    lr = get_lr(iter_num)
    for group in opt.param_groups:
        group['lr'] = lr * group.get('lr_ratio', 1.0)  # Muon's groups: muon_lr / learning_rate
        if group.get('kind') == 'muon':
            group['momentum'] = get_muon_momentum(iter_num)

    # evaluate, and checkpoint when val improved (or always_save_checkpoint)
    last_iter = iter_num == max_iters or eval_only
    if (iter_num % eval_interval == 0 and (iter_num > 0 or eval_at_start)) or last_iter:
        t_eval = time.time()
        losses = estimate_loss(fast_model, batches, eval_iters, dev, bytes_table, stop,
                               quiet=not master_process)
        if losses is None:  # Ctrl-C/SIGTERM during the evaluation: stop now, saving below
            stopped_in_eval = True
            break
        if master_process:
            run_log.evaluation(iter_num, losses, lr, batches.tokens_through(iter_num))
        if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
            cli.die(f"evaluation loss is not finite at iteration {iter_num} (train "
                    f"{losses['train']}, val {losses['val']}){last_good_state()}")
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        best_val_bpb = losses['val_bpb'] if improved else best_val_bpb  # bpb at the best val loss
        if master_process and iter_num > start_iter and (improved or always_save_checkpoint):
            reason = 'val loss improved' if improved else 'always_save_checkpoint'
            last_save = save_training_state(reason, iter_num, best_val_loss, best_val_bpb)
        time_left.evaluation_took(time.time() - t_eval)
        t_log += time.time() - t_eval  # keep evals and saves out of ms/iter
    if hellaswag_interval and (iter_num % hellaswag_interval == 0 or last_iter):
        t_eval = time.time()
        hs = hellaswag(model, dev)  # the uncompiled model: example lengths vary, no recompiles
        if master_process:
            run_log.hellaswag(iter_num, hs, batches.tokens_through(iter_num))
        t_log += time.time() - t_eval
    if eval_only or iter_num >= max_iters:
        break

    # one optimizer step over accum_steps micro-batches (this rank's share of the global batch)
    log_now = iter_num % log_interval == 0
    offsets, dropout_seeds = batches.plan(iter_num)
    T = batches.shape(iter_num)[1]  # tokens per sequence (seq_warmup)
    for micro_step in range(accum_steps):
        x, y = batches.get('train', offsets[micro_step], T)
        torch.manual_seed(int(dropout_seeds[micro_step]))  # dropout: (seed, iteration, micro-step)
        # gradients are all-reduced only after the last micro-step
        last = micro_step == accum_steps - 1
        with train_model.no_sync() if ddp and not last else contextlib.nullcontext():
            with dev.autocast():
                _, loss = train_model(x, y)
            if batches.mask_share is not None:  # no assistant token: a mean of 0/0, so count 0
                loss = torch.where((y != -1).any(), loss, 0.0)
            scaler.scale(loss / accum_steps).backward()
        if log_now:
            loss_sum += loss.detach().float()
    if grad_clip != 0.0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    iter_num += 1

    # log: the mean loss over all micro-steps of all ranks (the only sync point outside evals)
    if log_now:
        if ddp:
            dist.all_reduce(loss_sum)
        lossf = loss_sum.item() / gradient_accumulation_steps
        loss_sum.zero_()
        now = time.time()
        dt = (now - t_log) / (iter_num - last_log_iter)  # seconds per iteration since the last log
        tokens = batches.tokens_through(iter_num)
        tokens_per_sec = (tokens - batches.tokens_through(last_log_iter)) / (now - t_log)
        t_log, last_log_iter = now, iter_num
        if not math.isfinite(lossf):
            cli.die(f"training loss is not finite ({lossf}) at iteration {iter_num - 1}"
                    f"{last_good_state()} (try a lower learning_rate or grad_clip)")
        if master_process:
            mfu = hardware.estimate_mfu(model, tokens_per_sec / world_size, device_name,
                                        dev.ptdtype)
            left = time_left.after_step(iter_num, dt)
            run_log.step(iter_num - 1, max_iters, lossf, lr, tokens, dt, tokens_per_sec, mfu, left)
            if iter_num - start_iter >= 5 and (notice := time_left.long_run_notice(iter_num, left)):
                print(notice)  # said once

    # a stop request takes effect between steps (under DDP ranks agree at log intervals); with
    # checkpoint_interval_s, save between evaluations too (an evaluation next saves anyway)
    stopping = (log_now or not ddp) and stop.requested()
    evaluation_next = iter_num % eval_interval == 0 or iter_num >= max_iters
    due = checkpoint_interval_s and time.time() - last_save >= checkpoint_interval_s
    if stopping or (due and master_process and not evaluation_next):
        if not math.isfinite(loss.item()):  # no log line may have checked this step's loss
            cli.die(f"training loss is not finite at iteration {iter_num - 1}; "
                    f"not saving it{last_good_state()}")
        if master_process:
            why = f"{checkpoint_interval_s:g} s since the last save"
            why = f"stopped by {stop.name}" if stopping else why
            last_save = save_training_state(why, iter_num, best_val_loss, best_val_bpb)
    if stopping:
        break

# -----------------------------------------------------------------------------
# what happened, what to do next; then leave together
if stopped_in_eval and master_process:  # the model and optimizer hold the last finished step
    if iter_num > start_iter:
        save_training_state(f"stopped by {stop.name}", iter_num, best_val_loss, best_val_bpb)
    print(f"stopped by {stop.name} during the evaluation at iteration {iter_num}")
stopped_by = stop.name if stopping or stopped_in_eval else None  # exit status: hardware.STOPPED
if master_process and not eval_only:
    print(runs.summary(out_dir, dataset, iter_num - start_iter, time.time() - run_start,
                       best_val_loss, best_val_bpb, batches.tokens_through(iter_num), stopped_by,
                       iter_num, max_iters, chat=batches.mask_share is not None))
run_lock.release()
if wandb_log and master_process:
    wandb.finish()
status = hardware.STOPPED if stopped_by else 0  # a job script tells finished (0) from stopped
if ddp:
    # finish together: rank 0's torchrun agent may host the rendezvous store, and a node that
    # exits while another is still saving or leaving the group aborts that one
    dist.barrier()
    hardware.ddp_exit(status)  # no interpreter finalization: it races gloo's threads (docstring)
sys.exit(status)
