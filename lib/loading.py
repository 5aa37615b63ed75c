"""
A trained or pretrained model loaded back, with its tokenizer: what init_from names (the one place
that reads it), a run's ckpt.pt (ours or nanoGPT's, LoRA adapters merged onto their base) or GPT-2
weights turned into a GPT, fitted to a dataset, placed on a device; the tokenizer it was trained
with. sample.py, evaluate.py, plot.py, serve.py, export.py and train.py load through here.

    model, info = loading.load_model('resume', 'out', 'cpu')  # train.py's or nanoGPT's ckpt.pt, or 'gpt2'
    tokenizer = loading.load_tokenizer_for(info)
"""

import os
from dataclasses import fields
from pathlib import Path

import torch

from lib import hardware
from lib.cli import ConfigError, die
from lib.runs import load_checkpoint, model_state_dict
from model import GPT, PRETRAINED, GPTConfig



def init_kind(init_from, scratch=False):
    """What init_from names, the one place that reads it: 'scratch' (a new model; only where
    scratch=True, i.e. train.py), 'resume' (out_dir's checkpoint), 'pretrained' (a GPT-2 name or a
    local Hugging Face folder) or 'checkpoint' (another run's ckpt.pt); else a one-line error."""
    if init_from == 'scratch' and scratch:
        return 'scratch'
    if init_from == 'resume':
        return 'resume'
    if init_from in PRETRAINED or os.path.isdir(init_from):
        return 'pretrained'
    if os.path.basename(init_from) == 'ckpt.pt' and os.path.isfile(init_from):
        return 'checkpoint'
    looks_like_a_path = os.sep in init_from or init_from.endswith('.pt')
    missing = " (no such file or folder)" if looks_like_a_path and not os.path.exists(init_from) else ""
    raise ConfigError(f"init_from={init_from!r} not understood{missing}: use {'scratch, ' if scratch else ''}"
                      f"resume, {', '.join(PRETRAINED)}, the path of a local Hugging Face model folder "
                      f"or of a run's ckpt.pt")


def load_model(init_from, out_dir, device='cpu', dropout=None):
    """(model, info) for init_from 'resume' (out_dir/ckpt.pt from train.py or nanoGPT's train.py),
    another run's ckpt.pt, 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', or a local Hugging
    Face model folder (see init_kind).

    The model is on device, in eval mode. dropout=None keeps the checkpoint's value (HF: 0).
    info: source (a description), dataset (name or None), data_dir (folder with meta.json or
    meta.pkl, or None: GPT-2 BPE), vocab_size, iter_num and best_val_loss (checkpoints only).
    """
    kind = init_kind(init_from)
    if kind in ('resume', 'checkpoint'):
        path = Path(out_dir) / 'ckpt.pt' if kind == 'resume' else Path(init_from)
        ckpt = load_checkpoint(path, map_location='cpu')  # to the device after the shapes are checked
        known = {f.name for f in fields(GPTConfig)}
        # nanoGPT writes the same model_args keys; anything else is ignored rather than fatal
        args = {k: v for k, v in dict(ckpt['model_args']).items() if k in known}
        missing = sorted({'n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'} - set(args))
        if missing:
            raise ConfigError(f"{path}: model_args lacks {missing}; it was not written by train.py")
        if dropout is not None:
            args['dropout'] = dropout
        try:
            model = GPT(GPTConfig(**args))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: model_args {args} do not make a GPT ({e})") from None
        state = model_state_dict(ckpt)
        # nanoGPT without flash attention saves its causal-mask buffer as '<block>.attn.bias'
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.endswith('.attn.bias')}
        if ckpt.get('lora'):  # a LoRA run stores only its adapters: its base plus them, merged
            model = load_lora_model(ckpt, path, dropout)
        else:
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise ConfigError(f"{path}: weights do not fit model_args {args}: "
                                  f"{' '.join(str(e).split())[:300]}") from None
        config = ckpt.get('config') if isinstance(ckpt.get('config'), dict) else {}
        dataset = config.get('dataset')
        info = dict(source=f"checkpoint {path} (iteration {ckpt.get('iter_num', '?')})",
                    dataset=dataset, data_dir=_find_data_dir(config.get('data_dir'), dataset),
                    iter_num=ckpt.get('iter_num'), best_val_loss=ckpt.get('best_val_loss'),
                    tokenizer_record=ckpt.get('tokenizer'))
    else:  # pretrained
        try:
            model = GPT.from_pretrained(pretrained_folder(init_from), dict(dropout=dropout or 0.0))
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise ConfigError(f"cannot load {init_from}: {e}") from None
        info = dict(source=f"pretrained {init_from}", dataset=None, data_dir=None,
                    iter_num=None, best_val_loss=None)
    # NaN or inf weights would sample garbage (or fail deep inside sampling): say so here. A sum
    # is NaN or inf exactly when an element is (weights are far too small to overflow it), and
    # takes 0.03 s for GPT-2 124M where isfinite(t).all() takes 0.5 s
    broken = next((name for name, t in model.state_dict().items()
                   if t.is_floating_point() and not torch.isfinite(t.sum())), None)
    if broken is not None:
        raise ConfigError(f"{info['source']}: {broken} holds NaN or inf values, so the model cannot "
                          f"predict anything; these weights come from a run that diverged: use an earlier checkpoint")
    info['vocab_size'] = model.config.vocab_size
    model.to(device)
    model.eval()
    return model, info


