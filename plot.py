"""
Pictures of training runs and models (PNG files; needs matplotlib: pip install matplotlib).

Loss curves from one run's out_dir/log.jsonl, or several runs overlaid (legend = folder names):
$ python plot.py loss out-shakespeare-char                       # writes out-shakespeare-char/loss.png
$ python plot.py loss out-a out-b --out=compare.png
$ python plot.py loss out-a out-b --x=time --out=compare.png       # right panel: seconds, not tokens

Attention of every layer and head (rows = layers, columns = heads) for a prompt, from a
checkpoint (out_dir/ckpt.pt) or a Hugging Face GPT-2 (name or local folder):
$ python plot.py attention --out_dir=out-shakespeare-char --start="ROMEO: But soft"
$ python plot.py attention --init_from=gpt2 --start="The cat sat on the mat" --out=gpt2-attention.png

In code (train.py draws out_dir/loss.png at each evaluation when matplotlib is installed):
    import plot
    if plot.have_matplotlib():
        plot.plot_loss([out_dir], os.path.join(out_dir, 'loss.png'))
"""

import json
import os
import sys

import common

DPI = 100  # figure sizes below are in inches; pixels = inches * DPI


def have_matplotlib():
    """True when matplotlib can be imported (it is optional: only pictures need it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(width_px, height_px):
    """A matplotlib Figure of the given pixel size, detached from pyplot.

    Figure objects without pyplot keep no global state, so a training loop can draw one at
    every evaluation without leaking memory or needing a display (the Agg renderer is used).
    """
    try:
        import matplotlib
    except ImportError:
        raise common.ConfigError("pictures need matplotlib: pip install matplotlib") from None
    matplotlib.use('Agg')  # no display needed; harmless if a backend is already set
    from matplotlib.figure import Figure
    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)


def _save(fig, path):
    """Write the PNG atomically (common.atomic_write), so a viewer never sees half a file."""
    common.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=DPI))


# -----------------------------------------------------------------------------
# loss curves


def read_log(out_dir):
    """The records of out_dir/log.jsonl (train.py appends one JSON object per line).

    A last line that does not parse is skipped: train.py may be writing it right now.
    """
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.isfile(path):
        raise common.ConfigError(f"no {path}: is {out_dir} a training run's out_dir?")
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise common.ConfigError(f"{path} line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


# the right panel's x axis: log.jsonl key -> axis label
X_AXES = {'tokens': 'tokens seen', 'time': 'seconds since training started'}


def plot_loss(out_dirs, path, width_px=1200, height_px=600, x='tokens'):
    """PNG of train and val loss of each run: against iterations (left) and, on the right,
    tokens (x='tokens') or wall-clock seconds since the run's training loop started (x='time').

    Lines per run (one colour each): val loss at evaluations (solid, dots), train loss at
    evaluations (dashed), and the logged per-step training loss (thin, faint).
    """
    if x not in X_AXES:
        raise common.ConfigError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    logs = [read_log(d) for d in out_dirs]  # a missing log fails before any drawing
    names = [os.path.basename(os.path.normpath(d)) for d in out_dirs]
    fig = _new_figure(width_px, height_px)
    ax_iter, ax_right = fig.subplots(1, 2)
    any_points = False
    for i, (records, name) in enumerate(zip(logs, names)):
        color = f'C{i % 10}'
        series = [  # (label, style, records)
            (f'{name} train (step)', dict(lw=0.8, alpha=0.35),
             [r for r in records if r.get('kind') == 'train']),
            (f'{name} train (eval)', dict(ls='--', lw=1.5),
             [r for r in records if r.get('kind') == 'eval' and r.get('split') == 'train']),
            (f'{name} val', dict(lw=2, marker='o', ms=3),
             [r for r in records if r.get('kind') == 'eval' and r.get('split') == 'val']),
        ]
        for label, style, rows in series:
            if not rows:
                continue
            any_points = True
            ax_iter.plot([r['iter'] for r in rows], [r['loss'] for r in rows], color=color, label=label, **style)
            rows = [r for r in rows if x in r]  # logs of older versions have no 'time'
            ax_right.plot([r[x] for r in rows], [r['loss'] for r in rows], color=color, label=label, **style)
    from matplotlib.ticker import EngFormatter
    ax_iter.set_xlabel('iteration')
    ax_right.set_xlabel(X_AXES[x])
    if x == 'tokens':
        ax_right.xaxis.set_major_formatter(EngFormatter(sep=''))  # 300k, 1.2M, ...
    for ax in (ax_iter, ax_right):
        ax.set_ylabel('loss (nats per token)')
        ax.grid(True, alpha=0.4)
    if any_points:
        ax_iter.legend(fontsize=8)
    else:
        ax_iter.text(0.5, 0.5, 'no log entries yet', ha='center', va='center', transform=ax_iter.transAxes)
    fig.suptitle(f"loss: {', '.join(names)}")
    fig.tight_layout()
    _save(fig, path)
    return fig


# -----------------------------------------------------------------------------
# attention heatmaps


def token_label(piece):
    """A decoded token as a one-line axis label: newlines and tabs escaped, '$' not math."""
    return (piece.replace('\\', '\\\\').replace('\n', '\\n').replace('\r', '\\r')
            .replace('\t', '\\t').replace('$', r'\$'))


def plot_attention(model, ids, labels, path, title=None):
    """PNG grid of the attention probabilities of every layer (rows) and head (columns).

    ids: the prompt's token ids; labels: one axis label per token. Each panel shows query
    positions down and key positions across, on one colour scale 0..1 for all panels.
    Returns the Figure (its first n_layer * n_head axes are the panels, row by row).
    """
    import torch
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    maps = model.attention_maps(idx)  # n_layer tensors (1, nh, T, T)
    n_layer, n_head, T = len(maps), maps[0].size(1), len(ids)
    # panels grow with the prompt so labels stay readable: about 0.12 inch per token
    panel = max(1.6, 0.12 * T + 0.4)
    margin = 0.8 + 0.06 * max(len(s) for s in labels)  # room for the token labels
    fig = _new_figure(DPI * (n_head * panel + margin + 0.8), DPI * (n_layer * panel + margin + 0.6))
    axes = fig.subplots(n_layer, n_head, squeeze=False, sharex=True, sharey=True)
    label_size = 7 if T <= 24 else 5
    for layer in range(n_layer):
        probs = maps[layer][0].float().cpu().numpy()  # (nh, T, T)
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(probs[head], cmap='viridis', vmin=0.0, vmax=1.0, interpolation='nearest')
            ax.set_title(f'layer {layer} head {head}', fontsize=8)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.tick_params(length=0)
            if layer == n_layer - 1:
                ax.set_xticklabels([token_label(s) for s in labels], rotation=90, fontsize=label_size)
            if head == 0:
                ax.set_yticklabels([token_label(s) for s in labels], fontsize=label_size)
                ax.set_ylabel('query', fontsize=8)
        axes[n_layer - 1][0].set_xlabel('key', fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label='attention probability')
    fig.suptitle(title or 'attention')
    _save(fig, path)
    return fig


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
)


def run_loss(argv):
    out_dirs = [a for a in argv if not a.startswith('--')]
    cfg = dict(LOSS_DEFAULTS, **common.load_config(LOSS_DEFAULTS, [a for a in argv if a.startswith('--')]))
    if not out_dirs:
        common.die("name at least one run folder: python plot.py loss OUT_DIR [OUT_DIR ...]")
    path = cfg['out'] or (os.path.join(out_dirs[0], 'loss.png') if len(out_dirs) == 1 else 'loss.png')
    plot_loss(out_dirs, path, x=cfg['x'])
    print(f"wrote {path}")


def run_attention(argv):
    cfg = dict(ATTENTION_DEFAULTS, **common.load_config(ATTENTION_DEFAULTS, argv))
    dev = common.setup_device(cfg['device'], 'float32')
    model, info = common.load_model(cfg['init_from'], cfg['out_dir'], dev.device)
    tokenizer = common.load_tokenizer_for(info, cfg['data_dir'] or None)
    start = cfg['start']
    if start.startswith('FILE:'):
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    ids = tokenizer.encode(start)
    if not ids:
        common.die("the prompt encodes to no tokens; give one with --start=...")
    if len(ids) > cfg['max_tokens']:
        print(f"prompt has {len(ids)} tokens; plotting the first {cfg['max_tokens']} (--max_tokens)")
        ids = ids[:cfg['max_tokens']]
    ids = ids[:model.config.block_size]
    labels = [tokenizer.decode([i]) for i in ids]
    default_dir = cfg['out_dir'] if cfg['init_from'] == 'resume' else '.'
    path = cfg['out'] or os.path.join(default_dir, 'attention.png')
    name = cfg['out_dir'] if cfg['init_from'] == 'resume' else cfg['init_from']
    plot_attention(model, ids, labels, path, title=f"attention of {name}: {token_label(start[:60])!s}")
    print(f"wrote {path} ({model.config.n_layer} layers x {model.config.n_head} heads, {len(ids)} tokens)")


COMMANDS = {'loss': run_loss, 'attention': run_attention}


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    COMMANDS[argv[0]](argv[1:])
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
