"""
Your own tokenizer (bpe.py, prepare.py --tokenizer=bpe) and bits per byte (train.py,
evaluate.py, plot.py): byte-exact round trips in any script, trained on the train split only,
one-line errors that write nothing, and bits per byte checked against an independent count.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib import bpe
import prepare
from lib import tokenizers
from lib import tokenfiles
from lib import evaluation
from local_data import NO_SHAKESPEARE, SHAKESPEARE
from model import GPT, GPTConfig
from helpers import ENV, REPO, TINY, read_log, run_train

pytest.importorskip('rustbpe', reason='training a BPE needs rustbpe (pip install rustbpe)')

MIXED = ("The quick brown fox jumps over the lazy dog. " * 40 + "Καλημέρα κόσμε, τι κάνεις; " * 40
         + "我们的模型学习中文。" * 40 + "emoji 🎉🙂 and naïve café; " * 40)


def prepare_text(tmp_path, text, *argv, name='mine'):
    source = tmp_path / f'{name}.txt'
    source.write_text(text, encoding='utf-8')
    return subprocess.run([sys.executable, str(REPO / 'prepare.py'), 'text', f'--input={source}', f'--name={name}',
                           f'--data_dir={tmp_path / "data"}', *argv], capture_output=True, text=True, timeout=120)


def test_any_utf8_text_round_trips_byte_for_byte(tmp_path):
    r = prepare_text(tmp_path, MIXED, '--tokenizer=bpe', '--vocab_size=300')
    assert r.returncode == 0, r.stderr
    assert 'merges learned' in r.stderr  # progress and the time it took
    folder = tmp_path / 'data' / 'mine'
    meta = json.loads((folder / 'meta.json').read_text())
    assert meta['tokenizer'] == 'bpe' and meta['vocab_size'] == 300 and meta['bpe']['file'] == 'tokenizer.tiktoken'
    tok = tokenizers.load_tokenizer(folder)
    ids = np.concatenate([np.fromfile(folder / f'{s}.bin', dtype=np.uint16) for s in ('train', 'val')]).tolist()
    assert tok.decode(ids) == MIXED  # the data decodes to the text exactly
    # text the tokenizer never saw, every script, control characters: no unknown token, exact
    for text in ["Привет, мир! שלום עולם", "日本語のテキスト", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\t\r\n end", "<|endoftext|> a", ""]:
        encoded = tok.encode(text)
        assert tok.decode(encoded) == text and all(0 <= i < 300 for i in encoded)
    assert tok.encode("<|endoftext|>") == [299]  # the one special token, the last id


def test_the_tokenizer_never_sees_the_val_text(tmp_path):
    """Trained on the train split only: a word that occurs only in the last 10% gets no merges."""
    text = "ordinary words of the training text. " * 300 + "zyxwvzyxwv " * 100
    assert text.index("zyxwv") > 0.9 * len(text)
    assert prepare_text(tmp_path, text, '--tokenizer=bpe', '--vocab_size=280').returncode == 0
    ranks = bpe.parse_ranks((tmp_path / 'data' / 'mine' / 'tokenizer.tiktoken').read_text())
    assert not any(b'zy' in token or b'xw' in token for token in ranks)
    assert any(b'ord' in token for token in ranks)  # merges of the train text did happen


@pytest.mark.parametrize('argv, code, fragment', [
    (['--tokenizer=bpe', '--vocab_size=256'], 2, 'between 257'),
    (['--tokenizer=bpe', '--vocab_size=70000'], 2, '65,536'),
    (['--tokenizer=bpe'], 2, '--vocab_size'),
    (['--tokenizer=char', '--vocab_size=500'], 2, '--vocab_size is for --tokenizer=bpe'),
    (['--tokenizer=bpe', '--vocab_size=60000'], 1, 'supports only'),
    (['--tokenizer=wordpiece'], 2, '--tokenizer must be char, gpt2 or bpe'),
])
def test_bad_vocabularies_are_one_line_and_write_nothing(tmp_path, argv, code, fragment):
    r = prepare_text(tmp_path, "a small text. " * 100, *argv)
    assert r.returncode == code and r.stderr.splitlines()[-1].startswith('error: ') and fragment in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr
    assert not (tmp_path / 'data' / 'mine').exists()


def test_non_utf8_input_and_a_missing_trainer_are_one_line(tmp_path):
    bad = tmp_path / 'latin1.txt'
    bad.write_bytes("café crème".encode('latin-1') * 100)
    r = subprocess.run([sys.executable, str(REPO / 'prepare.py'), 'text', f'--input={bad}', '--tokenizer=bpe',
                        '--vocab_size=300', f'--data_dir={tmp_path / "d"}'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith('error: ') and 'not UTF-8' in r.stderr
    code = (f"import sys, runpy; sys.modules['rustbpe'] = None; sys.argv = ['prepare.py', 'text', "
            f"'--input={tmp_path / 'ok.txt'}', '--tokenizer=bpe', '--vocab_size=300', '--data_dir={tmp_path / 'd'}']; "
            f"runpy.run_path('prepare.py', run_name='__main__')")
    (tmp_path / 'ok.txt').write_text("some text " * 100)
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and 'pip install rustbpe' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path / 'd').exists()


def test_a_changed_tokenizer_file_is_refused(tmp_path):
    assert prepare_text(tmp_path, MIXED, '--tokenizer=bpe', '--vocab_size=300').returncode == 0
    path = tmp_path / 'data' / 'mine' / 'tokenizer.tiktoken'
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1] + [lines[-1].split()[0] + " 5"]) + "\n")
    with pytest.raises(tokenfiles.PrepareError, match='sha256'):
        tokenizers.load_tokenizer(tmp_path / 'data' / 'mine')


@pytest.mark.skipif(SHAKESPEARE is None, reason=NO_SHAKESPEARE)
def test_a_builtin_text_gets_its_own_bpe_folder(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / 'prepare.py'), 'shakespeare', '--tokenizer=bpe', '--vocab_size=512',
                        f'--input={SHAKESPEARE}', f'--data_dir={tmp_path}'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'shakespeare_bpe512' / 'tokenizer.tiktoken').is_file() and not (tmp_path / 'shakespeare').exists()
    tok = tokenizers.load_tokenizer(tmp_path / 'shakespeare_bpe512')
    val = np.fromfile(tmp_path / 'shakespeare_bpe512' / 'val.bin', dtype=np.uint16).tolist()
    text = SHAKESPEARE.read_text(encoding='utf-8')
    assert tok.decode(val) == text[int(len(text) * 0.9):]


# -----------------------------------------------------------------------------
# bits per byte

def test_perplexity_bits_per_byte_match_an_independent_count():
    """evaluation.perplexity's bpb: the scored tokens' negative log-likelihood in bits over the
    UTF-8 bytes of the text they decode to, computed here in one plain forward pass; the
    <|endoftext|> target is left out of both."""
    chars = sorted(set("abc αβγ 中文🎉\n"))
    tok = tokenizers.char_tokenizer(chars)
    text = "abc αβγ 中文🎉\n" * 3
    ids = tok.encode(text)
    eot = len(chars)  # a vocabulary with one more id, standing for a document end
    tokens = ids[:20] + [eot] + ids[20:]
    token_bytes = tok.token_bytes + [0]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=eot + 1, n_layer=1, n_head=2, n_embd=16)).eval()
    r = evaluation.perplexity(model, np.array(tokens), token_bytes=token_bytes)
    x, y = torch.tensor([tokens[:-1]]), torch.tensor(tokens[1:])
    with torch.no_grad():
        nats = F.cross_entropy(model(x, x)[0][0], y, reduction='none')
    text_targets = y != eot
    expected = nats[text_targets].sum().item() / math.log(2) / len(tok.decode(tokens[1:20] + tokens[21:]).encode())
    assert r['bpb'] == pytest.approx(expected, rel=1e-6)
    assert r['loss'] == pytest.approx(nats.mean().item(), rel=1e-6)


def char_dataset(folder, text):
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    folder.mkdir(parents=True)
    ids[:int(len(ids) * 0.9)].tofile(folder / 'train.bin')
    ids[int(len(ids) * 0.9):].tofile(folder / 'val.bin')
    (folder / 'meta.json').write_text(json.dumps({'vocab_size': len(chars), 'tokenizer': 'char', 'chars': chars}))
    return folder


def test_train_logs_bits_per_byte_at_every_evaluation(tmp_path):
    data = char_dataset(tmp_path / 'data', "To be, or not to be: καλημέρα. " * 200)
    out = tmp_path / 'out'
    proc = run_train(*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=4', '--eval_interval=2')
    assert proc.returncode == 0, proc.stderr
    evals = [json.loads(line) for line in open(out / 'log.jsonl') if '"eval"' in line]
    assert len(evals) == 6 and all(r['bpb'] > 0 for r in evals)
    # bits per byte = loss in bits over bytes per token; the Greek letters take 2 bytes each
    assert all(r['bpb'] < r['loss'] / math.log(2) for r in evals)
    assert 'val bpb' in proc.stdout and 'bits per byte)' in proc.stdout  # the evaluation lines and the summary
    r = subprocess.run([sys.executable, 'plot.py', 'loss', str(out), '--y=bpb', f'--out={tmp_path / "bpb.png"}'],
                       cwd=REPO, capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and (tmp_path / 'bpb.png').is_file(), r.stderr
    r = subprocess.run([sys.executable, 'evaluate.py', 'perplexity', f'--out_dir={out}', f'--data_dir={data}',
                        '--device=cpu'], cwd=REPO, capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and ', bpb ' in r.stdout, r.stderr


def test_counting_reports_per_token_numbers_only(tmp_path):
    prepare.prepare('counting', data_dir=tmp_path, num_train=300, num_val=50)
    out = tmp_path / 'out'
    proc = run_train(*TINY, f'--data_dir={tmp_path / "counting"}', f'--out_dir={out}', '--max_iters=2',
                     '--eval_interval=2')
    assert proc.returncode == 0, proc.stderr
    assert "bits per byte: not computed (the counting task's tokens are numbers" in proc.stdout
    assert all(r[1] != 'eval' or json.loads(line)['bpb'] is None
               for r, line in zip(read_log(out), open(out / 'log.jsonl')))


# -----------------------------------------------------------------------------
# every script on an own-BPE run

@pytest.mark.slow
def test_every_script_works_on_an_own_bpe_run(tmp_path):
    assert prepare_text(tmp_path, MIXED * 3, '--tokenizer=bpe', '--vocab_size=300').returncode == 0
    data, out = tmp_path / 'data' / 'mine', tmp_path / 'out'

    def run(*argv):
        r = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True, env=ENV,
                           timeout=300)
        assert r.returncode == 0, (argv, r.stderr[-2000:])
        return r
    run('train.py', *TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=6', '--eval_interval=3')
    assert 'bpb' in json.loads(open(out / 'log.jsonl').readlines()[-1])
    sample = run('sample.py', f'--out_dir={out}', '--start=Καλημέρα 中文', '--max_new_tokens=10', '--device=cpu')
    assert sample.stdout.startswith('Καλημέρα 中文')
    run('evaluate.py', 'perplexity', f'--out_dir={out}', '--device=cpu')
    attention = run('plot.py', 'attention', f'--out_dir={out}', '--start=The quick fox', f'--out={tmp_path / "a.png"}')
    assert 'wrote' in attention.stdout
    run('sample.py', f'--out_dir={out}', '--start=The', '--max_new_tokens=5', '--quantize=int8', '--device=cpu')
    lora = tmp_path / 'lora'
    run('train.py', *TINY, f'--data_dir={data}', f'--out_dir={lora}', f'--init_from={out / "ckpt.pt"}',
        '--lora_rank=2', '--max_iters=2', '--eval_interval=2')
    run('sample.py', f'--out_dir={lora}', '--start=The', '--max_new_tokens=5', '--device=cpu')
    # the checkpoint keeps the tokenizer: sampling works with the data folder moved away
    data.rename(tmp_path / 'moved')
    again = run('sample.py', f'--out_dir={out}', '--start=The quick', '--max_new_tokens=5', '--device=cpu')
    assert again.stdout.startswith('The quick')
