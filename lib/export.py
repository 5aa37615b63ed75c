"""
A trained model written for other programs: one GGUF file for llama.cpp (and what is built on it:
Ollama, LM Studio, llama-cpp-python), or a Hugging Face GPT-2 folder for transformers.

    arch = export.gguf_architecture(model.config)      # 'gpt2', 'gptneox', ..., or a one-line error
    export.write_gguf(model, tokenizer, 'out/model-f16.gguf', 'f16')
    export.save_hf(model, 'out/hf')

A GGUF file holds the hyperparameters, the tokenizer and the weights. Its key and tensor names come
from the gguf package, llama.cpp's own writer (pip install gguf); which llama.cpp architecture
computes which of our knobs was read from llama.cpp's src/models/*.cpp and src/llama-vocab.cpp,
and tests/test_export.py checks each against llama.cpp itself. Outputs appear only when complete.
"""

import json
import os
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from lib import bpe, chat
from lib.cli import die, optional_import
from lib.files import write_complete
from model import HF_CONV1D, GPTConfig

OUTTYPES = ('f32', 'f16', 'q8_0')

# The llama.cpp architectures that compute our GPT exactly, and the knob values each one needs.
# Besides the sizes, bias (all but arcee always load biases: zeros stand in for missing ones) and
# dropout, these knobs export with any value; any other knob (a new one too) only at its default.
FREE_KNOBS = ('tie_embeddings',  # an untied head is written as `output`
              'rope_base',  # the file's rope.freq_base
              'zero_init_proj')  # only the initialization
ARCHITECTURES = {
    # GPT-2 itself: learned positions, LayerNorm, tanh GELU
    'gpt2': dict(pos_emb='learned', norm='layernorm', mlp_act='gelu'),
    # GPT-NeoX with use_parallel_residual=False is GPT-2 with rotary positions, in our half-split
    # layout (llama.cpp's NEOX rope) and no position table
    'gptneox': dict(pos_emb='rope', norm='layernorm', mlp_act='gelu'),
    # Jais 2: the same with relu(x)^2 in the MLP
    'jais2': dict(pos_emb='rope', norm='layernorm', mlp_act='relu2'),
    # Arcee (AFM-4.5B): RMSNorm (our gain-free one is a gain of ones), relu(x)^2, rotary with
    # adjacent pairs (our q and k rows are reordered to match), and no biases anywhere
    'arcee': dict(pos_emb='rope', norm='rmsnorm', mlp_act='relu2', bias=False),
}
ZERO_BIASES = ('gpt2', 'gptneox', 'jais2')  # architectures whose bias tensors are required

# What the knobs that no llama.cpp architecture computes alongside the ones above do.
NOT_IN_LLAMA_CPP = {
    'qk_norm': "RMS-normalises each head's queries and keys",
    'logit_softcap': 'softcaps the logits',
    'value_embeds': 'adds value embeddings',
    'x0_mix': "mixes each block's input with the embedding",
    'bigram_vocab': 'adds a hashed bigram embedding',
}

LAYER_NORM_EPS = 1e-5  # model.py's LayerNorm (GPT-2's layer_norm_epsilon)
RMS_NORM_EPS = 1e-6  # model.py's rms_norm

# GPT-4's split pattern (tiktoken's cl100k_base), the one lib/bpe.py uses
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
                      r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
# Our own BPE's split pattern -> the llama.cpp pre-tokenizer that splits text the same way.
# 'llama-bpe' is llama.cpp's LLAMA3 splitter, written for GPT-4's regex, in a form that differs
# only where no match changes (no possessive quantifiers, \s*[\r\n]+ for \s*[\r\n], the case-free
# contractions spelled out); it also looks a whole piece up before merging, as tiktoken does.
PRE_TOKENIZERS = {GPT4_SPLIT_PATTERN: 'llama-bpe'}


def gguf_architecture(config):
    """The llama.cpp architecture that computes a model of this GPTConfig exactly; otherwise a
    one-line error naming the knob that keeps it out, and the value that would export."""
    defaults = {f.name: f.default for f in fields(config)}
    matched = {k for needs in ARCHITECTURES.values() for k in needs}
    for knob, value in config.modern().items():  # the knobs away from GPT-2
        if knob not in FREE_KNOBS and knob not in matched:
            what = NOT_IN_LLAMA_CPP.get(knob, 'computes it (lib/export.py knows none that does)')
            die(f"{knob}={value!r} does not export to GGUF: no llama.cpp architecture that computes the "
                f"rest of our GPT also {what}; runs trained with {knob}={defaults[knob]!r} export "
                f"(docs/export.md)")
    for arch, needs in ARCHITECTURES.items():
        if all(getattr(config, k) == v for k, v in needs.items()):
            return arch

    def fixes(needs):
        return {k: v for k, v in needs.items() if getattr(config, k) != v}
    fewest = min(len(fixes(needs)) for needs in ARCHITECTURES.values())
    nearest = ' or '.join(', '.join(f"{k}={v!r}" for k, v in fixes(needs).items()) + f" ({arch})"
                          for arch, needs in ARCHITECTURES.items() if len(fixes(needs)) == fewest)
    knobs = dict.fromkeys(k for needs in ARCHITECTURES.values() for k in needs)
    ours = ', '.join(f"{k}={getattr(config, k)!r}" for k in knobs)
    die(f"{ours} does not export to GGUF: no llama.cpp architecture computes that model; one trained "
        f"with {nearest} would (docs/export.md lists the knobs that export)")


