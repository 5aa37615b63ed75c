"""Tests for evaluate.py and plot.py: perplexity against a plain reference, counting accuracy
after a short training run, and the PNGs (size read back from the file, panel count).

CPU only, offline, tiny models; everything is written under pytest's tmp_path.
"""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib import cli
from lib import runs
import evaluate
import plot
import prepare
from lib import tokenfiles
from lib import plotting
from lib import evaluation
from model import GPT, GPTConfig


def tiny_gpt(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer,
                          n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True))
    return model.eval()


# -----------------------------------------------------------------------------
# perplexity


def reference_loss(model, tokens, stride):
    """One window at a time, written out plainly: the summed cross-entropy of every target
    position 1..N-1, each taken from the window that reaches it first; windows start at
    0, stride, 2*stride, ..., the last one moved back to end at the last token."""
    block = model.config.block_size
    data = torch.tensor(np.asarray(tokens, dtype=np.int64))
    last = len(tokens) - 1  # the last target position
    total, count, done, k = 0.0, 0, 0, 0  # done: targets 1..done are scored
    while done < last:
        begin = max(0, min(k * stride, last - block))
        end = min(begin + block, last)  # this window's inputs are data[begin:end]
        logits, _ = model(data[None, begin:end], data[None, begin + 1:end + 1])  # (1, T, V)
        new = torch.arange(begin + 1, end + 1) > done  # targets not yet scored
        total += F.cross_entropy(logits[0][new], data[begin + 1:end + 1][new], reduction='sum').item()
        count += int(new.sum())
        done, k = end, k + 1
    return total / count, count


@pytest.mark.parametrize('n_tokens,stride,batch_size', [(100, 8, 3), (100, 5, 8), (100, 16, 1), (17, 4, 2)])
def test_perplexity_matches_plain_cross_entropy(n_tokens, stride, batch_size):
    model = tiny_gpt(block_size=16)
    tokens = np.random.default_rng(n_tokens + stride).integers(0, 50, size=n_tokens).astype(np.uint16)
    r = evaluation.perplexity(model, tokens, stride=stride, batch_size=batch_size)
    ref_loss, ref_count = reference_loss(model, tokens, stride)
    assert r['tokens'] == ref_count == n_tokens - 1
    assert r['loss'] == pytest.approx(ref_loss, rel=1e-5)
    assert r['perplexity'] == pytest.approx(math.exp(ref_loss), rel=1e-5)


def test_perplexity_of_a_split_shorter_than_the_block():
    model = tiny_gpt(block_size=32)
    tokens = np.arange(20, dtype=np.uint16) % 50  # 19 targets, fewer than block_size
    r = evaluation.perplexity(model, tokens, stride=8)
    data = torch.tensor(tokens.astype(np.int64))
    logits, _ = model(data[None, :-1], data[None, 1:])
    expected = F.cross_entropy(logits[0], data[1:]).item()  # the whole split in one window
    assert r['windows'] == 1 and r['tokens'] == 19
    assert r['loss'] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('n_tokens,block_size,stride', [
    (2, 4, 1), (5, 4, 4), (6, 4, 4), (100, 16, 16), (100, 16, 1), (101, 16, 7), (1000, 64, 48)])
def test_window_plan_scores_every_token_exactly_once(n_tokens, block_size, stride):
    times_scored = np.zeros(n_tokens, dtype=int)
    for begin, length, skip in evaluation.window_plan(n_tokens, block_size, stride):
        assert length == min(block_size, n_tokens - 1)  # full windows: they batch without padding
        assert 0 <= skip < length
        times_scored[begin + 1 + skip:begin + 1 + length] += 1  # target positions
    assert times_scored[0] == 0  # the first token has no prediction
    assert (times_scored[1:] == 1).all()


def test_window_plan_rejects_bad_input():
    with pytest.raises(ValueError, match='at least 2 tokens'):
        evaluation.window_plan(1, 16, 8)
    with pytest.raises(ValueError, match='stride'):
        evaluation.window_plan(100, 16, 17)


# -----------------------------------------------------------------------------
# counting


