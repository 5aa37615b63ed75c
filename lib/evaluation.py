"""
Numbers about a model that evaluate.py prints and train.py logs: perplexity over a whole token
stream (sliding windows, every token scored once, bits per byte), counting accuracy, and
HellaSwag (which of 4 endings the model finds likeliest; also during training, over ranks), and
train.py's evaluation: the loss and bits per byte on fixed batches of each split.
"""

import io
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from lib import cli, loading
from lib.download import download, progress
from lib.tokenfiles import DATA_DIR, PrepareError
from lib.tokenizers import gpt2_tokenizer

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
    dest = DATA_DIR / 'hellaswag' / 'hellaswag_val.jsonl'
    try:
        download(HELLASWAG_URL, dest)
    except PrepareError as e:
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
    tokenizer = loading.load_tokenizer_for(info, data_dir)
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
            progress(label, n, len(examples), final=n == len(examples))
    model.train(was_training)
    return n, correct, correct_norm


class HellaSwagDuringTraining:
    """train.py's hellaswag_interval: each rank scores every world_size-th example, the counts
    are summed over ranks. Rank 0 downloads the file (when not given) before the others read it."""

    def __init__(self, meta, input_path, vocab_size, rank=0, world_size=1):
        kind = meta.get('tokenizer') or ('char' if 'chars' in meta or 'itos' in meta else 'gpt2')
        tokenizer = gpt2_tokenizer() if kind == 'gpt2' else None
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


# -----------------------------------------------------------------------------
# train.py's evaluation: the loss on fixed batches of each split, and bits per byte

def bytes_per_token(token_bytes, vocab_size, device):
    """(vocab_size,) float64 table of the UTF-8 bytes each token id stands for (ids a padded
    vocabulary adds have none), on device; None without token_bytes (no bits per byte)."""
    if token_bytes is None:
        return None
    table = torch.zeros(vocab_size, dtype=torch.float64, device=device)
    table[:len(token_bytes)] = torch.tensor(token_bytes, dtype=torch.float64)
    return table


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, dev, bytes_table=None, stop=None, quiet=False):
    """Mean loss per target over the fixed eval batches of each split (batches.eval_offsets), and
    bits per byte (the targets' total loss in bits over their UTF-8 bytes; <|endoftext|> has none
    and is left out of both): {'train', 'val', 'train_bpb', 'val_bpb'}, the bpb None without a
    bytes_table. Targets are the ones batches.get does not mark -1: on chat data, the assistant's
    tokens only, so each batch counts by its number of them (a batch without one adds nothing).

    Under torchrun (dist initialized) the ranks share the batches, then all-reduce. None when
    stop.requested() (checked before every batch) says a stop was asked for meanwhile: a long
    evaluation must not delay Ctrl-C/SIGTERM."""
    import torch.distributed as dist
    ddp = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    model.eval()
    losses = {}
    # silent unless it takes more than a few seconds (the first evaluation of a big model)
    bar = cli.Progress('evaluating', total=2 * len(range(rank, eval_iters, world_size)), unit='batches',
                       stream=io.StringIO() if quiet else None, keep=False)
    for split in ('train', 'val'):
        total = torch.zeros(4, device=dev.device, dtype=torch.float64)  # nats, targets, nats of text, bytes
        for j in range(-(-eval_iters // world_size)):  # every rank checks as often, even with no batch left
            if stop is not None and stop.requested():
                model.train()
                return None
            k = rank + j * world_size
            if k >= eval_iters:
                continue
            x, y = batches.get(split, batches.eval_offsets[split][k])
            with dev.autocast():
                logits, loss = model(x, y)
            targets = (y != -1).sum()  # all of B*T but on chat data
            total[:2] += torch.stack([torch.where(targets > 0, loss.double(), 0.0) * targets, targets])
            if bytes_table is not None:
                nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1,
                                       reduction='none')  # (B*T,), 0 where ignored
                size = bytes_table[y.flatten().clamp(min=0)] * (y.flatten() != -1)  # (B*T,)
                total[2:] += torch.stack([(nats * (size > 0)).sum(), size.sum()])
            bar.update()
        if ddp:
            dist.all_reduce(total)
        losses[split] = total[0].item() / total[1].item() if total[1] else float('nan')
        losses[f'{split}_bpb'] = (total[2].item() / math.log(2) / total[3].item()
                                  if bytes_table is not None else None)
    bar.close()
    model.train()
    return losses