# -----------------------------------------------------------------------------
# the tokenizer, as llama.cpp reads it

def byte_symbols():
    """The printable character that stands for each byte value in byte-level BPE vocabularies
    (GPT-2's encoder.json, Hugging Face, llama.cpp): printable Latin-1 bytes stand for
    themselves, the other 68 (controls, space, soft hyphen...) for U+0100 onwards in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(0x100 + shifted))
            shifted += 1
    return symbols


def bpe_merges(ranks):
    """The merges of a byte-level BPE given as tiktoken ranks {token bytes: rank}, in rank order:
    for each token of two or more bytes, the two parts that BPE with only lower ranks leaves of it.
    llama.cpp merges the pair listed first, tiktoken the pair whose join ranks lowest: for a BPE
    learned by merging (bpe.py, GPT-2) these are the same choices."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            joined = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            best = min(range(len(joined)), key=joined.__getitem__)  # the leftmost lowest, as tiktoken
            if joined[best] >= rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            die(f"token {rank} ({token!r}) of this tokenizer is not one merge of lower-ranked tokens, so "
                f"llama.cpp's BPE cannot make it; retrain the tokenizer (prepare.py --tokenizer=bpe)")
        merges.append(parts)
    return merges


def rwkv_escape(text):
    """A token's text as llama.cpp's 'rwkv' vocabulary spells it: backslash escapes for the
    backslash, tab, newline, carriage return and other control characters, the rest as is."""
    named = {'\\': '\\\\', '\t': '\\t', '\n': '\\n', '\r': '\\r'}
    control = {chr(i) for i in range(0x20)} | {'\x7f'}
    return ''.join(named.get(c) or (f'\\x{ord(c):02x}' if c in control else c) for c in text)


def gguf_vocabulary(tokenizer):
    """What a GGUF file says about the tokenizer: dict(model, pre, tokens, types, merges, eot, end),
    or a one-line error for a tokenizer llama.cpp cannot reproduce exactly. A chat run's tokenizer
    adds the chat template's markers (lib/chat.py) as control tokens after the base ids, and end,
    the id of <|end|>, where a reply stops (else None).

    GPT-2's and our own BPE are llama.cpp's byte-level BPE ('gpt2'), with the pre-tokenizer that
    splits text exactly as ours does. A character vocabulary is llama.cpp's 'rwkv' vocabulary:
    its tokenizer takes the longest token that matches the text, which for single characters is
    each character in turn (UTF-8 is prefix-free), so every text encodes as ours does."""
    import gguf
    markers = tokenizer.special_ids  # a chat run's {marker: id}; {} for text
    base_size = tokenizer.vocab_size - len(markers)
    if tokenizer.name == 'char':
        chars = [tokenizer.decode([i]) for i in range(base_size)]
        vocab = dict(model='rwkv', pre=None, tokens=[rwkv_escape(c) for c in chars],
                     types=[gguf.TokenType.NORMAL] * len(chars), merges=None, eot=None)
        return with_chat_tokens(vocab, markers)
    enc = tokenizer.encoding
    if enc is None or tokenizer.name not in ('gpt2', 'bpe'):
        die(f"the {tokenizer.name} tokenizer does not export to GGUF: its tokens are numbers, not text "
            f"that llama.cpp could tokenize; export runs with a char, gpt2 or bpe tokenizer")
    pre = 'gpt-2' if tokenizer.name == 'gpt2' else PRE_TOKENIZERS.get(bpe.SPLIT_PATTERN)
    if pre is None:
        die("lib/bpe.py's SPLIT_PATTERN is none that llama.cpp implements exactly, so llama.cpp would "
            "split text differently; export needs GPT-4's pattern (see PRE_TOKENIZERS in lib/export.py)")
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    pieces = {i: enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)}
    ranks = {piece: i for i, piece in pieces.items() if i not in special}
    symbols = byte_symbols()

    def spelled(piece):
        return ''.join(symbols[b] for b in piece)
    tokens = [pieces[i].decode() if i in special else spelled(pieces[i]) for i in range(enc.n_vocab)]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(enc.n_vocab)]
    merges = [f"{spelled(a)} {spelled(b)}" for a, b in bpe_merges(ranks)]
    assert enc.n_vocab == base_size, (enc.n_vocab, base_size)  # the chat ids follow the base's
    vocab = dict(model='gpt2', pre=pre, tokens=tokens, types=types, merges=merges, eot=enc.eot_token)
    return with_chat_tokens(vocab, markers)


