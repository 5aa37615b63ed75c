"""
Numbers about a trained model: perplexity over a whole split, counting accuracy, HellaSwag.

Perplexity of a checkpoint (out_dir/ckpt.pt) or of a Hugging Face GPT-2 (name or local folder)
on any prepared split, every token scored exactly once:
$ python evaluate.py perplexity --out_dir=out-shakespeare-char-cpu      # its own dataset's val split
$ python evaluate.py perplexity --init_from=gpt2 --dataset=wikitext2 --split=test --stride=512

Counting accuracy of a model trained on `python prepare.py counting` (greedy decoding from
start values held out of training):
$ python evaluate.py counting --out_dir=out-counting

HellaSwag accuracy (10,042 validation examples, downloaded once into data/hellaswag/) of a GPT-2
BPE model; GPT-2 124M gets acc_norm ~0.29:
$ python evaluate.py hellaswag --init_from=gpt2
$ python evaluate.py hellaswag --out_dir=out-gpt2 --limit=1000

Without --out_dir, the newest run folder here (one holding ckpt.pt) is used. Knobs are
--key=value flags (or config files), checked like train.py's; `python evaluate.py perplexity
--help` lists them with their defaults.
"""

import json
import math
import os
import sys
from contextlib import nullcontext

import cli  # first: a missing package is one line naming the fix, not a traceback

import numpy as np
import torch
import torch.nn.functional as F

import prepare
import runs
from quantize import QUANTIZE, quantize_model

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
def perplexity(model, tokens, stride=None, batch_size=8, autocast=None, token_bytes=None):
    """Mean cross-entropy (nats per token) and perplexity of model over the 1-D token array, and
    bits per byte when token_bytes (UTF-8 bytes per id) is given: the scored tokens' loss in bits
    over the bytes of their text (<|endoftext|>, 0 bytes, is left out of both).

    Windows of the model's block_size with the given stride (default: half the block), batched
    batch_size at a time. Returns dict(loss, perplexity, bpb, bytes, tokens=number of tokens
    scored, windows, block_size, stride).
    """
    block_size = model.config.block_size
    stride = stride or max(1, block_size // 2)
    plan = window_plan(len(tokens), block_size, stride)
    device = next(model.parameters()).device
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    was_training = model.training
    model.eval()
    total_nll, total_count, text_nll, text_bytes = 0.0, 0, 0.0, 0
    sizes = None if token_bytes is None else torch.tensor(list(token_bytes) + [0] * (model.config.vocab_size -
                                                                                  len(token_bytes)), device=device)
    bar = cli.Progress('perplexity', total=len(plan), unit='windows')
    for i in range(0, len(plan), batch_size):
        chunk = plan[i:i + batch_size]
        x = torch.stack([data[b:b + n] for b, n, _ in chunk])  # (B, T); all windows share T
        y = torch.stack([data[b + 1:b + n + 1] for b, n, _ in chunk])  # (B, T)
        for row, (_, _, skip) in enumerate(chunk):
            y[row, :skip] = -1  # already scored by the previous window: ignored
        x, y = x.to(device), y.to(device)
        with autocast() if autocast else nullcontext():
            logits, _ = model(x, y)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction='none')  # (B*T,)
        total_nll += nats.sum().item()  # ignored targets (already scored) give 0
        total_count += int((y != -1).sum())  # every window scores at least one target (window_plan)
        if sizes is not None:
            size = sizes[y.flatten().clamp(min=0)] * (y.flatten() != -1)
            text_nll += (nats * (size > 0)).sum().item()
            text_bytes += int(size.sum())
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    assert total_count == len(tokens) - 1, f"scored {total_count} tokens, expected {len(tokens) - 1}"
    loss = total_nll / total_count
    bpb = text_nll / math.log(2) / text_bytes if text_bytes else None
    return dict(loss=loss, perplexity=math.exp(loss), bpb=bpb, bytes=text_bytes, tokens=total_count,
                windows=len(plan), block_size=block_size, stride=stride)


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
# hellaswag: which of 4 endings does the model find most likely?

# the original release (Zellers et al. 2019); 10,042 validation examples
HELLASWAG_URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'


def hellaswag_path(input_path=''):
    """--input=FILE as given, else data/hellaswag/hellaswag_val.jsonl, downloaded once."""
    if input_path:
        if not os.path.isfile(input_path):
            cli.die(f"--input={input_path} is not a file; pass a HellaSwag .jsonl file or leave --input "
                       f"empty to download {HELLASWAG_URL}")
        return input_path
    dest = prepare.DATA_DIR / 'hellaswag' / 'hellaswag_val.jsonl'
    try:
        prepare.download(HELLASWAG_URL, dest)
    except prepare.PrepareError as e:
        cli.die(str(e))
    return str(dest)


