# The CPU speedrun: nanoGPT's README CPU recipe reaches val 1.8857 in 1-2 minutes on 2 cores;
# this reaches a lower val loss in about a seventh of that time, whole process included (numbers,
# ablations and method: docs/speedrun.md, docs/faster_cpu.md). Muon on the blocks' matrices, a
# 2-layer model with RoPE, QK-norm and a bigram table, a short sequence-length warmup, one
# evaluation at the end.
# python prepare.py shakespeare_char && python train.py config/speedrun_shakespeare_char_cpu.py

out_dir = 'out-speedrun-shakespeare-char-cpu'  # where ckpt.pt, config.json and log.jsonl go
eval_interval = 140  # = max_iters: one evaluation, at the end
eval_at_start = False  # no evaluation before the first step (saves ~4% of the run)
eval_iters = 20  # 20 batches of 32 x 64 characters per split, more tokens than nanoGPT's 20 x 12 x 64
log_interval = 50  # a log line every 50 steps
always_save_checkpoint = False  # keep the checkpoint with the best val loss only

dataset = 'shakespeare_char'  # data/shakespeare_char, written by prepare.py
gradient_accumulation_steps = 1  # one micro-batch per step
batch_size = 32  # sequences per step
block_size = 64  # 64 characters of context, as nanoGPT's CPU recipe

n_layer = 2  # half of the recipe's 4 blocks: twice the steps per second, and 1.88 is within reach
n_head = 4  # attention heads
n_embd = 128  # embedding width
dropout = 0.0  # too few steps to overfit
pos_emb = 'rope'  # rotary positions: val -0.028 at step 250 over learned positions (docs/speedrun.md)
qk_norm = True  # RMS-normalised queries and keys: another -0.048 at step 250
bigram_vocab = 8192  # a hashed (previous, current) character-pair table: 1.88 at step 140, not 200 (docs/faster_cpu.md)
# mlp_act='relu2', norm='rmsnorm', tie_embeddings=False and logit_softcap=15 measured neutral to
# harmful at this size (docs/speedrun.md, ablation): they stay at GPT-2's values

optimizer = 'muon'  # Muon on the blocks' matrices, AdamW on embeddings, head and gains
muon_lr = 0.05  # Muon's peak learning rate
learning_rate = 3e-3  # AdamW's peak learning rate (embeddings, head)
max_iters = 140  # optimizer steps (220 before the bigram table and the warmup: docs/faster_cpu.md)
lr_decay_iters = 140  # cosine ends at max_iters
min_lr = 1e-4  # the cosine's floor for AdamW (Muon's: min_lr * muon_lr / learning_rate)
warmup_iters = 25  # a short warmup
beta2 = 0.99  # few tokens per step, so average the second moment over more steps
embedding_lr = 1e-2  # AdamW's lr for the token and bigram tables: -0.013 at step 220
scalar_lr = 1e-2  # and for the gains and biases
seq_warmup = 28  # the first 28 steps on 16..56 characters: the same loss, less time (ablation: 20 s vs 21-25 s to 1.88)

device = 'cpu'  # also on machines with a GPU: the comparison is on CPU
compile = False  # compiling takes longer than this whole run
