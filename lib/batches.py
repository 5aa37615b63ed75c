"""
The batches a training run reads from its uint16 token files: which sequences every process
trains on at each iteration, the fixed evaluation batches, and the batch and sequence warmups.

Each iteration's batches come from a generator seeded by (seed, iteration) alone: a resumed run
draws exactly the batches the uninterrupted run would have drawn, and the batches do not depend
on the number of processes (each process takes its own rows of the same plan).

Chat data (lib/chat.py) has a loss mask beside each split: a target the mask marks 0 (a marker,
the user's or the system's words) becomes -1, which the model's loss ignores, so the loss counts
the assistant's tokens only. Rows are windows of the token stream, as for text.

    batches = Batches('data/shakespeare_char', 'shakespeare_char', dev, seed=1337, batch_size=12,
                      block_size=256, accumulation=4, batch_warmup=0, seq_warmup=0, eval_iters=200)
    offsets, dropout_seeds = batches.plan(iter_num)            # this process's micro-batches
    x, y = batches.get('train', offsets[0], batches.shape(iter_num)[1])
"""

import math
import os

import numpy as np
import torch

from lib.cli import ConfigError, die
from lib.tokenfiles import MASK_DTYPE, PrepareError, check_dataset, mask_path

# datasets that take a GPU: on a CPU, a missing one is answered with the CPU quick start
GPU_SIZED = ('openwebtext', 'fineweb_edu', 'fineweb10B_gpt2')


def ramp(full, it, steps):
    """full, or during the first `steps` iterations 2/8, 3/8, ... 7/8 of it (few shapes: few recompiles)."""
    return full if it >= steps else max(1, full * (2 + 6 * it // steps) // 8)


class Batches:
    """The training and evaluation batches of one process (rank of world_size) of a run.
    accumulation is the global count of micro-batches per iteration: it must divide evenly
    over the processes, each running accum_steps of them."""

    def __init__(self, folder, dataset, dev, *, seed, batch_size, block_size, accumulation,
                 batch_warmup, seq_warmup, eval_iters, rank=0, world_size=1):
        if accumulation % world_size != 0:
            die(f"gradient_accumulation_steps={accumulation} is the global count and must divide evenly "
                f"over {world_size} processes; use a multiple of {world_size}")
        self.folder, self.dev, self.seed, self.rank = folder, dev, seed, rank
        self.batch_size, self.block_size, self.accumulation = batch_size, block_size, accumulation
        self.batch_warmup, self.seq_warmup = batch_warmup, seq_warmup
        self.accum_steps = accumulation // world_size  # micro-steps per process per iteration
        self.paths = {split: os.path.join(folder, f'{split}.bin') for split in ('train', 'val')}
        if dev.device_type == 'cpu' and dataset in GPU_SIZED and not os.path.isfile(self.paths['train']):
            die(f"no {self.paths['train']}: {dataset} takes GPUs (billions of tokens); on this CPU start "
                f"with the quick start: `python prepare.py shakespeare_char`, then `python train.py "
                f"config/train_shakespeare_char_cpu.py` (on a GPU: `python prepare.py {dataset}`)")
        try:  # sizes, metadata and token ids checked now; files over 256 MiB are checked batch by batch
            self.sizes, self.meta, self.check_per_batch = check_dataset(folder, self.paths, block_size, dataset)
        except PrepareError as e:
            die(str(e))
        # chat data: the loss masks, and the share of the training tokens that are targets
        self.masks = {s: mask_path(p) for s, p in self.paths.items() if os.path.isfile(mask_path(p))} or None
        self.mask_share = None if self.masks is None else float(
            np.memmap(self.masks['train'], dtype=MASK_DTYPE, mode='r').mean(dtype=np.float64))
        self.tokens_per_iter = accumulation * batch_size * block_size  # once the warmups are over
        self.warmup_tokens = [0]  # tokens of iterations [0, i) while a warmup lasts
        for it in range(max(batch_warmup, seq_warmup)):
            self.warmup_tokens.append(self.warmup_tokens[-1] + accumulation * math.prod(self.shape(it)))
        # a fixed evaluation set per split, so that losses at different iterations are comparable
        self.eval_offsets = {split: np.random.default_rng([seed, 1, i]).integers(
                                 0, self.sizes[split] - block_size, size=(eval_iters, batch_size))
                             for i, split in enumerate(('train', 'val'))}

    def shape(self, it):
        """(sequences per micro-batch, tokens per sequence) at iteration it (batch_warmup, seq_warmup)."""
        return ramp(self.batch_size, it, self.batch_warmup), ramp(self.block_size, it, self.seq_warmup)

    def tokens_through(self, it):
        """Tokens trained on in iterations [0, it), all processes together."""
        ramped = min(it, len(self.warmup_tokens) - 1)
        return self.warmup_tokens[ramped] + (it - ramped) * self.tokens_per_iter

    def plan(self, it):
        """Sequence offsets (G, B) and dropout seeds (G,) of this process's G micro-steps of iteration it."""
        rng = np.random.default_rng([self.seed, 0, it])
        offsets = rng.integers(0, self.sizes['train'] - self.block_size, size=(self.accumulation, self.batch_size))
        dropout_seeds = rng.integers(0, 2**62, size=self.accumulation)
        first = self.rank * self.accum_steps
        B = self.shape(it)[0]  # a batch warmup takes the first B rows: the same draws either way
        return offsets[first:first + self.accum_steps, :B], dropout_seeds[first:first + self.accum_steps]

    def get(self, split, offsets, T=None):
        """Inputs and targets (B, T) on the device for the sequences starting at offsets (B,); with
        a loss mask, the targets it marks 0 are -1 (ignored by the loss)."""
        T = T or self.block_size
        # a fresh memmap per batch keeps the process's memory flat on huge files
        data = np.memmap(self.paths[split], dtype=np.uint16, mode='r')
        tokens = data[offsets[:, None] + np.arange(T + 1)]  # (B, T+1)
        vocab_size = self.meta.get('vocab_size')
        if split in self.check_per_batch and tokens.max() >= vocab_size:
            raise ConfigError(f"{self.paths[split]} holds token id {int(tokens.max())} >= the vocab_size "
                              f"{vocab_size} of {self.folder}/meta.json: the file is corrupt or from "
                              f"another tokenizer; prepare the dataset again", this_rank_only=True)
        x = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1], dtype=np.int64))
        y = torch.from_numpy(np.ascontiguousarray(tokens[:, 1:], dtype=np.int64))
        if self.masks is not None:
            mask = np.memmap(self.masks[split], dtype=MASK_DTYPE, mode='r')
            y[torch.from_numpy(mask[offsets[:, None] + np.arange(1, T + 1)] == 0)] = -1  # (B, T)
        if self.dev.device_type == 'cuda':
            # pinned memory lets the copy run asynchronously while the GPU is busy
            return (x.pin_memory().to(self.dev.device, non_blocking=True),
                    y.pin_memory().to(self.dev.device, non_blocking=True))
        return x.to(self.dev.device), y.to(self.dev.device)
