# Evaluate OpenAI's gpt2-medium (24 layers, 16 heads, 1024 wide: 350M parameters) on OpenWebText, no training.
# python prepare.py openwebtext && python train.py config/eval_gpt2_medium.py

init_from = 'gpt2-medium'  # pretrained weights (downloaded by transformers)
eval_only = True  # evaluate once, then exit
batch_size = 8  # sequences per eval batch
eval_iters = 500  # 500 batches per split for a precise estimate
wandb_log = False  # nothing to follow
