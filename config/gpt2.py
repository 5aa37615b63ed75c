# GPT-2 small (124M) on OpenWebText, to a val loss of about 2.85 on one node of 8 A100s (~4-5 days).
# python prepare.py openwebtext
# torchrun --standalone --nproc_per_node=8 train.py config/gpt2.py

wandb_log = False  # True follows the run on Weights & Biases (pip install wandb)
wandb_project = 'owt'  # wandb project name
wandb_run_name = 'gpt2-124M'  # wandb run name

dataset = 'openwebtext'  # data/openwebtext, written by prepare.py
# tokens per step: 12 sequences * 1024 tokens * 40 micro-batches = 491,520 (~0.5M, as in GPT-3's small models)
batch_size = 12  # sequences per micro-batch and GPU
block_size = 1024  # GPT-2's context length
gradient_accumulation_steps = 40  # global over all processes: 5 per GPU on 8 GPUs

n_layer = 12  # GPT-2 small
n_head = 12  # GPT-2 small
n_embd = 768  # GPT-2 small
dropout = 0.0  # no dropout for pretraining
bias = False  # slightly faster and as good

learning_rate = 6e-4  # peak learning rate (GPT-3 paper, 125M model)
max_iters = 600000  # 600k steps * 0.5M tokens = 300B tokens
lr_decay_iters = 600000  # cosine ends at max_iters
min_lr = 6e-5  # learning_rate / 10
warmup_iters = 2000  # linear warmup steps
weight_decay = 1e-1  # AdamW weight decay
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 1.0  # clip the gradient norm at 1

eval_interval = 1000  # evaluate every 1000 steps
eval_iters = 200  # batches per split and evaluation
log_interval = 10  # a log line every 10 steps
