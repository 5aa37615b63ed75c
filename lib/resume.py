"""
Starting and continuing a training run (train.py's --init_from=resume and auto_resume): which
checkpoint to read (the newest good one), the knobs it records, the checks a run's knobs pass
before anything is built or written (refusing a checkpoint that belongs to another kind of run),
and the training state a checkpoint saves and a resume restores exactly: model, optimizer,
GradScaler and random generators.

    checkpoint, path, recorded = resume.find_resume('out', 'scratch', True, overrides, keys)
    kind = resume.check_run_config(config, RULES, checkpoint, path)   # init_from's kind
"""

import os
import random
import shlex
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from lib import cli, hardware
from lib.cli import ConfigError, die
from lib.lora import check_lora_knobs, lora_state_dict
from lib.loading import init_kind, load_lora_model
from lib.runs import CHECKPOINT_FORMAT, load_checkpoint, logged_evaluation, model_state_dict, older_checkpoints
from model import GPT, GPTConfig


def check_resumable(ckpt, path):
    """One line naming what is wrong with a damaged or foreign checkpoint, before anything is
    built; returns its best_val_loss as a float (nanoGPT saves a 0-d tensor)."""
    args = ckpt.get('model_args')
    missing = [k for k in ('model', 'optimizer', 'iter_num', 'best_val_loss') if k not in ckpt]
    missing += [f"model_args['{k}']" for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')
                if not isinstance(args, dict) or k not in args]
    if missing:
        die(f"{path} lacks {', '.join(missing)}: it is not a complete training checkpoint; "
            f"start over in a new --out_dir (or replace the run: --overwrite=True)")
    try:
        best_val_loss = float(ckpt['best_val_loss'])
    except (TypeError, ValueError, RuntimeError):
        best_val_loss = None
    if not isinstance(ckpt['iter_num'], int) or best_val_loss is None:
        die(f"{path}: iter_num {ckpt['iter_num']!r} and best_val_loss {ckpt['best_val_loss']!r} must be "
            f"numbers; the checkpoint is damaged")
    return best_val_loss


def newest_checkpoint(out_dir, notice=print):
    """(checkpoint, path) of the newest good checkpoint in out_dir: ckpt.pt, else the ckpt-ITER.pt
    files newest first; one that cannot be read or is incomplete is passed over with a notice.
    (None, None) when out_dir holds no checkpoint; one line, never a fresh start, when it holds
    only damaged ones."""
    candidates = [p for p in [Path(out_dir) / 'ckpt.pt'] + older_checkpoints(out_dir) if p.is_file()]
    problems = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path, map_location='cpu')
            check_resumable(ckpt, path)
        except ConfigError as e:
            cli.last_error = None  # passed over, not the error this run stops with
            problems.append(e.message)
            if notice:
                notice(f"notice: passing over {path}: {e.message}")
            continue
        return ckpt, path
    if len(problems) > 1:
        die(f"none of the {len(problems)} checkpoints in {out_dir} can be resumed (the newest: {problems[0]})")
    if problems:
        die(problems[0])
    return None, None


# knobs a resume takes from this invocation, not from the run it continues
NOT_RECORDED = ('init_from', 'out_dir', 'auto_resume', 'overwrite', 'eval_only')


def recorded_knobs(ckpt, keys):
    """The knobs a checkpoint's run was configured with (its 'config'), for the keys this script
    has: a resume continues the run as it was, with config files and flags on top. Values of
    another type (a nanoGPT checkpoint's own knobs) are left out."""
    recorded = ckpt.get('config') if isinstance(ckpt.get('config'), dict) else {}
    return {k: v for k, v in recorded.items() if k in keys and k not in NOT_RECORDED
            and (v is None or isinstance(v, (bool, int, float, str)))}


def find_resume(out_dir, init_from, auto_resume, overrides, keys):
    """(checkpoint, its path, the knobs it records) of the run train.py continues, or (None, None,
    {}) for a fresh start: out_dir's newest good checkpoint when init_from is 'resume' (which
    needs one) or auto_resume is on. Under auto_resume a command for another kind of run is refused."""
    if init_from != 'resume' and not auto_resume:
        return None, None, {}
    checkpoint, path = newest_checkpoint(out_dir, notice=print if os.environ.get('RANK', '0') == '0' else None)
    if checkpoint is None:
        if init_from == 'resume':
            die(f"--init_from=resume but there is no {Path(out_dir) / 'ckpt.pt'}; train first, or point "
                f"--out_dir at the run's folder")
        return None, None, {}
    recorded = recorded_knobs(checkpoint, keys)
    if init_from != 'resume':
        refuse_other_run(recorded, overrides, path)
    return checkpoint, path, recorded


