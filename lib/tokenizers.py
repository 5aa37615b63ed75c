"""
Tokenizers: characters, GPT-2's BPE (tiktoken), an own BPE (lib/bpe.py) and the counting task's
numbers, behind one small Tokenizer object; any of them with the chat template's four markers
added as special tokens (chat_tokenizer; the template itself: lib/chat.py); which one a dataset
or a checkpoint was made with, and the bytes of text each token stands for (bits per byte).

    from lib.tokenizers import load_tokenizer
    tok = load_tokenizer("data/shakespeare_char")
    tok.decode(tok.encode("To be")) == "To be"
"""
import os
from pathlib import Path

from lib.tokenfiles import MAX_VOCAB, PrepareError, read_meta, sha256_of

END = "<|end|>"  # lib/chat.py's template: closes every message; generation stops when the model writes it
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", END)  # in id order, after the base ids


class Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str, vocab_size, name.

    encode_batch(list[str]) -> list[list[int]] is the data-preparation path; for GPT-2 it runs
    tiktoken's threaded batch encoder and treats special-token text as plain text.
    encode_ordinary(str) treats special-token text as plain text too (lib/chat.py's tokens can
    then come only from its template, never from what a user typed).
    """

    # One class holding functions rather than a class per kind: the three tokenizers differ
    # only in these four callables, and callers never need to know which one they got.
    def __init__(self, name, vocab_size, encode, decode, encode_batch=None, token_bytes=None,
                 encode_ordinary=None, encoding=None, special_ids=None):
        self.name = name
        self.vocab_size = vocab_size
        self.encode = encode
        self.decode = decode
        self.encode_batch = encode_batch or (lambda texts: [encode(t) for t in texts])
        self.encode_ordinary = encode_ordinary or encode  # the same but for tiktoken's
        # UTF-8 bytes of the text each id stands for (0 for <|endoftext|>), for bits per byte;
        # None where tokens are not text (the counting task)
        self.token_bytes = token_bytes
        self.encoding = encoding  # the tiktoken.Encoding of a BPE (export.py writes its ranks), else None
        self.special_ids = special_ids or {}  # a chat tokenizer's {marker: id} (lib/chat.py); {} for text

    def __repr__(self):
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def char_tokenizer(chars):
    """Id i is chars[i]; chars is sorted so the same text always gives the same ids."""
    stoi = {ch: i for i, ch in enumerate(chars)}

    def encode(text):
        try:
            return [stoi[ch] for ch in text]
        except KeyError as e:  # a prompt with a character the training text never had
            raise PrepareError(f"character {e.args[0]!r} is not in this dataset's vocabulary "
                               f"of {len(chars)} characters") from None

    return Tokenizer("char", len(chars), encode, lambda ids: "".join(chars[i] for i in ids),
                     token_bytes=[len(c.encode("utf-8")) for c in chars])


# fills a tiktoken cache: tiktoken downloads vocab.bpe and encoder.json into TIKTOKEN_CACHE_DIR,
# each named by the sha1 of its web address, and reads them from there from then on
FILL_TIKTOKEN_CACHE = ("TIKTOKEN_CACHE_DIR=tiktoken_cache python -c "
                       "\"import tiktoken; tiktoken.get_encoding('gpt2')\"")


def gpt2_tokenizer(num_threads=None):
    """tiktoken's 'gpt2' encoding (50,257 ids); encode_batch spreads over num_threads cores."""
    import tiktoken  # imported here so char-only users never load the BPE files
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without a cache tiktoken fails deep inside requests
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        why = (f"TIKTOKEN_CACHE_DIR={cache} does not hold them" if cache else
               "tiktoken downloads them on first use")
        copy = (f"the files of that tiktoken_cache folder into {cache}" if cache else
                "that tiktoken_cache folder here and set TIKTOKEN_CACHE_DIR=/path/to/tiktoken_cache")
        raise PrepareError(f"cannot load the GPT-2 BPE files ({type(e).__name__}): {why}; offline, run "
                           f"{FILL_TIKTOKEN_CACHE} on a machine with network, then copy {copy}") from None
    return tiktoken_tokenizer("gpt2", enc, num_threads)