def with_chat_tokens(vocab, markers):
    """vocab with the chat markers appended as control tokens (llama.cpp reads them in a prompt
    only when asked to parse special tokens, as our encoder never makes them from text)."""
    import gguf
    n = len(vocab['tokens'])
    assert list(markers.values()) == list(range(n, n + len(markers)))
    return dict(vocab, tokens=[*vocab['tokens'], *markers], end=markers.get(chat.END),
                types=[*vocab['types'], *[gguf.TokenType.CONTROL] * len(markers)])


# -----------------------------------------------------------------------------
# the weights, named and shaped as llama.cpp's architecture loads them

def gguf_tensors(model, arch, n_vocab):
    """{GGUF tensor name: float32 array} of model for arch, with n_vocab rows in the embedding and
    the head. Matrices keep torch's (out, in) layout: GGUF lists dimensions innermost first, so it
    is the {in, out} that llama.cpp expects."""
    import gguf
    cfg = model.config
    C, hs = cfg.n_embd, cfg.n_embd // cfg.n_head
    sd = {k: v.detach().to('cpu', torch.float32).numpy() for k, v in model.state_dict().items()}
    out = {}

    def put(kind, param, array, layer=None):
        name = f"{gguf.TENSOR_NAMES[kind].format(bid=layer)}.{param}"
        out[name] = np.ascontiguousarray(array, dtype=np.float32)

    def norm(kind, ours, layer=None):
        if cfg.norm == 'rmsnorm':
            put(kind, 'weight', np.ones(C), layer)  # our RMSNorm has no gain: a gain of ones
        else:
            put(kind, 'weight', sd[f'{ours}.weight'], layer)
            put(kind, 'bias', sd.get(f'{ours}.bias', np.zeros(C)), layer)

    def linear(kind, ours, layer, weight=None):
        weight = sd[f'{ours}.weight'] if weight is None else weight
        put(kind, 'weight', weight, layer)
        if cfg.bias or arch in ZERO_BIASES:
            put(kind, 'bias', sd.get(f'{ours}.bias', np.zeros(weight.shape[0])), layer)

    M = gguf.MODEL_TENSOR
    put(M.TOKEN_EMBD, 'weight', sd['transformer.wte.weight'][:n_vocab])
    if cfg.pos_emb == 'learned':
        put(M.POS_EMBD, 'weight', sd['transformer.wpe.weight'])
    if not cfg.tie_embeddings or arch == 'gptneox':  # gptneox has no tied head: the same matrix again
        put(M.OUTPUT, 'weight', sd['lm_head.weight'][:n_vocab])
    norm(M.OUTPUT_NORM, 'transformer.ln_f')
    for i in range(cfg.n_layer):
        block = f'transformer.h.{i}'
        norm(M.ATTN_NORM, f'{block}.ln_1', i)
        qkv = sd[f'{block}.attn.c_attn.weight']  # (3C, C): q, k, v rows, head after head
        if arch == 'arcee':
            # llama.cpp's 'normal' rope turns channels (2j, 2j+1) of a head together, ours (j, j + hs/2):
            # the same rows of q and k in another order give the same attention scores
            order = np.arange(hs).reshape(2, hs // 2).T.reshape(-1)  # 0, hs/2, 1, hs/2 + 1, ...
            qk = qkv[:2 * C].reshape(2 * cfg.n_head, hs, C)[:, order].reshape(2 * C, C)
            qkv = np.concatenate([qk, qkv[2 * C:]])
        linear(M.ATTN_QKV, f'{block}.attn.c_attn', i, qkv)
        linear(M.ATTN_OUT, f'{block}.attn.c_proj', i)
        norm(M.FFN_NORM, f'{block}.ln_2', i)
        linear(M.FFN_UP, f'{block}.mlp.c_fc', i)
        linear(M.FFN_DOWN, f'{block}.mlp.c_proj', i)
    return out


def stored(name, array, outtype):
    """(data, ggml type) of a tensor in a file of outtype: vectors (norms, biases) and the position
    table stay float32, as llama.cpp's converter keeps them; matrices take outtype, q8_0 falling
    back to float16 where a row is not whole blocks of 32 values."""
    import gguf
    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD]) or outtype == 'f32':
        return array, Q.F32
    if outtype == 'q8_0' and array.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0
    return array.astype(np.float16), Q.F16


# -----------------------------------------------------------------------------
# writing

