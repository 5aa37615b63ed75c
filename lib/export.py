"""
Export a GPT to a Hugging Face GPT-2 folder (config.json and model.safetensors, or
pytorch_model.bin without safetensors) that transformers.GPT2LMHeadModel.from_pretrained loads
with the same logits; GPT.from_pretrained (model.py) reads such a folder back.

    save_hf(model, folder)                              # a GPT-2-shaped model of ours
    save_hf(model, folder, lora.merged_state_dict(m))   # other weights of the same shape
"""

import json
import os

import torch

from model import HF_CONV1D, GPTConfig


def save_hf(model, folder, state_dict=None):
    """Write model as a Hugging Face GPT-2 folder. Models without biases get zero biases (the same
    function). Only GPT-2 models export: a modern knob (pos_emb, norm, ...) has no GPT-2
    equivalent, and nothing is written. state_dict: the weights to write, default the model's."""
    cfg = model.config
    for name, value in cfg.modern().items():
        default = GPTConfig.__dataclass_fields__[name].default
        raise ValueError(f"save_hf exports GPT-2 only, and GPT-2 has no {name}={value!r} "
                         f"(it needs {name}={default!r}); keep this model as a train.py checkpoint")
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
    os.makedirs(folder, exist_ok=True)
    _write_replacing(os.path.join(folder, "config.json"), lambda f: f.write(json.dumps(hf_config, indent=2).encode()))
    try:
        from safetensors.torch import save
    except ImportError:
        _write_replacing(os.path.join(folder, "pytorch_model.bin"), lambda f: torch.save(out, f))
    else:
        _write_replacing(os.path.join(folder, "model.safetensors"), lambda f: f.write(save(out, {"format": "pt"})))


def _write_replacing(path, write):
    """Write through a temporary name, then rename: a crash never leaves a half-written file."""
    with open(f"{path}.tmp", "wb") as f:
        write(f)
    os.replace(f"{path}.tmp", path)
