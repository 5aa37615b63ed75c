# bench.py preset: GPT-2 124M (12 layers, 12 heads, 768 wide, 1024 context)
# $ python bench.py config/bench_gpt2.py --device=cuda
# $ python bench.py config/bench_gpt2.py --mode=generate --hf_compare=True   # CPU: generation only
# On a CPU a training step at batch 12 takes many seconds: add --batch_size=1 --num_iters=2 --repeats=1.
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64, as train.py trains it
gen_vocab_size = 50257  # generation uses the real GPT-2 shape, as pretrained weights have it
bias = True
dropout = 0.0
dataset = 'openwebtext'  # real batches when data/openwebtext/train.bin exists
batch_size = 12  # on a GPU
prompt_len = 16
max_new_tokens = 100
gen_batch_sizes = [1, 8]
