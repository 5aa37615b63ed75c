"""
export.py and lib/export.py: GGUF files checked by llama.cpp itself (through llama-cpp-python) and
Hugging Face folders. llama.cpp's token ids equal ours, its logits match ours within a measured
tolerance, its greedy continuation equals ours, and its f16 and q8_0 perplexity is within 1% of ours;
knobs and tokenizers it cannot compute are one-line errors, and outputs appear only when complete.
Tiny models made here, in temporary folders.
"""

import copy
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib import loading, runs, tokenizers
from lib.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from lib.tokenizers import gpt2_tokenizer
from model import GPT, GPTConfig
from helpers import ENV, REPO, assert_one_line_error


def importable(name):
    try:
        importlib.import_module(name)
        return True
    except Exception:  # missing, or installed without what it needs (llama_cpp without diskcache)
        return False


HAVE_GGUF, HAVE_LLAMA = importable('gguf'), importable('llama_cpp')
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason=(
    "writing GGUF needs llama.cpp's gguf package: pip install gguf"))
needs_llama = pytest.mark.skipif(not (HAVE_GGUF and HAVE_LLAMA), reason=(
    "checking against llama.cpp needs `pip install gguf llama-cpp-python`"))

# Non-ASCII letters and symbols, emoji, digit runs, runs of spaces, tabs and newlines, contractions
TEXTS = [
    "Hello, world! It's 2024: 1234567 apples cost $3.50, 0.5% of 1,000,000.",
    "naïve café — Καλημέρα κόσμε, τι κάνεις; 我们的模型学习中文。 emoji 🎉🙂👍🏽 ½ ∑ ℕ",
    "two  spaces,   three,    four\t\ttabs\n\n\nnewlines  \n  mixed   \r\n end   ",
    "DON'T, we'LL, they'RE, I'M, he's, she'd, it'S, you've   ",
    "    leading and trailing    ",
    "digits 0 12 345 6789 00000 3.14159 x1y22z333 ٣٤٥ ０１２",
]
# A character vocabulary with non-ASCII letters, a backslash and control characters
CHAR_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\tSpeak, speak! "
             "Café naïve — 'quoted' \\back\\slash\x01 end; 3 + 4 = 7?\r\n")
BPE_TEXT = " ".join(TEXTS) * 30 + ("The quick brown fox jumps over the lazy dog. " * 40)


# -----------------------------------------------------------------------------
# runs and the tokenizers they carry

def tokenizer_record(kind, tmp_path):
    """What a checkpoint records of its tokenizer (lib.tokenizers.tokenizer_record), or None for GPT-2."""
    if kind == 'gpt2':
        return None
    if kind == 'char':
        chars = sorted(set(CHAR_TEXT))
        return {'tokenizer': 'char', 'vocab_size': len(chars), 'chars': chars}
    if kind == 'bpe':
        pytest.importorskip('rustbpe', reason='training a BPE needs rustbpe (pip install rustbpe)')
        from lib import bpe
        ranks = bpe.train_bpe([BPE_TEXT], vocab_size=400)
        return {'tokenizer': 'bpe', 'vocab_size': 400, 'bpe_ranks': bpe.ranks_text(ranks)}
    return {'tokenizer': 'counting', 'vocab_size': 101}


def save_run(folder, model, record=None, lora=None, state=None):
    runs.save_checkpoint({'format': runs.CHECKPOINT_FORMAT,
                          'model': model.state_dict() if state is None else state,
                          'model_args': model.config.checkpoint_args(), 'iter_num': 0,
                          'tokenizer': record, 'lora': lora, 'config': {}}, Path(folder) / 'ckpt.pt')
    return folder


def make_run(tmp_path, kind='gpt2', name='run', train_steps=0, seed=0, **knobs):
    """(run folder, model, tokenizer): a tiny GPT with the given knobs and tokenizer, optionally
    trained a few steps on the test texts so that its predictions are confident."""
    record = tokenizer_record(kind, tmp_path)
    info = {'tokenizer_record': record, 'vocab_size': 50304 if kind == 'gpt2' else record['vocab_size']}
    tokenizer = loading.load_tokenizer_for(info)
    torch.manual_seed(seed)
    config = dict(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=info['vocab_size'], bias=True)
    model = GPT(GPTConfig(**{**config, **knobs}))
    if train_steps:
        train(model, tokenizer.encode(CHAR_TEXT * 20 if kind == 'char' else BPE_TEXT), train_steps)
    model.eval()
    return save_run(tmp_path / name, model, record), model, tokenizer