def read_hellaswag(path, limit=0):
    """[(context, [4 endings], label)] from a HellaSwag .jsonl file (fields ctx, endings, label)."""
    examples = []
    try:
        with open(path, 'rb') as f:
            lines = f.read().splitlines()
    except OSError as e:
        cli.die(f"cannot read --input={path}: {e.strerror or e}")
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line.decode('utf-8'))
            ctx, endings, label = ex['ctx'], list(ex['endings']), int(ex['label'])
        except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
            cli.die(f"{path} line {line_no} is not a HellaSwag example with ctx, endings and label "
                       f"({type(e).__name__}: {str(e)[:60]})")
        if len(endings) != 4 or not 0 <= label < 4:
            cli.die(f"{path} line {line_no}: expected 4 endings and a label 0..3")
        if not all(isinstance(t, str) for t in [ctx, *endings]):
            cli.die(f"{path} line {line_no}: ctx and endings must be strings")
        examples.append((ctx, endings, label))
        if limit and len(examples) >= limit:
            break
    if not examples:
        cli.die(f"{path} holds no examples")
    return examples


def gpt2_tokenizer_or_die(info, data_dir=None):
    """The model's tokenizer, which must be GPT-2 BPE: HellaSwag is text scored as GPT-2 tokens."""
    tokenizer = runs.load_tokenizer_for(info, data_dir)
    if tokenizer.name != 'gpt2':
        cli.die(f"HellaSwag needs a GPT-2 BPE model; this one uses the {tokenizer.name} tokenizer "
                   f"(train on a GPT-2 dataset such as fineweb_edu, openwebtext or shakespeare)")
    return tokenizer


@torch.no_grad()
def hellaswag_counts(model, examples, encode, batch_size=16, autocast=None, label=None):
    """(examples, correct by summed loss, correct by mean loss) over examples.

    Each ending is scored by the model's cross-entropy on the tokens of " " + ending after
    the context tokens; the prediction is the ending with the lowest sum (acc) or the lowest
    mean per token (acc_norm, which does not favour short endings). batch_size examples
    (4 rows each) go through the model at once, right-padded.
    """
    device = next(model.parameters()).device
    block = model.config.block_size
    was_training = model.training
    model.eval()
    n = correct = correct_norm = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        rows = []  # (tokens, number of ending tokens at the end)
        for ctx, endings, _ in chunk:
            ctx_ids = encode(ctx)
            for ending in endings:
                end_ids = encode(' ' + ending)
                rows.append(((ctx_ids + end_ids)[-(block + 1):], len(end_ids)))  # keep the end within the block
        T = max(len(seq) for seq, _ in rows) - 1
        x = torch.zeros((len(rows), T), dtype=torch.long)  # (4B, T); padding is never a target
        y = torch.full((len(rows), T), -1, dtype=torch.long)  # (4B, T); -1: not scored
        for r, (seq, n_end) in enumerate(rows):
            x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            n_end = min(n_end, len(seq) - 1)
            y[r, len(seq) - 1 - n_end:len(seq) - 1] = torch.tensor(seq[-n_end:])
        x, y = x.to(device), y.to(device)
        with autocast() if autocast else nullcontext():
            logits, _ = model(x, y)  # (4B, T, V)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                                 reduction='none').view(y.shape)  # (4B, T)
        total = losses.sum(1).view(-1, 4)  # (B, 4)
        mean = total / (y != -1).sum(1).view(-1, 4)  # (B, 4)
        labels = torch.tensor([ex[2] for ex in chunk], device=device)
        correct += int((total.argmin(1) == labels).sum())
        correct_norm += int((mean.argmin(1) == labels).sum())
        n += len(chunk)
        if label:
            prepare.progress(label, n, len(examples), final=n == len(examples))
    model.train(was_training)
    return n, correct, correct_norm


class HellaSwagDuringTraining:
    """train.py's hellaswag_interval: each rank scores every world_size-th example, the counts
    are summed over ranks. Rank 0 downloads the file (when not given) before the others read it."""

    def __init__(self, meta, input_path, vocab_size, rank=0, world_size=1):
        kind = meta.get('tokenizer') or ('char' if 'chars' in meta or 'itos' in meta else 'gpt2')
        tokenizer = prepare.gpt2_tokenizer() if kind == 'gpt2' else None
        if tokenizer is None or vocab_size < tokenizer.vocab_size:
            cli.die(f"hellaswag_interval needs GPT-2 BPE data; this dataset uses the {kind} "
                       f"tokenizer: set hellaswag_interval=0")
        path = hellaswag_path(input_path) if rank == 0 or input_path else None
        if world_size > 1:
            import torch.distributed as dist
            dist.barrier()  # rank 0 has the file now
        self.examples = read_hellaswag(path or hellaswag_path(input_path))[rank::world_size]
        self.encode, self.world_size = tokenizer.encode, world_size

    def __call__(self, model, dev):
        n, c, cn = hellaswag_counts(model, self.examples, self.encode, autocast=dev.autocast)
        if self.world_size > 1:
            import torch.distributed as dist
            counts = torch.tensor([n, c, cn], dtype=torch.float64, device=dev.device)
            dist.all_reduce(counts)
            n, c, cn = (int(v) for v in counts.tolist())
        return dict(examples=n, acc=c / n, acc_norm=cn / n)


