"""
The chat template and chat data (lib/chat.py): the loss mask on each tokenizer, special tokens
only from the template, the Jinja twin, file:line errors for bad conversation files, the split by
conversation, fitting to block_size, growing a model's vocabulary, the reversal task, the
tokenizer's record in a checkpoint, and the chitchat corpus.
"""

import json
import string
import sys

import pytest
import torch

import local_data  # TIKTOKEN_CACHE_DIR for offline GPT-2 BPE files; Tiny Shakespeare when present
from lib import bpe, chat, tokenfiles, tokenizers
from lib.tokenfiles import PrepareError
from model import GPT, GPTConfig

# Tiny Shakespeare's 65 characters, the vocabulary of the character model the task is for
SHAKESPEARE_CHARS = sorted("\n !$&',-.3:;?" + string.ascii_letters)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "reverse: abc"},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "And <|user|>?"},
    {"role": "assistant", "content": "Why,\nsir."},
]
# The runs of equal mask in CONVERSATION's tokens, decoded: 0 (context), 1 (learned), 0, 1
MASK_RUNS = [("<|system|>Be brief.<|end|><|user|>reverse: abc<|end|><|assistant|>", 0), ("cba<|end|>", 1),
             ("<|user|>And <|user|>?<|end|><|assistant|>", 0), ("Why,\nsir.<|end|>", 1)]
# text that spells every marker (and GPT-2's own special token) but is plain text
SPELLED = "".join(tokenizers.SPECIAL_TOKENS) + " <|endoftext|> <|user|>hi<|end|><|assistant|"


@pytest.fixture(scope="module")
def bpe_ranks():
    pytest.importorskip("rustbpe", reason="training a BPE needs rustbpe (pip install rustbpe)")
    text = ("To be, or not to be, that is the question. <|user|> naïve café 中文 " * 30).split(". ")
    return bpe.train_bpe(text, vocab_size=300)


def base_tokenizer(kind, bpe_ranks=None):
    if kind == "char":  # Shakespeare's characters and the markers' <, | and >
        return tokenizers.char_tokenizer(sorted(set(SHAKESPEARE_CHARS) | set("<|>")))
    if kind == "bpe":
        encoding = bpe.load_encoding("ranks", 300, text=bpe.ranks_text(bpe_ranks))
        return tokenizers.tiktoken_tokenizer("bpe", encoding)
    try:
        return tokenizers.gpt2_tokenizer()
    except PrepareError as e:
        pytest.skip(str(e))


@pytest.fixture(params=["char", "bpe", "gpt2"])
def kind(request):
    return request.param


@pytest.fixture
def base(kind, request):
    return base_tokenizer(kind, request.getfixturevalue("bpe_ranks") if kind == "bpe" else None)


# ----------------------------------------------------------------------------- the template

def test_the_special_ids_follow_the_base_ids(base):
    tok = tokenizers.chat_tokenizer(base)
    first = base.vocab_size
    assert tok.special_ids == {"<|system|>": first, "<|user|>": first + 1, "<|assistant|>": first + 2,
                               "<|end|>": first + 3}
    assert tok.vocab_size == first + 4 and tok.name == base.name
    assert tok.token_bytes[:first] == base.token_bytes and tok.token_bytes[first:] == [0, 0, 0, 0]
    if base.name == "gpt2":  # GPT-2's padded model already has rows for them
        assert list(tok.special_ids.values()) == [50257, 50258, 50259, 50260] and tok.vocab_size <= 50304


def test_the_mask_covers_the_assistants_content_and_end(base):
    tok = tokenizers.chat_tokenizer(base)
    ids, mask = chat.render(CONVERSATION, tok)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    runs, start = [], 0  # cut the tokens where the mask changes and decode each piece
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            runs.append((tok.decode(ids[start:i]), mask[start]))
            start = i
    assert runs == MASK_RUNS
    special = tok.special_ids  # the markers are the template's ids, one each per message
    markers = [marker for m in CONVERSATION for marker in (chat.marker(m["role"]), chat.END)]
    assert [i for i in ids if i >= base.vocab_size] == [special[marker] for marker in markers]
    assert tok.decode(ids) == chat.render_text(CONVERSATION)


def test_a_prompt_asks_for_the_assistant(base):
    tok = tokenizers.chat_tokenizer(base)
    prompt = chat.render_prompt(CONVERSATION[:2], tok)
    assert prompt[-1] == tok.special_ids["<|assistant|>"]
    assert prompt == chat.render(CONVERSATION[:2], tok)[0] + [tok.special_ids["<|assistant|>"]]
    assert tok.decode(prompt) == "<|system|>Be brief.<|end|><|user|>reverse: abc<|end|><|assistant|>"


