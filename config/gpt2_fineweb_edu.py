# GPT-2 small (124M) on FineWeb-Edu sample-10BT with build-nanogpt's schedule: 19,073 steps of
# 524,288 tokens = 10B tokens, one epoch. build-nanogpt and llm.c reach val loss ~3.28-3.3 and
# HellaSwag acc_norm ~0.29-0.30 with it (their published runs; GPT-2 124M itself: 0.2955).
# NOT yet run on GPUs by this project: expect to tune batch_size to your GPU memory.
# python prepare.py fineweb_edu
# torchrun --standalone --nproc_per_node=8 train.py config/gpt2_fineweb_edu.py

out_dir = 'out-gpt2-fineweb-edu'  # checkpoint and log.jsonl
wandb_log = False  # True to follow the run on Weights & Biases
wandb_project = 'fineweb-edu'  # wandb project name
wandb_run_name = 'gpt2-124M'  # wandb run name

dataset = 'fineweb_edu'  # data/fineweb_edu, written by `python prepare.py fineweb_edu`
# tokens per step: 16 sequences * 1024 tokens * 32 micro-batches = 524,288 = 2**19 (build-nanogpt's total_batch_size)
batch_size = 16  # sequences per micro-batch and GPU (build-nanogpt uses 64 on 80 GB GPUs with 8 micro-batches)
block_size = 1024  # GPT-2's context length
gradient_accumulation_steps = 32  # global over all processes: 4 per GPU on 8 GPUs

n_layer = 12  # GPT-2 small
n_head = 12  # GPT-2 small
n_embd = 768  # GPT-2 small
dropout = 0.0  # no dropout for pretraining
bias = False  # slightly faster and as good

learning_rate = 6e-4  # peak learning rate (GPT-3 paper, 125M model), as build-nanogpt
min_lr = 6e-5  # learning_rate / 10
warmup_iters = 715  # build-nanogpt: 375M tokens of warmup (GPT-3) / 524,288 tokens per step
max_iters = 19073  # 10e9 tokens / 524,288 tokens per step: one pass over sample-10BT
lr_decay_iters = 19073  # cosine ends at max_iters
weight_decay = 1e-1  # AdamW weight decay
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 1.0  # clip the gradient norm at 1

eval_interval = 250  # val loss every 250 steps, as build-nanogpt
eval_iters = 20  # batches per split and evaluation: 20 * 16 * 1024 = 327,680 tokens
log_interval = 10  # a log line every 10 steps
hellaswag_interval = 250  # HellaSwag acc_norm every 250 steps, as build-nanogpt (10,042 examples shared by the GPUs)
