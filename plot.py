"""
Pictures of training runs and models (PNG files; needs matplotlib: pip install matplotlib).

Loss curves from one run's out_dir/log.jsonl, or several runs overlaid (legend = folder names):
$ python plot.py loss out-shakespeare-char-cpu         # writes out-shakespeare-char-cpu/loss.png
$ python plot.py loss                                  # the newest run folder here (one with ckpt.pt)
$ python plot.py loss out-a out-b --out=compare.png
$ python plot.py loss out-a out-b --x=time --out=compare.png       # right panel: seconds, not tokens

Attention of every layer and head (rows = layers, columns = heads) for a prompt, from a
checkpoint (out_dir/ckpt.pt) or a Hugging Face GPT-2 (name or local folder):
$ python plot.py attention --out_dir=out-shakespeare-char-cpu --start="ROMEO: But soft"
$ python plot.py attention --init_from=gpt2 --start="The cat sat on the mat" --out=gpt2-attention.png

The drawing functions are in lib/plotting.py (train.py draws out_dir/loss.png with them).
"""

import os
import sys

from lib import cli, hardware, loading, runs
from lib.plotting import plot_attention, plot_loss, read_log, token_label

# -----------------------------------------------------------------------------
# command line

ATTENTION_DEFAULTS = dict(
    out_dir='out',  # the run folder holding ckpt.pt (init_from='resume')
    init_from='resume',  # 'resume' (out_dir/ckpt.pt), 'gpt2'..'gpt2-xl', or a local Hugging Face folder
    data_dir='',  # folder with the tokenizer's meta.json; '' means the one the run trained on
    start='\n',  # the prompt; 'FILE:prompt.txt' reads it from a file
    out='',  # the PNG to write; '' means <out_dir>/attention.png (attention.png for init_from=gpt2*)
    max_tokens=48,  # longer prompts are cut to their first max_tokens tokens (the grid gets huge)
    device='cpu',  # one short forward pass: the CPU is fine
)
LOSS_DEFAULTS = dict(
    out='',  # the PNG to write; '' means <out_dir>/loss.png for one run, loss.png for several
    x='tokens',  # the right panel's x axis: 'tokens' seen or 'time' (seconds since training started)
    y='loss',  # 'loss' (nats per token) or 'bpb' (bits per byte: compares runs of different tokenizers)
)


def run_loss(argv):
    out_dirs = [a for a in argv if not a.startswith('-')]
    cfg = dict(LOSS_DEFAULTS, **cli.load_config(LOSS_DEFAULTS, [a for a in argv if a.startswith('-')],
                                                     usage=USAGES['loss'][1]))
    if cfg['out']:
        check_out(cfg['out'])
    if not out_dirs:  # the newest run folder here
        out_dirs = [runs.find_run_dir('out', False, what='plot',
                                      otherwise='or name its folder: python plot.py loss RUN_FOLDER')]
    for d in out_dirs:
        if not os.path.isfile(os.path.join(d, 'log.jsonl')):
            cli.die(f"no {os.path.join(d, 'log.jsonl')}: is {d} a training run's out_dir?")
    # a log without a single loss (a run that has not logged a step yet, or a garbled file) makes an
    # empty picture: say so instead of writing one
    if not any(r.get('kind', 'train') in ('train', 'eval') for d in out_dirs for r in read_log(d, notice=lambda m: None)):
        cli.die(f"no loss records in {', '.join(os.path.join(d, 'log.jsonl') for d in out_dirs)} yet: "
                   f"plot once the run has logged a step (log_interval)")
    path = cfg['out'] or (os.path.join(out_dirs[0], 'loss.png') if len(out_dirs) == 1 else 'loss.png')
    plot_loss(out_dirs, path, x=cfg['x'], y=cfg['y'])
    print(f"wrote {path}")


