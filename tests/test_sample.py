"""Tests for sample.py and the model/tokenizer loading in lib/loading.py.

Checkpoints are tiny GPTs saved with train.py's checkpoint keys (no training run), except
the counting test, which trains a small model in-process for a few seconds so that its
samples mean something.
"""

import io
import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

import local_data  # noqa: F401  (TIKTOKEN_CACHE_DIR for offline GPT-2 BPE files)
import torch

from lib import cli
from lib import loading, runs
import prepare
import sample
from lib import tokenizers
from lib import sampling
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
CHARS = sorted(set("ROMEO: JULIET\nthe quick brown fox,.!?"))


def tiny_gpt(vocab_size, block_size=32, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size,
                         bias=False, dropout=0.0))


def save_like_train(model, out_dir, dataset, data_dir):
    """A checkpoint with the keys train.py writes (optimizer state left empty: sampling ignores it)."""
    runs.save_checkpoint({
        'format': runs.CHECKPOINT_FORMAT, 'model': model.state_dict(), 'optimizer': {},
        'model_args': asdict(model.config), 'iter_num': 7, 'best_val_loss': 1.5,
        'config': {'dataset': dataset, 'data_dir': str(data_dir)},
    }, Path(out_dir) / 'ckpt.pt')


@pytest.fixture
def char_run(tmp_path):
    """out/ckpt.pt of a tiny char model whose run used data/chars/meta.json."""
    data_dir = tmp_path / 'data' / 'chars'
    data_dir.mkdir(parents=True)
    (data_dir / 'meta.json').write_text(json.dumps({'vocab_size': len(CHARS), 'tokenizer': 'char', 'chars': CHARS}))
    model = tiny_gpt(len(CHARS))
    save_like_train(model, tmp_path / 'out', 'chars', data_dir)
    return tmp_path / 'out', model


def run_sample(capsys, *argv):
    sample.main(['--device=cpu', *argv])
    return capsys.readouterr().out


def run_script(*argv, cwd=None):
    env = dict(os.environ)  # TIKTOKEN_CACHE_DIR, when set (tests/local_data.py), reaches the child
    return subprocess.run([sys.executable, str(ROOT / 'sample.py'), '--device=cpu', *argv],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=120)


def expected_samples(model, tokenizer, prompt, n, max_new_tokens, seed, **kw):
    """What sample.py should print: model.generate on the same prompt batch and seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(tokenizer.encode(prompt))[None].repeat(n, 1)
    y = model.generate(x, max_new_tokens, generator=g, **kw)
    return ''.join(tokenizer.decode(row) + '\n' + sample.SEPARATOR + '\n' for row in y.tolist())


def test_seeded_samples_repeat_and_match_model_generate(char_run, capsys):
    out_dir, model = char_run
    args = (f'--out_dir={out_dir}', '--start=ROMEO:', '--num_samples=3', '--max_new_tokens=20', '--seed=5',
            '--temperature=0.9', '--top_k=10')
    first = run_sample(capsys, *args)
    assert first == run_sample(capsys, *args)
    tok = tokenizers.char_tokenizer(CHARS)
    assert first == expected_samples(model, tok, 'ROMEO:', 3, 20, 5, temperature=0.9, top_k=10)
    assert first.count(sample.SEPARATOR) == 3
    assert first != run_sample(capsys, *args[:-3], '--seed=6', *args[-2:])


def test_streaming_prints_what_batch_generation_prints(char_run, capsys):
    out_dir, model = char_run
    args = (f'--out_dir={out_dir}', '--start=JULIET', '--max_new_tokens=25', '--top_p=0.9')
    streamed = run_sample(capsys, *args)
    assert streamed == run_sample(capsys, *args, '--stream=False')
    tok = tokenizers.char_tokenizer(CHARS)
    assert streamed == expected_samples(model, tok, 'JULIET', 1, 25, sample.DEFAULTS['seed'],
                                        temperature=0.8, top_k=200, top_p=0.9)


def test_bfloat16_samples_from_bfloat16_weights_without_autocast(char_run, capsys, monkeypatch):
    """--dtype=bfloat16: sample.py decodes with the weights converted to bfloat16 once and never
    enters autocast (which casts every weight again at every token); its text is that of the
    converted model's generate."""
    out_dir, model = char_run

    def no_autocast(*args, **kwargs):
        raise AssertionError("autocast entered")
    monkeypatch.setattr(torch, 'autocast', no_autocast)
    loaded = {}
    load = loading.load_model_on_device
    monkeypatch.setattr(loading, 'load_model_on_device', lambda *a: loaded.setdefault('it', load(*a)))
    args = (f'--out_dir={out_dir}', '--start=ROMEO:', '--max_new_tokens=20', '--seed=5', '--dtype=bfloat16')
    batch = run_sample(capsys, *args, '--num_samples=2')
    assert all(p.dtype == torch.bfloat16 for p in loaded['it'][0].parameters()) and loaded['it'][2].weights_cast
    tok = tokenizers.char_tokenizer(CHARS)
    converted = model.to(torch.bfloat16)
    assert batch == expected_samples(converted, tok, 'ROMEO:', 2, 20, 5, temperature=0.8, top_k=200)
    streamed = run_sample(capsys, *args)  # one sample streams, token by token
    assert streamed == expected_samples(converted, tok, 'ROMEO:', 1, 20, 5, temperature=0.8, top_k=200)