def fit_model(model, vocab_size, block_size, notice=print):
    """A model to train on data with vocab_size ids (None: unknown) in block_size-token sequences:
    its vocabulary must hold the data's; a shorter block_size crops its positions (with a notice)."""
    if vocab_size is not None and vocab_size > model.config.vocab_size:
        die(f"the dataset has vocab_size {vocab_size} but the model only {model.config.vocab_size}")
    positions = model.config.block_size
    if block_size < positions:
        notice(f"notice: cropping the model's {positions} positions to block_size={block_size}")
        model.crop_block_size(block_size)  # e.g. GPT-2's 1024 positions down to a shorter context
    elif block_size > positions:
        die(f"block_size={block_size} is longer than the model's {positions} positions")


def load_model_on_device(init_from, out_dir, device='auto', dtype='auto'):
    """(model, info, dev): load_model for inference, on the device and dtype that
    hardware.setup_device(inference=True) picks (dtype 'auto' on a CPU: float32). bfloat16 converts
    the weights once (dev.weights_cast, dev.autocast() then does nothing)."""
    hardware.setup_device(device, 'float32', verbose=False)  # a bad device fails before a long load
    model, info = load_model(init_from, out_dir, 'cpu')
    dev = hardware.setup_device(device, dtype, inference=True)
    model = model.to(dev.device)
    if dev.weights_cast:  # once: autocast would cast every weight again at every token
        model = model.to(dev.ptdtype)
    return model, info, dev


def load_base_model(base, dropout=None):
    """The model a LoRA run adapts, on the CPU: 'gpt2'..'gpt2-xl', a local Hugging Face folder,
    or a run's ckpt.pt (its adapters merged, if it is a LoRA run itself)."""
    return load_model(base, '', 'cpu', dropout)[0]


