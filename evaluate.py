"""
Numbers about a trained model: perplexity over a whole split, and counting accuracy.

Perplexity of a checkpoint (out_dir/ckpt.pt) or of a Hugging Face GPT-2 (name or local folder)
on any prepared split, every token scored exactly once:
$ python evaluate.py perplexity --out_dir=out-shakespeare --dataset=shakespeare --split=val
$ python evaluate.py perplexity --init_from=gpt2 --dataset=wikitext2 --split=test --stride=512

Counting accuracy of a model trained on `python prepare.py counting` (greedy decoding from
start values held out of training):
$ python evaluate.py counting --out_dir=out-counting

Knobs are --key=value flags (or config files), checked like train.py's; `python evaluate.py
perplexity --help` lists them with their defaults.
"""

import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch

import common
import prepare

# -----------------------------------------------------------------------------
# perplexity: sliding windows over one long token stream


def window_plan(n_tokens, block_size, stride):
    """Windows that score every target position 1..n_tokens-1 exactly once.

    Returns a list of (begin, length, skip): the window's inputs are tokens[begin:begin+length],
    its targets tokens[begin+1:begin+length+1], and it scores all but its first `skip` targets.
    Windows start at 0, stride, 2*stride, ...; each scores only the targets the previous one did
    not reach, so every scored token has at least block_size - stride tokens of context (except
    at the start). All windows are block_size long, so they batch without padding: the last one
    is moved back to end exactly at the last token. A stream shorter than block_size + 1 is one
    window of n_tokens - 1 inputs.
    """
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n_tokens}")
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    n_targets = n_tokens - 1
    if n_targets <= block_size:
        return [(0, n_targets, 0)]
    plan, scored_to = [], 0  # scored_to: targets 1..scored_to are done
    begin = 0
    while scored_to < n_targets:
        begin = min(begin, n_targets - block_size)  # the last window ends at the last target
        end = begin + block_size  # this window's last target position
        plan.append((begin, block_size, scored_to - begin))
        scored_to = end
        begin += stride
    return plan