def test_plain_text_never_gives_a_special_id(base):
    tok = tokenizers.chat_tokenizer(base)
    for ids in [tok.encode(SPELLED), tok.encode_ordinary(SPELLED), tok.encode_batch([SPELLED, "x"])[0]]:
        assert max(ids) < base.vocab_size
        assert tok.decode(ids) == SPELLED
    if base.name == "gpt2":
        assert 50256 not in tok.encode("<|endoftext|>")
    # rendered, the typed markers stay text: one special id opens and one closes the message
    ids, _ = chat.render([{"role": "user", "content": SPELLED}], tok)
    special = [i for i in ids if i >= base.vocab_size]
    assert special == [tok.special_ids["<|user|>"], tok.special_ids["<|end|>"]]


def test_special_ids_decode_to_their_markers(base):
    tok = tokenizers.chat_tokenizer(base)
    for marker, i in tok.special_ids.items():
        assert tok.decode([i]) == marker
    if base.name != "char":  # a character cut into byte tokens, beside a marker
        party = tok.encode("🎉")
        assert len(party) > 1
        assert tok.decode(party + [tok.special_ids[chat.END]] + party) == "🎉<|end|>🎉"


def test_render_needs_the_chat_tokenizer_and_good_messages():
    base = tokenizers.char_tokenizer(SHAKESPEARE_CHARS)
    with pytest.raises(ValueError, match="chat_tokenizer"):
        chat.render(CONVERSATION, base)
    tok = tokenizers.chat_tokenizer(base)
    with pytest.raises(ValueError, match="already has the chat tokens"):
        tokenizers.chat_tokenizer(tok)
    with pytest.raises(ValueError, match="role 'tool'"):
        chat.render([{"role": "tool", "content": "x"}], tok)


def test_the_chat_tokens_must_fit_uint16_token_files():
    def tokenizer(vocab_size):
        return tokenizers.Tokenizer("big", vocab_size, encode=list, decode=str)
    assert tokenizers.chat_tokenizer(tokenizer(65532)).vocab_size == 65536  # ids 0..65535
    with pytest.raises(PrepareError, match="use a vocab_size of at most 65,532"):
        tokenizers.chat_tokenizer(tokenizer(65533))


def test_the_jinja_template_renders_what_the_renderer_does():
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    conversations = [
        CONVERSATION,
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "  {{ braces }} {% raw %} 'quotes' \"double\"\n\n"},
         {"role": "assistant", "content": "<|end|> spelled, & < > kept\n"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "naïve 中文 🙂"},
         {"role": "assistant", "content": ""}],
    ]
    # plain Jinja, and the environment Hugging Face's apply_chat_template uses
    hugging_face = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    templates = [jinja2.Template(chat.JINJA_TEMPLATE), hugging_face.from_string(chat.JINJA_TEMPLATE)]
    for template in templates:
        for messages in conversations:
            for prompt in (False, True):
                assert template.render(messages=messages, add_generation_prompt=prompt) == \
                    chat.render_text(messages, add_generation_prompt=prompt)
    assert chat.render_text(conversations[1], True) == "<|user|>hi<|end|><|assistant|>"


# ----------------------------------------------------------------------------- conversation files

GOOD = json.dumps({"messages": CONVERSATION[:3]})


def write(path, *lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def test_conversations_are_read_from_a_file_or_a_sorted_folder(tmp_path):
    one = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "one"}]
    two = [{"role": "user", "content": "2"}, {"role": "assistant", "content": "two", "name": "ignored"}]
    write(tmp_path / "b.jsonl", json.dumps({"messages": two, "id": 7}))
    write(tmp_path / "a.jsonl", "", json.dumps({"messages": one}), "  ", GOOD)  # blank lines are skipped
    (tmp_path / "notes.txt").write_text("not a conversation")
    assert chat.read_conversations(tmp_path / "b.jsonl") == [two]
    assert chat.read_conversations(tmp_path) == [one, CONVERSATION[:3], two]