def train(model, ids, steps):
    data = torch.tensor(ids)
    T = model.config.block_size
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (8,), generator=gen)
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()


def export(run, *args):
    return subprocess.run([sys.executable, 'export.py', f'--out_dir={run}', *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=ENV)


def write(run, model, tokenizer, outtype='f32'):
    """The GGUF file of a run, written in-process (what export.py does after loading the run)."""
    from lib import export as lib_export
    path = Path(run) / f'model-{outtype}.gguf'
    lib_export.write_gguf(model, tokenizer, path, outtype)
    return path


def llama(path, n_ctx):
    """llama.cpp on the file: one thread, logits of every position, float32 KV cache."""
    import llama_cpp
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=1,
                           logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32)


def llama_logits(llm, ids):
    """llama.cpp's logits (T, V) for the token ids, from an empty context."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def our_logits(model, ids, n_vocab):
    idx = torch.tensor([ids])
    with torch.no_grad():
        return model(idx, idx)[0][0, :, :n_vocab]  # (T, V): with targets, every position's logits


# -----------------------------------------------------------------------------
# the tokenizer: the same ids as ours

@needs_gguf
def test_gpt2_vocabulary_and_merges_are_openais_files():
    """Tokens and merges made from tiktoken's ranks equal GPT-2's encoder.json and vocab.bpe, which
    tiktoken's cache holds under the sha1 of their addresses."""
    import hashlib
    import os
    from lib.export import gguf_vocabulary
    cache = Path(os.environ.get('TIKTOKEN_CACHE_DIR', '/nonexistent'))
    base = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
    files = {name: cache / hashlib.sha1((base + name).encode()).hexdigest()
             for name in ('encoder.json', 'vocab.bpe')}
    if not all(f.is_file() for f in files.values()):
        pytest.skip("GPT-2's encoder.json and vocab.bpe are not in TIKTOKEN_CACHE_DIR")
    vocab = gguf_vocabulary(gpt2_tokenizer())
    encoder = json.loads(files['encoder.json'].read_text(encoding='utf-8'))
    assert vocab['tokens'] == sorted(encoder, key=encoder.get)
    merges = [m for m in files['vocab.bpe'].read_text(encoding='utf-8').split('\n')[1:] if m]
    assert vocab['merges'] == merges
    assert (vocab['model'], vocab['pre'], vocab['eot']) == ('gpt2', 'gpt-2', 50256)


def test_our_bpe_splits_text_with_a_pattern_llama_cpp_implements():
    """lib/bpe.py's SPLIT_PATTERN has a llama.cpp pre-tokenizer (else own-BPE runs do not export)."""
    from lib import bpe
    from lib.export import PRE_TOKENIZERS
    assert PRE_TOKENIZERS.get(bpe.SPLIT_PATTERN) == 'llama-bpe'


@needs_llama
@pytest.mark.parametrize('kind', ['gpt2', 'bpe', 'char'])
def test_llama_cpp_token_ids_equal_ours(kind, tmp_path):
    run, model, tokenizer = make_run(tmp_path, kind, n_layer=1, n_embd=32)
    llm = llama(write(run, model, tokenizer), 128)
    texts = [CHAR_TEXT, CHAR_TEXT[::-1], CHAR_TEXT.replace(' ', '   ')] if kind == 'char' else TEXTS
    for text in texts:
        ours = tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours, text
        assert llm.detokenize(ours).decode() == text
    if kind != 'char':  # <|endoftext|> in a text is the special token, for llama.cpp too when asked
        text = 'a<|endoftext|>b'
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)


