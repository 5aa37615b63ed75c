# The CPU quick start: a small character-level GPT on Shakespeare with the modern recipe (Muon,
# RoPE, QK-norm; docs/speedrun.md). Measured 2026-11-23 on a quiet 2-core VM, torch 2.13.0 CPU:
# val loss 1.7891 at step 400, 1.6359 at 1200, 1.5647 at 2000, 1.5553 at 2400, in 303 s wall
# (0.8M parameters, ~0.125 s per step, peak RSS 540 MB). The GPT-2 recipe it replaced
# (AdamW, learned positions, block 64) ended at 1.72 in about the same time.
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_cpu.py

out_dir = 'out-shakespeare-char-cpu'  # where ckpt.pt, config.json and log.jsonl go
eval_interval = 400  # evaluate every 400 steps
eval_iters = 20  # a quick estimate: 20 batches per split
log_interval = 50  # a log line every 50 steps
always_save_checkpoint = False  # keep the checkpoint with the best val loss only

dataset = 'shakespeare_char'  # data/shakespeare_char, written by prepare.py
gradient_accumulation_steps = 1  # one micro-batch per step
batch_size = 16  # sequences per step (2,048 characters)
block_size = 128  # 128 characters of context

n_layer = 4  # transformer blocks
n_head = 4  # attention heads
n_embd = 128  # embedding width
dropout = 0.0  # too few steps to overfit
pos_emb = 'rope'  # rotary positions (helped in the ablation, docs/speedrun.md)
qk_norm = True  # RMS-normalised queries and keys (helped in the ablation)

optimizer = 'muon'  # Muon on the blocks' matrices, AdamW on embeddings, head and gains (docs/speedrun.md)
muon_lr = 0.05  # Muon's peak learning rate (0.03-0.05 measured flat, 0.08 too high)
learning_rate = 3e-3  # AdamW's peak learning rate (embeddings, head, gains)
max_iters = 2400  # optimizer steps
lr_decay_iters = 2400  # cosine ends at max_iters
min_lr = 1e-4  # the cosine's floor for AdamW (Muon's: min_lr * muon_lr / learning_rate)
beta2 = 0.99  # few tokens per step, so average the second moment over more steps
warmup_iters = 100  # a short warmup

device = 'cpu'  # also on machines with a GPU
compile = False  # compiling takes longer than this whole run saves
