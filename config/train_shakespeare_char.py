# A small character-level GPT on Shakespeare (10.7M parameters): minutes on one GPU.
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char.py
# On a CPU use config/train_shakespeare_char_cpu.py instead.

out_dir = 'out-shakespeare-char'  # where ckpt.pt, config.json and log.jsonl go
eval_interval = 250  # evaluate often: this small dataset overfits
eval_iters = 200  # batches per split and evaluation
log_interval = 10  # a log line every 10 iterations
always_save_checkpoint = False  # keep the checkpoint with the best val loss only

wandb_log = False  # turn on with --wandb_log=True
wandb_project = 'shakespeare-char'  # wandb project name
wandb_run_name = 'mini-gpt'  # wandb run name

dataset = 'shakespeare_char'  # data/shakespeare_char, written by prepare.py
gradient_accumulation_steps = 1  # one micro-batch per step
batch_size = 64  # sequences per step
block_size = 256  # up to 256 previous characters of context

n_layer = 6  # transformer blocks
n_head = 6  # attention heads
n_embd = 384  # embedding width
dropout = 0.2  # the model is big for 1M characters: regularize

learning_rate = 1e-3  # a baby network tolerates a high learning rate
max_iters = 5000  # optimizer steps
lr_decay_iters = 5000  # cosine ends at max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # few tokens per step, so average the second moment over more steps
warmup_iters = 100  # a short warmup
