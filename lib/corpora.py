"""
Big corpora into token files, streamed: documents cut into pieces the tokenizer encodes exactly as
the whole, a corpus's data files listed on the Hugging Face Hub, parquet files (a table format the
Hub stores datasets in) tokenized row group by row group on every core and appended to train.bin
and val.bin, and llm.c token shards (GPT-2 tokens with a small header) read as they are. Memory
stays bounded by a few row groups or one shard, whatever the corpus size. prepare.py's registry
says which corpus goes through which path.
"""
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import requests

from lib.download import progress, request_problem
from lib.tokenfiles import GPT2_EOT, TOKEN_DTYPE, PrepareError
from lib.tokenizers import gpt2_tokenizer


# ----------------------------------------------------------------------------- documents to token ids

def safe_pieces(text, size=1 << 16):
    """Cut text into ~size pieces that GPT-2's BPE (and bpe.py's, GPT-4's pattern) encodes exactly
    as the whole.

    A cut just before an ASCII space that follows a letter or digit is a token boundary of
    GPT-2's pre-tokenizer regex in both directions (no pattern spans ' ' after a word, and
    ' ?\\p{L}+' starts the same way), so the concatenated ids equal encode_ordinary(text).
    """
    start = 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut] == " " and text[cut - 1].isalnum()):
            cut += 1
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def encode_documents(docs, tokenizer, eot=None, batch_chars=1 << 22, label="tokenizing", stats=None,
                     between=False):
    """Yield uint16-ready id arrays for an iterable of documents, eot appended after each one
    (between=True: only between two documents, so a split cut inside a document ends without one).

    Documents are cut into safe pieces and encoded a batch (~batch_chars characters) at a time
    with tokenizer.encode_batch, so memory stays bounded and all cores work whatever the size.
    """
    # the bar follows the input (characters of in-memory text, documents of a corpus); the count
    # shown is tokens, the unit of the summary printed at the end
    by_chars = isinstance(docs, list)
    total = sum(map(len, docs)) if by_chars else (len(docs) if hasattr(docs, "__len__") else None)
    stats = stats if stats is not None else {}
    stats.setdefault("tokens", 0)
    stats.setdefault("seconds", 0.0)
    first_token = stats["tokens"]  # stats may already count earlier splits

    def written():
        return f"{stats['tokens'] - first_token:,} tokens"
    pieces, chars, done = [], 0, 0  # None in pieces marks a document end (eot goes there)

    def flush():
        t0 = time.perf_counter()
        encoded = iter(tokenizer.encode_batch([p for p in pieces if p is not None]))
        stats["seconds"] += time.perf_counter() - t0
        out = []
        for piece in pieces:
            out.extend(next(encoded) if piece is not None else (eot,))
        stats["tokens"] += len(out)
        pieces.clear()
        return np.array(out, dtype=np.int64)

    for n, doc in enumerate(docs):
        if between and n and eot is not None:
            pieces.append(None)
        for piece in safe_pieces(doc) if tokenizer.name in ("gpt2", "bpe") else [doc]:
            pieces.append(piece)
            chars += len(piece)
            done += len(piece) if by_chars else 0
            if chars >= batch_chars:  # flush mid-document too: one huge file stays bounded
                yield flush()
                chars = 0
                progress(label, done, total, count=written())
        if eot is not None and not between:
            pieces.append(None)
        done += 0 if by_chars else 1
    if pieces:
        yield flush()
    progress(label, done, total, final=True, count=written())


# ----------------------------------------------------------------------------- files on the Hugging Face Hub

@dataclass
class Shard:
    """One data file of a corpus (parquet or token shard): where it comes from, what it must be."""
    name: str  # file name under data/NAME/parquet/ (or shards/)
    url: str
    size: int | None = None  # bytes, from the Hub's file listing
    sha256: str | None = None  # the Hub gives it for files stored with Git LFS


@dataclass
class HubFiles:
    """A dataset's data files (names ending in `suffix`) on the Hugging Face Hub. `where` lists
    (revision, folder) candidates tried in order; the first that holds such files is used."""
    repo: str
    where: list
    suffix: str = ".parquet"

    @property
    def page(self):
        return f"https://huggingface.co/datasets/{self.repo}"


