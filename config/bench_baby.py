# bench.py preset: the Shakespeare-char "baby GPT" of config/train_shakespeare_char.py
# $ python bench.py config/bench_baby.py [--nanogpt_dir=/path/to/nanoGPT]
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
vocab_size = 65  # the 65 characters of Tiny Shakespeare
bias = False
dropout = 0.2  # as in training, so the step does the same work
dataset = 'shakespeare_char'  # real batches once `python prepare.py shakespeare_char` has run
batch_size = 12
prompt_len = 1  # sample.py starts from a single newline
max_new_tokens = 500  # sample.py's default
gen_batch_sizes = [1, 8]