# -----------------------------------------------------------------------------
# the model: llama.cpp computes what ours does

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train and run fastest on one thread, the more so on a busy machine (8x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Each llama.cpp architecture and the knobs it covers (character vocabulary: quick to train)
EXPORTABLE = {
    'gpt2': dict(),
    'gpt2 without biases, untied head': dict(bias=False, tie_embeddings=False),
    'gptneox (rope)': dict(pos_emb='rope', rope_base=500.0),
    'gptneox (rope) without biases': dict(pos_emb='rope', bias=False, tie_embeddings=False),
    'jais2 (rope, relu2)': dict(pos_emb='rope', mlp_act='relu2', rope_base=2000.0),
    'jais2 (rope, relu2) without biases': dict(pos_emb='rope', mlp_act='relu2', bias=False),
    'arcee (rope, rmsnorm, relu2)': dict(pos_emb='rope', norm='rmsnorm', mlp_act='relu2', bias=False),
}
# Largest |logit difference| measured (float32 file and KV cache, logits spanning about -5..8):
# 0.9e-3 to 1.4e-3 with GELU, which llama.cpp's CPU code looks up in a float16 table of its input
# (ggml-cpu's GGML_GELU_FP16); 9e-6 without it (arcee's relu^2). The tolerances leave room above.
LOGIT_ATOL = {'gelu': 1e-2, 'relu2': 1e-4}


@needs_llama
@pytest.mark.parametrize('knobs', EXPORTABLE.values(), ids=EXPORTABLE.keys())
def test_llama_cpp_logits_match_ours(knobs, tmp_path):
    run, model, tokenizer = make_run(tmp_path, 'char', train_steps=100, **knobs)
    ids = tokenizer.encode(CHAR_TEXT * 2)[:128]
    theirs = llama_logits(llama(write(run, model, tokenizer, 'f32'), 128), ids)
    ours = our_logits(model, ids, tokenizer.vocab_size)
    assert ours.max() - ours.min() > 2  # logits that mean something, not all near zero
    torch.testing.assert_close(theirs, ours, atol=LOGIT_ATOL[model.config.mlp_act], rtol=0)


@needs_llama
def test_llama_cpp_logits_match_ours_with_gpt2s_padded_vocabulary(tmp_path):
    """vocab_size 50304: the file keeps GPT-2's 50257 ids, in the embedding and in the head."""
    run, model, tokenizer = make_run(tmp_path, 'gpt2', train_steps=10, block_size=32, n_embd=32)
    ids = tokenizer.encode(" ".join(TEXTS))[:32]
    theirs = llama_logits(llama(write(run, model, tokenizer, 'f32'), 32), ids)
    ours = our_logits(model, ids, 50257)
    assert theirs.shape == ours.shape == (32, 50257) and ours.max() - ours.min() > 2
    torch.testing.assert_close(theirs, ours, atol=LOGIT_ATOL['gelu'], rtol=0)


@needs_llama
@pytest.mark.parametrize('kind, knobs', [('char', {}), ('bpe', dict(pos_emb='rope'))],
                         ids=['char gpt2', 'bpe gptneox'])
def test_llama_cpp_greedy_continuation_equals_ours(kind, knobs, tmp_path):
    """60 greedy tokens, as sample.py --temperature=0 draws them."""
    run, model, tokenizer = make_run(tmp_path, kind, train_steps=100, **knobs)
    llm = llama(write(run, model, tokenizer, 'f32'), 128)
    prompt = tokenizer.encode("First Citizen:\nBefore we" if kind == 'char' else "The quick brown")
    ours = model.generate(torch.tensor([prompt]), 60, temperature=0)[0, len(prompt):].tolist()
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(60):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert len(set(ours)) > 5  # a continuation, not one token repeated
    assert theirs == ours, (tokenizer.decode(theirs), tokenizer.decode(ours))


@needs_llama
@pytest.mark.parametrize('outtype', ['f16', 'q8_0'])
def test_quantized_perplexity_within_one_percent(outtype, tmp_path):
    """Perplexity on a validation slice (a text the model did not train on) from llama.cpp's
    logits of the f16 and q8_0 files, within 1% of ours in float32 (measured: f16 within 0.01%,
    q8_0 within 0.2%, on all five architectures' models of test_llama_cpp_logits_match_ours)."""
    run, model, tokenizer = make_run(tmp_path, 'char', train_steps=100)
    words = CHAR_TEXT.split(' ')
    ids = tokenizer.encode(' '.join(words[i * 7 % len(words)] for i in range(len(words))) * 3)[:128]
    targets = torch.tensor(ids[1:])

    def perplexity(logits):
        return math.exp(F.cross_entropy(logits[:-1].double(), targets).item())
    ours = perplexity(our_logits(model, ids, tokenizer.vocab_size))
    theirs = perplexity(llama_logits(llama(write(run, model, tokenizer, outtype), 128), ids))
    assert abs(theirs / ours - 1) < 0.01, (outtype, theirs, ours)


@needs_gguf
def test_lora_run_exports_merged(tmp_path):
    """A LoRA run's file holds its base's weights with the adapters folded in."""
    import gguf
    base_run, base, tokenizer = make_run(tmp_path, 'gpt2', name='base', n_layer=1)
    model = copy.deepcopy(base)
    apply_lora(model, 4, 8.0, 0.0, 'c_attn,c_fc')
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.05)
    lora = {'base': str(base_run / 'ckpt.pt'), 'rank': 4, 'alpha': 8.0, 'dropout': 0.0,
            'targets': 'c_attn,c_fc'}
    run = save_run(tmp_path / 'lora', base, lora=lora, state=lora_state_dict(model))
    r = export(run, '--outtype=f32')
    assert r.returncode == 0, r.stderr
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(run / 'model-f32.gguf').tensors}
    merged = merge_lora(model).state_dict()
    for ours, theirs in [('transformer.h.0.attn.c_attn.weight', 'blk.0.attn_qkv.weight'),
                         ('transformer.h.0.mlp.c_fc.weight', 'blk.0.ffn_up.weight')]:
        assert not torch.equal(merged[ours], base.state_dict()[ours])  # the adapters changed it
        np.testing.assert_allclose(tensors[theirs], merged[ours].numpy(), rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# what does not export, and bad input: one line, nothing written

NOT_EXPORTABLE = {
    'qk_norm': (dict(qk_norm=True), 'qk_norm=True'),
    'logit_softcap': (dict(logit_softcap=15.0), 'logit_softcap=15.0'),
    'value_embeds': (dict(value_embeds=True), 'value_embeds=True'),
    'x0_mix': (dict(x0_mix=True), 'x0_mix=True'),
    'bigram_vocab': (dict(bigram_vocab=64), 'bigram_vocab=64'),
    'rmsnorm with learned positions': (dict(norm='rmsnorm'), "norm='layernorm' (gpt2)"),
    'relu2 with learned positions': (dict(mlp_act='relu2'),
                                     "mlp_act='gelu' (gpt2) or pos_emb='rope' (jais2)"),
    'rmsnorm with gelu': (dict(pos_emb='rope', norm='rmsnorm'), "norm='layernorm' (gptneox)"),
    'rmsnorm and relu2 with biases': (dict(pos_emb='rope', norm='rmsnorm', mlp_act='relu2'),
                                      "norm='layernorm' (jais2) or bias=False (arcee)"),
}


@pytest.mark.parametrize('knobs, named', NOT_EXPORTABLE.values(), ids=NOT_EXPORTABLE.keys())
def test_a_knob_no_architecture_computes_is_one_line_naming_it(knobs, named, tmp_path):
    from lib import export as lib_export
    with pytest.raises(SystemExit) as e:
        lib_export.gguf_architecture(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, **knobs))
    assert named in e.value.message and 'GGUF' in e.value.message, e.value.message


