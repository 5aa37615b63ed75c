"""
Turn a corpus (a body of text) into what train.py reads: data/NAME/train.bin and val.bin (and
test.bin where the corpus has one) hold the text as token ids, the numbers a model reads and
writes, 2 bytes each; data/NAME/meta.json records how they were made.

    python prepare.py --list                            # every dataset, its source, prepared or not
    python prepare.py shakespeare_char                  # Tiny Shakespeare, one token per character
    python prepare.py shakespeare                       # Tiny Shakespeare, GPT-2's tokenizer
    python prepare.py the_verdict                       # a 20k-character story, GPT-2's tokenizer
    python prepare.py wikitext2 --input=wikitext-2/     # a local copy: train/valid/test.txt
    python prepare.py counting --seed=1337              # made-up "x x+1 x+2 ..." sequences
    python prepare.py fineweb_edu --max_tokens=100_000_000   # FineWeb-Edu's first 100M tokens (download)
    python prepare.py fineweb_edu                       # all ~10B tokens (~20 GB of .bin, ~27 GB download)
    python prepare.py openwebtext                       # OpenWebText, nanoGPT's GPT-2 corpus (download)
    python prepare.py fineweb_edu --input=shards/       # local .parquet files with a `text` column, offline
    python prepare.py fineweb10B_gpt2 --shards=8        # FineWeb already in GPT-2 tokens: no tokenizing
    python prepare.py text --input=notes/ --tokenizer=char --name=mydata
    python prepare.py text --input=notes/ --tokenizer=bpe --vocab_size=4096 --name=mine   # own tokenizer
    python prepare.py shakespeare --tokenizer=bpe --vocab_size=1024   # into data/shakespeare_bpe1024/
    python prepare.py chat --input=conversations.jsonl --name=mychat     # chat data (docs/chat.md)
    python prepare.py chat_reverse --base=out-shakespeare-char-cpu     # a chat task on a run's characters

Words: a tokenizer cuts text into tokens. GPT-2's is a BPE (byte-pair encoding): 50,257 tokens,
frequent pieces of words learned from web text; --tokenizer=bpe learns such pieces from your own
text instead. Parquet is the table format the Hugging Face Hub keeps datasets in; a shard is one
of the many files a big corpus is stored in. Validation (val) is the held-out text a run measures
its loss on.

Every dataset takes --input=PATH (a local copy instead of a download), --data_dir=PATH (write under
PATH instead of data/) and --force (prepare again a dataset that is already prepared).
`python prepare.py NAME --help` lists that dataset's options, what each does and its default.
"""
import difflib
import json
import os
import random
import signal
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

try:  # torch is not needed here; numpy and requests are (requirements.txt)
    import numpy as np
    import requests  # noqa: F401 (lib/download.py and lib/corpora.py use it)
except ModuleNotFoundError as e:
    raise SystemExit(f"error: no module named {e.name!r}: activate the project's virtual environment "
                     f"(. .venv/bin/activate), or install the packages: README, Quick start") from None

from lib import bpe, chat, corpora
from lib.chat_data import write_chat_dataset
from lib.corpora import HubFiles, Shard
from lib.download import Offline, download, download_resumable
from lib.tokenfiles import (DATA_DIR, GPT2_EOT, MAX_VOCAB, SMALL_DATA, TOKEN_DTYPE, PrepareError,
                            UsageError, mask_path, sha256_of, write_json, write_tokens)
from lib.tokenizers import char_tokenizer, counting_tokenizer, gpt2_tokenizer, tiktoken_tokenizer


# ----------------------------------------------------------------------------- files

def read_text(path):
    """A UTF-8 file, or every .txt file under a folder (sorted), as one string."""
    parts = read_text_files(path)
    # files joined so that each one starts on its own line
    return "".join(p if p.endswith("\n") or i == len(parts) - 1 else p + "\n" for i, p in enumerate(parts))


def read_text_files(path):
    """The texts of a UTF-8 file, or of every .txt file under a folder (sorted), one per file."""
    path = Path(path)
    if not path.exists():
        raise PrepareError(f"input {path} does not exist; check --input")
    # sorted so the same folder always gives the same token stream and split
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise PrepareError(f"no .txt files under {path}; point --input at a .txt file or a folder of them")
    parts = []
    for file in files:
        try:
            parts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise PrepareError(f"{file} is not UTF-8 text (byte {e.start}); convert it, e.g. "
                               f"iconv -f latin1 -t utf-8") from None
        except OSError as e:
            raise PrepareError(f"cannot read {file}: {e.strerror}") from None
    if not "".join(parts).strip():
        raise PrepareError(f"input {path} is empty; nothing to tokenize")
    return parts


# ----------------------------------------------------------------------------- sources

@dataclass
class RawFile:
    name: str  # file name inside data/NAME/
    url: str
    sha256: str | None = None  # of the published file, where known


@dataclass
class Raw:
    """What a source hands to the common pipeline: documents per split and provenance."""
    splits: dict  # split name -> list/iterable of documents (str)
    source: str
    sha256: dict = field(default_factory=dict)  # file name -> sha256
    eot: bool = False  # append the tokenizer's end-of-text id after each document
    eot_between: bool = False  # the eot goes between documents only (own-BPE text: no eot at a cut)
    extra: dict = field(default_factory=dict)  # more keys for meta.json
    # large corpora: an iterable of parquet row groups (parquet_tasks) in corpus order, split
    # into train/val by write_corpus instead of `splits` (which then stays empty)
    corpus: object = None
    tokenized: bool = False  # splits hold iterables of token id arrays, not documents
    where: dict = field(default_factory=dict)  # chat: split -> each conversation's 'FILE:LINE', for errors