@pytest.mark.slow
def test_counting_reaches_full_accuracy_after_short_training(tmp_path, capsys):
    prepare.prepare('counting', data_dir=tmp_path, num_train=4000, num_val=100)
    meta = tokenfiles.read_meta(tmp_path / 'counting')
    data = np.fromfile(tmp_path / 'counting' / 'train.bin', dtype=np.uint16).astype(np.int64)
    model = tiny_gpt(block_size=32, vocab_size=meta['vocab_size'], n_layer=1, n_embd=32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        offsets = rng.integers(0, len(data) - 33, size=32)
        window = torch.from_numpy(data[offsets[:, None] + np.arange(33)])  # (32, 33)
        _, loss = model(window[:, :-1].contiguous(), window[:, 1:].contiguous())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    assert 1 in meta['val_starts'] and 10 in meta['val_starts']  # held out of training
    results, accuracy = evaluation.counting_accuracy(model, [1, 10], meta['separator'])
    assert [r['generated'] for r in results] == [[4, 5, 6, 7, 8], [13, 14, 15, 16, 17]]
    assert accuracy == 1.0


def test_counting_accuracy_counts_from_the_prompt():
    """A model that always answers 5 gets exactly the one position where 5 is right."""
    class AlwaysFive(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, idx, max_new_tokens, temperature=1.0):
            assert temperature == 0.0  # greedy
            return torch.cat([idx, torch.full((idx.size(0), max_new_tokens), 5)], dim=1)

    results, accuracy = evaluation.counting_accuracy(AlwaysFive(), [1, 10], separator=100)
    assert results[0] == dict(prompt=[1, 2, 3], generated=[5, 5, 5, 5, 5], correct=1)
    assert results[1]['correct'] == 0
    assert accuracy == pytest.approx(1 / 10)


# -----------------------------------------------------------------------------
# pictures

@pytest.fixture
def mpimg():
    """matplotlib.image, for reading PNGs back; tests that draw skip without matplotlib."""
    return pytest.importorskip('matplotlib.image', reason='pictures need matplotlib')


def write_log(out_dir, iters=5):
    out_dir.mkdir()
    with open(out_dir / 'log.jsonl', 'w') as f:
        for it in range(iters):
            f.write(json.dumps(dict(iter=it, kind='train', split='train', loss=3.0 / (it + 1),
                                    lr=1e-3, tokens=(it + 1) * 512, time=0.5 * (it + 1))) + '\n')
            if it % 2 == 0:
                for split, bonus in (('train', 0.0), ('val', 0.1)):
                    f.write(json.dumps(dict(iter=it, kind='eval', split=split, loss=3.0 / (it + 1) + bonus,
                                            lr=1e-3, tokens=it * 512)) + '\n')
        f.write('{"iter": 5, "kind": "tr')  # a line train.py is still writing


def test_loss_plot_of_several_runs_has_the_asked_size(tmp_path, mpimg):
    write_log(tmp_path / 'run-a')
    write_log(tmp_path / 'run-b', iters=3)
    path = tmp_path / 'loss.png'
    fig = plotting.plot_loss([tmp_path / 'run-a', tmp_path / 'run-b'], path)
    image = mpimg.imread(path)
    assert image.shape[:2] == (600, 1200)  # rows, columns
    assert image.std() > 0  # something was drawn
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert 'run-a val' in labels and 'run-b train (eval)' in labels


def test_loss_plot_draws_a_series_of_one_point(tmp_path, mpimg):
    """A run with one logged step and one evaluation: every series in the legend is drawn on both
    panels, a single point as a marker (a line through one point draws nothing); longer series
    keep their style."""
    write_log(tmp_path / 'one', iters=1)
    write_log(tmp_path / 'two', iters=2)
    fig = plotting.plot_loss([tmp_path / 'one', tmp_path / 'two'], tmp_path / 'loss.png')
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f'{run} {series}' for run in ('one', 'two')
                      for series in ('train (every logged step)', 'train (eval)', 'val')]
    for ax in fig.axes[:2]:
        lines = {line.get_label(): line for line in ax.get_lines()}
        for label in labels:
            line = lines[label]
            points = len(line.get_xdata())
            assert points >= 1, label
            if points == 1:
                assert line.get_marker() not in (None, '', ' ', 'None') and line.get_markersize() > 0, label
        assert len(lines['one train (every logged step)'].get_xdata()) == 1
        assert lines['two train (every logged step)'].get_marker() in ('None', '', ' ', None)  # 2 points: a line


