"""
Export a trained run as one GGUF file (llama.cpp, Ollama, LM Studio) or a Hugging Face folder.

docs/export.md says which knobs export and how to run the file.

$ python export.py --out_dir=out                                        # out/model-f16.gguf
$ python export.py --out_dir=out --outtype=q8_0 --out=tiny.gguf        # 8-bit weights, about half of f16
$ python export.py --out_dir=out --format=hf                           # out/hf, for transformers
$ llama-completion -m out/model-f16.gguf -p "ROMEO:" -n 200 --temp 0.8      # llama.cpp

GGUF needs llama.cpp's writer, `pip install gguf`. The file carries the tokenizer and the context
length (block_size), a chat run its chat template; a LoRA run exports with its adapters merged. An
existing output is replaced only with --force=True, and an output appears only when it is complete.
"""

import os
import sys
from pathlib import Path

from lib import cli  # first: a missing package is one line naming the fix, not a traceback

from lib import export, loading, runs

# -----------------------------------------------------------------------------
# defaults; config files and --key=value flags change them
out_dir = 'out'  # the training run's folder (its ckpt.pt; a LoRA run exports merged)
format = 'gguf'  # 'gguf' (one file for llama.cpp, Ollama, LM Studio) or 'hf' (a transformers GPT-2 folder)
outtype = 'f16'  # GGUF weights: 'f32', 'f16' or 'q8_0' (8-bit); norms and biases stay float32
out = ''  # where to write; '' = OUT_DIR/model-OUTTYPE.gguf, or OUT_DIR/hf with --format=hf
force = False  # replace an existing output
data_dir = ''  # folder with the tokenizer metadata; '' = what the checkpoint records
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
RULES = dict(format=('gguf', 'hf'), outtype=export.OUTTYPES)  # what each knob may be (cli.check_knobs)


def main(argv):
    cfg = dict(DEFAULTS)
    overrides = cli.load_config(DEFAULTS, argv)
    cfg.update(overrides)
    cli.check_knobs(cfg, RULES)
    run = runs.find_run_dir(cfg['out_dir'], 'out_dir' in overrides, what='export')
    gguf = cfg['format'] == 'gguf'
    path = Path(cfg['out'] or os.path.join(run, f"model-{cfg['outtype']}.gguf" if gguf else 'hf'))
    if path.exists() and not cfg['force']:
        cli.die(f"{path} exists; pass --force=True to replace it, or --out=PATH to write elsewhere")
    if gguf:  # before the model loads: a missing package is the first thing to hear about
        cli.optional_import('gguf', "writing GGUF files needs llama.cpp's gguf package: pip install gguf")

    model, info = loading.load_model('resume', run, 'cpu')
    if gguf:
        tokenizer = loading.load_tokenizer_for(info, cfg['data_dir'] or None)
        arch = export.write_gguf(model, tokenizer, path, cfg['outtype'], name=Path(run).resolve().name)
        chat = tokenizer.special_ids  # a chat run: its template travels too
        print(f"wrote {path} ({path.stat().st_size / 1e6:,.1f} MB): llama.cpp architecture {arch}, "
              f"{cfg['outtype']} weights, {tokenizer.name} tokenizer{' and chat template' if chat else ''}, "
              f"context {model.config.block_size}")
        run_it = f"llama-cli -m {path} --jinja" if chat else f"llama-completion -m {path} -p \"Hello\" -n 100"
        print(f"next: {run_it}   (Ollama: docs/export.md)")
    else:
        try:
            export.save_hf(model, path)
        except ValueError as e:  # a modern knob: GPT-2 has no such thing
            cli.die(str(e))
        print(f"wrote {path}/ (config.json and weights): "
              f"transformers.GPT2LMHeadModel.from_pretrained('{path}')")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