def check_out(path):
    """An --out PNG must be a .png in a folder that exists (checked before any model is loaded)."""
    if not path.lower().endswith('.png'):
        cli.die(f"out={path!r} must name a .png file")
    folder = os.path.dirname(path) or '.'
    if not os.path.isdir(folder):
        cli.die(f"cannot write {path}: folder {folder} does not exist")


def run_attention(argv):
    overrides = cli.load_config(ATTENTION_DEFAULTS, argv, usage=USAGES['attention'][1])
    cfg = dict(ATTENTION_DEFAULTS, **overrides)
    cli.check_knobs(cfg, dict(max_tokens='>= 1'))
    if cfg['start'].startswith('FILE:') and not os.path.isfile(cfg['start'][5:]):
        cli.die(f"cannot read the prompt file {cfg['start'][5:]}: no such file")
    if cfg['out']:
        check_out(cfg['out'])
    if cfg['data_dir'] and not os.path.isdir(cfg['data_dir']):
        cli.die(f"data_dir {cfg['data_dir']} is not a folder")
    dev = hardware.setup_device(cfg['device'], 'float32',
                              default_reason=None if 'device' in overrides else "plot.py's default")
    if cfg['init_from'] == 'resume':
        cfg['out_dir'] = runs.find_run_dir(cfg['out_dir'], 'out_dir' in overrides, what='plot')
    model, info = loading.load_model(cfg['init_from'], cfg['out_dir'], dev.device)
    tokenizer = loading.load_tokenizer_for(info, cfg['data_dir'] or None)
    start = cfg['start']
    if start.startswith('FILE:'):
        try:
            with open(start[5:], encoding='utf-8') as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            cli.die(f"cannot read the prompt file {start[5:]}: {e.strerror if isinstance(e, OSError) else e}")
    try:
        ids = tokenizer.encode(start)
    except Exception as e:  # prepare.PrepareError: a character outside a char vocabulary, ...
        cli.die(f"cannot encode the prompt with the model's tokenizer ({tokenizer.name}): {e}")
    if not ids:
        cli.die("the prompt encodes to no tokens; give one with --start=...")
    if len(ids) > cfg['max_tokens']:
        print(f"prompt has {len(ids)} tokens; plotting the first {cfg['max_tokens']} (--max_tokens)")
        ids = ids[:cfg['max_tokens']]
    ids = ids[:model.config.block_size]
    labels = [tokenizer.decode([i]) for i in ids]
    default_dir = cfg['out_dir'] if cfg['init_from'] == 'resume' else '.'
    path = cfg['out'] or os.path.join(default_dir, 'attention.png')
    name = cfg['out_dir'] if cfg['init_from'] == 'resume' else cfg['init_from']
    plot_attention(model, ids, labels, path, title=f"attention of {name}: {token_label(start[:60])!s}",
                   out_dir=cfg['out_dir'] if cfg['init_from'] == 'resume' else None)
    print(f"wrote {path} ({model.config.n_layer} layers x {model.config.n_head} heads, {len(ids)} tokens)")


COMMANDS = {'loss': run_loss, 'attention': run_attention}
USAGES = {'loss': (LOSS_DEFAULTS, "python plot.py loss [OUT_DIR ...] [--out=FILE.png]"),
          'attention': (ATTENTION_DEFAULTS, "python plot.py attention [--key=value ...]")}


def main(argv):
    if not argv or argv[0] in ('-h', '--help'):
        cli.print_stdout(f"usage: python plot.py {{{','.join(COMMANDS)}}} ...\n{__doc__.strip()}")
        if argv:
            for command, (defaults, usage) in USAGES.items():
                cli.print_stdout('')
                cli.print_help(defaults, __file__, usage)
            return 0
        cli.die(f"name a command: python plot.py {{{','.join(COMMANDS)}}} (usage above)")
    if argv[0] not in COMMANDS:
        cli.die(cli.unknown_command(argv[0], COMMANDS, 'plot.py'))
    COMMANDS[argv[0]](argv[1:])
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
