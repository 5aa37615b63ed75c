"""
The chat template and chat data: conversations in, token ids and a loss mask out, in one way
shared by training, sampling, serving, evaluation and export.

    tok = chat_tokenizer(load_tokenizer("data/shakespeare_char"))   # lib/tokenizers.py: 65 chars + 4 chat ids
    messages = [{"role": "user", "content": "reverse: wodnik"}, {"role": "assistant", "content": "kindow"}]
    ids, mask = render(messages, tok)      # mask 1 where the model learns: the assistant's reply
    prompt = render_prompt(messages[:1], tok)   # ... + <|assistant|>; generate until <|end|>

The template: each message is <|ROLE|> + content + <|end|>, nothing added between (no newlines).
Its four markers are special tokens added after a base tokenizer's ids (characters: len(chars)..;
own BPE: vocab_size..; GPT-2: 50257..50260, inside the padded 50304 model). Text never encodes to
them: a user who types "<|user|>" gets those characters, so only the template can open a turn.
JINJA_TEMPLATE is the same template for Hugging Face and GGUF exports.

Also here: reading conversations (OpenAI's messages format, .jsonl), splitting them into train
and val, fitting them to block_size, growing a model's vocabulary for the new ids, a synthetic
task with exact answers (reversing words), and the chitchat corpus as conversations.
"""
import hashlib
import json
import random
from pathlib import Path

from lib.tokenfiles import PrepareError
from lib.tokenizers import END, SPECIAL_TOKENS, base_vocab_size

ROLES = ("system", "user", "assistant")
FORMAT = ('one conversation per line: {"messages": [{"role": "user", "content": "..."}, '
          '{"role": "assistant", "content": "..."}]}')

