# The CPU quick start: a tiny character-level GPT on Shakespeare, val loss about 1.9 in ~5 minutes
# on 2 CPU cores (0.8M parameters).
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_cpu.py

out_dir = 'out-shakespeare-char-cpu'  # where ckpt.pt, config.json and log.jsonl go
eval_interval = 250  # evaluate every 250 steps
eval_iters = 20  # a quick estimate: 20 batches per split
log_interval = 50  # a log line every 50 steps
always_save_checkpoint = False  # keep the checkpoint with the best val loss only

dataset = 'shakespeare_char'  # data/shakespeare_char, written by prepare.py
gradient_accumulation_steps = 1  # one micro-batch per step
batch_size = 32  # sequences per step
block_size = 64  # 64 characters of context

n_layer = 4  # transformer blocks
n_head = 4  # attention heads
n_embd = 128  # embedding width
dropout = 0.0  # too few steps to overfit

learning_rate = 1e-3  # a baby network tolerates a high learning rate
max_iters = 2000  # optimizer steps
lr_decay_iters = 2000  # cosine ends at max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # few tokens per step, so average the second moment over more steps
warmup_iters = 100  # a short warmup

device = 'cpu'  # also on machines with a GPU
compile = False  # compiling takes longer than this whole run saves