def run_hellaswag(cfg):
    # cheap checks before costly work: a given --input file is read first; a missing run is found
    # before the data set is downloaded; both before the model loads
    examples = read_hellaswag(hellaswag_path(cfg['input']), cfg['limit']) if cfg['input'] else None
    if cfg['init_from'] == 'resume':
        cfg['out_dir'] = runs.find_run_dir(cfg['out_dir'], cfg['_out_dir_given'], what='evaluate')
        cfg['_out_dir_given'] = True
        if not os.path.isfile(os.path.join(cfg['out_dir'], 'ckpt.pt')):
            runs.load_checkpoint(os.path.join(cfg['out_dir'], 'ckpt.pt'))  # its one-line error
    examples = examples or read_hellaswag(hellaswag_path(cfg['input']), cfg['limit'])
    model, info, dev = load_model(cfg)
    tokenizer = gpt2_tokenizer_or_die(info, cfg['data_dir'] or None)
    n, c, cn = hellaswag_counts(model, examples, tokenizer.encode, cfg['batch_size'], dev.autocast,
                                label='hellaswag')
    print(f"hellaswag: {n} examples, acc {c / n:.4f}, acc_norm {cn / n:.4f}")
    return dict(examples=n, acc=c / n, acc_norm=cn / n)


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
        dataset='',  # reads data/<dataset>/<split>.bin; '' = the checkpoint's dataset (wikitext2 for GPT-2)
        data_dir='',  # a folder with <split>.bin instead of data/<dataset>
        split='',  # train, val or test; '' = test where the dataset has one, else val
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
    'hellaswag': dict(
        MODEL_KNOBS,
        input='',  # a HellaSwag .jsonl file; '' downloads hellaswag_val.jsonl into data/hellaswag/
        limit=0,  # score only the first N examples; 0 means all (10,042)
        batch_size=16,  # examples per forward pass (4 rows each)
        data_dir='',  # the run's tokenizer metadata folder; '' means the run's own (or GPT-2 BPE)
    ),
}


def load_model(cfg):
    """(model, info, device setup) for init_from/out_dir: see runs.load_model."""
    if cfg['init_from'] == 'resume':
        cfg['out_dir'] = runs.find_run_dir(cfg['out_dir'], cfg['_out_dir_given'], what='evaluate')
    model, info, dev = runs.load_model_on_device(cfg['init_from'], cfg['out_dir'], cfg['device'], cfg['dtype'])
    print(f"model: {info['source']}")
    quantize_model(model, cfg['quantize'])
    return model, info, dev


def run_perplexity(cfg):
    model, info, dev = load_model(cfg)
    dataset = cfg['dataset'] or info.get('dataset') or 'wikitext2'  # a checkpoint's own data; GPT-2: wikitext2
    if cfg['data_dir']:
        folder = cfg['data_dir']
    elif not cfg['dataset'] and info.get('data_dir'):
        folder = info['data_dir']  # where the checkpoint's dataset was found
    else:
        folder = os.path.join(prepare.DATA_DIR, dataset)
    split = cfg['split'] or ('test' if os.path.isfile(os.path.join(folder, 'test.bin')) else 'val')
    path = os.path.join(folder, f"{split}.bin")
    if not os.path.isfile(path):
        cli.die(f"no {path}: prepare it with `python prepare.py {dataset}` "
                   f"(or point --data_dir at a folder with {split}.bin)")
    try:
        tokens = prepare.open_tokens(path)
    except prepare.PrepareError as e:
        cli.die(str(e))
    if cfg['block_size']:
        if cfg['block_size'] > model.config.block_size:
            cli.die(f"block_size={cfg['block_size']} is longer than the model's {model.config.block_size}")
        model.crop_block_size(cfg['block_size'])
    if len(tokens) and int(tokens.max()) >= model.config.vocab_size:
        cli.die(f"{path} has token id {int(tokens.max())} but the model's vocab_size is "
                   f"{model.config.vocab_size}: this model was not trained with this tokenizer")
    try:
        token_bytes, no_bpb = prepare.token_bytes_of(prepare.read_meta(folder), folder)
    except prepare.PrepareError as e:
        cli.die(str(e))
    try:
        r = perplexity(model, tokens, cfg['stride'] or None, cfg['batch_size'], dev.autocast, token_bytes)
    except ValueError as e:
        cli.die(str(e))
    print(f"{os.path.relpath(path)}: {r['tokens']:,} tokens scored in {r['windows']} windows "
          f"(block_size {r['block_size']}, stride {r['stride']})")
    print(f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f}"
          + (f", bpb {r['bpb']:.4f} ({r['bytes']:,} bytes of text)" if r['bpb'] is not None else f" (bpb: {no_bpb})"))
    print(f"(every token scored once, with at least {r['block_size'] - r['stride']} tokens of context except near "
          f"the start; train.py's val loss averages random windows whose first positions see little context, so "
          f"it reads higher)")
    return r


