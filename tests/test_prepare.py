"""Tests for prepare.py: exact token counts, round trips, atomic writes, errors, safe metadata.

CPU only and offline: raw text comes from local copies (tests/local_data.py; tests skip, saying
how to get them, when they are absent) and everything is prepared under pytest's tmp_path.
"""
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import requests

import prepare
from lib import corpora, download, tokenizers
from lib import tokenfiles
from local_data import NO_SHAKESPEARE, NO_WIKITEXT, ROOT, SHAKESPEARE, WIKITEXT

needs_shakespeare = pytest.mark.skipif(SHAKESPEARE is None, reason=NO_SHAKESPEARE)
needs_wikitext = pytest.mark.skipif(WIKITEXT is None, reason=NO_WIKITEXT)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def read_bin(path):
    return np.memmap(path, dtype=np.uint16, mode="r")


def gpt2():
    try:
        return tokenizers.gpt2_tokenizer()
    except tokenfiles.PrepareError as e:
        pytest.skip(str(e))


# ----------------------------------------------------------------------------- exact counts

@needs_shakespeare
def test_shakespeare_char_counts_bins_and_metadata(tmp_path):
    meta = prepare.prepare("shakespeare_char", input=SHAKESPEARE, data_dir=tmp_path)
    out = tmp_path / "shakespeare_char"
    # nanoGPT's data/shakespeare_char/prepare.py gives exactly these
    assert meta["splits"] == {"train": 1_003_854, "val": 111_540}
    assert meta["vocab_size"] == 65 and len(meta["chars"]) == 65
    train, val = read_bin(out / "train.bin"), read_bin(out / "val.bin")
    assert train.dtype == np.uint16 and len(train) == 1_003_854 and len(val) == 111_540
    assert (out / "train.bin").stat().st_size == 2 * 1_003_854
    # metadata round trip: what is on disk is what prepare returned, and it decodes the text back
    assert tokenfiles.read_meta(out) == meta
    assert meta["source_sha256"] == {"input.txt": hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest()}
    tok = tokenizers.load_tokenizer(out)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"
    assert not list(out.glob(".*tmp"))


@needs_shakespeare
def test_shakespeare_gpt2_counts_and_batched_encoding_is_exact(tmp_path, capsys):
    meta = prepare.prepare("shakespeare", input=SHAKESPEARE, data_dir=tmp_path)
    assert meta["splits"] == {"train": 301_966, "val": 36_059}
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert "tokens/s" in capsys.readouterr().out
    # cutting into pieces for the threaded batch encoder must not change a single id
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    assert read_bin(tmp_path / "shakespeare" / "val.bin").tolist() == enc.encode_ordinary(text[cut:])
    assert read_bin(tmp_path / "shakespeare" / "train.bin").tolist() == enc.encode_ordinary(text[:cut])


def test_safe_pieces_match_whole_encoding_on_awkward_text():
    """Runs of newlines and spaces, contractions, digits, accents: the cases where a careless
    cut changes GPT-2's pre-tokenization. Tiny pieces make cuts land everywhere they may."""
    tok = gpt2()
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    text = ("word's  it'll  \n\n\n  42 3.14 'quote' é ünïcode   tabs\t\tend\n" * 300) + "tail"
    pieces = list(corpora.safe_pieces(text, size=97))
    assert "".join(pieces) == text and len(pieces) > 10
    ids = [i for p in tok.encode_batch(pieces) for i in p]
    assert ids == enc.encode_ordinary(text)