def hub_endpoint():
    # HF_ENDPOINT is the Hub's own variable for mirrors; the tests point it at a local server
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_shards(hub, timeout=30):
    """The data files of `hub`, sorted by path, from the Hub's file-listing API."""
    endpoint = hub_endpoint()
    for revision, folder in hub.where:
        rev = quote(revision, safe="")  # refs/convert/parquet -> refs%2Fconvert%2Fparquet
        url = f"{endpoint}/api/datasets/{hub.repo}/tree/{rev}/{folder}".rstrip("/") + "?recursive=true"
        shards = []
        while url:  # the listing is paged; the next page is in the Link header
            try:
                r = requests.get(url, timeout=timeout)
                if r.status_code == 404:  # no such branch or folder: try the next candidate
                    break
                r.raise_for_status()
                entries = r.json()
            except (requests.RequestException, ValueError) as e:
                problem = (request_problem(e, url, timeout)[0] if isinstance(e, requests.RequestException)
                           else "the answer is not JSON")
                raise PrepareError(f"cannot list the {hub.suffix} files at {url} ({problem}); download the "
                                   f"{hub.suffix} files of {hub.page} elsewhere and pass --input=FOLDER"
                                   ) from None
            for entry in entries:
                path = entry.get("path", "")
                if entry.get("type") == "file" and path.endswith(hub.suffix):
                    shards.append(Shard(path.replace("/", "_"),
                                        f"{endpoint}/datasets/{hub.repo}/resolve/{rev}/{path}",
                                        entry.get("size"), (entry.get("lfs") or {}).get("oid")))
            url = r.links.get("next", {}).get("url")
        if shards:
            if any("partial" in s.url for s in shards):  # the Hub converts only ~5 GB of big datasets
                print(f"warning: {hub.repo} has only a partial parquet conversion; the corpus is "
                      f"smaller than the original", file=sys.stderr)
            return sorted(shards, key=lambda s: s.url)
    tried = ", ".join(f"{revision}:{folder or '/'}" for revision, folder in hub.where)
    raise PrepareError(f"no {hub.suffix} files found for {hub.repo} at {tried}; "
                       f"download them elsewhere and pass --input=FOLDER")


# ----------------------------------------------------------------------------- parquet corpora

def import_parquet():
    """pyarrow.parquet, or the line that says how to install it."""
    try:
        import pyarrow.parquet as pq  # optional: only the parquet corpora need it
    except ImportError:
        raise PrepareError("reading parquet files needs pyarrow: pip install pyarrow") from None
    return pq


PARQUET_BATCH_ROWS = 1024  # documents encoded at once inside a task: ~5 MB of FineWeb-Edu text


def _parquet_error(path, e):
    # pyarrow raises ArrowInvalid (a ValueError) or OSError for a file that is not parquet
    text = " ".join(str(e).split())
    text = text if len(text) <= 120 else text[:120].rsplit(" ", 1)[0] + " ..."  # whole words only
    return PrepareError(f"cannot read {path} as parquet ({type(e).__name__}: {text})")


def parquet_tasks(path):
    """One task (path, row group) per row group of a parquet file with a `text` column."""
    pq = import_parquet()
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        groups = pf.metadata.num_row_groups
    except (OSError, ValueError) as e:
        raise _parquet_error(path, e) from None
    if "text" not in names:
        raise PrepareError(f"{path} has no 'text' column (columns: {', '.join(names)})")
    kind = pf.schema_arrow.field("text").type
    import pyarrow.types as pa_types  # pyarrow is installed: import_parquet() succeeded above
    if not (pa_types.is_string(kind) or pa_types.is_large_string(kind)):
        raise PrepareError(f"{path}: the 'text' column holds {kind}, expected strings (documents)")
    return [(str(path), g) for g in range(groups)]


def encode_row_group(task):
    """encode_gpt2_documents over one row group of the `text` column, read PARQUET_BATCH_ROWS
    documents at a time. Runs in a tokenizer process: reading and decompressing parquet is
    parallel too, and the main process only writes arrays."""
    path, group = task
    pq = import_parquet()
    parts = []
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group],
                                                        columns=["text"]):
            parts.append(encode_gpt2_documents([t or "" for t in batch.column(0).to_pylist()]))
    except (OSError, ValueError) as e:
        raise _parquet_error(path, e) from None
    if not parts:
        return np.empty(0, TOKEN_DTYPE), np.empty(0, np.int64), 0.0
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            sum(p[2] for p in parts))


_worker_enc = []  # the GPT-2 encoding, loaded once per process