def run_counting(cfg):
    model, info, _ = load_model(cfg)
    folder = cfg['data_dir'] or info.get('data_dir') or os.path.join(prepare.DATA_DIR, 'counting')
    try:
        meta = prepare.read_meta(folder)
    except prepare.PrepareError as e:
        cli.die(str(e))
    if not meta and not cfg['starts']:  # the held-out starts are in meta.json; guessing could score train starts
        cli.die(f"no counting metadata (meta.json) in {folder}: point --data_dir at the folder "
                   f"`python prepare.py counting` made, or name the starts, e.g. --starts=1,10")
    if meta.get('tokenizer', 'counting') != 'counting':  # numbers are token ids only in counting data
        cli.die(f"counting accuracy needs a model trained on `python prepare.py counting`; {folder} holds "
                   f"{meta['tokenizer']} data (or point --data_dir at the counting data's folder)")
    separator = meta.get('separator', model.config.vocab_size - 1)
    if cfg['starts']:
        starts = parse_starts(cfg['starts'])
    else:
        starts = meta.get('val_starts', [1, 10])
    # a prompt and its continuation must stay below the separator (the largest number + 1)
    span = cfg['prompt_len'] + cfg['max_new_tokens']
    starts = [s for s in starts if 0 <= s and s + span <= separator]
    if not starts:
        cli.die(f"no start value leaves room for {span} numbers below {separator}; use --starts=1,10")
    results, accuracy = counting_accuracy(model, starts, separator, cfg['prompt_len'], cfg['max_new_tokens'])
    for r in results:
        print(f"prompt {r['prompt']} -> {r['generated']} {r['correct']}/{len(r['generated'])} correct")
    print(f"accuracy {accuracy:.1%} ({len(results)} prompts, greedy)")
    return accuracy


COMMANDS = {'perplexity': run_perplexity, 'counting': run_counting, 'hellaswag': run_hellaswag}


# what each knob may be (cli.check_knobs), for the knobs a command has
RULES = dict(batch_size='>= 1', prompt_len='>= 1', max_new_tokens='>= 1', stride='>= 0', block_size='>= 0',
             limit='>= 0', split=('', 'train', 'val', 'test'), quantize=QUANTIZE)


def check_config(command, cfg):
    """Every knob checked before a model or a file is touched."""
    cli.check_knobs(cfg, {k: rule for k, rule in RULES.items() if k in cfg})
    if command == 'perplexity':
        if cfg['stride'] and cfg['block_size'] and cfg['stride'] > cfg['block_size']:
            cli.die(f"stride={cfg['stride']} must be at most block_size={cfg['block_size']}")
    if command == 'counting' and cfg['starts']:
        cfg['starts'] = parse_starts(cfg['starts'])


def parse_starts(text):
    """'1,10' -> [1, 10]; anything else is a one-line error."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, list):  # already parsed by check_config
        return text
    if isinstance(text, tuple):
        text = ','.join(map(str, text))
    try:
        starts = [int(s) for s in str(text).split(',')]
    except ValueError:
        cli.die(f"starts must be comma-separated whole numbers like --starts=1,10, got {text!r}")
    if any(s < 0 for s in starts):
        cli.die(f"starts must be >= 0, got {text!r}")
    return starts


def main(argv):
    if not argv or argv[0] in ('-h', '--help'):
        cli.print_stdout(f"usage: python evaluate.py {{{','.join(COMMANDS)}}} [--key=value ...]\n{__doc__.strip()}")
        if argv:
            for command, defaults in DEFAULTS.items():
                cli.print_stdout('')
                cli.print_help(defaults, __file__, f"python evaluate.py {command} [--key=value ...]")
            return 0
        cli.die(f"name a command: python evaluate.py {{{','.join(COMMANDS)}}} (usage above)")
    if argv[0] not in COMMANDS:
        cli.die(cli.unknown_command(argv[0], COMMANDS, 'evaluate.py'))
    command, rest = argv[0], argv[1:]
    defaults = DEFAULTS[command]
    overrides = cli.load_config(defaults, rest, usage=f"python evaluate.py {command} [--key=value ...]")
    cfg = dict(defaults, **overrides, _out_dir_given='out_dir' in overrides)
    check_config(command, cfg)
    COMMANDS[command](cfg)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