def write_gguf(model, tokenizer, path, outtype='f16', name=None):
    """Write model with its tokenizer to path as one GGUF file (outtype 'f32', 'f16' or 'q8_0');
    the context length is block_size. Returns the llama.cpp architecture. A one-line error for a
    knob or tokenizer that llama.cpp cannot compute exactly, and for an unwritable path."""
    gguf = optional_import('gguf', "writing GGUF files needs llama.cpp's gguf package: pip install gguf")
    if outtype not in OUTTYPES:
        die(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    cfg = model.config
    arch = gguf_architecture(cfg)
    vocab = gguf_vocabulary(tokenizer)
    n_vocab = len(vocab['tokens'])  # a padded vocab_size (50304) keeps only the ids the tokenizer makes
    if n_vocab > cfg.vocab_size:
        die(f"the tokenizer has {n_vocab} tokens but the model only {cfg.vocab_size}: wrong --data_dir?")
    tensors = gguf_tensors(model, arch, n_vocab)

    def write(tmp):
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or Path(path).stem)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_head)
        if cfg.norm == 'layernorm':
            w.add_layer_norm_eps(LAYER_NORM_EPS)
        else:
            w.add_layer_norm_rms_eps(RMS_NORM_EPS)
        if cfg.pos_emb == 'rope':
            w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
            w.add_rope_freq_base(cfg.rope_base)
        if arch == 'gptneox':
            w.add_parallel_residual(False)  # x + attn(ln_1(x)), then + mlp(ln_2(...)): GPT-2's order
        w.add_file_type({'f32': gguf.LlamaFileType.ALL_F32, 'f16': gguf.LlamaFileType.MOSTLY_F16,
                         'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        if outtype == 'q8_0':
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model(vocab['model'])
        if vocab['pre']:
            w.add_tokenizer_pre(vocab['pre'])
        w.add_token_list(vocab['tokens'])
        w.add_token_types(vocab['types'])
        if vocab['merges'] is not None:
            w.add_token_merges(vocab['merges'])
        if vocab['eot'] is not None:  # <|endoftext|> joins documents: where generation stops
            w.add_bos_token_id(vocab['eot'])
        if vocab['end'] is not None:  # a chat run: a reply ends at <|end|>, and the template
            w.add_eos_token_id(vocab['end'])  # that renders a conversation (llama.cpp --jinja)
            w.add_eot_token_id(vocab['end'])
            w.add_chat_template(chat.JINJA_TEMPLATE)
        elif vocab['eot'] is not None:
            w.add_eos_token_id(vocab['eot'])
        w.add_add_bos_token(False)  # our models never saw a token put before the text
        w.add_add_eos_token(False)
        for tensor_name, array in tensors.items():
            data, kind = stored(tensor_name, array, outtype)
            w.add_tensor(tensor_name, data, raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_complete(path, write, 'file')
    return arch


def save_hf(model, folder, state_dict=None):
    """A Hugging Face GPT-2 folder (config.json and weights) that transformers.GPT2LMHeadModel loads
    with the same logits (GPT.from_pretrained reads it back), appearing only when complete.
    state_dict: the weights to write, default the model's (lib/lora.py's merged_state_dict, say).
    Only GPT-2 models export: a modern knob (pos_emb, norm, ...) has no GPT-2 equivalent, so it is
    a ValueError and nothing is written."""
    for name, value in model.config.modern().items():
        default = GPTConfig.__dataclass_fields__[name].default
        raise ValueError(f"save_hf exports GPT-2 only, and GPT-2 has no {name}={value!r} "
                         f"(it needs {name}={default!r}); keep this model as a train.py checkpoint")
    write_complete(folder, lambda tmp: hf_folder(model, tmp, state_dict), 'folder')


def hf_folder(model, folder, state_dict=None):
    """Write config.json and the weights (GPT-2 layout: Conv1D weights transposed, zero biases
    where the model has none) into folder."""
    cfg = model.config
    eos = min(50256, cfg.vocab_size - 1)
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eos, "eos_token_id": eos,
    }
    out = {}
    for k, v in (model.state_dict() if state_dict is None else state_dict).items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight; transformers re-ties it on load
        out[k] = (v.t() if k.endswith(HF_CONV1D) else v).detach().to("cpu", torch.float32).contiguous()
    if not cfg.bias:
        for k, v in list(out.items()):
            if k.endswith(".weight") and (".c_" in k or ".ln_" in k or k.startswith("transformer.ln_f")):
                n = v.shape[1] if k.endswith(HF_CONV1D) else v.shape[0]
                out[k[:-len("weight")] + "bias"] = torch.zeros(n)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(json.dumps(hf_config, indent=2))
    try:
        from safetensors.torch import save
    except ImportError:
        torch.save(out, os.path.join(folder, "pytorch_model.bin"))
    else:
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(save(out, {"format": "pt"}))