# The same template for Hugging Face's apply_chat_template and llama.cpp (--jinja): the variables
# they pass are messages and add_generation_prompt. One line, so trim_blocks changes nothing.
JINJA_TEMPLATE = ("{% for message in messages %}"
                  "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                  "{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def marker(role):
    return f"<|{role}|>"


# ----------------------------------------------------------------------------- the template

def check_messages(messages, need_assistant=True):
    """ValueError naming the problem and the fix unless messages is a list of {"role": one of
    ROLES, "content": str} (other keys are ignored), with an assistant message if need_assistant."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'no "messages" list (a non-empty list of messages); {FORMAT}')
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is a {type(message).__name__}, "
                             "not an object with a role and a content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            what = "no content" if content is None else f"a content of type {type(content).__name__}"
            raise ValueError(f"message {i} ({role}) has {what}; the content must be one string of text")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message, so there is no reply to learn; "
                         "add the assistant's reply or leave the conversation out")


def render_text(messages, add_generation_prompt=False):
    """The template as text (what JINJA_TEMPLATE renders): for reading and exports. Its tokens
    come from render(), never from encoding this text, which would spell the markers."""
    text = "".join(marker(m["role"]) + m["content"] + END for m in messages)
    return text + (marker("assistant") if add_generation_prompt else "")


def render(messages, tokenizer):
    """(ids, mask) of a conversation: mask[i] is 1 where ids[i] is a token the model learns to
    predict (the assistant's content and its <|end|>), 0 elsewhere (markers, system and user
    content). Messages are encoded one by one, as render_prompt does at inference."""
    special = _special_ids(tokenizer)
    check_messages(messages, need_assistant=False)
    ids, mask = [], []
    for m in messages:
        content = tokenizer.encode_ordinary(m["content"])
        learn = int(m["role"] == "assistant")
        ids += [special[marker(m["role"])], *content, special[END]]
        mask += [0] + [learn] * (len(content) + 1)
    return ids, mask


def render_prompt(messages, tokenizer):
    """Token ids asking for the next assistant message: messages + <|assistant|>."""
    return render(messages, tokenizer)[0] + [_special_ids(tokenizer)[marker("assistant")]]


def _special_ids(tokenizer):
    if not tokenizer.special_ids:
        raise ValueError(f"{tokenizer} has no chat tokens: use lib.tokenizers.chat_tokenizer(tokenizer)")
    return tokenizer.special_ids


# ----------------------------------------------------------------------------- the tokenizer

def chat_entry(tokenizer):
    """What meta.json (and so a checkpoint's tokenizer record) keeps under "chat": the ids."""
    return {"special_tokens": dict(_special_ids(tokenizer))}


def run_tokenizer(run):
    """(tokenizer, record) a trained run was made with, without its chat tokens if it has them:
    what `prepare.py chat --base=RUN` builds chat data on, so a fine-tune reads the ids the base
    model learned. run: a run folder (its ckpt.pt) or a ckpt.pt. record: the checkpoint's
    tokenizer record (lib/tokenizers.tokenizer_record), or the run's data's meta.json where the
    checkpoint has none (nanoGPT's); {"tokenizer": "gpt2"} where there is neither (GPT-2 ids)."""
    from lib import loading, runs, tokenizers  # torch: only a --base reads a checkpoint
    path = Path(run) / "ckpt.pt" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise PrepareError(f"--base={run}: no {path}; name a trained run's folder (it holds ckpt.pt) "
                           "or its ckpt.pt")
    try:
        ckpt = runs.load_checkpoint(path)
    except SystemExit as e:  # ConfigError: damaged, foreign
        raise PrepareError(f"--base={run}: {getattr(e, 'message', e)}") from None
    record = ckpt.get("tokenizer") if isinstance(ckpt.get("tokenizer"), dict) else None
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    if not record or not record.get("tokenizer"):  # nanoGPT's checkpoints: the data's metadata
        folder = loading._find_data_dir(config.get("data_dir"), config.get("dataset"))
        if folder:
            record = {**tokenizers.read_meta(folder), "folder": folder}
        elif ckpt["model_args"].get("vocab_size", 0) >= 50257:
            record = {"tokenizer": "gpt2"}
        else:
            raise PrepareError(f"--base={run}: its checkpoint records no tokenizer and its data folder "
                               f"is gone, so its ids cannot be known; prepare its dataset again")
    record = dict(record)
    if record.get("chat"):  # a chat run fine-tuned again: the same ids under the same markers
        record["vocab_size"] = base_vocab_size(record.pop("chat"))
    try:
        if record.get("tokenizer") == "bpe" and "bpe_ranks" not in record:
            tokenizer = tokenizers.bpe_tokenizer(record.get("folder"), record)
        else:
            tokenizer = tokenizers.tokenizer_from_record(record)
    except (PrepareError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"--base={run}: cannot rebuild its tokenizer ({e})") from None
    if tokenizer.name == "bpe" and "bpe_ranks" not in record:
        record["bpe_ranks"] = (Path(record["folder"]) / (record.get("bpe") or {}).get(
            "file", "tokenizer.tiktoken")).read_text(encoding="ascii")
    return tokenizer, record


# ----------------------------------------------------------------------------- conversation files

def read_conversations(path, where=None):
    """The conversations (lists of messages) of a .jsonl file, or of the .jsonl files in a folder
    (sorted by name): one {"messages": [...]} per line, blank lines skipped. A PrepareError names
    the file, the line and the fix for anything else. where: a list that gets each conversation's
    'FILE:LINE', for later errors about its content."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise PrepareError(f"{path} holds no .jsonl files; put conversations in FILE.jsonl, {FORMAT}")
    elif path.is_file():
        files = [path]
    else:
        raise PrepareError(f"no file or folder {path}; pass a .jsonl file of conversations "
                           "or a folder of them")
    conversations = []
    for file in files:
        try:
            lines = file.read_bytes().splitlines()
        except OSError as e:
            raise PrepareError(f"cannot read {file}: {e.strerror}") from None
        count = len(conversations)
        for n, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PrepareError(f"{file}:{n}: not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise PrepareError(f"{file}:{n}: not valid JSON ({getattr(e, 'msg', e)}, column "
                                   f"{getattr(e, 'colno', '?')}); {FORMAT}") from None
            try:
                messages = record.get("messages") if isinstance(record, dict) else None
                check_messages(messages)
            except ValueError as e:
                raise PrepareError(f"{file}:{n}: {e}") from None
            conversations.append(messages)
            if where is not None:
                where.append(f"{file}:{n}")
        if len(conversations) == count:
            raise PrepareError(f"{file} holds no conversations; {FORMAT}")
    return conversations


def split_conversations(conversations, val_fraction=0.1, seed=0):
    """(train, val): whole conversations, about val_fraction of them (at least one) in val, each
    split in the input's order. Deterministic: which ones go to val depends on their contents and
    seed, not on their order, and copies of one conversation stay together, so no val
    conversation is also a training one."""
    if len(conversations) < 2:
        raise PrepareError(f"{len(conversations)} conversation(s): train and val need at least 2")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")

    def key(messages):
        text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
        return hashlib.sha256(f"{seed}\n{text}".encode()).hexdigest()
    keys = [key(m) for m in conversations]
    counts = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    want, taken, val_keys = max(1, round(len(conversations) * val_fraction)), 0, set()
    for k in sorted(counts):  # hash order: a seeded shuffle that keeps copies together
        if taken >= want:
            break
        val_keys.add(k)
        taken += counts[k]
    train = [c for c, k in zip(conversations, keys) if k not in val_keys]
    val = [c for c, k in zip(conversations, keys) if k in val_keys]
    if not train:
        raise PrepareError("all conversations are copies of one: train and val need different ones")
    return train, val


def fit_to_block(rendered, block_size, long="cut"):
    """Rendered conversations [(ids, mask)] that fit a training row of block_size + 1 tokens
    (block_size inputs, each predicting the next token), and counts {"kept", "cut", "skipped"} to
    report. A longer one is cut to its first block_size + 1 tokens (long="cut") or left out
    ("skip"); a cut one that keeps no token to learn is left out too."""
    if long not in ("cut", "skip"):
        raise ValueError(f"long must be 'cut' or 'skip', got {long!r}")
    kept, counts, row = [], {"kept": 0, "cut": 0, "skipped": 0}, block_size + 1
    for ids, mask in rendered:
        if len(ids) <= row:
            kept.append((ids, mask))
            counts["kept"] += 1
        elif long == "cut" and any(mask[1:row]):  # mask[0] is never a target
            kept.append((ids[:row], mask[:row]))
            counts["cut"] += 1
        else:
            counts["skipped"] += 1
    return kept, counts


def render_split(conversations, tokenizer, max_tokens, where=None):
    """(ids, mask, counts) of a split: each conversation rendered, fitted to max_tokens
    (fit_to_block: a longer one cut, or skipped when the cut keeps nothing to learn), all
    concatenated. counts: {"kept", "cut", "skipped"}. A character the tokenizer lacks is a
    PrepareError naming it and the conversation (where[i]: its 'FILE:LINE', else its number)."""
    rendered = []
    for i, messages in enumerate(conversations):
        try:
            rendered.append(render(messages, tokenizer))
        except PrepareError:  # a character vocabulary without one of the content's characters
            missing = missing_characters("".join(m["content"] for m in messages), tokenizer)
            at = where[i] if where else f"conversation {i + 1}"
            raise PrepareError(f"{at}: {len(missing)} character(s) not in the {tokenizer.vocab_size - 4}-"
                               f"character vocabulary: {' '.join(map(repr, missing[:10]))}; remove them "
                               f"from the conversations, or use a base trained on text with them") from None
    kept, counts = fit_to_block(rendered, max_tokens - 1)
    ids = [i for conversation, _ in kept for i in conversation]
    mask = [m for _, conversation in kept for m in conversation]
    return ids, mask, counts


def missing_characters(text, tokenizer):
    """The characters of text a character vocabulary lacks, each once, in the text's order."""
    def encodes(character):
        try:
            tokenizer.encode_ordinary(character)
            return True
        except PrepareError:
            return False
    return [c for c in dict.fromkeys(text) if not encodes(c)]


# ----------------------------------------------------------------------------- the model

def grow_vocab(model, vocab_size):
    """Give a GPT vocab_size token ids (model.py's GPT, in place) before training the new ones:
    the token embedding, the output head when untied (tied stays tied) and the value embeddings
    get new rows, each the mean of the existing rows, so a new token starts as an average token
    and the old ids' logits do not change. Every other weight is untouched; config.vocab_size
    follows. Returns False (and does nothing) when the model already has that many ids, as GPT-2's
    padded 50,304 has for its 50,257 + 4. Build the optimizer, LoRA and torch.compile after."""
    import torch  # here, so prepare.py reads conversations without loading torch
    old = model.config.vocab_size
    if vocab_size <= old:
        return False

    def grow(embedding_or_linear):
        weight = embedding_or_linear.weight  # (old, C)
        extra = weight.detach().mean(dim=0, keepdim=True).expand(vocab_size - old, -1)  # (new - old, C)
        grown = torch.cat([weight.detach(), extra])  # (new, C)
        embedding_or_linear.weight = torch.nn.Parameter(grown, requires_grad=weight.requires_grad)
    tied = model.lm_head.weight is model.transformer.wte.weight
    grow(model.transformer.wte)
    model.transformer.wte.num_embeddings = vocab_size
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    else:
        grow(model.lm_head)
    model.lm_head.out_features = vocab_size
    for table in model.value_embeds:
        if not isinstance(table, torch.nn.Embedding):
            continue  # a block without value embeddings
        grow(table)
        table.num_embeddings = vocab_size
    model.config.vocab_size = vocab_size
    return True


def fit_base_model(model, info, meta, lora_rank=0, notice=print):
    """Ready a loaded model (loading.load_model's model and info: a run's ckpt.pt, or GPT-2) to be
    fine-tuned on chat data described by meta (meta.json): its tokenizer must be the data's base
    tokenizer (prepare.py's --base makes it so), then its vocabulary grows by the chat tokens
    (grow_vocab). ConfigError otherwise, and for LoRA, which freezes the rows the chat tokens need."""
    from lib.cli import ConfigError  # here: lib/cli.py imports torch
    gpt2 = model.config.vocab_size >= 50257  # pretrained GPT-2 (a Hugging Face folder) has no record
    record = info.get("tokenizer_record") or {"tokenizer": "gpt2" if gpt2 else None}
    base, mine = meta.get("tokenizer"), record.get("tokenizer")
    same = base == mine and (base != "char" or list(record.get("chars", [])) == list(meta.get("chars", [])))
    if same and base == "bpe":  # compare the merges, not just the names
        mine = hashlib.sha256(str(record.get("bpe_ranks", "")).encode()).hexdigest()
        same = mine == (meta.get("bpe") or {}).get("sha256")
    if record.get("chat") and record["chat"] != meta["chat"]:
        same = False  # a chat model whose markers sit at other ids
    if not same:
        raise ConfigError(f"{info['source']} was trained with another tokenizer than the chat data's "
                          f"({meta.get('tokenizer')}): prepare the data again on this base, `python "
                          f"prepare.py {meta.get('dataset', 'chat')} --base=RUN_FOLDER --force` with the "
                          f"options you used")
    old = model.config.vocab_size
    if grow_vocab(model, meta["vocab_size"]):
        if lora_rank:
            raise ConfigError(f"LoRA freezes the embeddings, but the {len(SPECIAL_TOKENS)} chat tokens need "
                              f"rows of their own in this model ({old} ids): fine-tune fully (lora_rank=0)")
        notice(f"chat: the vocabulary grows from {old} to {model.config.vocab_size} ids for the chat "
               f"tokens, each starting as the mean of the others (lib/chat.py grow_vocab)")


def reply_tokens(model, tokenizer, prompt, max_new_tokens, **sampling):
    """Yield the token ids of the model's reply to prompt (render_prompt's ids), one at a time,
    until it writes <|end|> or another marker (a new message: not yielded), or max_new_tokens
    ids. sampling: model.generate_stream's (temperature, top_k, top_p, vocab_limit, generator)."""
    import torch
    markers = set(_special_ids(tokenizer).values())
    device = next(model.parameters()).device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    for token in model.generate_stream(idx, max_new_tokens, **sampling):
        token = int(token[0])
        if token in markers:
            return
        yield token


def prompt_limit(block_size, max_new_tokens):
    """The most tokens a reply's prompt may keep (fit_history's limit): the context less the room
    for the reply, that room at most half the context, so a large max_new_tokens still leaves the
    chat half of it (the reply may then end when the context is full)."""
    return block_size - min(max_new_tokens, block_size // 2)


def fit_history(messages, tokenizer, limit):
    """(prompt, messages kept, turns dropped, tokens cut) for the reply to messages: render_prompt's
    ids after the oldest turns are dropped (a turn: a user message and the replies after it; a
    system message first stays) until the prompt is at most limit tokens. A last user message too
    long on its own keeps its last limit tokens (tokens cut: how many it lost)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest, dropped = list(messages[len(system):]), 0
    prompt = render_prompt(system + rest, tokenizer)
    while len(prompt) > limit and any(m["role"] == "user" for m in rest[1:]):
        rest = rest[1:]
        while rest and rest[0]["role"] != "user":
            rest = rest[1:]
        dropped += 1
        prompt = render_prompt(system + rest, tokenizer)
    return prompt[-limit:], system + rest, dropped, max(0, len(prompt) - limit)


# ----------------------------------------------------------------------------- a synthetic task

REVERSE = "reverse: "  # the question's prefix: letters, ':' and ' ' are all in Tiny Shakespeare
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def reversal_task(n_train, n_val, seed=0):
    """(train, val) conversations of the word-reversal task: user "reverse: wodnik", assistant
    "kindow", with random lowercase words of 3-8 letters. Its answers are exact and need the
    skill, not recall: no val word, nor its reverse, is a training question, and val depends on
    seed and n_val only, so runs with more training data are scored on the same questions.
    Chosen over counting letters (answered in words) because a guess almost never scores (26^k
    possible answers of k letters, against a handful of number words), and because copying
    characters back in reverse order is a skill a small character model can learn."""
    rng = random.Random(seed)

    def words(n, unseen):
        out = []
        while len(out) < n:
            word = "".join(rng.choices(LETTERS, k=rng.randint(3, 8)))
            if word not in unseen:
                unseen.add(word)
                out.append(word)
        return out
    val = words(n_val, set())
    train = words(n_train, set(val) | {w[::-1] for w in val})

    def conversation(word):
        return [{"role": "user", "content": REVERSE + word}, {"role": "assistant", "content": word[::-1]}]
    return [conversation(w) for w in train], [conversation(w) for w in val]


def answer_questions(model, tokenizer, questions, autocast=None):
    """[(question, answer, expected)] of conversations whose last message is the expected reply:
    the model's greedy reply (reply_tokens) to the messages before it. A reply is cut a few tokens
    after the expected one's length: a longer one is wrong anyway."""
    import contextlib
    # a padded vocabulary (GPT-2's 50304) has ids no tokenizer can decode
    limit = tokenizer.vocab_size if tokenizer.vocab_size < model.config.vocab_size else None
    results = []
    for messages in questions:
        if messages[-1]["role"] != "assistant":
            raise ValueError("every question must end with the expected assistant reply")
        prompt, expected = render_prompt(messages[:-1], tokenizer), messages[-1]["content"]
        room = len(tokenizer.encode_ordinary(expected)) + 8
        with autocast() if autocast else contextlib.nullcontext():
            reply = list(reply_tokens(model, tokenizer, prompt, room, temperature=0.0, vocab_limit=limit))
        question = messages[-2]["content"] if len(messages) > 1 else ""
        results.append((question, tokenizer.decode(reply), expected))
    return results


def score_answer(answer, expected):
    """1.0 if the model's answer (its text up to <|end|>) is the expected one, whitespace at the
    ends aside, else 0.0: exact match, no partial credit."""
    return float(answer.strip() == expected.strip())


# ----------------------------------------------------------------------------- a real corpus

def chitchat_conversations():
    """The chitchat-dataset corpus (BYU PCC lab, MIT licence; `pip install chitchat-dataset`):
    7,168 two-person chats as conversations, in the package's order. The first speaker is the
    user, the second the assistant; the lines of one turn are joined by newlines. A chat is cut
    before its first empty turn and after its last assistant turn; 4,017 chats remain (the 3,150
    where nobody answered have one speaker)."""
    try:
        import chitchat_dataset
    except ImportError:
        raise PrepareError("the chitchat corpus needs its package: pip install chitchat-dataset") from None
    conversations = []
    for record in chitchat_dataset.Dataset().values():
        # a turn is a list of utterances by one sender; senders alternate (checked for all 7,168)
        messages = []
        for i, turn in enumerate(record["messages"]):
            text = "\n".join(u["text"].strip() for u in turn if u["text"].strip())
            if not text:
                break
            messages.append({"role": ("user", "assistant")[i % 2], "content": text})
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if messages:
            conversations.append(messages)
    return conversations
