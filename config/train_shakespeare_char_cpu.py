# The CPU quick start: a small character-level GPT on Shakespeare with the modern recipe (Muon,
# RoPE, QK-norm; docs/speedrun.md), 192 wide with weight decay on Muon's matrices (docs/faster_cpu.md).
# Val loss (fixed seed and batches; 2026-12-05, torch 2.13.0 CPU, 2 threads, bfloat16 picked by
# dtype=auto on an AMD EPYC with AVX512-BF16): 1.7201 at step 500, 1.5639 at 1000, 1.4989 at 1500.
# 1.8M parameters. Wall time on a quiet 2-core VM: 271-281 s, whole process, peak RSS 563 MB,
# where nanoGPT's README CPU recipe took 80 s (3.4x). Without bfloat16 hardware it trains in
# float32, ~1.7x slower per step; --n_embd=128 --muon_weight_decay=0 is the previous recipe (val
# ~1.54 in about the time this one takes with bfloat16).
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_cpu.py

out_dir = 'out-shakespeare-char-cpu'  # where ckpt.pt, config.json and log.jsonl go
eval_interval = 500  # evaluate every 500 steps (each evaluation costs ~1 s)
eval_at_start = False  # no evaluation at step 0 (it would print ~4.19, ln 65)
eval_iters = 20  # 20 batches per split (40,960 characters)
log_interval = 50  # a log line every 50 steps
always_save_checkpoint = False  # keep the checkpoint with the best val loss only

dataset = 'shakespeare_char'  # data/shakespeare_char, written by prepare.py
gradient_accumulation_steps = 1  # one micro-batch per step
batch_size = 8  # sequences per step (2,048 characters, as 16 x 128)
block_size = 256  # 256 characters of context (val -0.03 against 16 x 128, ~5% more time per step)

n_layer = 4  # transformer blocks
n_head = 4  # attention heads
n_embd = 192  # embedding width (128 in float32: val 1.54 in about the time 192 takes in bfloat16; 192 needs bfloat16 hardware to stay within 4x nanoGPT)
dropout = 0.0  # the train/val gap is mostly val being other plays, not overfitting (docs/speedrun.md)
pos_emb = 'rope'  # rotary positions (helped in the ablation, docs/speedrun.md)
qk_norm = True  # RMS-normalised queries and keys (helped in the ablation)

optimizer = 'muon'  # Muon on the blocks' matrices, AdamW on embeddings, head and gains (docs/speedrun.md)
muon_lr = 0.05  # Muon's peak learning rate (0.03-0.05 measured flat, 0.08 too high)
learning_rate = 3e-3  # AdamW's peak learning rate (embeddings, head, gains; 6e-3 was no better here)
max_iters = 1500  # optimizer steps (~3 passes over the 1M training characters)
lr_decay_iters = 1500  # cosine ends at max_iters
min_lr = 1e-4  # the cosine's floor for AdamW (Muon's: min_lr * muon_lr / learning_rate)
beta2 = 0.99  # few tokens per step, so average the second moment over more steps
muon_weight_decay = 0.025  # decoupled decay on the blocks' matrices: val -0.013 (0.05, 0.1: -0.011, -0.008)
warmup_iters = 100  # a short warmup

device = 'cpu'  # also on machines with a GPU
compile = False  # compiling takes longer than this whole run saves