@needs_wikitext
def test_wikitext2_prepares_available_splits_and_names_the_missing_one(tmp_path):
    """Offline only valid and test exist: exit 0, a warning naming train.txt, the rest prepared."""
    r = run_cli("wikitext2", f"--input={WIKITEXT}", f"--data_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "train split missing" in r.stderr and "train.txt" in r.stderr
    meta = tokenfiles.read_meta(tmp_path / "wikitext2")
    assert meta["splits"] == {"val": 258_659, "test": 295_877}
    assert meta["missing_splits"] == ["train"]
    assert (tmp_path / "wikitext2" / "test.bin").exists() and not (tmp_path / "wikitext2" / "train.bin").exists()


# ----------------------------------------------------------------------------- tokenizers

def test_tokenizer_round_trips():
    text = "Hello, world!\n\nTo be, or not to be: <|endoftext|> ünïcode 42"
    tok = gpt2()
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|endoftext|>") == [tokenfiles.GPT2_EOT]  # prompts may ask for it
    char = tokenizers.char_tokenizer(sorted(set(text)))
    assert char.decode(char.encode(text)) == text
    with pytest.raises(tokenfiles.PrepareError, match="not in this dataset's vocabulary"):
        char.encode("Z")
    count = tokenizers.get_tokenizer({"tokenizer": "counting", "vocab_size": 101})
    assert count.encode("10 11 12") == [10, 11, 12]
    assert count.decode([10, 11, 12]) == "10 11 12"
    assert count.decode(count.encode("1 2 3\n40 41\n")) == "1 2 3\n40 41\n"
    with pytest.raises(tokenfiles.PrepareError, match="not a number"):
        count.encode("100")


def test_offline_gpt2_error_says_how_to_fill_the_tiktoken_cache(tmp_path, monkeypatch):
    """Offline without GPT-2's files: one line naming the command that fills a tiktoken cache and
    where to copy it. That command reads the files from a copied cache with no network, and with an
    empty folder it is the one that downloads them."""
    import tiktoken.registry
    gpt2()  # skips where this machine has no GPT-2 files to copy
    filled = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or Path(tempfile.gettempdir()) / "data-gym-cache")
    if not filled.is_dir():
        pytest.skip(f"GPT-2's files are not in a tiktoken cache folder here ({filled})")

    def no_network(*args, **kwargs):
        raise requests.ConnectionError("Name or service not known")

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget the encoding loaded so far
    monkeypatch.setattr(requests, "get", no_network)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(tokenfiles.PrepareError) as error:
        tokenizers.gpt2_tokenizer()
    line = str(error.value)
    assert "\n" not in line and f"TIKTOKEN_CACHE_DIR={tmp_path / 'empty'} does not hold them" in line
    assert line.endswith(f"copy the files of that tiktoken_cache folder into {tmp_path / 'empty'}")
    command = re.search(r"run (TIKTOKEN_CACHE_DIR=tiktoken_cache python -c \"[^\"]+\") on a machine with network",
                        line).group(1)
    # no TIKTOKEN_CACHE_DIR: tiktoken's default folder (DATA_GYM_CACHE_DIR here) is empty too
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(tokenfiles.PrepareError, match="set TIKTOKEN_CACHE_DIR=/path/to/tiktoken_cache$"):
        tokenizers.gpt2_tokenizer()

    # the command as a user runs it, in a shell, every request refused (a dead proxy)
    dead = {name: "http://127.0.0.1:9" for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}
    env = dict(os.environ, **dead, NO_PROXY="", no_proxy="",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    shutil.copytree(filled, tmp_path / "tiktoken_cache")
    copied = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert copied.returncode == 0, copied.stderr
    shutil.rmtree(tmp_path / "tiktoken_cache")
    empty = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert empty.returncode != 0 and "127.0.0.1" in empty.stderr, empty.stderr


def test_counting_is_deterministic_and_val_starts_are_unseen(tmp_path):
    """Same seed, same bytes; val starts never start a train sequence (the whole point of val)."""
    small = dict(num_train=2000, num_val=200)
    a = prepare.prepare("counting", data_dir=tmp_path / "a", seed=7, **small)
    b = prepare.prepare("counting", data_dir=tmp_path / "b", seed=7, **small)
    c = prepare.prepare("counting", data_dir=tmp_path / "c", seed=8, **small)
    bins = [(tmp_path / d / "counting" / "train.bin").read_bytes() for d in "abc"]
    assert bins[0] == bins[1] and bins[0] != bins[2] and a == b and a != c
    assert a["vocab_size"] == 101 and a["separator"] == 100

    def starts_and_check(path):
        ids = read_bin(path).tolist()
        starts, seq = [], []
        for i in ids + [100]:
            if i == 100:
                if seq:
                    assert seq == list(range(seq[0], seq[0] + len(seq)))  # really counts up by one
                    assert 4 <= len(seq) <= 16
                    starts.append(seq[0])
                seq = []
            else:
                seq.append(i)
        assert ids[-1] == 100  # every sequence ends with the separator
        return set(starts)

    out = tmp_path / "a" / "counting"
    train, val = starts_and_check(out / "train.bin"), starts_and_check(out / "val.bin")
    assert {1, 10} <= val and not (train & val)
    assert set(a["val_starts"]) >= val
    tok = tokenizers.load_tokenizer(out)
    assert tok.encode("10 11 12") == [10, 11, 12] and tok.decode([1, 2, 3]) == "1 2 3"


# ----------------------------------------------------------------------------- metadata safety

def test_nanogpt_meta_pkl_is_read(tmp_path):
    chars = sorted(set("hello world\n"))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    assert tokenfiles.read_meta(tmp_path) == meta
    tok = tokenizers.load_tokenizer(tmp_path)
    assert tok.name == "char" and tok.decode(tok.encode("hello world")) == "hello world"
    assert tokenfiles.read_meta(tmp_path / "nothing_here") == {}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_meta_pkl_is_refused_without_running_it(tmp_path):
    """A plain pickle.load would run `touch marker` while loading; ours must refuse first."""
    marker = tmp_path / "pwned"
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "x": _Evil(marker)}))
    with pytest.raises(tokenfiles.PrepareError, match="refused"):
        tokenfiles.read_meta(tmp_path)
    with pytest.raises(tokenfiles.PrepareError):
        tokenizers.load_tokenizer(tmp_path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- downloads

class FakeResponse:
    def __init__(self, body):
        self.body, self.headers = body, {"content-length": str(len(body))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size):
        for i in range(0, len(self.body), chunk_size):
            yield self.body[i:i + chunk_size]


def test_download_retries_checks_sha256_and_reuses(tmp_path, monkeypatch):
    """Network error, then wrong bytes, then the right bytes: three tries, one verified file."""
    good = b"the real file\n" * 1000
    sha = hashlib.sha256(good).hexdigest()
    answers = [requests.ConnectionError("down"), b"corrupted", good]
    calls = []

    def fake_get(url, stream, timeout):
        calls.append(url)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return FakeResponse(answer)

    monkeypatch.setattr(download.requests, "get", fake_get)
    dest = tmp_path / "x" / "file.txt"
    assert download.download("https://example.org/file.txt", dest, sha, backoff=0) == sha
    assert dest.read_bytes() == good and len(calls) == 3
    assert not (dest.parent / "file.txt.part").exists()
    # a file already there with the right sha256 is reused: no request at all
    assert download.download("https://example.org/file.txt", dest, sha, backoff=0) == sha
    assert len(calls) == 3
    # a body that never matches is an error, and nothing is kept
    monkeypatch.setattr(download.requests, "get", lambda url, stream, timeout: FakeResponse(b"bad"))
    with pytest.raises(tokenfiles.PrepareError, match="sha256 mismatch"):
        download.download("https://example.org/other.txt", tmp_path / "other.txt", sha, backoff=0)
    assert not list(tmp_path.glob("other.txt*"))


def test_offline_failure_names_address_and_path(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise requests.ConnectionError("Name or service not known")

    monkeypatch.setattr(download.requests, "get", no_network)
    monkeypatch.setattr(download.time, "sleep", lambda s: None)  # skip the retry backoff
    code = prepare.main(["the_verdict", f"--data_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1
    line = [ln for ln in err.splitlines() if ln.startswith("error:")][0]
    assert prepare.VERDICT.url in line
    assert str(tmp_path / "the_verdict" / "the-verdict.txt") in line and "--input=" in line
    assert "Traceback" not in err


def test_offline_is_found_in_one_try_and_said_in_one_whole_line(tmp_path, monkeypatch, capsys):
    """WikiText-2 offline: one request, not three files times three retries (18 s); one error
    line with the whole address (it was cut mid-word: '/karpathy/char-rnn/maste')."""
    calls = []

    def no_network(url, **kwargs):
        calls.append(url)
        raise requests.ConnectionError(f"HTTPSConnectionPool(host='raw.githubusercontent.com', port=443): Max retries "
                                       f"exceeded with url: {url} (Caused by NameResolutionError(\"Failed to resolve\"))")

    monkeypatch.setattr(download.requests, "get", no_network)
    assert prepare.main(["wikitext2", f"--data_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert len(calls) == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: could not download " + calls[0] + " (cannot connect to raw.githubusercontent.com")
    assert "Max retries" not in err and "--input=" in err


# ----------------------------------------------------------------------------- atomic writes

@needs_shakespeare
def test_interrupted_prepare_leaves_no_bin(tmp_path, monkeypatch):
    """Ctrl-C after the first chunk: nothing is left, and an older complete prepare survives."""
    real = corpora.encode_documents

    def dies_midway(*args, **kwargs):
        gen = real(*args, **kwargs)
        yield next(gen)
        raise KeyboardInterrupt

    monkeypatch.setattr(corpora, "encode_documents", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare("shakespeare_char", input=SHAKESPEARE, data_dir=tmp_path)
    out = tmp_path / "shakespeare_char"
    assert not out.exists() and tmp_path.is_dir()  # no .bin, no temp file, no meta.json, and the
    # folder this run made is gone again; tmp_path, there before, stays
    # a complete earlier preparation survives a later interrupted one untouched
    monkeypatch.setattr(corpora, "encode_documents", real)
    prepare.prepare("shakespeare_char", input=SHAKESPEARE, data_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def val_dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # train finished, val breaks
            raise KeyboardInterrupt
        yield from real(*args, **kwargs)

    monkeypatch.setattr(corpora, "encode_documents", val_dies)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare("shakespeare_char", input=SHAKESPEARE, data_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_token_id_out_of_range_is_an_error(tmp_path):
    with pytest.raises(tokenfiles.PrepareError, match="token id 70000 out of range"):
        tokenfiles.write_tokens(tmp_path / "train.bin", [np.array([1, 2]), np.array([70000])], 50257)
    with pytest.raises(tokenfiles.PrepareError, match="token id 65 out of range"):
        tokenfiles.write_tokens(tmp_path / "train.bin", [[3, 65]], 65)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- user errors

def test_bad_inputs_give_one_line_errors(tmp_path):
    """Through the real command line: exit code, one `error:` line naming the fix, no traceback."""
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    cases = [
        (["shakespere"], 2, "did you mean shakespeare"),
        (["counting", "--sed=3"], 2, "did you mean --seed"),
        (["counting", "--seed=abc"], 2, "must be an integer"),
        (["text", f"--input={empty}"], 1, "is empty"),
        (["text", f"--input={latin1}"], 1, "is not UTF-8"),
        (["text", f"--input={tmp_path / 'missing.txt'}"], 1, "does not exist"),
        (["text", f"--input={latin1}", "--tokenizer=wordpiece"], 2, "--tokenizer must be char, gpt2 or bpe"),
        (["text", f"--input={latin1}", "--tokenizer=bpe"], 2, "--tokenizer=bpe needs --vocab_size"),
    ]
    for args, code, message in cases:
        r = run_cli(*args, f"--data_dir={tmp_path / 'out'}")
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.startswith("error: ") and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "out").rglob("*.bin"))


# words a newcomer may not know: the help may use them only beside their plain meaning
HELP_JARGON = {"BPE": "byte-pair encoding", "parquet": "table format", "perplexity": "predicts"}
# notes for developers and code words, which belong in comments, not in --help
NOT_IN_HELP = ("registry", "mechanism", "lib/", "In code", "bpe.py", "knob", "eot", "uint16", "None")


def test_help_says_what_every_option_does_in_plain_words(capsys):
    assert prepare.main(["--help"]) == 0
    texts = {"--help": capsys.readouterr().out}
    for name in prepare.DATASETS:
        assert prepare.main([name, "--help"]) == 0
        texts[name] = capsys.readouterr().out
    for name, spec in prepare.DATASETS.items():
        # one row per option, in order, each with a description: `  --key=default  what it does`
        rows = [line.split(None, 1) for line in texts[name].splitlines() if line.startswith("  --")]
        assert [row[0].split("=")[0] for row in rows] == ["--data_dir", *(f"--{k}" for k in spec.options), "--force"]
        assert all(len(row) == 2 and len(row[1].split()) >= 3 for row in rows), (name, rows)
        assert spec.description.split()[0] in texts[name]
    for where, text in texts.items():
        assert not [note for note in NOT_IN_HELP if note in text], where
        assert not [word for word, plain in HELP_JARGON.items() if word in text and plain not in text], where
    # the usage examples stay, one command a line
    examples = [line for line in texts["--help"].splitlines() if line.startswith("    python prepare.py ")]
    assert len(examples) >= 14 and "    python prepare.py fineweb_edu --max_tokens=100_000_000" in texts["--help"]


def test_help_and_list_into_a_closed_pipe_end_quietly(tmp_path):
    """`python prepare.py --list | head -1`: no 'error: cannot write the data folder: Broken pipe'."""
    for args in (["--list"], ["--help"], ["counting", "--help"]):
        read, write = os.pipe()
        os.close(read)  # nobody reads: the first write to stdout fails
        try:
            r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), *args, f"--data_dir={tmp_path}"],
                               stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write)
        assert r.returncode == 0 and r.stderr == "", (args, r.stderr)


def test_char_vocabulary_over_uint16_is_an_error(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("".join(chr(0x10000 + i) for i in range(tokenfiles.MAX_VOCAB + 1)), encoding="utf-8")
    with pytest.raises(tokenfiles.PrepareError, match="do not fit uint16"):
        prepare.prepare("text", input=big, tokenizer="char", data_dir=tmp_path)


def test_text_folder_and_list(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("first file, first line\n" * 20)
    (folder / "b.txt").write_text("second file without newline")
    meta = prepare.prepare("text", input=folder, tokenizer="char", name="mydata", data_dir=tmp_path / "d")
    tok = tokenizers.load_tokenizer(tmp_path / "d" / "mydata")
    ids = np.concatenate([read_bin(tmp_path / "d" / "mydata" / f"{s}.bin") for s in ("train", "val")])
    assert tok.decode(ids.tolist()) == "first file, first line\n" * 20 + "second file without newline"
    assert sum(meta["splits"].values()) == len(ids)
    r = run_cli("--list", f"--data_dir={tmp_path / 'd'}")
    assert r.returncode == 0
    for name in prepare.DATASETS:
        assert name in r.stdout
    assert "not prepared" in r.stdout and "mydata" in r.stdout


def test_text_prepared_from_another_input_is_refused_not_replaced(tmp_path):
    """data/NAME records what it was made from (files, sizes, sha256): another --input, or a file
    added to the same folder, stops with one line naming the difference; --force prepares again."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("first notes\n" * 50)
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n" * 50)
    data = tmp_path / "d"
    first = run_cli("text", f"--input={folder}", "--name=mine", f"--data_dir={data}")
    assert first.returncode == 0 and "is little text" in first.stdout and "Train on your own text" in first.stdout
    before = {p.name: p.read_bytes() for p in (data / "mine").iterdir()}
    again = run_cli("text", f"--input={folder}", "--name=mine", f"--data_dir={data}")
    assert again.returncode == 0 and "already prepared" in again.stdout
    for args, fragment in [([f"--input={other}"], "added other.txt; removed a.txt"), ([f"--input={folder}"], "added b.txt")]:
        (folder / "b.txt").write_text("a new file\n")  # for the second case: the same folder, one file more
        r = run_cli("text", *args, "--name=mine", f"--data_dir={data}")
        assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert fragment in r.stderr and "--force" in r.stderr and "mine" in r.stderr
        assert {p.name: p.read_bytes() for p in (data / "mine").iterdir()} == before  # nothing written
    forced = run_cli("text", f"--input={folder}", "--name=mine", f"--data_dir={data}", "--force")
    assert forced.returncode == 0
    assert set(json.loads((data / "mine" / "meta.json").read_text())["inputs"]) == {"a.txt", "b.txt"}


# ----------------------------------------------------------------------------- openwebtext path

def test_openwebtext_streaming_writer_on_small_documents(tmp_path):
    """The openwebtext path (batched threaded encoding, eot per document, chunked appends)
    on a few in-memory documents instead of 8M downloaded ones."""
    tok = gpt2()
    long_doc = "A long document, cut into pieces for the batch encoder. " * 3000  # > one 64k piece
    docs = ["Hello world.", "", "Second\n\ndocument with <|endoftext|> as plain text.", long_doc, "end"]
    # a generator (no len) in batches far smaller than the documents: many chunks are appended
    arrays = corpora.encode_documents((d for d in docs), tok, eot=tokenfiles.GPT2_EOT, batch_chars=1000)
    tmp, count = tokenfiles.write_tokens(tmp_path / "train.bin", arrays, tok.vocab_size)
    os.replace(tmp, tmp_path / "train.bin")
    ids = read_bin(tmp_path / "train.bin").tolist()
    expected = [len(tok.encode_batch([d])[0]) + 1 for d in docs]
    assert count == len(ids) == sum(expected)
    eot_at = [i for i, t in enumerate(ids) if t == tokenfiles.GPT2_EOT]
    assert eot_at == list(np.cumsum(expected) - 1)  # exactly one eot after each document
    pieces, start = [], 0
    for end in eot_at:
        pieces.append(tok.decode(ids[start:end]))
        start = end + 1
    assert pieces == docs


# ----------------------------------------------------------------------------- parquet corpora

def parquet_corpus(folder, shards):
    """Write shards (lists of documents) as NNN_00000.parquet files with a `text` column."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    folder.mkdir(parents=True, exist_ok=True)
    for i, docs in enumerate(shards):
        # small row groups: several tasks per file for the tokenizer processes
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}),
                       folder / f"{i:03d}_00000.parquet", row_group_size=7)
    return sorted(folder.glob("*.parquet"))


def corpus_docs(n_shards=2, per_shard=40):
    long_doc = "A long page, longer than one piece for the threaded encoder. " * 2000
    docs = [f"Document {k}: it's <|endoftext|> plain text here, caf\u00e9 {k * 37}.\n\nMore\tlines." for k in
            range(n_shards * per_shard)]
    docs[5], docs[6] = long_doc, ""
    return [docs[i * per_shard:(i + 1) * per_shard] for i in range(n_shards)]


def split_by_eot(ids):
    out, start = [], 0
    for i, t in enumerate(ids):
        if t == tokenfiles.GPT2_EOT:
            out.append(ids[start:i])
            start = i + 1
    assert start == len(ids)  # the last document ends with eot too
    return out


def test_parquet_corpus_from_input_folder_is_exact(tmp_path, monkeypatch):
    """Every document is encode_ordinary(doc) + [eot], in corpus order; val holds exactly the
    documents k % val_every == 0, whole; --shards and --max_tokens take prefixes."""
    gpt2()
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    shards = corpus_docs()
    parquet_corpus(tmp_path / "src", shards)
    docs = [d for shard in shards for d in shard]
    # two tokenizer processes, row groups of 7 documents: results must be put back in order
    meta = prepare.prepare("fineweb_edu", input=tmp_path / "src", data_dir=tmp_path / "d", val_every=10, num_proc=2)
    out = tmp_path / "d" / "fineweb_edu"
    train, val = (read_bin(out / f"{s}.bin").tolist() for s in ("train", "val"))
    assert split_by_eot(val) == [enc.encode_ordinary(d) for k, d in enumerate(docs) if k % 10 == 0]
    assert split_by_eot(train) == [enc.encode_ordinary(d) for k, d in enumerate(docs) if k % 10 != 0]
    assert meta["splits"] == {"train": len(train), "val": len(val)}
    assert meta["shards"] == ["000_00000.parquet", "001_00000.parquet"] and "k % 10 == 0" in meta["val_rule"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]

    monkeypatch.setattr(corpora, "PARQUET_BATCH_ROWS", 3)  # in-process below: row groups read in pieces
    # --shards=1: the first file only; --max_tokens: stops at the first document boundary past N
    one = prepare.prepare("fineweb_edu", input=tmp_path / "src", data_dir=tmp_path / "s1", val_every=10, shards=1,
                          num_proc=1)
    assert one["shards"] == ["000_00000.parquet"]
    first = [len(enc.encode_ordinary(d)) + 1 for d in shards[0]]
    assert sum(one["splits"].values()) == sum(first)
    lengths = [len(enc.encode_ordinary(d)) + 1 for d in docs]
    limit = sum(lengths[:50]) - 3  # inside document 49
    cut = prepare.prepare("fineweb_edu", input=tmp_path / "src", data_dir=tmp_path / "m", val_every=10,
                          max_tokens=str(limit), num_proc=1)
    assert sum(cut["splits"].values()) == sum(lengths[:50])
    ids = read_bin(tmp_path / "m" / "fineweb_edu" / "train.bin").tolist()
    assert split_by_eot(ids) == [enc.encode_ordinary(d) for k, d in enumerate(docs[:50]) if k % 10 != 0]


def test_parquet_interrupted_tokenization_leaves_nothing_usable(tmp_path, monkeypatch):
    gpt2()
    parquet_corpus(tmp_path / "src", corpus_docs())
    real = corpora.parquet_tasks

    def dies_after_first_row_group(path):
        yield real(path)[0]
        raise KeyboardInterrupt

    monkeypatch.setattr(corpora, "parquet_tasks", dies_after_first_row_group)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare("openwebtext", input=tmp_path / "src", data_dir=tmp_path / "d", num_proc=1)
    assert not (tmp_path / "d").exists()  # no .bin, no temp file, no meta.json: the folders it made are gone


def test_parquet_errors_are_one_line(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.parquet").write_bytes(b"not parquet at all")
    r = run_cli("fineweb_edu", f"--input={bad}", f"--data_dir={tmp_path / 'out'}")
    assert r.returncode == 1 and r.stderr.startswith("error: cannot read") and "Traceback" not in r.stderr
    assert list((tmp_path / "out").rglob("*.bin*")) == []
    r = run_cli("openwebtext", f"--input={tmp_path / 'none'}", f"--data_dir={tmp_path / 'out'}")
    assert r.returncode == 1 and "does not exist" in r.stderr
    # offline without --input: one line with the address tried and the --input alternative
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")  # discard port: connection refused
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "fineweb_edu", f"--data_dir={tmp_path / 'off'}"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: cannot list the .parquet files at "
                               "http://127.0.0.1:9/api/datasets/HuggingFaceFW/fineweb-edu/tree/main/sample/10BT")
    assert "--input=FOLDER" in r.stderr
    assert not (tmp_path / "off").exists()
    # pyarrow missing: the install hint, before anything is downloaded
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(tokenfiles.PrepareError, match="pip install pyarrow"):
        prepare.prepare("fineweb_edu", data_dir=tmp_path / "out")


class HubServer:
    """A local stand-in for the Hub on 127.0.0.1: the file-listing API (two pages) and file
    downloads honouring HTTP Range. The first request for each file is cut off halfway."""

    def __init__(self, folder, repo, prefix):
        import http.server
        import json
        import threading
        self.requests = []
        files = sorted(p for p in folder.iterdir() if p.suffix in (".parquet", ".bin"))
        listing = [{"type": "file", "path": f"{prefix}/{f.name}".lstrip("/"), "size": f.stat().st_size,
                    "lfs": {"oid": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size}}
                   for f in files]
        cut_done = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_body(self, code, body, headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                api = f"/api/datasets/{repo}/tree/main/{prefix}".rstrip("/") + "?recursive=true"
                if self.path == api:  # page 1 of 2, the next page named in a Link header
                    link = f'<http://127.0.0.1:{server.port}{api}&cursor=2>; rel="next"'
                    return self.send_body(200, json.dumps(listing[:1]).encode(), [("Link", link)])
                if self.path == api + "&cursor=2":
                    return self.send_body(200, json.dumps(listing[1:]).encode())
                name = self.path.rsplit("/", 1)[-1]
                if not self.path.startswith(f"/datasets/{repo}/resolve/main/{prefix}".rstrip("/") + "/") or not (folder / name).is_file():
                    return self.send_body(404, b"not found")
                data = (folder / name).read_bytes()
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                code = 206 if rng else 200
                self.send_response(code)
                self.send_header("Content-Length", str(len(data) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if name not in cut_done:  # promise everything, send half, hang up
                    cut_done.add(name)
                    self.wfile.write(data[start:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_parquet_download_resumes_with_range_and_matches_local_input(tmp_path, monkeypatch):
    """Listing (paged), download cut halfway, resumed with a Range request, sha256-checked;
    the result is byte-identical to preparing the same files with --input."""
    gpt2()
    files = parquet_corpus(tmp_path / "src", corpus_docs())
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    monkeypatch.setattr(download, "DOWNLOAD_BLOCK", 1024)  # small files still arrive in several blocks
    with HubServer(tmp_path / "src", "HuggingFaceFW/fineweb-edu", "sample/10BT") as hub:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.port}")
        meta = prepare.prepare("fineweb_edu", data_dir=tmp_path / "d", val_every=10, num_proc=1)
    ranges = [(p.rsplit("/", 1)[-1], r) for p, r in hub.requests if "/resolve/" in p]
    half = files[0].stat().st_size // 2
    assert ranges[0] == ("000_00000.parquet", None) and ranges[1][0] == "000_00000.parquet"
    resumed_at = int(ranges[1][1].removeprefix("bytes=").removesuffix("-"))  # the blocks written before the cut
    assert half - 1024 < resumed_at <= half
    out = tmp_path / "d" / "fineweb_edu"
    for f in files:  # downloaded copies are complete and kept for the next run; no .part left
        assert (out / "parquet" / f"sample_10BT_{f.name}").read_bytes() == f.read_bytes()
    assert not list(out.rglob("*.part"))
    assert meta["source_sha256"] == {f"sample_10BT_{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
                                     for f in files}
    local = tmp_path / "local"
    prepare.prepare("fineweb_edu", input=tmp_path / "src", data_dir=local, val_every=10, num_proc=1)
    for split in ("train.bin", "val.bin"):
        assert (out / split).read_bytes() == (local / "fineweb_edu" / split).read_bytes()
    # a re-run finds the shards on disk: it lists them again but downloads nothing
    with HubServer(tmp_path / "src", "HuggingFaceFW/fineweb-edu", "sample/10BT") as hub:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.port}")
        prepare.prepare("fineweb_edu", data_dir=tmp_path / "d", val_every=10, num_proc=1)
    assert not [p for p, _ in hub.requests if "/resolve/" in p]


def test_download_resumable_resumes_a_part_file_and_rejects_wrong_bytes(tmp_path, monkeypatch):
    files = parquet_corpus(tmp_path / "src", corpus_docs(n_shards=1))
    data = files[0].read_bytes()
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    with HubServer(tmp_path / "src", "o/r", "p") as hub:
        url = f"http://127.0.0.1:{hub.port}/datasets/o/r/resolve/main/p/{files[0].name}"
        # a .part left by an earlier, killed run: the first request asks only for the rest
        (tmp_path / "y.parquet.part").write_bytes(data[:1000])
        got = download.download_resumable(url, tmp_path / "y.parquet", len(data), hashlib.sha256(data).hexdigest())
        assert got.read_bytes() == data
        assert hub.requests[0][1] == "bytes=1000-" and not (tmp_path / "y.parquet.part").exists()
        # the right size but the wrong sha256: refused, nothing kept
        with pytest.raises(tokenfiles.PrepareError, match="sha256 mismatch"):
            download.download_resumable(url, tmp_path / "x.parquet", len(data), "0" * 64, retries=2)
        # the way out names the files --input takes: llm.c shards are .bin files, not .parquet
        with pytest.raises(tokenfiles.PrepareError, match=r"pass --input=FOLDER with the \.bin files"):
            download.download_resumable(url, tmp_path / "x.bin", len(data), "0" * 64, retries=1)
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x.parquet.part").exists()
    assert not list(tmp_path.glob("x.bin*"))

def llmc_shard(path, tokens, magic=20240520):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, 1, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def test_pretokenized_fineweb_shards_are_copied_exactly(tmp_path, monkeypatch):
    """modded-nanogpt's llm.c shards (header 20240520, 1, count; uint16 ids): val from the val
    shard, train from the first --shards train shards, downloaded from a local Hub or --input."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    parts = {name: rng.integers(0, 50257, size=n) for name, n in
             (("fineweb_val_000000.bin", 300), ("fineweb_train_000001.bin", 500), ("fineweb_train_000002.bin", 400))}
    for name, tokens in parts.items():
        llmc_shard(src / name, tokens)
    meta = prepare.prepare("fineweb10B_gpt2", input=src, data_dir=tmp_path / "a", shards=1)
    out = tmp_path / "a" / "fineweb10B_gpt2"
    assert read_bin(out / "val.bin").tolist() == parts["fineweb_val_000000.bin"].tolist()
    assert read_bin(out / "train.bin").tolist() == parts["fineweb_train_000001.bin"].tolist()
    assert meta["splits"] == {"val": 300, "train": 500} and meta["tokenizer"] == "gpt2"
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    with HubServer(src, "kjj0/fineweb10B-gpt2", "") as hub:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.port}")
        prepare.prepare("fineweb10B_gpt2", data_dir=tmp_path / "b")
    train = read_bin(tmp_path / "b" / "fineweb10B_gpt2" / "train.bin").tolist()
    assert train == parts["fineweb_train_000001.bin"].tolist() + parts["fineweb_train_000002.bin"].tolist()
    # a shard with another magic number or fewer tokens than its header says is refused
    llmc_shard(src / "fineweb_train_000001.bin", [1, 2, 3], magic=20240801)
    with pytest.raises(tokenfiles.PrepareError, match="not an llm.c token shard"):
        prepare.prepare("fineweb10B_gpt2", input=src, data_dir=tmp_path / "c")
    llmc_shard(src / "fineweb_train_000001.bin", [1, 2, 3])
    (src / "fineweb_train_000001.bin").write_bytes((src / "fineweb_train_000001.bin").read_bytes()[:-2])
    with pytest.raises(tokenfiles.PrepareError, match="truncated"):
        prepare.prepare("fineweb10B_gpt2", input=src, data_dir=tmp_path / "c")
    assert not list((tmp_path / "c").rglob("*.bin"))
