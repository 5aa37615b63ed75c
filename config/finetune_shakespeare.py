# Fine-tune the pretrained GPT-2 (124M) on Shakespeare with the GPT-2 tokenizer.
# python prepare.py shakespeare && python train.py config/finetune_shakespeare.py
# Bigger models: --init_from=gpt2-medium, gpt2-large or gpt2-xl (needs a large GPU).

out_dir = 'out-shakespeare'  # where ckpt.pt, config.json and log.jsonl go
eval_interval = 5  # evaluate every 5 steps: the run is short
eval_iters = 40  # batches per split and evaluation
log_interval = 1  # a log line every step
always_save_checkpoint = False  # keep the checkpoint with the best val loss only

wandb_log = False  # turn on with --wandb_log=True
wandb_project = 'shakespeare'  # wandb project name
wandb_run_name = 'ft-gpt2'  # wandb run name

dataset = 'shakespeare'  # data/shakespeare (GPT-2 tokens), written by prepare.py
init_from = 'gpt2'  # start from OpenAI's GPT-2 weights (downloaded by transformers)
dropout = 0.1  # a little regularization for fine-tuning

# tokens per step: 1 sequence * 1024 tokens * 32 micro-batches = 32,768;
# shakespeare has ~300k GPT-2 tokens, so an epoch is ~9 steps
batch_size = 1  # sequences per micro-batch
gradient_accumulation_steps = 32  # micro-batches per step
max_iters = 20  # about two epochs

learning_rate = 3e-5  # small and constant: nudge the pretrained weights
decay_lr = False  # constant learning rate