def test_stream_printer_holds_back_half_characters():
    # GPT-2 BPE splits many non-ASCII characters over several tokens; the printed pieces
    # must never contain a replacement character and must add up to the full decode
    tok = tokenizers.gpt2_tokenizer()
    text = "naïve café — 日本語 🙂 ok"
    ids = tok.encode(text)
    assert any('\ufffd' in tok.decode([i]) for i in ids)  # the case under test really occurs
    buf = io.StringIO()
    printer = sampling.StreamPrinter(tok, buf)
    pieces = []
    for i in ids:
        before = buf.tell()
        printer.add([i])
        pieces.append(buf.getvalue()[before:])
    printer.finish()
    assert buf.getvalue() == text
    assert not any('\ufffd' in p for p in pieces)
    # Greek, and tokens in any order (a model's output): the pieces always add up to decoding all at once
    greek = tok.encode("Καλημέρα κόσμε· τι κάνεις;")
    for ids in (greek, torch.randint(0, 50257, (400,), generator=torch.Generator().manual_seed(0)).tolist()):
        buf = io.StringIO()
        printer = sampling.StreamPrinter(tok, buf)
        for i in ids:
            printer.add([i])
        printer.finish()
        assert buf.getvalue() == tok.decode(ids)


def test_an_empty_prompt_starts_from_endoftext_for_bpe_tokenizers_chat_ones_too(capsys):
    gpt2 = tokenizers.gpt2_tokenizer()
    for tok in (gpt2, tokenizers.chat_tokenizer(gpt2)):  # a chat tokenizer's encode() spells special text out
        assert sampling.encode_prompt('', tok, 64) == [50256]
        assert 'empty prompt: starting from <|endoftext|> (id 50256)' in capsys.readouterr().err


def test_empty_prompt_starts_from_newline_and_long_prompt_is_cropped(char_run, capsys):
    out_dir, _ = char_run
    sample.main(['--device=cpu', f'--out_dir={out_dir}', '--max_new_tokens=3', '--temperature=0'])
    captured = capsys.readouterr()
    assert 'empty prompt: starting from a newline' in captured.err
    assert captured.out.startswith('\n') and len(captured.out.split(sample.SEPARATOR)[0]) == 1 + 3 + 1
    long_prompt = 'the quick brown fox, ' * 5  # 105 characters, block_size 32
    sample.main(['--device=cpu', f'--out_dir={out_dir}', f'--start={long_prompt}', '--max_new_tokens=2'])
    captured = capsys.readouterr()
    assert 'keeping its last 32 tokens' in captured.err
    assert captured.out.startswith(long_prompt[-32:])


