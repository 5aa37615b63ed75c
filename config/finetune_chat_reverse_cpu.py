# Fine-tune the CPU quick start's Shakespeare model (config/train_shakespeare_char_cpu.py) to chat:
# it answers "reverse: wodnik" with "kindow", a task with exact answers (docs/chat.md). The loss
# counts the replies only; the chat tokens grow the base's vocabulary from 65 to 69 ids.
# python prepare.py chat_reverse --base=out-shakespeare-char-cpu
# python train.py config/finetune_chat_reverse_cpu.py
# python evaluate.py chat --out_dir=out-chat-reverse
# Measured on 2 cores (Intel Xeon, no bfloat16 hardware): the base scores 0 of 200 held-out words,
# this recipe 200 of 200 after 71-73 s of training (three seeds; dev/LOG.md).

out_dir = 'out-chat-reverse'  # where ckpt.pt, config.json and log.jsonl go
init_from = 'out-shakespeare-char-cpu/ckpt.pt'  # the quick start's run: its weights, a fresh run
eval_interval = 100  # evaluate every 100 steps
eval_at_start = False  # the base's loss on replies is not needed
eval_iters = 10  # 10 batches per split
log_interval = 25  # a log line every 25 steps
always_save_checkpoint = True  # the last checkpoint: val loss on replies keeps falling

dataset = 'chat_reverse'  # data/chat_reverse, written by prepare.py chat_reverse --base=...
gradient_accumulation_steps = 1  # one micro-batch per step
batch_size = 8  # sequences per step: ~85 conversations of ~24 tokens
block_size = 256  # the base's context, kept for chats of several turns

dropout = 0.0  # no dropout: the model's shape and knobs come from the base's checkpoint

optimizer = 'muon'  # as the base was trained
muon_lr = 0.02  # Muon's peak learning rate
learning_rate = 1e-3  # AdamW's peak learning rate (embeddings, head, gains)
max_iters = 300  # optimizer steps
lr_decay_iters = 300  # cosine ends at max_iters
min_lr = 1e-4  # the cosine's floor
warmup_iters = 30  # a short warmup
beta2 = 0.99  # few tokens per step

device = 'cpu'  # also on machines with a GPU
compile = False  # compiling takes longer than the run saves