def load_lora_model(ckpt, path, dropout=None, merge=True, lora_dropout=None):
    """The model of a LoRA checkpoint: its base (ckpt['lora']['base']) cropped to the run's
    block_size, with the saved adapters; merged into plain Linear layers unless merge=False
    (train.py resumes the adapters themselves). lora_dropout None keeps the run's value."""
    from lib.lora import apply_lora, merge_lora
    lora = ckpt['lora']
    try:
        model = load_base_model(lora['base'], dropout)
    except ConfigError as e:
        raise ConfigError(f"{path} adapts the base {lora['base']!r}, which cannot be loaded: {e.message}") from None
    block_size = ckpt['model_args']['block_size']
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    apply_lora(model, lora['rank'], lora['alpha'], lora['dropout'] if lora_dropout is None else lora_dropout,
               lora['targets'])
    try:
        missing, unexpected = model.load_state_dict(ckpt['model'], strict=False)
    except RuntimeError as e:  # shapes: the base changed since the run
        raise ConfigError(f"{path}: adapters do not fit the base {lora['base']!r}: {' '.join(str(e).split())[:300]}") from None
    missing = [k for k in missing if k.endswith(('.lora_A', '.lora_B'))]
    if missing or unexpected:
        raise ConfigError(f"{path}: adapters do not match lora_targets {lora['targets']!r}: "
                          f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    return merge_lora(model) if merge else model


def _first_sentence(error, limit=200):
    """The error's text on one line, cut at its first sentence and at a word boundary, never mid-word."""
    text = ' '.join(str(error).split())
    end = text.find('. ')
    if 0 < end < limit:
        return text[:end + 1]
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(' ', 1)[0] + ' ...'


def pretrained_folder(name_or_path):
    """For a GPT-2 name, the Hugging Face cache's folder of its weights (looked up there first,
    then downloaded), or an error that says what is missing and how to get it; anything else
    is returned as is, for GPT.from_pretrained to check."""
    if name_or_path not in PRETRAINED or os.path.isdir(name_or_path):
        return name_or_path
    repo_id = name_or_path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        snapshot_download = None
    if snapshot_download is not None:
        patterns = ["config.json", "model.safetensors", "pytorch_model.bin"]
        try:  # the local cache first, so no network is touched when the files are here
            folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
        except Exception:
            try:
                folder = snapshot_download(repo_id, allow_patterns=patterns)
            except Exception as e:
                text = ' '.join(str(e).split()).lower()
                offline = any(w in text for w in ('offline', 'connect', 'resolve', 'network', 'unreachable'))
                why = "the Hub cannot be reached: offline?" if offline else f"{type(e).__name__}: {_first_sentence(e)}"
                raise FileNotFoundError(
                    f"GPT-2 weights {repo_id!r} are not in the local Hugging Face cache and could not be "
                    f"downloaded ({why}). Download them once where there is "
                    f"network (`hf download {repo_id} config.json model.safetensors`) or pass a local folder."
                ) from None
        return folder
    # without huggingface_hub, look in the cache layout it would have written
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    snapshots = os.path.join(hub, f"models--{repo_id}", "snapshots")
    if os.path.isdir(snapshots):
        for snap in sorted(os.listdir(snapshots)):
            folder = os.path.join(snapshots, snap)
            if os.path.isfile(os.path.join(folder, "config.json")):
                return folder
    raise FileNotFoundError(f"GPT-2 weights {repo_id!r} not found under {snapshots}; install huggingface_hub "
                            f"(`pip install huggingface_hub`) to download them, or pass a local folder")


def _find_data_dir(data_dir, dataset):
    """The folder holding a run's tokenizer metadata: the run's data_dir, else data/<dataset> under
    the working directory (where nanoGPT keeps it), else data/<dataset> next to this file. From
    this repository's root the last two are the same folder."""
    candidates = [data_dir] if data_dir else []
    if dataset:
        candidates += [Path('data') / dataset, Path(__file__).resolve().parent.parent / 'data' / dataset]
    for folder in candidates:
        if (Path(folder) / 'meta.json').is_file() or (Path(folder) / 'meta.pkl').is_file():
            return str(folder)
    return None


def load_tokenizer_for(info, data_dir=None):
    """The tokenizer a loaded model was trained with (lib.tokenizers.Tokenizer).

    From data_dir if given, else info['data_dir'] (meta.json, or nanoGPT's meta.pkl read by a
    restricted unpickler); GPT-2 BPE when there is no metadata, as for pretrained GPT-2. A model
    whose vocabulary is too small for GPT-2 and has no metadata is an error, not gibberish.
    """
    from lib import tokenizers
    folder = data_dir or info.get('data_dir')
    try:
        if folder:
            if not Path(folder).is_dir():
                raise ConfigError(f"data_dir {folder} is not a folder")
            tokenizer = tokenizers.load_tokenizer(folder)
        elif (info.get('tokenizer_record') or {}).get('tokenizer'):  # the data folder is gone or elsewhere
            tokenizer = tokenizers.tokenizer_from_record(info['tokenizer_record'])
        else:
            if info.get('vocab_size', 50257) < 50257:
                where = f"data/{info['dataset']}/" if info.get('dataset') else "the dataset folder"
                raise ConfigError(f"the model has vocab_size {info['vocab_size']} but no tokenizer metadata was "
                                  f"found (meta.json or meta.pkl in {where}); prepare the dataset again "
                                  f"or pass --data_dir=FOLDER")
            tokenizer = tokenizers.gpt2_tokenizer()
    except tokenizers.PrepareError as e:
        raise ConfigError(str(e)) from None
    if tokenizer.vocab_size > info.get('vocab_size', tokenizer.vocab_size):
        raise ConfigError(f"the tokenizer ({tokenizer.name}, {tokenizer.vocab_size} ids) does not fit the "
                          f"model's vocab_size {info['vocab_size']}: wrong data_dir for this checkpoint?")
    return tokenizer