def encode_gpt2_documents(docs):
    """(ids, lengths, seconds): every document's GPT-2 ids (encode_ordinary) followed by eot, as
    one uint16 array; tokens per document, eot included; seconds spent encoding. Runs in the
    worker processes of write_corpus (or in-process with num_proc=1)."""
    if not _worker_enc:
        _worker_enc.append(gpt2_tokenizer(num_threads=1))
    encode_batch = _worker_enc[0].encode_batch
    t0 = time.perf_counter()
    encoded = encode_batch(docs)
    seconds = time.perf_counter() - t0
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=TOKEN_DTYPE)
    for ids, end in zip(encoded, ends):
        flat[end - 1 - len(ids):end - 1] = ids
    flat[ends - 1] = GPT2_EOT
    return flat, lengths, seconds


def _encoded_tasks(tasks, num_proc):
    """encode_row_group of each task, in order, on num_proc processes. At most 2 tasks per
    process are in flight, so memory stays bounded however large the corpus."""
    if num_proc <= 1:
        for task in tasks:
            yield encode_row_group(task)
        return
    import multiprocessing
    from collections import deque
    # spawn: workers start clean (no copy of the parent's threads, sockets or locks)
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(encode_row_group, (task,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_corpus(out_dir, tasks, num_proc=1, max_tokens=0, val_every=2000, label="tokenizing", stats=None):
    """Tokenize parquet row groups (tasks from parquet_tasks; GPT-2 BPE) on num_proc processes into
    out_dir/.train.bin.tmp and .val.bin.tmp at once, eot after each document; returns
    {split: (temp path, token count)} for prepare.py to rename.

    Whole documents go to val (every val_every-th, the first included): a val document is
    never cut, and the split does not depend on row groups, batch sizes or process counts. With max_tokens
    the corpus stops at the first document boundary where train + val reach max_tokens.
    Memory holds 2 row groups per process; on any failure the temp files are removed.
    """
    stats = stats if stats is not None else {}
    stats.setdefault("tokens", 0)
    stats.setdefault("seconds", 0.0)
    tmps = {s: out_dir / f".{s}.bin.tmp" for s in ("train", "val")}
    counts = {"train": 0, "val": 0}
    files = {}
    k = total = 0  # documents and tokens so far
    t_start = time.perf_counter()
    try:
        files = {s: open(p, "wb") for s, p in tmps.items()}
        for flat, lengths, seconds in _encoded_tasks(tasks, num_proc):
            stats["seconds"] += seconds
            if max_tokens and total + flat.size >= max_tokens:  # keep documents up to the one reaching it
                last = int(np.searchsorted(total + np.cumsum(lengths), max_tokens))
                lengths = lengths[:last + 1]
                flat = flat[:int(lengths.sum())]
            is_val = np.arange(k, k + len(lengths)) % val_every == 0
            in_val = np.repeat(is_val, lengths)  # (tokens,)
            for split, part in (("val", flat[in_val]), ("train", flat[~in_val])):
                files[split].write(part.tobytes())
                counts[split] += part.size
            k += len(lengths)
            total += flat.size
            stats["tokens"] = total
            progress(f"{label} (tokens)", total, max_tokens or None)
            if max_tokens and total >= max_tokens:
                break
        progress(f"{label} (tokens)", total, max_tokens or None, final=True)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if counts["train"] == 0:
            raise PrepareError(f"only {k} document(s) read; the train split would be empty "
                               f"(every {val_every}th document goes to val)")
    except BaseException:
        for s, p in tmps.items():
            if s in files:
                files[s].close()
            p.unlink(missing_ok=True)
        raise
    stats["documents"] = k
    stats["wall"] = time.perf_counter() - t_start  # reading, downloading, tokenizing and writing
    return {s: (tmps[s], counts[s]) for s in ("train", "val")}

# ----------------------------------------------------------------------------- llm.c token shards

# llm.c / modded-nanogpt token shards: a 256-int32 header (magic, version 1, count), then uint16 ids
LLMC_MAGIC = 20240520


def read_llmc_shard(path):
    """The uint16 tokens of an llm.c-format shard, memory-mapped, after checking its header."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=256)
    if header.size < 256 or header[0] != LLMC_MAGIC or header[1] != 1:
        raise PrepareError(f"{path} is not an llm.c token shard (a 256-int32 header starting "
                           f"{LLMC_MAGIC}, 1); re-download it")
    count = int(header[2])
    if path.stat().st_size != 256 * 4 + 2 * count:
        raise PrepareError(f"{path} should hold {count:,} tokens after its header but has "
                           f"{path.stat().st_size - 1024:,} bytes; it is truncated, re-download it")
    return np.memmap(path, dtype="<u2", mode="r", offset=256 * 4, shape=(count,))