def test_bad_prompts_and_missing_checkpoints_exit_with_one_line(char_run, tmp_path):
    out_dir, _ = char_run
    r = run_script(f'--out_dir={out_dir}', '--start=ROMEO: 123 Zz')
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert "missing from the model's" in r.stderr and "5 character(s)" in r.stderr and "'1' '2' '3' 'Z' 'z'" in r.stderr
    r = run_script(f'--out_dir={tmp_path / "nowhere"}')
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith('error: no checkpoint at')


@pytest.mark.parametrize('argv, message', [
    (['--temprature=0.5'], "did you mean 'temperature'"),
    (['--start=FILE:/no/such/prompt.txt'], 'cannot read the prompt file'),
    (['--temperature=-1'], 'temperature must be >= 0'),
    (['--init_from=gpt3'], 'init_from='),
])
def test_bad_options_are_config_errors(char_run, argv, message):
    out_dir, _ = char_run
    with pytest.raises(cli.ConfigError, match=message):
        sample.main(['--device=cpu', f'--out_dir={out_dir}', *argv])


def test_corrupt_and_foreign_checkpoints_error_clearly(tmp_path):
    (tmp_path / 'corrupt').mkdir()
    (tmp_path / 'corrupt' / 'ckpt.pt').write_bytes(b'PK\x03\x04 definitely not a checkpoint')
    with pytest.raises(cli.ConfigError, match='truncated, corrupt or not a plain PyTorch checkpoint'):
        loading.load_model('resume', tmp_path / 'corrupt')
    (tmp_path / 'foreign').mkdir()
    torch.save({'weights': torch.zeros(3)}, tmp_path / 'foreign' / 'ckpt.pt')
    with pytest.raises(cli.ConfigError, match='not a training checkpoint'):
        loading.load_model('resume', tmp_path / 'foreign')
    # right keys, wrong shapes: names the mismatch instead of a load_state_dict traceback
    model = tiny_gpt(10)
    runs.save_checkpoint({'model': model.state_dict(), 'model_args': dict(asdict(model.config), n_embd=64)},
                           tmp_path / 'shapes' / 'ckpt.pt')
    with pytest.raises(cli.ConfigError, match='weights do not fit model_args'):
        loading.load_model('resume', tmp_path / 'shapes')
    # a corrupt file through the script: one line, exit 1
    r = run_script(f'--out_dir={tmp_path / "corrupt"}')
    assert r.returncode == 1 and 'Traceback' not in r.stderr and 'corrupt' in r.stderr


def test_diverged_checkpoint_errors_instead_of_sampling_garbage(char_run):
    """A checkpoint whose weights hold a NaN (a diverged run; train.py itself stops before saving
    one, nanoGPT may not) is refused at load with the weight's name, before any sampling."""
    out_dir, model = char_run
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = float('nan')
    save_like_train(model, out_dir, 'chars', out_dir.parent / 'data' / 'chars')
    with pytest.raises(cli.ConfigError, match=r'transformer\.h\.1\.mlp\.c_fc\.weight holds NaN or inf'):
        loading.load_model('resume', out_dir)
    r = run_script(f'--out_dir={out_dir}', '--max_new_tokens=5')
    assert r.returncode == 1 and 'Traceback' not in r.stderr and r.stdout == ''
    assert r.stderr.strip().splitlines()[-1].startswith('error: ') and 'diverged' in r.stderr


