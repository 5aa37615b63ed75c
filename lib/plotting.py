"""
Pictures of runs and models, as PNG files written atomically: loss curves from log.jsonl (one
run or several overlaid; train.py redraws out_dir/loss.png at each evaluation) and the attention
of every layer and head for a prompt (attention_maps: the model's own probabilities, which
serve.py's playground draws too). matplotlib is imported only when drawing.
"""

import json
import os
import sys

from lib import cli
from lib.files import atomic_write

DPI = 100  # figure sizes below are in inches; pixels = inches * DPI


def attention_maps(model, idx):
    """Every layer's attention probabilities for idx (B, T): n_layer tensors (B, nh, T, T), the
    weights model's forward itself multiplies the values with (each attention's explicit path
    appends them to its attn_record while that is a list; test_model.py checks it against SDPA)."""
    import torch
    records, was_training = [], model.training
    for block in model.transformer.h:
        block.attn.attn_record = records
    try:
        with torch.no_grad():
            model.eval()._hidden(idx)
    finally:
        for block in model.transformer.h:
            block.attn.attn_record = None
        model.train(was_training)
    return records


def have_matplotlib():
    """True when matplotlib can be imported (it is optional: only pictures need it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(width_px, height_px, layout=None):
    """A matplotlib Figure of the given pixel size, detached from pyplot.

    Figure objects without pyplot keep no global state, so a training loop can draw one at
    every evaluation without leaking memory or needing a display (the Agg renderer is used).
    """
    try:
        import matplotlib
    except ImportError:
        raise cli.ConfigError("pictures need matplotlib: pip install matplotlib") from None
    matplotlib.use('Agg')  # no display needed; harmless if a backend is already set
    from matplotlib.figure import Figure
    width_px, height_px = round(width_px), round(height_px)  # whole pixels: the PNG is exactly this size
    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout=layout)


def _save(fig, path, described=None):
    """Write the PNG atomically (lib/files.py), so a viewer never sees half a file. described:
    what the picture shows (the runs' knobs and results), kept as JSON in the PNG's Description,
    so a picture can be checked against the config that should have made it (tests/test_repo.py)."""
    metadata = {'Description': json.dumps(described)} if described else None
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=DPI, metadata=metadata))


def run_record(out_dir):
    """A run's knobs (config.json) and what it reached (last iteration, lowest val loss), for _save."""
    try:
        with open(os.path.join(out_dir, 'config.json')) as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = None
    try:
        records = read_log(out_dir, notice=lambda m: None)
    except cli.ConfigError:  # a checkpoint without a log (nanoGPT's)
        records = []
    vals = [r for r in records if r.get('kind') == 'eval' and r.get('split') == 'val']
    return dict(run=os.path.basename(os.path.normpath(out_dir)), config=config,
                iterations=max((r['iter'] for r in vals), default=None),
                best_val_loss=min((r['loss'] for r in vals), default=None))


# -----------------------------------------------------------------------------
# loss curves


def read_log(out_dir, notice=None):
    """The records of out_dir/log.jsonl (train.py appends one JSON object per line).

    A last line that does not parse is skipped silently: train.py may be writing it right now.
    Other lines that are not a record (garbled, not JSON, no iter/loss) are skipped too, with one
    notice on stderr naming them, so a damaged log still gives a picture of what is readable.
    """
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.isfile(path):
        raise cli.ConfigError(f"no {path}: is {out_dir} a training run's out_dir?")
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        raise cli.ConfigError(f"cannot read {path}: {e.strerror}") from None
    records, bad = [], []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            number = (int, float)
            ok = isinstance(record, dict) and isinstance(record.get('iter'), number)
            if ok and record.get('kind', 'train') in ('train', 'eval'):  # loss curves need a loss and tokens
                ok = isinstance(record.get('loss'), number) and isinstance(record.get('tokens', 0), number)
        except ValueError:
            ok = False
        if ok:
            records.append(record)
        elif i != len(lines) - 1 or line.endswith('\n'):  # an unfinished last line is being written
            bad.append(i + 1)
    if bad:
        (notice or _stderr)(f"notice: skipped {len(bad)} unreadable line(s) of {path} "
                            f"(line {', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
    return records


def _stderr(message):
    print(message, file=sys.stderr)


# the right panel's x axis: log.jsonl key -> axis label
X_AXES = {'tokens': 'tokens seen', 'time': 'seconds since training started'}
Y_AXES = {'loss': 'loss (nats per token)', 'bpb': 'bits per byte (of the evaluated text)'}


def _visible(style, points):
    """A line through one point draws nothing: that one gets a marker (a dot) to be seen."""
    return style if points != 1 or style.get('marker') else dict(style, marker='o', ms=4)


def plot_loss(out_dirs, path, width_px=1200, height_px=600, x='tokens', y='loss'):
    """PNG of train and val loss of each run: against iterations (left) and, on the right,
    tokens (x='tokens') or wall-clock seconds since the run's training loop started (x='time').

    Lines per run (one colour each): val loss at evaluations (solid, dots), train loss at
    evaluations (dashed), and the logged per-step training loss (thinner, lighter, underneath).
    y='bpb': bits per byte of the evaluations instead, which compares runs of any tokenizers
    (training steps log no bpb, so their line is left out).
    """
    if x not in X_AXES:
        raise cli.ConfigError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    if y not in Y_AXES:
        raise cli.ConfigError(f"y must be one of {', '.join(Y_AXES)}, got {y!r}")
    logs = [read_log(d) for d in out_dirs]  # a missing log fails before any drawing
    names = [os.path.basename(os.path.normpath(d)) for d in out_dirs]
    fig = _new_figure(width_px, height_px)
    ax_iter, ax_right = fig.subplots(1, 2)
    any_points = False
    for i, (records, name) in enumerate(zip(logs, names)):
        color = f'C{i % 10}'
        series = [  # (label, style, records)
            (f'{name} train (every logged step)', dict(lw=1.3, alpha=0.55, zorder=1),
             [r for r in records if r.get('kind') == 'train']),
            (f'{name} train (eval)', dict(ls='--', lw=1.6, zorder=2),
             [r for r in records if r.get('kind') == 'eval' and r.get('split') == 'train']),
            (f'{name} val', dict(lw=2.2, marker='o', ms=4, zorder=3),
             [r for r in records if r.get('kind') == 'eval' and r.get('split') == 'val']),
        ]
        for label, style, rows in series:
            rows = [r for r in rows if r.get(y) is not None]  # bpb: evaluations of text data only
            if not rows:
                continue
            any_points = True
            ax_iter.plot([r['iter'] for r in rows], [r[y] for r in rows], color=color, label=label,
                         **_visible(style, len(rows)))
            rows = [r for r in rows if x in r]  # logs of older versions have no 'time'
            ax_right.plot([r[x] for r in rows], [r[y] for r in rows], color=color, label=label,
                          **_visible(style, len(rows)))
    hellaswag = [[r for r in records if r.get('kind') == 'hellaswag'] for records in logs]
    if any(hellaswag):  # train.py's hellaswag_interval: accuracy on its own scale, right axis
        ax_acc = ax_iter.twinx()
        for i, (rows, name) in enumerate(zip(hellaswag, names)):
            if rows:
                ax_acc.plot([r['iter'] for r in rows], [r['acc_norm'] for r in rows], color=f'C{i % 10}',
                            ls=':', marker='s', ms=3, label=f'{name} HellaSwag acc_norm')
        ax_acc.set_ylabel('HellaSwag acc_norm')
        ax_acc.legend(fontsize=8, loc='upper right')
    from matplotlib.ticker import EngFormatter
    ax_iter.set_xlabel('iteration')
    ax_right.set_xlabel(X_AXES[x])
    if x == 'tokens':
        ax_right.xaxis.set_major_formatter(EngFormatter(sep=''))  # 300k, 1.2M, ...
    for ax in (ax_iter, ax_right):
        ax.set_ylabel(Y_AXES[y])
        ax.grid(True, alpha=0.4)
    if any_points:
        ax_iter.legend(fontsize=8)
    else:
        ax_iter.text(0.5, 0.5, 'no log entries yet' if y == 'loss' else 'no bits per byte logged (not text, or an older run)',
                     ha='center', va='center', transform=ax_iter.transAxes)
    fig.suptitle(f"{'loss' if y == 'loss' else 'bits per byte'}: {', '.join(names)}")
    fig.tight_layout()
    _save(fig, path, {'runs': [run_record(d) for d in out_dirs]})
    return fig


# -----------------------------------------------------------------------------
# attention heatmaps


def token_label(piece):
    """A decoded token as a one-line axis label: newlines and tabs escaped, '$' not math, and a
    token of spaces only shown as '␣' so it does not look like a missing label."""
    if piece and piece.strip(' ') == '':
        return '\u2423' * len(piece)
    return (piece.replace('\\', '\\\\').replace('\n', '\\n').replace('\r', '\\r')
            .replace('\t', '\\t').replace('$', r'\$'))


def glyph_font(texts):
    """(font properties, texts) for labels that show every character: matplotlib's monospace font
    when it has them all, else an installed font that has them (a CJK font for Chinese, ...);
    with none, the missing characters become code points (U+4E2D) and one notice says so,
    instead of a 'Glyph missing' warning per label and empty boxes in the picture."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font
    wanted = {ord(c) for t in texts for c in t if not c.isspace()}

    def missing_from(path):
        try:
            return wanted - set(FT2Font(path).get_charmap())
        except (OSError, RuntimeError):
            return wanted
    default = font_manager.FontProperties(family='monospace')
    missing = missing_from(font_manager.findfont(default))
    if not missing:
        return default, texts
    # fonts made for many scripts first (Noto CJK, WenQuanYi, Droid Sans Fallback, Unifont)
    # (Last Resort, which matplotlib ships, maps every character to a box: not a glyph)
    known = sorted({f.fname for f in font_manager.fontManager.ttflist if 'lastresort' not in f.fname.lower()},
                   key=lambda f: not any(k in f.lower() for k in ('cjk', 'wqy', 'fallback', 'unifont', 'noto')))
    for fname in known:
        if not missing_from(fname):
            return font_manager.FontProperties(fname=fname), texts
    shown = ' '.join(chr(c) for c in sorted(missing)[:6]) + (' ...' if len(missing) > 6 else '')
    print(f"notice: no installed font has glyphs for {shown}: the labels show their code points (U+XXXX); "
          f"install a font that has them (e.g. fonts-noto-cjk) for the characters themselves", file=sys.stderr)
    return default, [''.join(f"U+{ord(c):04X}" if ord(c) in missing else c for c in t) for t in texts]


def plot_attention(model, ids, labels, path, title=None, out_dir=None):
    """PNG grid of the attention probabilities of every layer (rows) and head (columns).

    ids: the prompt's token ids; labels: one axis label per token. Each panel shows query
    positions down and key positions across, on one colour scale 0..1 for all panels; the scale
    is a square root (PowerNorm 0.5) so that the many small weights of a long prompt stay visible.
    Panels grow with the prompt so a few dozen token labels stay readable (8 pt at ~0.14 inch
    per token); the layout is constrained, so the grid, labels and colour bar fill the canvas.
    Returns the Figure (its first n_layer * n_head axes are the panels, row by row).
    """
    import torch
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    maps = attention_maps(model, idx)  # n_layer tensors (1, nh, T, T)
    n_layer, n_head, T = len(maps), maps[0].size(1), len(ids)
    # one token per ~0.14 inch keeps 8 pt labels apart; a big grid (GPT-2's 12 x 12) gets
    # smaller cells and labels so the picture stays under ~40 inches (4000 px) a side
    cell = min(0.14, 40 / (max(n_layer, n_head) * (T + 6)))
    label_size = max(4.0, min(8.0, cell * 72 * 0.85))  # points: 85% of a cell's height
    panel = cell * T + 0.35  # + room for the panel title
    font, (title, *text) = glyph_font([title or 'attention'] + [token_label(s) for s in labels])
    margin = 0.25 + 0.085 * label_size / 8 * max(len(s) for s in text)  # tick labels
    fig = _new_figure(DPI * (n_head * panel + margin + 1.3), DPI * (n_layer * panel + margin + 0.7),
                      layout='constrained')
    axes = fig.subplots(n_layer, n_head, squeeze=False, sharex=True, sharey=True)
    from matplotlib.colors import PowerNorm
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    for layer in range(n_layer):
        probs = maps[layer][0].float().cpu().numpy()  # (nh, T, T)
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(probs[head], cmap='viridis', norm=norm, interpolation='nearest')
            ax.set_title(f'layer {layer} head {head}', fontsize=9)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.tick_params(length=0, pad=1)
            if layer == n_layer - 1:
                ax.set_xticklabels(text, rotation=90, fontproperties=font, fontsize=label_size)
            if head == 0:
                ax.set_yticklabels(text, fontproperties=font, fontsize=label_size)
                ax.set_ylabel('query', fontsize=9)
        axes[n_layer - 1][0].set_xlabel('key', fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.5, aspect=30, label='attention probability (square-root scale)')
    title_font = font.copy()
    title_font.set_size('large')
    fig.suptitle(title, fontproperties=title_font)
    _save(fig, path, {'runs': [run_record(out_dir)] if out_dir else [], 'tokens': labels})
    return fig