def refuse_other_run(recorded, overrides, path):
    """auto_resume found a run in out_dir: a command that asks for other data, another model or
    another optimizer is not a restart of that run, so it stops with one line instead."""
    shape = ['dataset', 'data_dir', 'optimizer', 'lora_rank'] + [f.name for f in fields(GPTConfig) if f.name != 'dropout']
    for key in shape:
        if key in overrides and key in recorded and overrides[key] != recorded[key]:
            die(f"{path.parent} holds a run with {key}={recorded[key]!r} ({path.name}); this command asks for "
                f"{key}={overrides[key]!r}: use another --out_dir, or --overwrite=True to replace that run")


def check_run_config(config, rules, checkpoint=None, path=None):
    """Every knob of a training run checked together, before anything is built or written:
    each against its rule (cli.check_knobs), the model's (GPTConfig), and the ones that must
    agree with each other or with the run out_dir holds (checkpoint, read from path; None for a
    fresh start). Returns init_from's kind (loading.init_kind)."""
    cli.check_knobs(config, rules)
    cli.model_config(config)  # every GPTConfig field: n_embd divisible by n_head, pos_emb, norm, ...
    if config['hellaswag_input'] and not config['hellaswag_interval']:
        die(f"hellaswag_input={config['hellaswag_input']!r} is set but hellaswag_interval is 0 (off): "
            f"set --hellaswag_interval (e.g. 250) or drop --hellaswag_input")
    kind = init_kind(config['init_from'], scratch=True)
    try:
        check_lora_knobs(config['lora_rank'], config['lora_targets'], config['init_from'], config['optimizer'])
    except ValueError as e:
        die(str(e))
    out_dir = config['out_dir']
    if not out_dir.strip():  # '' would scatter ckpt.pt, config.json and log.jsonl into the working directory
        die("out_dir is empty; name the run's folder, e.g. --out_dir=out-mine")
    if checkpoint is None and not config['overwrite'] and holds_a_run(out_dir):  # never replace a run silently
        die(f"{out_dir} already holds a run ({Path(out_dir) / 'ckpt.pt'}): resume it (--auto_resume=True or "
            f"--init_from=resume), choose another --out_dir, or replace it with --overwrite=True")
    lora, rank = (checkpoint or {}).get('lora'), config['lora_rank']  # what ckpt.pt records
    if lora and rank not in (0, lora['rank']):
        die(f"lora_rank={rank} but {path} has rank {lora['rank']}: resume with its settings")
    if checkpoint is not None and not lora and rank > 0:
        die(f"lora_rank > 0 but {path} is a full-training run: resume it with --lora_rank=0, "
            f"or adapt it in a new out_dir with --init_from={path}")
    return kind


def exit_if_finished(checkpoint, path, config, ddp=False, device='cpu'):
    """A resumed run already at max_iters, with that iteration's evaluation logged, has nothing to
    train: say so and how to train it longer, and exit 0 before anything is written (the loop
    would only repeat the last evaluation; --eval_only=True still evaluates). Called once every
    check of the resume passed, so a bad flag is still an error. A run stopped before or during
    that evaluation is not finished: it evaluates as before. Under DDP the ranks agree and leave
    together."""
    done = checkpoint['iter_num'] if checkpoint is not None else 0
    finished = (checkpoint is not None and not config['eval_only'] and done >= config['max_iters']
                and logged_evaluation(config['out_dir'], done))
    if not hardware.all_ranks_ok(finished, ddp, device):
        return
    if os.environ.get('RANK', '0') == '0':
        longer = f"--out_dir={shlex.quote(config['out_dir'])} --max_iters={2 * done} --lr_decay_iters={2 * done}"
        print(f"{config['out_dir']} holds a finished run: {path} is at iteration {done:,} (max_iters "
              f"{config['max_iters']:,}), so there is nothing to train; to train it longer: python train.py "
              f"{longer}; to evaluate it: --eval_only=True; to start over: --overwrite=True")
    if ddp:
        import torch.distributed as dist
        dist.barrier()  # leave together, as train.py's end does
        hardware.ddp_exit(0)
    sys.exit(0)


def holds_a_run(out_dir):
    """True when out_dir holds a checkpoint (ckpt.pt or an older ckpt-ITER.pt)."""
    return (Path(out_dir) / 'ckpt.pt').is_file() or bool(older_checkpoints(out_dir))