def test_loss_plot_cli_writes_into_the_run_folder(tmp_path, mpimg):
    write_log(tmp_path / 'run')
    assert plot.main(['loss', str(tmp_path / 'run')]) == 0
    assert mpimg.imread(tmp_path / 'run' / 'loss.png').shape[:2] == (600, 1200)


def test_loss_plot_against_time(tmp_path, mpimg):
    """--x=time: the right panel's x values are log.jsonl's seconds (eval lines without 'time' are left out)."""
    write_log(tmp_path / 'run')
    path = tmp_path / 'loss.png'
    assert plot.main(['loss', str(tmp_path / 'run'), '--x=time', f'--out={path}']) == 0
    assert mpimg.imread(path).shape[:2] == (600, 1200)
    fig = plotting.plot_loss([tmp_path / 'run'], path, x='time')
    right = fig.axes[1]
    assert right.get_xlabel() == 'seconds since training started'
    steps = [line for line in right.get_lines() if line.get_label() == 'run train (every logged step)'][0]
    assert list(steps.get_xdata()) == [0.5, 1.0, 1.5, 2.0, 2.5]
    with pytest.raises(SystemExit, match="x must be one of tokens, time, got 'wall'"):
        plot.main(['loss', str(tmp_path / 'run'), '--x=wall'])


def test_loss_plot_names_a_missing_log(tmp_path):
    with pytest.raises(SystemExit, match='log.jsonl'):
        plotting.plot_loss([tmp_path], tmp_path / 'loss.png')


def test_attention_grid_has_a_panel_per_layer_and_head(tmp_path, mpimg):
    model = tiny_gpt(block_size=16, n_layer=3, n_head=2)
    ids = [1, 2, 3, 4, 5, 6]
    labels = ['a', ' b', '\n', 'd$', 'e', 'f']
    path = tmp_path / 'attention.png'
    fig = plotting.plot_attention(model, ids, labels, path)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3 * 2
    # each panel shows the model's own attention probabilities for that layer and head
    maps = plotting.attention_maps(model, torch.tensor([ids]))
    np.testing.assert_allclose(panels[5].images[0].get_array(), maps[2][0, 1].numpy(), rtol=1e-6)
    width, height = fig.get_size_inches() * fig.dpi
    image = mpimg.imread(path)
    assert image.shape[:2] == (round(height), round(width)) and image.std() > 0
    ticks = [t.get_text() for t in panels[4].get_xticklabels()]  # bottom row carries key labels
    assert ticks[2] == '\\n' and ticks[3] == 'd\\$'


def test_attention_labels_without_a_font_show_code_points_and_no_glyph_warnings(tmp_path, mpimg, capsys, recwarn):
    """Chinese labels with no installed font that has them (CI): one notice, code points as
    labels, none of matplotlib's 'Glyph missing' warnings (there were ~30 before)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font
    chinese = "中文模型"
    have = [f.fname for f in font_manager.fontManager.ttflist if 'lastresort' not in f.fname.lower()
            and all(ord(c) in FT2Font(f.fname).get_charmap() for c in chinese)]
    model = tiny_gpt(block_size=16, n_layer=1, n_head=2)
    labels = list(chinese) + ['a', 'é']
    fig = plotting.plot_attention(model, list(range(len(labels))), labels, tmp_path / 'a.png', title=f"attention: {chinese}")
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert not [w for w in recwarn if 'Glyph' in str(w.message)]
    err = capsys.readouterr().err
    if have:  # a CJK font is installed: the characters themselves
        assert ticks[:4] == list(chinese) and 'notice' not in err
    else:
        assert ticks[:4] == ['U+4E2D', 'U+6587', 'U+6A21', 'U+578B'] and ticks[5] == 'é'
        assert err.count('notice: no installed font has glyphs') == 1
    assert mpimg.imread(tmp_path / 'a.png').ndim == 3


def test_glyph_font_finds_an_installed_font_that_has_the_characters():
    """Characters the default monospace font lacks but another installed font has (matplotlib
    ships STIX: its integral signs and arrows) are drawn with that font, not replaced."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font
    default = set(FT2Font(font_manager.findfont(font_manager.FontProperties(family='monospace'))).get_charmap())
    stix = set(FT2Font(font_manager.findfont(font_manager.FontProperties(family='STIXGeneral'))).get_charmap())
    only_stix = sorted(c for c in stix - default if chr(c).isprintable() and not chr(c).isspace())[:3]
    assert only_stix, "STIX has characters that DejaVu Sans Mono lacks"
    text = ''.join(map(chr, only_stix))
    font, texts = plotting.glyph_font([text])
    assert texts == [text]
    assert not set(only_stix) - set(FT2Font(font_manager.findfont(font)).get_charmap())