def fetch_file(raw_file, out_dir, input_path=None):
    """Local --input copy or a (cached) download; returns (path, sha256)."""
    if input_path:  # a local copy is used as is; a different sha256 is allowed but reported
        path = Path(input_path)
        if not path.is_file():
            raise PrepareError(f"--input={input_path} is not a file")
        digest = sha256_of(path)
        if raw_file.sha256 and digest != raw_file.sha256:
            print(f"warning: {path} differs from the published {raw_file.name} (sha256 {digest[:12]}...)",
                  file=sys.stderr)
        return path, digest
    path = out_dir / raw_file.name
    return path, download(raw_file.url, path, raw_file.sha256)


def split_90_10(text):
    cut = int(len(text) * 0.9)  # by characters, as nanoGPT does
    return {"train": [text[:cut]], "val": [text[cut:]]}


def single_file_source(raw_file):
    """Source for a one-file corpus split 90/10 (Tiny Shakespeare, The Verdict)."""
    def read(opts, out_dir):
        path, digest = fetch_file(raw_file, out_dir, opts["input"])
        return Raw(split_90_10(read_text(path)), source=str(opts["input"] or raw_file.url),
                   sha256={raw_file.name: digest})
    return read


WIKITEXT_URL = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"
WIKITEXT_FILES = {  # our split name -> file
    "train": RawFile("train.txt", WIKITEXT_URL + "train.txt"),
    "val": RawFile("valid.txt", WIKITEXT_URL + "valid.txt",
                   "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
    "test": RawFile("test.txt", WIKITEXT_URL + "test.txt",
                    "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
}


def read_wikitext2(opts, out_dir):
    """WikiText-2's own splits; a split that cannot be had is skipped with a warning, because
    val and test alone are what perplexity evaluation needs (offline, train is not available)."""
    splits, digests, missing = {}, {}, []
    for split, raw_file in WIKITEXT_FILES.items():
        try:
            if opts["input"]:  # a folder: use what is there, download nothing
                path = Path(opts["input"]) / raw_file.name
                if not Path(opts["input"]).is_dir():
                    raise PrepareError(f"--input={opts['input']} is not a folder with train/valid/test.txt")
                if not path.exists():
                    raise PrepareError(f"{path} is missing")
                path, digest = fetch_file(raw_file, out_dir, path)
            else:
                path, digest = fetch_file(raw_file, out_dir)
        except Offline:
            raise  # offline: one line now, not three downloads that fail the same way
        except PrepareError as e:
            missing.append((split, raw_file, str(e)))
            continue
        splits[split] = [read_text(path)]
        digests[raw_file.name] = digest
    if not splits:
        raise PrepareError("no WikiText-2 split could be read: " + "; ".join(m[2] for m in missing))
    for split, raw_file, why in missing:
        print(f"warning: wikitext2 {split} split missing ({why}). Put {raw_file.url} at "
              f"{out_dir / raw_file.name} (or in the --input folder) and re-run; "
              f"preparing {', '.join(splits)} only", file=sys.stderr)
    return Raw(splits, source=str(opts["input"] or WIKITEXT_URL), sha256=digests,
               extra={"missing_splits": [m[0] for m in missing]})


COUNTING_KNOBS = ("seed", "numbers", "min_len", "max_len", "num_train", "num_val", "val_starts")  # in meta.json


def read_counting(opts, out_dir):
    """Sequences 'x x+1 ... x+k', one per line; val uses start values never used in train.

    Numbers 0..numbers-1 are tokens 0..numbers-1; the newline between sequences is token
    `numbers`, so a model learns where a count begins and how to continue it. Starts 1 and 10
    are always held out because evaluation prompts with "1 2 3" and "10 11 12".
    """
    numbers, lo, hi = opts["numbers"], opts["min_len"], opts["max_len"]
    if not 2 <= lo <= hi <= numbers:
        raise UsageError(f"counting needs 2 <= --min_len ({lo}) <= --max_len ({hi}) <= --numbers ({numbers})")
    # random.Random, not numpy: its seeded stream is the same on every platform and version
    rng = random.Random(opts["seed"])
    starts = list(range(numbers - lo + 1))  # a sequence of min_len must fit below `numbers`
    forced = [s for s in (1, 10) if s in starts]
    others = [s for s in starts if s not in forced]
    if opts["val_starts"] > len(others) - 1:  # at least one start value must stay for train
        raise UsageError(f"--val_starts={opts['val_starts']} is too many for --numbers={numbers} with "
                         f"--min_len={lo} ({len(starts)} start values, 1 and 10 already held out): use "
                         + (f"--val_starts={len(others) - 1} or less, or " if len(others) > 1 else "")
                         + "a larger --numbers")
    held_out = sorted(forced + rng.sample(others, opts["val_starts"]))
    train_starts = [s for s in starts if s not in held_out]

    def lines(count, pool):
        # random lengths, so a model cannot just count to a fixed length and stop
        out = []
        for _ in range(count):
            x = rng.choice(pool)
            length = rng.randint(lo, min(hi, numbers - x))
            out.append(" ".join(str(v) for v in range(x, x + length)) + "\n")
        return ["".join(out)]

    splits = {"train": lines(opts["num_train"], train_starts), "val": lines(opts["num_val"], held_out)}
    return Raw(splits, source=f"generated (seed={opts['seed']})",
               extra={"val_starts": held_out, "separator": numbers,
                      "counting": {k: opts[k] for k in COUNTING_KNOBS}})


def read_text_source(opts, out_dir):
    if not opts["input"]:
        raise UsageError("text needs --input=PATH (a .txt file or a folder of them)")
    path = Path(opts["input"])
    # an own BPE has <|endoftext|> between the files (documents); the others join them by newlines
    bpe = opts["tokenizer"] == "bpe"
    splits = split_documents_90_10(read_text_files(path)) if bpe else split_90_10(read_text(path))
    return Raw(splits, source=str(path.resolve()), sha256={path.name: sha256_of(path)} if path.is_file() else {},
               eot=bpe, eot_between=True, extra={"inputs": input_manifest(path)})


def split_documents_90_10(documents):
    """The first 90% of the characters, document by document, for train (the document at the cut
    is cut in two), the rest for val."""
    cut = int(sum(map(len, documents)) * 0.9)
    splits, seen = {"train": [], "val": []}, 0
    for doc in documents:
        head = max(0, min(len(doc), cut - seen))
        splits["train"] += [doc[:head]] if head else []
        splits["val"] += [doc[head:]] if head < len(doc) else []
        seen += len(doc)
    return splits


def input_manifest(path, pattern="**/*.txt"):
    """{file: [bytes, sha256]} of the files read from --input (names relative to a folder): what
    a prepared dataset was made from, so a different input is noticed."""
    path = Path(path)
    files = sorted(path.glob(pattern)) if path.is_dir() else [path]
    return {(str(f.relative_to(path)) if path.is_dir() else f.name): [f.stat().st_size, sha256_of(f)] for f in files}


def input_differences(recorded, current):
    """What changed between two input manifests, in words ('' when nothing did)."""
    added = sorted(set(current) - set(recorded))
    removed = sorted(set(recorded) - set(current))
    changed = sorted(f for f in set(current) & set(recorded) if list(current[f]) != list(recorded[f]))
    parts = [f"{what} {', '.join(names[:3])}{' and more' if len(names) > 3 else ''}"
             for what, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
    return "; ".join(parts)


# ------------------------------------------------------------ big corpora, file by file (lib/corpora.py)

def parquet_source(hub):
    """Source for a corpus of parquet files: --input=FOLDER (or one file), else the Hub's shards,
    downloaded one at a time into data/NAME/parquet/ just before they are tokenized, so a
    --max_tokens prefix downloads only the shards it needs."""
    def read(opts, out_dir):
        corpora.import_parquet()  # the install hint before any download
        if min(opts["shards"], opts["max_tokens"], opts["num_proc"]) < 0 or opts["val_every"] < 2:
            raise UsageError("--shards, --max_tokens and --num_proc must be >= 0 (0: all) and --val_every >= 2")
        if opts["input"]:
            path = Path(opts["input"])
            if not path.exists():
                raise PrepareError(f"input {path} does not exist; check --input")
            files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
            if not files:
                raise PrepareError(f"no .parquet files under {path}; point --input at a folder of them")
            shards = [Shard(f.name, str(f.resolve())) for f in files]
            source = str(path.resolve())
        else:
            shards = corpora.hub_shards(hub)
            source = hub.page
        if opts["shards"]:
            shards = shards[:opts["shards"]]
        used, digests = [], {}  # filled while the corpus is read; they end up in meta.json

        def tasks():
            for shard in shards:
                local = Path(shard.url) if opts["input"] else download_resumable(
                    shard.url, out_dir / "parquet" / shard.name, shard.size, shard.sha256)
                used.append(shard.name)
                if shard.sha256:
                    digests[shard.name] = shard.sha256
                yield from corpora.parquet_tasks(local)

        return Raw({}, source=source, eot=True, corpus=tasks(),
                   sha256=digests,
                   extra={"shards": used, "max_tokens": opts["max_tokens"],
                          "val_rule": f"document k (0-based, corpus order) is val when k % {opts['val_every']} == 0"})
    return read


def llmc_source(hub):
    """Source for pre-tokenized GPT-2 shards (fineweb_val_*.bin, fineweb_train_*.bin): copied into
    val.bin and train.bin, no tokenization. --shards=K keeps the first K train shards."""
    def read(opts, out_dir):
        if opts["shards"] < 0:
            raise UsageError("--shards must be >= 0 (0: all)")
        if opts["input"]:
            folder = Path(opts["input"])
            if not folder.is_dir():
                raise PrepareError(f"--input={folder} is not a folder of fineweb_val_*.bin and fineweb_train_*.bin")
            shards = [Shard(f.name, str(f.resolve())) for f in sorted(folder.glob("*.bin"))]
        else:
            shards = corpora.hub_shards(hub)
        val = [s for s in shards if "_val_" in s.name]
        train = [s for s in shards if "_train_" in s.name]
        if not val or not train:
            raise PrepareError(f"need fineweb_val_*.bin and fineweb_train_*.bin shards, found "
                               f"{', '.join(s.name for s in shards) or 'none'} in {opts['input'] or hub.page}")
        train = train[:opts["shards"] or None]
        used, digests = [], {}

        def arrays(group):
            for shard in group:
                path = Path(shard.url) if opts["input"] else download_resumable(
                    shard.url, out_dir / "shards" / shard.name, shard.size, shard.sha256)
                used.append(shard.name)
                if shard.sha256:
                    digests[shard.name] = shard.sha256
                tokens = corpora.read_llmc_shard(path)
                for i in range(0, len(tokens), 1 << 24):  # 32 MB at a time: memory stays flat
                    yield tokens[i:i + (1 << 24)]

        source = str(Path(opts["input"]).resolve()) if opts["input"] else hub.page
        return Raw({"val": arrays(val), "train": arrays(train)}, source=source, sha256=digests, tokenized=True,
                   extra={"shards": used})
    return read


# ----------------------------------------------------------------------------- chat data (lib/chat.py)

def read_chat_files(opts, out_dir):
    """chat: the conversations of --input (a .jsonl file or a folder of them), split by conversation."""
    if not opts["input"]:
        raise UsageError(f"chat needs --input=PATH, a .jsonl file or a folder of them: {chat.FORMAT}")
    path, where = Path(opts["input"]), []
    conversations = chat.read_conversations(path, where)
    at = dict(zip(map(id, conversations), where))
    splits = dict(zip(("train", "val"), chat.split_conversations(conversations)))
    return Raw(splits, source=str(path.resolve()), extra={"inputs": input_manifest(path, "*.jsonl")},
               sha256={path.name: sha256_of(path)} if path.is_file() else {},
               where={split: [at[id(c)] for c in convs] for split, convs in splits.items()})


def read_chat_reverse(opts, out_dir):
    """chat_reverse: the word-reversal task; its val conversations are also eval.jsonl, the
    held-out questions evaluate.py chat scores."""
    train, val = chat.reversal_task(opts["num_train"], opts["num_val"], opts["seed"])
    return Raw({"train": train, "val": val}, source=f"generated (seed={opts['seed']})",
               extra={"eval": {"file": "eval.jsonl", "questions": len(val), "scored": "exact match, greedy"}})


def read_chitchat(opts, out_dir):
    conversations = chat.chitchat_conversations()
    return Raw(dict(zip(("train", "val"), chat.split_conversations(conversations))),
               source="the chitchat-dataset package (BYU PCC lab, MIT licence)")


CHAT_TOKENIZER = {"chat": "gpt2", "chitchat": "gpt2", "chat_reverse": "char"}  # tokenizer='auto', no --base


# ----------------------------------------------------------------------------- registry

SHAKESPEARE = RawFile("input.txt", "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                      "tinyshakespeare/input.txt",
                      "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")
VERDICT = RawFile("the-verdict.txt", "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                  "ch02/01_main-chapter-code/the-verdict.txt",
                  "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f")


@dataclass
class Dataset:
    """A registry entry; adding a dataset means writing one source function and one entry."""
    description: str
    source: str
    tokenizer: str  # 'char' | 'gpt2' | 'counting' | 'choose' (text: --tokenizer)
    read: Callable  # (opts, out_dir) -> Raw
    options: dict  # this dataset's --key=value options and their defaults
    option_help: dict = field(default_factory=dict)  # what an option means here, where OPTION_HELP differs


FINEWEB_EDU = HubFiles("HuggingFaceFW/fineweb-edu", [("main", "sample/10BT")])
# the dataset repo holds a loading script and tarballs; its parquet files are the Hub's conversion
OPENWEBTEXT = HubFiles("Skylion007/openwebtext", [("main", ""), ("refs/convert/parquet", "")])
# modded-nanogpt's FineWeb 10B (not -Edu) in GPT-2 tokens: 1 val + 103 train shards of ~100M tokens
FINEWEB10B_GPT2 = HubFiles("kjj0/fineweb10B-gpt2", [("main", "")], suffix=".bin")
PARQUET_OPTIONS = {"input": None, "max_tokens": 0, "shards": 0, "val_every": 2000, "num_proc": 0}
PARQUET_HELP = {"input": "a local folder (or one file) of .parquet files (the Hub's table format) with a "
                         "`text` column, used instead of downloading"}
COMMON_OPTIONS = {"data_dir": None}  # output root; None means DATA_DIR (tests use a tmp dir)
TEXT_OPTIONS = {"input": None, "tokenizer": "gpt2", "vocab_size": 0, "name": None, "num_threads": 0}
TOKENIZERS = ("char", "gpt2", "bpe")
CHAT_OPTIONS = {"tokenizer": "auto", "vocab_size": 0, "base": None, "name": None,
                "max_tokens_per_conversation": 1024}
# what each option does, for `python prepare.py NAME --help`; a Dataset's option_help overrides
OPTION_HELP = {
    "data_dir": "write into PATH/NAME/ instead of data/NAME/",
    "input": "a local copy of the text file, used instead of downloading it",
    "tokenizer": "how text becomes tokens: gpt2 (GPT-2's 50,257 word pieces), char (one token per "
                 "character) or bpe (word pieces learned from this text's training part; set --vocab_size)",
    "vocab_size": f"with --tokenizer=bpe (and only then): how many tokens it learns, {bpe.MIN_VOCAB} to "
                  f"{bpe.MAX_VOCAB:,}",
    "name": "the folder to write under data/ (default: the dataset's name, or NAME_bpeVOCAB with "
            "--tokenizer=bpe, so it never replaces the GPT-2 version)",
    "num_threads": "threads that tokenize (0: one per CPU core); any number gives the same tokens",
    # counting's defaults give ~212k training and ~10k validation tokens
    "seed": "random seed: the same seed gives the same sequences",
    "numbers": "count with the numbers 0 to N-1; each number is one token",
    "min_len": "the fewest numbers in a sequence",
    "max_len": "the most numbers in a sequence",
    "num_train": "sequences in the training split",
    "num_val": "sequences in the validation split",
    "val_starts": "how many start values only validation uses (besides 1 and 10, always held out), so it "
                  "measures counting from starts training never saw",
    "max_tokens": "stop at the end of the document that reaches this many tokens, e.g. 100_000_000 (0: the "
                  "whole corpus); only the files it needs are downloaded",
    "shards": "use only the first N files of the corpus (0: all)",
    # 2000: 0.05% of documents, the share nanoGPT holds out of OpenWebText
    "val_every": "every N-th document goes to validation, whole; the rest to training",
    "num_proc": "processes that tokenize (0: one per CPU core); any number gives the same tokens",
    "base": "a trained run (its folder or ckpt.pt) whose tokenizer the data uses, so that run can be "
            "fine-tuned on it (a character it lacks is an error); leave out --tokenizer",
    "max_tokens_per_conversation": "a conversation longer than this many tokens is cut to it (skipped "
                                   "where the cut keeps no reply); counted and reported",
}
CHAT_HELP = {"tokenizer": "char, gpt2 or bpe (set --vocab_size); auto: the --base run's, else {}",
             "name": "the folder to write under data/ (default: the dataset's name)"}
SPLIT_90_10 = "90% training, 10% validation"
DATASETS = {
    "shakespeare_char": Dataset(
        f"Tiny Shakespeare, one token per character (65), {SPLIT_90_10}",
        SHAKESPEARE.url, "char", single_file_source(SHAKESPEARE), {"input": None}),
    "shakespeare": Dataset(
        f"Tiny Shakespeare, GPT-2's tokenizer (or --tokenizer=bpe), {SPLIT_90_10}",
        SHAKESPEARE.url, "choose", single_file_source(SHAKESPEARE), dict(TEXT_OPTIONS)),
    "the_verdict": Dataset(
        f"Edith Wharton's The Verdict (20k characters), GPT-2's tokenizer (or --tokenizer=bpe), "
        f"{SPLIT_90_10}",
        VERDICT.url, "choose", single_file_source(VERDICT), dict(TEXT_OPTIONS)),
    "wikitext2": Dataset(
        "WikiText-2 (Wikipedia articles), GPT-2's tokenizer (or --tokenizer=bpe), its own train/valid/test "
        "splits, for comparing perplexity (how well a model predicts text it never saw)",
        WIKITEXT_URL, "choose", read_wikitext2, dict(TEXT_OPTIONS),
        {"input": "a local folder holding train.txt, valid.txt and test.txt, used instead of downloading"}),
    "counting": Dataset(
        "made-up counting sequences over the numbers 0..99; validation starts from numbers training never "
        "starts from",
        "generated from --seed", "counting", read_counting,
        {"seed": 1337, "numbers": 100, "min_len": 4, "max_len": 16, "num_train": 20000, "num_val": 1000,
         "val_starts": 8}),
    "fineweb_edu": Dataset(
        "FineWeb-Edu sample-10BT (~10B tokens of educational web pages, enough to reproduce GPT-2 small), "
        "GPT-2's tokenizer, an end-of-text token after each document",
        FINEWEB_EDU.page + " (sample/10BT)", "gpt2", parquet_source(FINEWEB_EDU), dict(PARQUET_OPTIONS),
        PARQUET_HELP),
    "openwebtext": Dataset(
        "OpenWebText (nanoGPT's GPT-2 corpus, ~9B tokens of web pages) from the Hub's parquet files (a table "
        "format), GPT-2's tokenizer, "
        "an end-of-text token after each document",
        OPENWEBTEXT.page, "gpt2", parquet_source(OPENWEBTEXT), dict(PARQUET_OPTIONS), PARQUET_HELP),
    "fineweb10B_gpt2": Dataset(
        "FineWeb 10B already in GPT-2 tokens (modded-nanogpt's files in llm.c's format), copied, not "
        "tokenized; validation is its first file (~100M tokens)",
        FINEWEB10B_GPT2.page, "gpt2", llmc_source(FINEWEB10B_GPT2), {"input": None, "shards": 0},
        {"input": "a local folder of fineweb_val_*.bin and fineweb_train_*.bin files, used instead of "
                  "downloading",
         "shards": "copy only the first N training files, ~100M tokens each (0: all)"}),
    "chat": Dataset(
        "conversations from local .jsonl files ({\"messages\": [...]} per line, OpenAI's format), "
        "rendered with the chat template, a loss mask on the replies; 90% of the conversations for "
        "training, 10% validation",
        "--input=PATH", "chat", read_chat_files, {"input": None, **CHAT_OPTIONS},
        {"input": "a .jsonl file of conversations, or a folder of them (needed)",
         **CHAT_HELP, "tokenizer": CHAT_HELP["tokenizer"].format("gpt2")}),
    "chat_reverse": Dataset(
        "a synthetic chat task with exact answers: reverse a word ('reverse: wodnik' -> 'kindow'); held-out "
        "words for python evaluate.py chat",
        "generated from --seed", "chat", read_chat_reverse,
        {"seed": 1337, "num_train": 20000, "num_val": 200, **CHAT_OPTIONS},
        {"num_train": "training conversations (one word each)",
         "num_val": "held-out conversations (words never trained on), also the questions of eval.jsonl",
         **CHAT_HELP,
         "tokenizer": CHAT_HELP["tokenizer"].format("char")}),
    "chitchat": Dataset(
        "4,017 two-person chats (the chitchat-dataset package: pip install chitchat-dataset), the first "
        "speaker as the user; 90% of the conversations for training, 10% validation",
        "https://github.com/BYU-PCCL/chitchat-dataset", "chat", read_chitchat, dict(CHAT_OPTIONS),
        {**CHAT_HELP, "tokenizer": CHAT_HELP["tokenizer"].format("gpt2")}),
    "text": Dataset(
        f"any local .txt file or folder of them, {SPLIT_90_10} (--input, --tokenizer, --name)",
        "--input=PATH", "choose", read_text_source, dict(TEXT_OPTIONS),
        {"input": "the text to prepare: a UTF-8 .txt file, or a folder of them (needed)",
         "name": "the folder to write under data/ (default: text)"}),
}

def resolve_options(name, overrides):
    """Defaults of dataset `name` updated with overrides; unknown keys and bad values are errors."""
    if name not in DATASETS:
        near = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise UsageError(f"unknown dataset {name!r}{hint}; available: {', '.join(DATASETS)}")
    opts = {**COMMON_OPTIONS, **DATASETS[name].options}
    for key, value in overrides.items():
        if key not in opts:
            near = difflib.get_close_matches(key, opts, n=1)
            hint = f" (did you mean --{near[0]}?)" if near else ""
            raise UsageError(f"unknown option --{key} for {name}{hint}; "
                             f"known: {', '.join('--' + k for k in opts)}")
        default = opts[key]
        # command-line values arrive as strings; knobs whose default is an int must parse as one
        if isinstance(default, int) and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                try:  # 1e8 or 100e6 for --max_tokens
                    number = float(value)
                    if not number.is_integer():
                        raise ValueError
                    value = int(number)
                except ValueError:
                    raise UsageError(f"--{key} must be an integer, got {value!r}") from None
        # counts must be positive (num_train=-1 would write an empty split); knobs whose default is 0
        # (0: all, or every core) and seeds may be 0
        lowest = 0 if default == 0 or key == "seed" else 1
        if isinstance(default, int) and not isinstance(default, bool) and value < lowest:
            raise UsageError(f"--{key} must be at least {lowest}, got {value}")
        opts[key] = value
    if "tokenizer" in opts:
        chat_data = DATASETS[name].tokenizer == "chat"
        if opts["tokenizer"] not in TOKENIZERS + (("auto",) if chat_data else ()):
            raise UsageError(f"--tokenizer must be char, gpt2{', bpe or auto' if chat_data else ' or bpe'}, "
                             f"got {opts['tokenizer']!r}")
        if chat_data and opts["base"] and (opts["tokenizer"] != "auto" or opts["vocab_size"]):
            raise UsageError(f"--base={opts['base']} brings its run's tokenizer: leave out --tokenizer "
                             "and --vocab_size")

        if opts["tokenizer"] == "bpe" and not bpe.MIN_VOCAB <= opts["vocab_size"] <= bpe.MAX_VOCAB:
            raise UsageError(f"--tokenizer=bpe needs --vocab_size between {bpe.MIN_VOCAB} (the 256 bytes and "
                             f"{bpe.EOT}) and {bpe.MAX_VOCAB:,} (uint16 ids), got {opts['vocab_size']:,}")
        if opts["tokenizer"] != "bpe" and opts["vocab_size"]:
            raise UsageError(f"--vocab_size is for --tokenizer=bpe; {opts['tokenizer']} has its own vocabulary")
    # --name is one folder under data_dir: '../x' or 'a/b' would write outside it
    if opts.get("name") is not None and (opts["name"] in ("", ".", "..") or "/" in opts["name"] or "\\" in opts["name"]):
        raise UsageError(f"--name must be a plain folder name (no '/', '\\', '.' or '..'), got {opts['name']!r}")
    return opts


# ----------------------------------------------------------------------------- pipeline

def folder_name(dataset, opts):
    """The folder under data_dir: --name, else the dataset's name (NAME_bpeVOCAB for an own BPE of
    a built-in text, so it never replaces the GPT-2 version)."""
    if opts.get("name"):
        return opts["name"]
    if opts.get("tokenizer") == "bpe" and dataset != "text":
        return f"{dataset}_bpe{opts['vocab_size']}"
    return dataset


def prepare(dataset, **overrides):
    """Prepare `dataset` into <data_dir>/<dataset or --name>/; returns the metadata written."""
    opts = resolve_options(dataset, overrides)
    folder = folder_name(dataset, opts)
    out_dir = Path(opts["data_dir"] or DATA_DIR) / folder
    # folders this run makes, deepest first: a failed or stopped run (Ctrl-C, SIGTERM) removes
    # them again while still empty; a folder that was there before is never removed
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        return _prepare(dataset, opts, folder, out_dir)
    except BaseException:
        for path in created:
            try:
                path.rmdir()  # only an empty folder; one holding a download or any other file stays
            except OSError:
                break
        raise


def _prepare(dataset, opts, folder, out_dir):
    spec = DATASETS[dataset]
    raw = spec.read(opts, out_dir)  # a bad input fails here, before any folder is made
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create {out_dir}: {e.strerror or e}") from None
    if spec.tokenizer == "chat":
        kind = CHAT_TOKENIZER[dataset] if opts["tokenizer"] == "auto" else opts["tokenizer"]
        options = {k: v for k, v in opts.items() if k not in NOT_CONTENT_OPTIONS}
        return write_chat_dataset(dataset, raw, opts, kind, folder, out_dir, options)

    # one mechanism for all: the source gives documents per split, the tokenizer turns them
    # into ids, the writer streams them to disk; only the source differs between datasets
    kind = opts["tokenizer"] if spec.tokenizer == "choose" else spec.tokenizer
    meta = {"dataset": dataset, "tokenizer": kind}
    if kind == "char":
        # every split is in memory for char datasets; the vocabulary covers all of them
        chars = sorted(set().union(*(set(d) for docs in raw.splits.values() for d in docs)))
        if len(chars) > MAX_VOCAB:
            raise PrepareError(f"{len(chars):,} distinct characters do not fit uint16 token ids "
                               f"(at most {MAX_VOCAB:,}); use --tokenizer=gpt2")
        tokenizer = char_tokenizer(chars)
        meta["chars"] = chars
    elif kind == "gpt2":
        tokenizer = gpt2_tokenizer(opts.get("num_threads") or None)
    elif kind == "bpe":  # learned from the train split only: val stays unseen

        try:
            ranks = bpe.train_bpe(raw.splits["train"], opts["vocab_size"], label=f"{folder}: training a "
                                  f"{opts['vocab_size']:,}-token BPE on the train split")
        except (ImportError, ValueError) as e:
            raise PrepareError(str(e)) from None
        bpe_file = out_dir / ".tokenizer.tiktoken.tmp"
        bpe.save_ranks(bpe_file, ranks)
        tokenizer = tiktoken_tokenizer("bpe", bpe.load_encoding(bpe_file, opts["vocab_size"]),
                                       opts.get("num_threads") or None)
        meta["bpe"] = {"file": "tokenizer.tiktoken", "sha256": sha256_of(bpe_file), "pattern": "GPT-4 (bpe.py)",
                       "trainer": "rustbpe", "eot": tokenizer.vocab_size - 1}
    else:
        tokenizer = counting_tokenizer(opts["numbers"] + 1)
    meta["vocab_size"] = tokenizer.vocab_size
    if tokenizer.vocab_size > MAX_VOCAB:
        raise PrepareError(f"vocab_size {tokenizer.vocab_size:,} does not fit uint16 (at most {MAX_VOCAB:,})")

    stats, written = {}, {}  # written: split -> (temp path, token count)
    eot = (tokenizer.vocab_size - 1 if kind == "bpe" else GPT2_EOT) if raw.eot else None
    try:
        if raw.corpus is not None:
            written = corpora.write_corpus(out_dir, raw.corpus, opts["num_proc"] or os.cpu_count() or 1,
                                   opts["max_tokens"], opts["val_every"], label=folder, stats=stats)
        for split, docs in raw.splits.items():
            arrays = docs if raw.tokenized else corpora.encode_documents(
                docs, tokenizer, eot, between=raw.eot_between, label=f"{folder}/{split}", stats=stats)
            written[split] = write_tokens(out_dir / f"{split}.bin", arrays, tokenizer.vocab_size)
    except BaseException:
        for tmp, _ in written.values():
            tmp.unlink(missing_ok=True)
        if kind == "bpe":
            bpe_file.unlink(missing_ok=True)
        raise
    # every split is complete on disk: drop the old metadata (a folder without meta.json reads
    # as unfinished), swap the splits in, and write the new metadata last
    (out_dir / "meta.json").unlink(missing_ok=True)
    for split, (tmp, _) in written.items():
        os.replace(tmp, out_dir / f"{split}.bin")
    if kind == "bpe":
        os.replace(bpe_file, out_dir / "tokenizer.tiktoken")
    meta.update(dtype=np.dtype(TOKEN_DTYPE).name, splits={s: int(n) for s, (_, n) in written.items()},
                source=raw.source, source_sha256=raw.sha256, **raw.extra)
    # the knobs that shape the tokens, so `prepare.py NAME` can tell whether it is already done
    meta["options"] = {k: v for k, v in opts.items() if k not in NOT_CONTENT_OPTIONS}
    write_json(out_dir / "meta.json", meta)

    for split, count in meta["splits"].items():
        print(f"{folder}/{split}.bin: {count:,} tokens")
    if meta["splits"].get("train", SMALL_DATA) < SMALL_DATA:
        print(f"notice: {meta['splits']['train']:,} training tokens is little text: the quick start's model would "
              f"memorize it within a few hundred steps; README, 'Train on your own text', has settings for it")
    if stats.get("wall"):  # a parquet corpus: tokenizer processes, the whole pipeline timed
        print(f"{stats['documents']:,} documents, {stats['tokens']:,} tokens in {stats['wall']:.1f} s = "
              f"{stats['tokens'] / stats['wall']:,.0f} tokens/s end to end (read, tokenize, write) with "
              f"{opts['num_proc'] or os.cpu_count()} tokenizer processes; "
              f"{stats['tokens'] / max(stats['seconds'], 1e-9):,.0f} tokens/s per process while encoding")
    elif kind == "gpt2" and stats.get("seconds", 0) > 0:
        # encode time only (not reading or writing), the number to compare across machines
        rate = stats["tokens"] / stats["seconds"]
        threads = opts.get("num_threads") or os.cpu_count()
        print(f"GPT-2 tokenization: {stats['tokens']:,} tokens in {stats['seconds']:.2f} s = "
              f"{rate:,.0f} tokens/s (tiktoken encode_ordinary_batch, {threads} threads)")
    return meta


# where the data is read from or written to and how many cores work on it, not what it holds
NOT_CONTENT_OPTIONS = ("data_dir", "input", "num_threads", "num_proc")


def already_prepared(name, overrides):
    """Why data/NAME is already prepared as asked (a sentence), or None when it must be made.

    Prepared means: meta.json names this dataset, every split it lists is on disk with its token
    count, the dataset's own knobs (counting's seed, numbers, ...; text's tokenizer) are the same,
    and an --input file, if given, has the sha256 recorded. Where the text came from otherwise
    does not matter: a folder prepared from --input counts as prepared without it.
    """
    opts = resolve_options(name, overrides)
    folder = Path(opts["data_dir"] or DATA_DIR) / folder_name(name, opts)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("dataset") != name or not isinstance(meta.get("splits"), dict) or not meta["splits"]:
        return None
    for split, count in meta["splits"].items():
        path = folder / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != count * np.dtype(TOKEN_DTYPE).itemsize:
            return None
        mask = Path(mask_path(path))
        if "mask" in meta and (not mask.is_file() or mask.stat().st_size != count):  # a uint8 per token
            return None
    if "eval" in meta and not (folder / meta["eval"].get("file", "eval.jsonl")).is_file():
        return None
    if name == "text" and meta.get("tokenizer") != opts["tokenizer"]:
        return None
    if name == "counting" and meta.get("counting") != {k: opts[k] for k in COUNTING_KNOBS}:
        return None
    wanted = {k: v for k, v in opts.items() if k not in NOT_CONTENT_OPTIONS}
    if "options" in meta:
        if meta["options"] != json.loads(json.dumps(wanted)):  # as meta.json stores them
            return None
    elif any(k not in NOT_CONTENT_OPTIONS for k in overrides):
        return None  # prepared before knobs were recorded: asked for something, so make it again
    if opts.get("input") and not Path(opts["input"]).exists():
        return None  # a mistyped --input: preparing again reports it (and changes nothing)
    if name in ("text", "chat") and isinstance(meta.get("inputs"), dict):
        # the dataset records what it was made from: a different input must not replace it silently
        differs = input_differences(meta["inputs"], input_manifest(opts["input"], "**/*.txt" if name == "text"
                                                                   else "*.jsonl"))
        if differs:
            raise PrepareError(f"{folder} was prepared from {meta.get('source', '?')}, and --input={opts['input']} "
                               f"differs ({differs}): prepare it again with --force, or choose another --name")
    elif opts.get("input") and Path(opts["input"]).is_file():
        if sha256_of(opts["input"]) not in (meta.get("source_sha256") or {}).values():
            return None
    counts = ", ".join(f"{split} {count:,}" for split, count in meta["splits"].items())
    return f"{folder} is already prepared ({counts} tokens, from {meta.get('source', '?')})"

# ----------------------------------------------------------------------------- command line

def list_datasets(data_dir=None):
    """The --list table: name, prepared or not (meta.json present), description, source."""
    root = Path(data_dir or DATA_DIR)
    lines = []
    for name, spec in DATASETS.items():
        if name == "text":
            state = "use --name"
        else:
            state = "prepared" if (root / name / "meta.json").exists() else "not prepared"
        lines.append(f"{name:<17} {state:<13} {spec.description}\n{'':<31} source: {spec.source}")
    # folders made by `text --name=...` or copied from nanoGPT
    extra = sorted(p.name for p in root.glob("*/") if p.name not in DATASETS
                   and ((p / "meta.json").exists() or (p / "meta.pkl").exists()))
    if extra:
        lines.append(f"also prepared under {root}: {', '.join(extra)}")
    return "\n".join(lines)


def parse_args(argv):
    """['NAME', '--k=v', ...] -> (name, {k: v}); --list/--help come back as overrides['__action']."""
    name, overrides = None, {}
    for arg in argv:
        if arg in ("--list", "--help", "-h"):
            overrides.setdefault("__action", arg)
        elif arg == "--force":
            overrides["__force"] = True
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise UsageError(f"option {arg} needs a value: --{key}=VALUE")
            overrides[key] = value
        elif name is None:
            name = arg
        else:
            raise UsageError(f"one dataset at a time; got {name!r} and {arg!r}")
    return name, overrides


def option_flag(key, default):
    """--key=default as the help shows it; an option without a default shows what it takes."""
    return f"--{key}={default if default is not None else 'NAME' if key == 'name' else 'PATH'}"


def general_help():
    """`python prepare.py --help`: the usage, the examples and every dataset's options."""
    rows = "\n".join(textwrap.fill(" ".join(option_flag(k, v) for k, v in spec.options.items()), 100,
                                   initial_indent=f"  {name:<17} ", subsequent_indent=" " * 20)
                     for name, spec in DATASETS.items())
    return (f"usage: python prepare.py NAME [--key=value ...] [--force] | --list\n{__doc__.strip()}\n\n"
            f"the datasets and their options (--key=default):\n{rows}")


def dataset_help(name):
    """`python prepare.py NAME --help`: what the dataset is, where it comes from, and each option: what
    it does and its default."""
    spec = DATASETS[name]
    rows = [(option_flag(key, default), spec.option_help.get(key) or OPTION_HELP[key])
            for key, default in resolve_options(name, {}).items()]
    rows.append(("--force", "prepare it again even when it is already prepared with these options"))
    width = max(len(flag) for flag, _ in rows) + 2
    lines = [f"usage: python prepare.py {name} [--key=value ...] [--force]",
             textwrap.fill(spec.description, 100), f"source: {spec.source}", "", "options (--key=default):"]
    lines += [textwrap.fill(text, 100, initial_indent=f"  {flag:<{width}}",
                            subsequent_indent=" " * (width + 2)) for flag, text in rows]
    return "\n".join(lines)


def main(argv=None):
    """Command line entry; returns the exit code (0 ok, 1 data problem, 2 usage, 130 Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        name, overrides = parse_args(argv)
        action = overrides.pop("__action", None)
        if action == "--list":
            if name:
                raise UsageError(f"--list takes no dataset name (got {name!r}); python prepare.py {name} --help "
                                 "shows that dataset's options")
            print(list_datasets(overrides.get("data_dir")))
            return 0
        force = overrides.pop("__force", False)
        if action:
            print(dataset_help(name) if name else general_help())
            return 0
        if name is None:
            raise UsageError("name a dataset; python prepare.py --list shows them, --help the usage")
        done = None if force else already_prepared(name, overrides)
        if done:
            print(f"{done}; nothing to do (--force prepares it again)")
            return 0
        prepare(name, **overrides)
        return 0
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        raise  # stdout's reader went away (`| head`): not a data problem; ended quietly below
    except OSError as e:  # disk full, read-only data_dir: the temporary files are already removed
        where = e.filename or "the data folder"
        print(f"error: cannot write {where}: {e.strerror or e} (nothing half-written was kept)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; no partial .bin was kept", file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a job scheduler) cleans up like Ctrl-C: no temp files left


def _main_quiet_on_closed_pipe():
    """main(), ending quietly when stdout's reader goes away (`python prepare.py --help | head`)."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # point stdout at devnull so the interpreter's exit flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    return code


if __name__ == "__main__":
    sys.exit(_main_quiet_on_closed_pipe())
