# LoRA fine-tuning of GPT-2 (124M) on Shakespeare: the base stays frozen, only low-rank adapters
# train, so gradients and AdamW state shrink from ~1.5 GB to a few MB (numbers: docs/lora_int8.md).
# python prepare.py shakespeare && python train.py config/finetune_shakespeare_lora.py
# Then: python sample.py --out_dir=out-shakespeare-lora  (loads GPT-2 plus the adapters, merged)
# Any base: --init_from=path/to/hf_folder or --init_from=out-other-run/ckpt.pt
#
# CPU demo without GPT-2 weights (docs/lora_int8.md has the full recipe): a 4-layer, 128-wide GPT-2-shaped
# base (7.2M params) trained ~9 min on WikiText-2 text, exported with lib.export.save_hf to /tmp/lora2/base_hf, then
# (data: python prepare.py shakespeare) python train.py config/finetune_shakespeare_lora.py --init_from=/tmp/lora2/base_hf --device=cpu --block_size=128 \
#   --batch_size=8 --gradient_accumulation_steps=1 --max_iters=30 --eval_interval=15 --eval_iters=10 --learning_rate=3e-3
# Measured (2 shared CPU cores, load ~6-8, times noisy): val loss 10.26 -> 8.32 after 30 steps
# (65,536 trainable params, 0.75 MiB of grads + AdamW state, peak RSS 1.33 GB, 7:45 wall); a full fine-tune with the
# same steps (finetune_shakespeare.py, --learning_rate=3e-4): 10.26 -> 7.66 (7.24M trainable, 83 MiB, 1.47 GB, 7:44).

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