# -----------------------------------------------------------------------------
# command lines, on a checkpoint saved the way train.py saves one


def save_tiny_run(tmp_path, vocab_size=101):
    """A run folder with ckpt.pt for a tiny model, and counting data (tokenizer metadata)."""
    prepare.prepare('counting', data_dir=tmp_path, num_train=200, num_val=50)
    data_dir = tmp_path / 'counting'
    model = tiny_gpt(block_size=16, vocab_size=vocab_size)
    out_dir = tmp_path / 'run'
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(),
                            'model_args': dataclasses.asdict(model.config), 'iter_num': 0,
                            'best_val_loss': 9.9, 'config': {'dataset': 'counting', 'data_dir': str(data_dir)}},
                           out_dir / 'ckpt.pt')
    return model, out_dir, data_dir


def test_perplexity_cli_prints_the_numbers_of_the_function(tmp_path, capsys):
    model, out_dir, data_dir = save_tiny_run(tmp_path)
    assert evaluate.main(['perplexity', f'--out_dir={out_dir}', f'--data_dir={data_dir}', '--split=val',
                          '--stride=4', '--batch_size=16', '--device=cpu']) == 0
    tokens = np.fromfile(data_dir / 'val.bin', dtype=np.uint16)
    r = evaluation.perplexity(model, tokens, stride=4)
    out = capsys.readouterr().out
    assert f"{r['tokens']:,} tokens scored" in out and f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f}" in out


def test_counting_cli_runs_on_a_checkpoint(tmp_path, capsys):
    _, out_dir, _ = save_tiny_run(tmp_path)
    assert evaluate.main(['counting', f'--out_dir={out_dir}', '--starts=1,10', '--device=cpu']) == 0
    out = capsys.readouterr().out
    assert 'prompt [1, 2, 3] -> [' in out and 'prompt [10, 11, 12] -> [' in out and 'accuracy ' in out


def test_attention_cli_runs_on_a_checkpoint(tmp_path, mpimg):
    _, out_dir, _ = save_tiny_run(tmp_path)
    assert plot.main(['attention', f'--out_dir={out_dir}', '--start=1 2 3 4']) == 0
    assert mpimg.imread(out_dir / 'attention.png').ndim == 3


# -----------------------------------------------------------------------------
# hellaswag, against an independent computation through transformers.GPT2LMHeadModel

HELLASWAG_LIKE = [  # (context, endings): endings of different lengths, so sum and mean disagree
    ("A man is standing on a ladder. He", ["paints the wall.", "falls off the ladder and lands in a pile of leaves.",
                                           "sings.", "climbs up to the roof while holding a bucket of paint."]),
    ("The chef slices onions on a board. She", ["cries.", "puts them in a pan with butter and garlic.",
                                                "throws the knife across the room at the wall.", "smiles"]),
    ("Two kids play catch in the park. The ball", ["rolls away.", "hits a dog.",
                                                   "flies over the fence into the neighbour's garden.", "stops."]),
    ("A woman ties her running shoes. Then she", ["runs.", "starts jogging down the road toward the lake.",
                                                  "sits.", "eats a sandwich"]),
    ("Water boils in a pot on the stove. Someone", ["adds pasta.", "turns it off.", "walks away",
                                                    "pours the water into a teapot with green leaves."]),
]