def test_a_knob_export_does_not_know_is_refused():
    """A knob added to GPTConfig later exports only at its default until lib/export.py names the
    llama.cpp architecture that computes it."""
    import dataclasses
    from lib import export as lib_export

    @dataclasses.dataclass
    class Later(GPTConfig):
        attn_temp: bool = False
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=16)
    assert lib_export.gguf_architecture(Later(**shape)) == 'gpt2'
    with pytest.raises(SystemExit, match='attn_temp=True does not export to GGUF'):
        lib_export.gguf_architecture(Later(**shape, attn_temp=True))


@needs_gguf
def test_export_errors_are_one_line_and_write_nothing(tmp_path):
    run, model, tokenizer = make_run(tmp_path, 'char', n_layer=1, n_embd=32, qk_norm=True)
    assert_one_line_error(export(run), 'qk_norm=True')
    assert_one_line_error(export(tmp_path / 'nowhere'), 'no checkpoint')
    tiny = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=101))
    counting = save_run(tmp_path / 'counting', tiny, tokenizer_record('counting', tmp_path))
    assert_one_line_error(export(counting), 'counting tokenizer')
    good, _, _ = make_run(tmp_path, 'char', name='good', n_layer=1, n_embd=32)
    assert_one_line_error(export(good, '--outtype=q4'), 'outtype')
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    assert_one_line_error(export(good, f'--out={a_file}/model.gguf'), 'cannot write', 'not a folder')
    for folder in (run, counting, good):
        assert sorted(p.name for p in folder.iterdir()) == ['ckpt.pt']