def tiktoken_tokenizer(name, enc, num_threads=None):
    """A Tokenizer over a tiktoken.Encoding (GPT-2's, or an own BPE's from bpe.py)."""
    threads = num_threads or os.cpu_count() or 1
    special = set(enc.special_tokens_set)
    return Tokenizer(
        name, enc.n_vocab,
        # prompts may spell <|endoftext|> on purpose; data files are encoded "ordinary" (as nanoGPT)
        lambda text: enc.encode(text, allowed_special=special),
        enc.decode,
        lambda texts: enc.encode_ordinary_batch(texts, num_threads=threads),
        token_bytes=[0 if i in {enc.eot_token} else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
        encode_ordinary=enc.encode_ordinary, encoding=enc)


def bpe_tokenizer(folder, meta):
    """The tokenizer an own-BPE dataset was made with (bpe.py), from the ranks file meta.json names."""
    from lib import bpe
    info = meta.get("bpe") or {}
    path = Path(folder) / info.get("file", "tokenizer.tiktoken")
    if not path.is_file():
        raise PrepareError(f"{path} is missing: it holds this dataset's BPE tokenizer; prepare the dataset again")
    if info.get("sha256") and sha256_of(path) != info["sha256"]:
        raise PrepareError(f"{path} is not the tokenizer this dataset was made with (its sha256 differs from "
                           f"meta.json's); prepare the dataset again")
    try:
        return tiktoken_tokenizer("bpe", bpe.load_encoding(path, int(meta["vocab_size"])))
    except (ValueError, KeyError) as e:
        raise PrepareError(f"{path}: {e}") from None


def counting_tokenizer(vocab_size=101):
    """Token i is the number i; the last id separates sequences and reads as a newline."""
    sep = vocab_size - 1

    def encode(text):
        # lines are sequences; whitespace inside a line only separates numbers
        ids = []
        for line_no, line in enumerate(text.split("\n")):
            if line_no:
                ids.append(sep)
            for word in line.split():
                if not (word.isascii() and word.isdigit()) or int(word) >= sep:
                    raise PrepareError(f"counting tokenizer: {word!r} is not a number in 0..{sep - 1}")
                ids.append(int(word))
        return ids

    def decode(ids):
        # numbers joined by single spaces, no space around the newline, so encode(decode(x)) == x
        out = []
        for i in ids:
            word = "\n" if i == sep else str(i)
            out.append(word if i == sep or not out or out[-1] == "\n" else " " + word)
        return "".join(out)

    return Tokenizer("counting", vocab_size, encode, decode)


def token_bytes_of(meta, folder):
    """(UTF-8 bytes per token id, None) of a dataset whose tokens are text, for bits per byte;
    (None, why not) where they are not (the counting task) or the tokenizer is unknown."""
    name = meta.get("tokenizer") or ("char" if ("chars" in meta or "itos" in meta) else "gpt2" if not meta else None)
    if name is None:
        return None, "the metadata names no tokenizer"
    if name == "counting":
        return None, "the counting task's tokens are numbers, not text: per-token loss only"
    try:
        return get_tokenizer({**meta, "tokenizer": name}, folder).token_bytes, None
    except PrepareError as e:
        return None, str(e)


def tokenizer_record(meta, folder):
    """What a checkpoint keeps of its data's tokenizer, so sample.py and evaluate.py rebuild it
    even when the data folder is gone or elsewhere: the name, vocab_size, the characters of a
    char vocabulary, the ranks (tiktoken's text format) of an own BPE."""
    record = {"tokenizer": meta.get("tokenizer"), "vocab_size": meta.get("vocab_size"), "folder": str(folder)}
    if meta.get("chars"):
        record["chars"] = list(meta["chars"])
    if meta.get("chat"):
        record["chat"] = meta["chat"]
    if meta.get("tokenizer") == "bpe":
        path = Path(folder) / (meta.get("bpe") or {}).get("file", "tokenizer.tiktoken")
        try:
            record["bpe_ranks"] = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            pass  # sample.py will then need the data folder, and says so
    return record


def tokenizer_from_record(record):
    """The Tokenizer a checkpoint's tokenizer_record describes."""
    if record.get("chat"):
        return _with_chat_tokens(record, tokenizer_from_record)
    if record.get("tokenizer") == "bpe":
        from lib import bpe
        return tiktoken_tokenizer("bpe", bpe.load_encoding("the checkpoint's BPE", int(record["vocab_size"]),
                                                           text=record["bpe_ranks"]))
    return get_tokenizer(record, record.get("folder"))


def get_tokenizer(meta, folder=None):
    """Tokenizer described by metadata (meta.json or nanoGPT meta.pkl) of the dataset in folder
    (an own BPE's ranks are a file there); GPT-2 when meta is empty; with the chat tokens added
    (lib/chat.py) when meta has a "chat" entry."""
    if meta.get("chat"):
        return _with_chat_tokens(meta, lambda base_meta: get_tokenizer(base_meta, folder))
    name = meta.get("tokenizer")
    if name is None:  # nanoGPT's meta.pkl has only vocab_size, itos, stoi
        name = "char" if ("itos" in meta or "chars" in meta) else "gpt2"
    if name == "char":
        if "chars" in meta:
            chars = list(meta["chars"])
        elif "itos" in meta:  # nanoGPT: {id: char}, ids 0..n-1
            chars = [meta["itos"][i] for i in range(len(meta["itos"]))]
        else:
            raise PrepareError("char metadata has no 'chars' (or 'itos'); re-run prepare.py")
        return char_tokenizer(chars)
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "counting":  # vocab_size = numbers + separator, so --numbers changes it
        return counting_tokenizer(int(meta.get("vocab_size", 101)))
    if name == "bpe":
        if folder is None:
            raise PrepareError("an own-BPE dataset's tokenizer is read from its folder: pass the folder")
        return bpe_tokenizer(folder, meta)
    raise PrepareError(f"unknown tokenizer {name!r} in metadata; known: char, gpt2, bpe, counting")


def _with_chat_tokens(meta, build):
    """A chat dataset's tokenizer: build(the metadata of its base tokenizer) plus the chat
    template's special tokens, whose ids meta["chat"] records."""
    base_meta = {k: v for k, v in meta.items() if k != "chat"}
    base_meta["vocab_size"] = base_vocab_size(meta["chat"])
    return chat_tokenizer(build(base_meta), meta["chat"])


def chat_tokenizer(base, entry=None):
    """base (a lib.tokenizers.Tokenizer) with SPECIAL_TOKENS added at ids base.vocab_size...;
    .special_ids maps each marker to its id. encode() never produces them (special-token text is
    plain text, <|endoftext|> too); decode() writes them as their markers. entry: the "chat" entry
    of a meta.json or checkpoint, whose ids must be the ones given here."""
    if base.special_ids:
        raise ValueError(f"{base} already has the chat tokens")
    special = {m: base.vocab_size + i for i, m in enumerate(SPECIAL_TOKENS)}
    if base.vocab_size + len(special) > MAX_VOCAB:
        raise PrepareError(f"the {base.name} tokenizer's {base.vocab_size:,} ids leave no room for the "
                           f"{len(special)} chat tokens in uint16 token files; use a vocab_size of at most "
                           f"{MAX_VOCAB - len(special):,}")
    if entry is not None and entry.get("special_tokens") != special:
        raise PrepareError(f"the chat tokens {entry.get('special_tokens')} recorded with the data do not "
                           f"follow the {base.name} tokenizer's {base.vocab_size:,} ids; "
                           "prepare the dataset again")
    marker_of = {i: m for m, i in special.items()}

    def decode(ids):
        out, run = [], []  # runs of base ids decode together (a BPE character may span tokens)
        for i in ids:
            if i in marker_of:
                out += [base.decode(run), marker_of[i]] if run else [marker_of[i]]
                run = []
            else:
                run.append(i)
        return "".join(out + ([base.decode(run)] if run else []))

    token_bytes = None if base.token_bytes is None else [*base.token_bytes, *[0] * len(special)]
    tok = Tokenizer(base.name, base.vocab_size + len(special), base.encode_ordinary, decode,
                    encode_batch=base.encode_batch, token_bytes=token_bytes,  # (encode_batch: ordinary too)
                    encode_ordinary=base.encode_ordinary, encoding=base.encoding, special_ids=special)
    return tok


def base_vocab_size(entry):
    """The base tokenizer's vocab_size in a "chat" entry: its first special id."""
    ids = entry.get("special_tokens") if isinstance(entry, dict) else None
    if not isinstance(ids, dict) or list(ids) != list(SPECIAL_TOKENS) or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in ids.values()):
        raise PrepareError(f"the chat entry {entry!r} in the metadata is not {{'special_tokens': "
                           f"{{marker: id}}}} for {', '.join(SPECIAL_TOKENS)}; prepare the dataset again")
    return min(ids.values())


def load_tokenizer(dataset_dir):
    """The tokenizer a prepared folder was made with (GPT-2 when it has no metadata, as nanoGPT)."""
    return get_tokenizer(read_meta(dataset_dir), dataset_dir)