BAD_LINES = [
    ('{"messages": [', "not valid JSON"),
    ("[1, 2]", 'no "messages" list'),
    ('{"msgs": []}', 'no "messages" list'),
    ('{"messages": "hello"}', 'no "messages" list'),
    ('{"messages": []}', 'no "messages" list'),
    ('{"messages": ["hello"]}', "message 0 is a str, not an object"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     "message 1 has role 'bot'; use system, user or assistant"),
    ('{"messages": [{"content": "a"}]}', "message 0 has role None"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}',
     "message 1 (assistant) has a content of type int; the content must be one string"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}',
     "message 0 (user) has a content of type list"),
    ('{"messages": [{"role": "assistant"}]}', "message 0 (assistant) has no content"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}',
     "no assistant message, so there is no reply to learn; add the assistant's reply"),
    (b'{"messages": "\xff"}', "not UTF-8 text; save the file as UTF-8"),
]


@pytest.mark.parametrize("line, problem", BAD_LINES, ids=range(len(BAD_LINES)))
def test_a_bad_line_is_named_with_its_file_line_and_fix(tmp_path, line, problem):
    path = write(tmp_path / "chats.jsonl", GOOD, "", line, GOOD)
    with pytest.raises(PrepareError) as e:
        chat.read_conversations(path)
    message = str(e.value)
    assert message.startswith(f"{path}:3: ") and problem in message and "\n" not in message, message
    # in a folder: the bad file by name, after the good ones read before it
    write(tmp_path / "a.jsonl", GOOD)
    with pytest.raises(PrepareError, match="chats.jsonl:3: "):
        chat.read_conversations(tmp_path)


def test_empty_files_folders_and_missing_paths_are_named(tmp_path):
    fix = 'one conversation per line: {"messages": [{"role": "user"'
    cases = [(write(tmp_path / "blank.jsonl", "", "  "), f"blank.jsonl holds no conversations; {fix}"),
             (tmp_path / "none.jsonl", "no file or folder"),
             (tmp_path / "empty", f"holds no .jsonl files; put conversations in FILE.jsonl, {fix}")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "chats.json").write_text(GOOD)  # .json, not .jsonl
    (tmp_path / "zero.jsonl").write_bytes(b"")
    cases.append((tmp_path / "zero.jsonl", f"zero.jsonl holds no conversations; {fix}"))
    for path, problem in cases:
        with pytest.raises(PrepareError) as e:
            chat.read_conversations(path)
        assert problem in str(e.value) and str(path) in str(e.value), str(e.value)
    # an empty file among good ones is named too
    folder = tmp_path / "mixed"
    folder.mkdir()
    write(folder / "a.jsonl", GOOD)
    (folder / "b.jsonl").write_text("\n")
    with pytest.raises(PrepareError, match=r"b\.jsonl holds no conversations"):
        chat.read_conversations(folder)


# ----------------------------------------------------------------------------- split, fit

def numbered(n):
    return [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
            for i in range(n)]


def test_the_split_is_by_conversation_deterministic_and_order_free():
    conversations = numbered(200)
    train, val = chat.split_conversations(conversations, val_fraction=0.1, seed=0)
    assert len(val) == 20 and len(train) == 180
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, conversations))  # each once, whole
    assert [conversations.index(c) for c in val] == sorted(conversations.index(c) for c in val)  # input order
    assert chat.split_conversations(conversations, 0.1, seed=0) == (train, val)
    shuffled = conversations[::-1]
    val_of_shuffled = chat.split_conversations(shuffled, 0.1, seed=0)[1]
    assert sorted(map(json.dumps, val_of_shuffled)) == sorted(map(json.dumps, val))
    assert chat.split_conversations(conversations, 0.1, seed=1)[1] != val
    assert len(chat.split_conversations(numbered(3), 0.1)[1]) == 1  # at least one in val


def test_copies_of_a_conversation_stay_on_one_side():
    conversations = numbered(30) + numbered(30) + numbered(30)  # each conversation three times
    for seed in range(5):
        train, val = chat.split_conversations(conversations, 0.1, seed)
        assert val and not {json.dumps(c) for c in train} & {json.dumps(c) for c in val}
    with pytest.raises(PrepareError, match="at least 2"):
        chat.split_conversations(numbered(1))
    with pytest.raises(PrepareError, match="copies of one"):
        chat.split_conversations(numbered(1) * 5)


def test_long_conversations_are_cut_or_skipped_and_counted():
    # ids 0..n-1; the mask marks the tokens from `learn` on
    def conversation(n, learn):
        return list(range(n)), [int(i >= learn) for i in range(n)]
    rendered = [conversation(n, learn) for n, learn in [(5, 2), (9, 4), (12, 3), (12, 9), (20, 8)]]
    kept, counts = chat.fit_to_block(rendered, block_size=8)  # rows of 9 tokens
    assert counts == {"kept": 2, "cut": 2, "skipped": 1}  # (12, 9): nothing to learn in its first 9 tokens
    assert kept == [rendered[0], rendered[1], (list(range(9)), [0, 0, 0] + [1] * 6),
                    (list(range(9)), [0] * 8 + [1])]
    kept, counts = chat.fit_to_block(rendered, block_size=8, long="skip")
    assert kept == rendered[:2] and counts == {"kept": 2, "cut": 0, "skipped": 3}
    with pytest.raises(ValueError, match="'cut' or 'skip'"):
        chat.fit_to_block(rendered, 8, long="truncate")