@needs_gguf
def test_an_existing_output_is_replaced_only_with_force(tmp_path):
    run, model, tokenizer = make_run(tmp_path, 'char', n_layer=1, n_embd=32)
    out = run / 'model.gguf'
    out.write_text('keep me')
    assert_one_line_error(export(run, f'--out={out}'), 'exists', '--force=True')
    assert out.read_text() == 'keep me'
    r = export(run, f'--out={out}', '--force=True', '--outtype=f32')
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b'GGUF'
    assert sorted(p.name for p in run.iterdir()) == ['ckpt.pt', 'model.gguf']  # no temporary file left


def test_without_the_gguf_package_one_line_says_how_to_install_it(tmp_path):
    run, model, tokenizer = make_run(tmp_path, 'char', n_layer=1, n_embd=32)
    code = ("import sys, runpy; sys.modules['gguf'] = None; "
            f"sys.argv = ['export.py', '--out_dir={run}']; runpy.run_path('export.py', run_name='__main__')")
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=ENV)
    assert_one_line_error(r, 'pip install gguf')
    assert sorted(p.name for p in run.iterdir()) == ['ckpt.pt']


def test_hf_folder_loads_in_transformers_and_modern_knobs_are_refused(tmp_path):
    transformers = pytest.importorskip('transformers')
    run, model, tokenizer = make_run(tmp_path, 'char', n_layer=1, n_embd=32, bias=False)
    r = export(run, '--format=hf')
    assert r.returncode == 0, r.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(run / 'hf').eval()
    idx = torch.tensor([tokenizer.encode(CHAR_TEXT[:60])])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx, idx)[0], atol=1e-5, rtol=0)
    assert_one_line_error(export(run, '--format=hf'), 'exists')
    rope, _, _ = make_run(tmp_path, 'char', name='rope', n_layer=1, n_embd=32, pos_emb='rope')
    assert_one_line_error(export(rope, '--format=hf'), "pos_emb='rope'")
    assert sorted(p.name for p in rope.iterdir()) == ['ckpt.pt']


@needs_llama
@pytest.mark.parametrize('kind', ['char', 'gpt2'])
def test_a_chat_run_carries_its_template_and_its_replies_end_at_the_end_marker(kind, tmp_path):
    """A run fine-tuned for chat (lib/chat.py): the markers are llama.cpp control tokens with our
    ids, read from a prompt only as special tokens; the file's template is ours; and llama.cpp's
    chat completion (llama-cpp-python applies the file's template) is our greedy reply, ending
    at <|end|>."""
    from lib import chat
    if kind == 'char':
        chars = sorted(set(chat.LETTERS + chat.REVERSE + "<|>é"))
        record, vocab_size = {'tokenizer': 'char', 'vocab_size': len(chars), 'chars': chars}, len(chars) + 4
    else:
        record, vocab_size = None, 50304
    tokenizer = tokenizers.chat_tokenizer(loading.load_tokenizer_for({'tokenizer_record': record, 'vocab_size': vocab_size}))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64 if kind == 'char' else 32, block_size=128,
                          vocab_size=vocab_size))
    if kind == 'char':  # a reply that ends: a few steps on the reversal task
        conversations = chat.reversal_task(300, 0, seed=1)[0]
        train(model, [i for c in conversations for i in chat.render(c, tokenizer)[0]], 150)
    model.eval()
    llm = llama(write(tmp_path, model, tokenizer, 'f32'), 128)
    messages = [{'role': 'system', 'content': 'é'}, {'role': 'user', 'content': 'reverse: abc'}]
    text = chat.render_text(messages, add_generation_prompt=True)
    prompt = chat.render_prompt(messages, tokenizer)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt  # the markers: one id each
    assert len(prompt) < len(tokenizer.encode(text))
    if kind == 'gpt2':  # typed, a marker is plain text (llama.cpp's character vocabulary, 'rwkv',
        # matches every token's text, control tokens too: docs/export.md says so)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
    assert llm.metadata['tokenizer.chat_template'] == chat.JINJA_TEMPLATE
    assert llm.token_eos() == tokenizer.special_ids[chat.END]
    if kind == 'char':
        question = [{'role': 'user', 'content': 'reverse: abcde'}]
        ours = tokenizer.decode(list(chat.reply_tokens(model, tokenizer, chat.render_prompt(question, tokenizer),
                                                       40, temperature=0.0)))
        reply = llm.create_chat_completion(question, temperature=0.0, max_tokens=40)['choices'][0]
        assert reply['finish_reason'] == 'stop' and reply['message']['content'] == ours, (reply, ours)