def hf_tiny_gpt2(folder):
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    # a large initializer_range spreads the logits, so no two endings score nearly alike
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


def hf_ending_scores(model, enc, ctx, endings):
    """(summed, mean) cross-entropy of each ending's tokens given the context, one ending at a time."""
    ctx_ids = enc.encode_ordinary(ctx)
    sums, means = [], []
    for ending in endings:
        end_ids = enc.encode_ordinary(' ' + ending)
        ids = torch.tensor([ctx_ids + end_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)  # (T-1, V)
        nll = -logp[torch.arange(len(ctx_ids) - 1, ids.size(1) - 1), ids[0, len(ctx_ids):]]
        sums.append(nll.sum().item())
        means.append(nll.mean().item())
    return sums, means


@pytest.mark.slow  # ~12 s on the busy 2-core machine, mostly importing transformers
def test_hellaswag_matches_transformers_gpt2(tmp_path, capsys):
    """Labels are set to transformers' lowest-sum ending, so acc must be exactly 1; acc_norm must
    equal the share of examples where transformers' lowest-mean ending is that same one."""
    tiktoken = pytest.importorskip('tiktoken')
    try:
        enc = tiktoken.get_encoding('gpt2')
    except Exception as e:
        pytest.skip(f"no GPT-2 BPE files offline ({type(e).__name__})")
    hf = hf_tiny_gpt2(tmp_path / 'hf')
    lines, agree = [], 0
    for ctx, endings in HELLASWAG_LIKE:
        sums, means = hf_ending_scores(hf, enc, ctx, endings)
        label = int(np.argmin(sums))
        assert sorted(sums)[1] - sorted(sums)[0] > 1e-3 and sorted(means)[1] - sorted(means)[0] > 1e-4  # no near-ties
        agree += int(np.argmin(means)) == label
        lines.append(json.dumps({'ctx': ctx, 'endings': endings, 'label': label, 'activity_label': 'x'}))
    assert 0 < agree < len(lines)  # the two scores really differ on this file
    path = tmp_path / 'hellaswag_tiny.jsonl'
    path.write_text('\n'.join(lines) + '\n')

    ours = GPT.from_pretrained(str(tmp_path / 'hf')).eval()
    for batch_size in (1, 2, 16):  # padding to the longest row must not change any score
        assert evaluation.hellaswag_counts(ours, evaluation.read_hellaswag(path), enc.encode_ordinary,
                                         batch_size) == (len(lines), len(lines), agree)
    assert evaluate.main(['hellaswag', f'--init_from={tmp_path / "hf"}', f'--input={path}', '--device=cpu',
                          '--batch_size=3']) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"hellaswag: {len(lines)} examples, acc 1.0000, acc_norm {agree / len(lines):.4f}"
    assert evaluate.main(['hellaswag', f'--init_from={tmp_path / "hf"}', f'--input={path}', '--device=cpu',
                          '--limit=2']) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("hellaswag: 2 examples, acc 1.0000")


def test_hellaswag_refuses_a_char_model_and_bad_files(tmp_path, capsys):
    _, out_dir, _ = save_tiny_run(tmp_path)  # counting tokenizer: not GPT-2 BPE
    good = tmp_path / 'h.jsonl'
    good.write_text(json.dumps({'ctx': 'a', 'endings': ['b', 'c', 'd', 'e'], 'label': 0}) + '\n')
    with pytest.raises(cli.ConfigError, match='needs a GPT-2 BPE model; this one uses the counting tokenizer'):
        evaluate.main(['hellaswag', f'--out_dir={out_dir}', f'--input={good}', '--device=cpu'])
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"ctx": "a", "endings": ["b"], "label": 0}\n')
    with pytest.raises(cli.ConfigError, match='line 1: expected 4 endings'):
        evaluation.read_hellaswag(bad)
    with pytest.raises(cli.ConfigError, match='is not a file'):
        evaluation.hellaswag_path(str(tmp_path / 'missing.jsonl'))