# ----------------------------------------------------------------------------- grow_vocab

@pytest.mark.parametrize("knobs", [{}, {"tie_embeddings": False, "value_embeds": True, "n_layer": 3}],
                         ids=["tied", "untied+value_embeds"])
def test_grow_vocab_keeps_the_old_logits_and_other_weights(knobs):
    torch.manual_seed(0)
    config = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16, "vocab_size": 65, **knobs}
    model = GPT(GPTConfig(**config)).eval()
    with torch.no_grad():  # value embeddings start at zero; make them count
        for table in model.value_embeds:
            if isinstance(table, torch.nn.Embedding):
                table.weight.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 65, (3, 16))
    old_logits, _ = model(idx, idx)
    assert chat.grow_vocab(model, 69) is True
    assert model.config.vocab_size == 69 and model.transformer.wte.weight.shape == (69, 16)
    assert (model.lm_head.weight is model.transformer.wte.weight) == (knobs.get("tie_embeddings", True))
    logits, _ = model(idx, idx)
    assert logits.shape == (3, 16, 69)
    # float32 matmuls of another width may sum in another order: default float32 tolerances
    torch.testing.assert_close(logits[..., :65], old_logits)
    after = model.state_dict()
    assert after.keys() == before.keys()
    grown = [k for k in before if before[k].shape != after[k].shape]
    assert set(grown) == {"transformer.wte.weight", "lm_head.weight",
                          *(k for k in before if k.startswith("value_embeds."))}
    for k in before:
        assert torch.equal(after[k][:len(before[k])], before[k]), k  # bit-identical
        if k in grown:  # each new row the mean of the old rows
            assert torch.equal(after[k][65:], before[k].mean(0, keepdim=True).expand(4, -1)), k
    if not knobs:  # tied, no softcap: a new token's logit is the mean of the old ones
        torch.testing.assert_close(logits[..., 65:], old_logits.mean(-1, keepdim=True).expand(-1, -1, 4))
    # the new ids train: inputs and targets take them, gradients reach their rows
    model.train()
    _, loss = model(torch.full((1, 4), 68), torch.full((1, 4), 67))
    loss.backward()
    assert model.transformer.wte.weight.grad[65:].abs().sum() > 0


def test_grow_vocab_does_nothing_when_the_model_is_big_enough():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8))  # GPT-2's padded 50,304
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert chat.grow_vocab(model, 50261) is False and chat.grow_vocab(model, 50304) is False
    assert model.config.vocab_size == 50304
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- the reversal task

def test_the_reversal_task_is_exact_unseen_and_in_shakespeares_characters():
    # sizes where, left to chance, dozens of 3-letter val words or their reverses would be trained on
    train, val = chat.reversal_task(n_train=20000, n_val=2000, seed=0)
    assert len(train) == 20000 and len(val) == 2000
    questions = [c[0]["content"] for c in train + val]
    assert all(q.startswith("reverse: ") for q in questions) and len(set(questions)) == 22000
    val_words = {c[0]["content"][9:] for c in val}
    train_words = {c[0]["content"][9:] for c in train}
    assert not val_words & train_words and not {w[::-1] for w in val_words} & train_words
    for c in train + val:
        word = c[0]["content"][9:]
        assert 3 <= len(word) <= 8 and word.isalpha() and word.islower()
        assert [m["role"] for m in c] == ["user", "assistant"] and c[1]["content"] == word[::-1]
        assert set(chat.render_text(c)) - set("<|>") <= set(SHAKESPEARE_CHARS) - set("<|>")
    if local_data.SHAKESPEARE:  # the characters above are the text's
        assert sorted(set(local_data.SHAKESPEARE.read_text(encoding="utf-8"))) == SHAKESPEARE_CHARS
    # a Shakespeare character model's tokenizer renders it (the markers are its 4 added ids)
    tok = tokenizers.chat_tokenizer(tokenizers.char_tokenizer(SHAKESPEARE_CHARS))
    assert tok.vocab_size == 69 and max(chat.render(val[0], tok)[0]) == 68
    # reproducible; the held-out questions do not depend on how much training data is asked for
    assert chat.reversal_task(20000, 2000, seed=0) == (train, val)
    assert chat.reversal_task(10, 2000, seed=0)[1] == val
    assert chat.reversal_task(10, 2000, seed=1)[1] != val


