# Evaluate OpenAI's gpt2-xl (48 layers, 25 heads, 1600 wide: 1558M parameters) on OpenWebText, no training.
# python prepare.py openwebtext && python train.py config/eval_gpt2_xl.py

init_from = 'gpt2-xl'  # pretrained weights (downloaded by transformers)
eval_only = True  # evaluate once, then exit
batch_size = 8  # sequences per eval batch
eval_iters = 500  # 500 batches per split for a precise estimate
wandb_log = False  # nothing to follow