def resume_model(ckpt, path, config, overrides, meta, dataset_dir, dropout, lora_dropout, notice=None):
    """The model of a training checkpoint, to train on: its architecture from model_args (a key
    it lacks, as in nanoGPT's and older checkpoints, is GPT-2's value), dropout from this run.

    The data must fit its vocabulary, and block_size its positions. Model flags the checkpoint
    overrides are named (notice), and config is set to what is really trained, so config.json
    and the next checkpoint record the truth."""
    saved = ckpt['model_args']
    args = {f.name: saved.get(f.name, f.default) for f in fields(GPTConfig) if f.name != 'dropout'}
    ckpt_config = ckpt.get('config') if isinstance(ckpt.get('config'), dict) else {}
    trained_on = ckpt_config.get('data_dir') or ckpt_config.get('dataset') or 'its dataset'
    vocab = meta.get('vocab_size')
    # GPT-2 BPE data (50257 ids) may train a model padded to 50304 (nanoGPT's OpenWebText runs)
    padded = meta.get('tokenizer') == 'gpt2' and vocab <= args['vocab_size'] if vocab else False
    if vocab is not None and vocab != args['vocab_size'] and not padded:
        die(f"{dataset_dir} has vocab_size {vocab} but {path} was trained on vocab_size {args['vocab_size']} "
            f"({trained_on}): resuming would train on another tokenizer's ids; resume with that dataset, "
            f"or start a new --out_dir")
    if config['block_size'] > args['block_size']:
        die(f"block_size={config['block_size']} is longer than the checkpoint's {args['block_size']} "
            f"positions; resume with --block_size={args['block_size']} or less")
    shape = [k for k in args if k not in ('block_size', 'vocab_size')]
    ignored = [f"{k}={overrides[k]!r} (checkpoint: {args[k]!r})" for k in shape if k in overrides and overrides[k] != args[k]]
    if ignored and notice:
        notice(f"notice: resuming keeps the checkpoint's model; ignored: {', '.join(ignored)}")
    config.update({k: args[k] for k in shape if k in config})
    if ckpt.get('lora'):  # adapters only: the frozen base is rebuilt from where the run started
        return load_lora_model(ckpt, path, dropout, merge=False, lora_dropout=lora_dropout)
    try:
        model = GPT(GPTConfig(**args, dropout=dropout))
        model.load_state_dict(model_state_dict(ckpt))
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:  # bad model_args, weights that do not fit
        die(f"{path}: its weights and model_args do not make one GPT ({' '.join(str(e).split())[:200]}); "
            f"the checkpoint is damaged")
    return model


def restore_training_state(ckpt, path, optimizer, scaler, optimizer_name, dev):
    """Put the optimizer's state, the GradScaler's and the random generators' back as saved."""
    saved_optimizer = ckpt.get('config', {}).get('optimizer', 'adamw')
    if saved_optimizer != optimizer_name:
        die(f"{path} was trained with optimizer={saved_optimizer!r}; resume with --optimizer={saved_optimizer}")
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError, TypeError) as e:  # another model's or a damaged optimizer state
        die(f"{path}: the optimizer state does not fit the model ({str(e)[:150]}); the checkpoint is damaged")
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    rng_state = ckpt.get('rng')
    if rng_state is not None:  # nanoGPT checkpoints have none
        random.setstate(rng_state['python'])
        np.random.set_state((rng_state['numpy'][0], np.array(rng_state['numpy'][1], dtype=np.uint32),
                             *rng_state['numpy'][2:]))
        torch.set_rng_state(rng_state['torch'].cpu())
        if rng_state.get('cuda') and dev.device_type == 'cuda':
            torch.cuda.set_rng_state_all([s.cpu() for s in rng_state['cuda']])


def training_state(model, optimizer, scaler, lora, iter_num, best_val_loss, best_val_bpb, tokenizer,
                   config, device_type):
    """The checkpoint of a training run at iter_num: everything an exact resume needs (the
    counterpart of restore_training_state). lora: None, or what a LoRA run adapts (its rank,
    alpha, dropout, targets and base); such a run saves its adapters only."""
    np_state = np.random.get_state()
    return {
        'format': CHECKPOINT_FORMAT,
        'model': lora_state_dict(model) if lora else model.state_dict(),
        'lora': lora,
        'optimizer': optimizer.state_dict(),
        'model_args': model.config.checkpoint_args(),  # nanoGPT's keys, plus the modern knobs that are on
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'best_val_bpb': best_val_bpb,
        'tokenizer': tokenizer,  # rebuilds the tokenizer without the data folder
        'config': config,
        'scaler': scaler.state_dict(),
        'rng': {'python': random.getstate(),
                'numpy': (np_state[0], np_state[1].tolist(), *np_state[2:]),
                'torch': torch.get_rng_state(),
                'cuda': torch.cuda.get_rng_state_all() if device_type == 'cuda' else []},
        # batches and dropout masks are a pure function of (seed, iteration): see lib/batches.py
        'data': {'sampler': 'numpy default_rng([seed, 0, iter_num])', 'seed': config['seed'], 'iter_num': iter_num},
    }