def test_answers_are_scored_by_exact_match():
    assert chat.score_answer("kindow", "kindow") == 1.0
    assert chat.score_answer(" kindow\n", "kindow") == 1.0  # whitespace at the ends aside
    for wrong in ["kindo", "kindowk", "Kindow", "kin dow", ""]:
        assert chat.score_answer(wrong, "kindow") == 0.0


# ----------------------------------------------------------------------------- records

def chat_meta(kind, base, folder, bpe_ranks=None):
    """A chat dataset's meta.json (what prepare.py will write) in folder."""
    tok = tokenizers.chat_tokenizer(base)
    meta = {"tokenizer": kind, "vocab_size": tok.vocab_size, "chat": chat.chat_entry(tok)}
    if kind == "char":
        meta["chars"] = sorted(set(SHAKESPEARE_CHARS) | set("<|>"))
    if kind == "bpe":
        bpe.save_ranks(folder / "tokenizer.tiktoken", bpe_ranks)
        sha256 = tokenfiles.sha256_of(folder / "tokenizer.tiktoken")
        meta["bpe"] = {"file": "tokenizer.tiktoken", "sha256": sha256}
    tokenfiles.write_json(folder / "meta.json", meta)
    return tok, meta


def test_the_chat_tokenizer_comes_back_from_metadata_and_a_checkpoint_record(kind, base, request, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    tok, meta = chat_meta(kind, base, folder, request.getfixturevalue("bpe_ranks") if kind == "bpe" else None)
    record = json.loads(json.dumps(tokenizers.tokenizer_record(meta, folder)))  # as a checkpoint stores it
    assert record["chat"] == chat.chat_entry(tok)
    loaded = tokenizers.load_tokenizer(folder)
    assert tokenizers.token_bytes_of(meta, folder) == (tok.token_bytes, None)  # bits per byte: markers 0
    for path in folder.iterdir():  # the record alone rebuilds it: the data folder is gone
        path.unlink()
    rebuilt = tokenizers.tokenizer_from_record(record)
    ids = chat.render(CONVERSATION, tok)[0]
    for other in (loaded, rebuilt):
        assert other.vocab_size == tok.vocab_size and other.special_ids == tok.special_ids
        assert other.token_bytes == tok.token_bytes and other.encode(SPELLED) == tok.encode(SPELLED)
        assert chat.render(CONVERSATION, other) == chat.render(CONVERSATION, tok)
        assert other.decode(ids) == tok.decode(ids)


def test_a_chat_entry_that_does_not_fit_its_tokenizer_is_an_error():
    meta = {"tokenizer": "char", "chars": SHAKESPEARE_CHARS, "vocab_size": 69,
            "chat": {"special_tokens": {m: 65 + i for i, m in enumerate(tokenizers.SPECIAL_TOKENS)}}}
    assert tokenizers.get_tokenizer(meta).special_ids["<|end|>"] == 68
    assert tokenizers.token_bytes_of(meta, None)[0][-5:] == [1, 0, 0, 0, 0]
    bad = [{"special_tokens": {m: 66 + i for i, m in enumerate(tokenizers.SPECIAL_TOKENS)}},  # a gap after the base
           {"special_tokens": {"<|user|>": 65}}, {"tokens": []}, "chat"]
    for entry in bad:
        with pytest.raises(PrepareError, match="prepare the dataset again"):
            tokenizers.get_tokenizer({**meta, "chat": entry})


# ----------------------------------------------------------------------------- chitchat

def test_chitchat_becomes_user_and_assistant_turns():
    pytest.importorskip("chitchat_dataset", reason="the chitchat corpus needs pip install chitchat-dataset")
    conversations = chat.chitchat_conversations()
    assert len(conversations) == 4017
    for messages in conversations:
        chat.check_messages(messages)
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all(m["content"] and m["content"] == m["content"].strip() for m in messages)
    assert conversations[0][:2] == [
        {"role": "user", "content": "Hello\nHow are you doing today?"},
        {"role": "assistant", "content": "whats up MD\nim doing good\nhow are you doing?"}]


def test_chitchat_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "chitchat_dataset", None)  # import fails as if not installed
    with pytest.raises(PrepareError, match="pip install chitchat-dataset"):
        chat.chitchat_conversations()
