# LoRA fine-tuning of GPT-2 (124M) on Shakespeare: the base stays frozen, only low-rank adapters
# train, so gradients and AdamW state shrink from ~1.5 GB to a few MB (numbers: docs/lora_int8.md).
# python prepare.py shakespeare && python train.py config/finetune_shakespeare_lora.py
# Then: python sample.py --out_dir=out-shakespeare-lora  (loads GPT-2 plus the adapters, merged)
# Any base: --init_from=path/to/hf_folder or --init_from=out-other-run/ckpt.pt

out_dir = 'out-shakespeare-lora'  # ckpt.pt holds the adapters and the name of the base
eval_interval = 5  # evaluate every 5 steps: the run is short
eval_iters = 40  # batches per split and evaluation
log_interval = 1  # a log line every step
always_save_checkpoint = False  # keep the checkpoint with the best val loss only

dataset = 'shakespeare'  # data/shakespeare (GPT-2 tokens), written by prepare.py
init_from = 'gpt2'  # the base model the adapters adapt
dropout = 0.0  # the frozen base runs without dropout; the adapters have their own

lora_rank = 8  # adapter rank: 8 x (in + out) parameters per adapted matrix
lora_alpha = 16.0  # scale alpha / rank = 2
lora_dropout = 0.05  # dropout on the adapters' input
lora_targets = 'c_attn,c_proj,c_fc,mlp.c_proj'  # every Linear of every block (QLoRA, arXiv:2305.14314, found this best)

# tokens per step as in finetune_shakespeare.py: 1 sequence * 1024 tokens * 32 micro-batches
batch_size = 1  # sequences per micro-batch
gradient_accumulation_steps = 32  # micro-batches per step
max_iters = 20  # about two epochs

learning_rate = 1e-3  # adapters start at zero and need a larger step than full fine-tuning's 3e-5
decay_lr = False  # constant learning rate
weight_decay = 0.0  # no pull of the adapters towards zero