def test_nanogpt_checkpoint_with_meta_pkl_loads_and_samples(tmp_path, monkeypatch, capsys):
    # nanoGPT: keys of the compiled module ('_orig_mod.'), no 'format', its config globals,
    # and data/<dataset>/meta.pkl (stoi/itos) under the working directory
    model = tiny_gpt(len(CHARS))
    (tmp_path / 'out-shakespeare-char').mkdir()
    (tmp_path / 'data' / 'shakespeare_char').mkdir(parents=True)
    with open(tmp_path / 'data' / 'shakespeare_char' / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(CHARS), 'itos': dict(enumerate(CHARS)),
                     'stoi': {c: i for i, c in enumerate(CHARS)}}, f)
    torch.save({
        'model': {'_orig_mod.' + k: v for k, v in model.state_dict().items()}, 'optimizer': {},
        'model_args': dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=len(CHARS),
                           dropout=0.0),
        'iter_num': 5000, 'best_val_loss': torch.tensor(1.47),
        'config': {'out_dir': 'out-shakespeare-char', 'dataset': 'shakespeare_char', 'compile': True,
                   'gradient_accumulation_steps': 1, 'learning_rate': 1e-3},
    }, tmp_path / 'out-shakespeare-char' / 'ckpt.pt')
    monkeypatch.chdir(tmp_path)
    loaded, info = loading.load_model('resume', 'out-shakespeare-char')
    assert info['dataset'] == 'shakespeare_char' and info['data_dir'].endswith('shakespeare_char')
    assert loading.load_tokenizer_for(info).vocab_size == len(CHARS)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    out = run_sample(capsys, '--out_dir=out-shakespeare-char', '--start=ROMEO:', '--max_new_tokens=10', '--seed=3')
    tok = tokenizers.char_tokenizer(CHARS)
    assert out == expected_samples(model, tok, 'ROMEO:', 1, 10, 3, temperature=0.8, top_k=200)


def test_hugging_face_folder_samples(tmp_path, capsys):
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=50257))
    hf.save_pretrained(tmp_path / 'hf')
    out = run_sample(capsys, f'--init_from={tmp_path / "hf"}', '--start=Hello, world', '--max_new_tokens=8',
                     '--seed=1')
    ours = GPT.from_pretrained(str(tmp_path / 'hf'))
    assert out == expected_samples(ours, tokenizers.gpt2_tokenizer(), 'Hello, world', 1, 8, 1,
                                   temperature=0.8, top_k=200)
    for extra in ([], ['--num_samples=2']):  # streamed, and as a batch
        sample.main(['--device=cpu', f'--init_from={tmp_path / "hf"}', '--max_new_tokens=2', *extra])
        captured = capsys.readouterr()
        assert 'starting from <|endoftext|> (id 50256)' in captured.err
        assert not captured.out.startswith('<|endoftext|>')  # the start token is context, not text


def test_padded_vocabulary_never_samples_past_the_tokenizer(tmp_path, capsys):
    # a GPT-2-vocabulary model padded to 50304 (as train.py does): ids >= 50257 cannot be decoded
    model = tiny_gpt(50304, seed=1)
    with torch.no_grad():
        model.lm_head.weight[50257:] += 5.0  # make the padding ids the likeliest by far
    save_like_train(model, tmp_path / 'out', 'owt', '')
    out = run_sample(capsys, f'--out_dir={tmp_path / "out"}', '--start=Hi', '--max_new_tokens=5', '--temperature=0')
    assert out.startswith('Hi') and sample.SEPARATOR in out


def train_counting_model(data_dir, steps, seed=0):
    """A small GPT trained in-process on data_dir/train.bin (counting sequences)."""
    data = np.memmap(data_dir / 'train.bin', dtype=np.uint16, mode='r')
    model = tiny_gpt(101, block_size=32, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        offsets = rng.integers(0, len(data) - 33, size=16)
        chunk = torch.from_numpy(data[offsets[:, None] + np.arange(33)].astype(np.int64))  # (B, T+1)
        _, loss = model(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, loss.item()


@pytest.mark.slow
def test_model_trained_on_counting_continues_the_count(tmp_path, capsys):
    prepare.prepare('counting', data_dir=str(tmp_path), num_train=3000, num_val=50)
    capsys.readouterr()  # prepare's progress lines
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs several times faster on one thread than on a busy two
    try:
        model, loss = train_counting_model(tmp_path / 'counting', steps=250)  # 150 were enough when tried
    finally:
        torch.set_num_threads(threads)
    save_like_train(model, tmp_path / 'out', 'counting', tmp_path / 'counting')
    out = run_sample(capsys, f'--out_dir={tmp_path / "out"}', '--start=10 11 12', '--max_new_tokens=4',
                     '--temperature=0')
    assert out.split('\n')[0] == '10 11 12 13 14 15 16', (out, loss)