@torch.no_grad()
def perplexity(model, tokens, stride=None, batch_size=8, autocast=None):
    """Mean cross-entropy (nats per token) and perplexity of model over the 1-D token array.

    Windows of the model's block_size with the given stride (default: half the block), batched
    batch_size at a time. Returns dict(loss, perplexity, tokens=number of tokens scored,
    windows, block_size, stride).
    """
    block_size = model.config.block_size
    stride = stride or max(1, block_size // 2)
    plan = window_plan(len(tokens), block_size, stride)
    device = next(model.parameters()).device
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    was_training = model.training
    model.eval()
    total_nll, total_count = 0.0, 0
    for i in range(0, len(plan), batch_size):
        chunk = plan[i:i + batch_size]
        x = torch.stack([data[b:b + n] for b, n, _ in chunk])  # (B, T); all windows share T
        y = torch.stack([data[b + 1:b + n + 1] for b, n, _ in chunk])  # (B, T)
        for row, (_, _, skip) in enumerate(chunk):
            y[row, :skip] = -1  # already scored by the previous window: ignored
        x, y = x.to(device), y.to(device)
        with autocast() if autocast else nullcontext():
            _, loss = model(x, y)  # mean cross-entropy over the targets that are not -1
        count = int((y != -1).sum())  # every window scores at least one target (window_plan)
        total_nll += loss.item() * count
        total_count += count
    model.train(was_training)
    assert total_count == len(tokens) - 1, f"scored {total_count} tokens, expected {len(tokens) - 1}"
    loss = total_nll / total_count
    return dict(loss=loss, perplexity=math.exp(loss), tokens=total_count, windows=len(plan),
                block_size=block_size, stride=stride)


# -----------------------------------------------------------------------------
# counting: does the model continue "x x+1 x+2" correctly?


@torch.no_grad()
def counting_accuracy(model, starts, separator, prompt_len=3, max_new_tokens=5):
    """Greedy continuation of the prompts [s, s+1, ..., s+prompt_len-1] for each start s.

    Each prompt is preceded by the separator token, as every sequence is in the training data.
    Generated token i is correct when it equals prompt[-1] + 1 + i, so one slip does not let
    the tokens after it count as correct. Returns (results, accuracy) with results a list of
    dict(prompt, generated, correct).
    """
    device = next(model.parameters()).device
    results = []
    for s in starts:
        prompt = list(range(s, s + prompt_len))
        idx = torch.tensor([[separator] + prompt], dtype=torch.long, device=device)  # (1, 1+prompt_len)
        out = model.generate(idx, max_new_tokens, temperature=0.0)
        generated = out[0, idx.size(1):].tolist()
        correct = sum(g == prompt[-1] + 1 + i for i, g in enumerate(generated))
        results.append(dict(prompt=prompt, generated=generated, correct=correct))
    total = sum(r['correct'] for r in results)
    return results, total / (len(results) * max_new_tokens)


# -----------------------------------------------------------------------------
# command line

MODEL_KNOBS = dict(
    out_dir='out',  # the run folder holding ckpt.pt (init_from='resume')
    init_from='resume',  # 'resume' (out_dir/ckpt.pt), 'gpt2'..'gpt2-xl', or a local Hugging Face folder
    device='auto',  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype='auto',  # 'auto', 'float32', 'bfloat16' or 'float16'
    quantize='none',  # 'none' or 'int8' (int8 weights, float activations)
)
DEFAULTS = {
    'perplexity': dict(
        MODEL_KNOBS,
        dataset='wikitext2',  # reads data/<dataset>/<split>.bin
        data_dir='',  # a folder with <split>.bin instead of data/<dataset>
        split='test',  # train, val or test
        stride=0,  # tokens between window starts; 0 means block_size // 2
        block_size=0,  # window length; 0 means the model's block_size (a smaller one crops the model)
        batch_size=8,  # windows per forward pass
    ),
    'counting': dict(
        MODEL_KNOBS,
        data_dir='',  # the counting data's folder (meta.json: separator, held-out starts); '' means the run's
        starts='',  # comma-separated start values, e.g. '1,10'; '' means the held-out val starts
        prompt_len=3,  # numbers in each prompt
        max_new_tokens=5,  # numbers generated and checked per prompt
    ),
}


def load_model(cfg):
    """(model, info, device setup) for init_from/out_dir: see common.load_model."""
    dev = common.setup_device(cfg['device'], cfg['dtype'])
    model, info = common.load_model(cfg['init_from'], cfg['out_dir'], dev.device)
    print(f"model: {info['source']}")
    common.quantize_model(model, cfg['quantize'])
    return model, info, dev


def run_perplexity(cfg):
    folder = cfg['data_dir'] or os.path.join(prepare.DATA_DIR, cfg['dataset'])
    path = os.path.join(folder, f"{cfg['split']}.bin")
    if not os.path.isfile(path):
        common.die(f"no {path}: prepare it with `python prepare.py {cfg['dataset']}` "
                   f"(or point --data_dir at a folder with {cfg['split']}.bin)")
    tokens = np.memmap(path, dtype=np.uint16, mode='r')
    model, _, dev = load_model(cfg)
    if cfg['block_size']:
        if cfg['block_size'] > model.config.block_size:
            common.die(f"block_size={cfg['block_size']} is longer than the model's {model.config.block_size}")
        model.crop_block_size(cfg['block_size'])
    if len(tokens) and int(tokens.max()) >= model.config.vocab_size:
        common.die(f"{path} has token id {int(tokens.max())} but the model's vocab_size is "
                   f"{model.config.vocab_size}: this model was not trained with this tokenizer")
    try:
        r = perplexity(model, tokens, cfg['stride'] or None, cfg['batch_size'], dev.autocast)
    except ValueError as e:
        common.die(str(e))
    print(f"{os.path.relpath(path)}: {r['tokens']:,} tokens scored in {r['windows']} windows "
          f"(block_size {r['block_size']}, stride {r['stride']})")
    print(f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f}")
    return r


def run_counting(cfg):
    model, info, _ = load_model(cfg)
    folder = cfg['data_dir'] or info.get('data_dir') or os.path.join(prepare.DATA_DIR, 'counting')
    meta = prepare.read_meta(folder)
    separator = meta.get('separator', model.config.vocab_size - 1)
    if cfg['starts']:
        starts = [int(s) for s in str(cfg['starts']).split(',')]
    else:
        starts = meta.get('val_starts', [1, 10])
    # a prompt and its continuation must stay below the separator (the largest number + 1)
    span = cfg['prompt_len'] + cfg['max_new_tokens']
    starts = [s for s in starts if 0 <= s and s + span <= separator]
    if not starts:
        common.die(f"no start value leaves room for {span} numbers below {separator}; use --starts=1,10")
    results, accuracy = counting_accuracy(model, starts, separator, cfg['prompt_len'], cfg['max_new_tokens'])
    for r in results:
        print(f"prompt {r['prompt']} -> {r['generated']} {r['correct']}/{len(r['generated'])} correct")
    print(f"accuracy {accuracy:.1%} ({len(results)} prompts, greedy)")
    return accuracy


COMMANDS = {'perplexity': run_perplexity, 'counting': run_counting}


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    command, rest = argv[0], argv[1:]
    defaults = DEFAULTS[command]
    if '--help' in rest or '-h' in rest:
        for key, value in defaults.items():
            print(f"--{key}={value!r}")
        return 0
    cfg = dict(defaults, **common.load_config(defaults, rest))
    COMMANDS[command](cfg)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
