"""
Prepared data on disk: data/NAME/{train,val}.bin (uint16 token ids) and meta.json, and for chat
data a loss mask beside each split, {train,val}.mask.bin (uint8, 1 where the token is one the
model learns: the assistant's). Writing them atomically, reading the metadata (nanoGPT's
meta.pkl too, safely), and checking a dataset before training (sizes, vocabulary, token ids,
masks). prepare.py writes datasets; train.py, evaluate.py and
bench.py read them through this file.
"""
import difflib
import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np

# data/ beside this file, not the working directory, so scripts run from anywhere agree
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# uint16 halves disk and memmap traffic versus int32 and still holds GPT-2's 50,257 ids
TOKEN_DTYPE = np.uint16
SMALL_DATA = 100_000  # training tokens below which prepare.py warns of memorization (Tiny Shakespeare: 1M)
# train.py's rule for the same thing, per parameter: SMALL_DATA for the quick start's 1.8M parameters
SMALL_DATA_PER_PARAMETER = SMALL_DATA / 1.8e6
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max) + 1  # ids 0..65535
GPT2_EOT = 50256  # <|endoftext|> in tiktoken's gpt2 encoding
MASK_DTYPE = np.uint8  # a loss mask holds 0 or 1 per token



class PrepareError(Exception):
    """A problem the user can fix; main() prints it as one line, no traceback."""
    exit_code = 1  # data problems (missing, empty, not UTF-8, offline)


class Offline(PrepareError):
    """No network: a download failed to connect at all (name lookup, refused, unreachable)."""


class UsageError(PrepareError):
    """Bad command line (unknown dataset or option)."""
    exit_code = 2



def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def token_count(path, allow_empty=True):
    """The number of uint16 tokens in a token file, after checking that it is one: an odd byte
    size (or, with allow_empty=False, an empty file) is a PrepareError."""
    try:
        n_bytes = os.path.getsize(path)
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror}") from None
    if n_bytes % 2 or (n_bytes == 0 and not allow_empty):
        raise PrepareError(f"{path} has {'an odd size' if n_bytes else 'no tokens'} ({n_bytes:,} bytes) but should "
                           f"hold uint16 tokens: it is truncated or not a token file; prepare the dataset again")
    return n_bytes // 2


def open_tokens(path):
    """np.memmap of a uint16 token file that holds tokens (token_count's checks) instead of
    numpy's ValueError."""
    token_count(path, allow_empty=False)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def mask_path(path):
    """The loss mask beside a token file: train.bin -> train.mask.bin."""
    path = str(path)
    return path[:-len(".bin")] + ".mask.bin" if path.endswith(".bin") else path + ".mask"


def check_mask(path, n_tokens, chunk=1 << 24):
    """PrepareError unless the loss mask beside the token file path holds one 0 or 1 per token,
    and at least one 1 (a split with nothing to learn). Returns how many tokens it marks."""
    mask = mask_path(path)
    size = os.path.getsize(mask)
    if size != n_tokens * np.dtype(MASK_DTYPE).itemsize:
        raise PrepareError(f"{mask} holds {size:,} mask bytes but {path} {n_tokens:,} tokens: they must be "
                           f"the same length (an interrupted copy?); prepare the dataset again")
    data, learned = np.memmap(mask, dtype=MASK_DTYPE, mode="r"), 0
    for start in range(0, len(data), chunk):
        part = data[start:start + chunk]
        if int(part.max()) > 1:
            raise PrepareError(f"{mask} holds the value {int(part.max())}; a loss mask holds only 0 and 1: "
                               f"prepare the dataset again")
        learned += int(part.sum(dtype=np.int64))
    if not learned:
        raise PrepareError(f"{mask} marks no token to learn (no assistant reply in this split); "
                           f"prepare the dataset again with conversations that have replies")
    return learned


def check_token_ids(path, vocab_size, chunk=1 << 24):
    """PrepareError naming path and the largest id if a uint16 token file holds an id >=
    vocab_size. Reads the file in chunks of 16M tokens (about 0.05 s each), so memory stays flat."""
    data = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    for start in range(0, len(data), chunk):
        largest = int(data[start:start + chunk].max())
        if largest >= vocab_size:
            largest = max(largest, *(int(data[i:i + chunk].max()) for i in range(start, len(data), chunk)))
            raise PrepareError(f"{path} holds token id {largest} but vocab_size is {vocab_size} (meta.json): the "
                               f"file is corrupt or from another tokenizer; prepare the dataset again")


def check_dataset(folder, split_paths, block_size, name):
    """Check a prepared dataset before training: each split exists and holds more than block_size
    tokens, the metadata's vocab_size fits uint16, every token id is below it, and a loss mask
    (chat data: meta.json's "mask", or a SPLIT.mask.bin) is there for every split, as long as
    its tokens, with 0s and 1s only. Files up to 256 MiB are scanned now (well under a second).
    Returns (tokens per split, metadata, the splits too big to scan, which the caller checks
    batch by batch)."""
    sizes = {}
    for split, path in split_paths.items():
        if not os.path.isfile(path):
            prepared = sorted(p.name for p in DATA_DIR.iterdir() if (p / "meta.json").is_file()) if DATA_DIR.is_dir() else []
            nearest = difflib.get_close_matches(name, prepared, n=1, cutoff=0.6)
            if Path(folder) == DATA_DIR / name and nearest:  # a typo of a prepared dataset
                raise PrepareError(f"no dataset {name!r}: did you mean --dataset={nearest[0]}? "
                                   f"(python prepare.py --list shows them)")
            raise PrepareError(f"no {path}: prepare the dataset first with `python prepare.py {name}` (your own "
                               f"text: `python prepare.py text --input=YOUR_TEXT --name={name}`; `python prepare.py "
                               f"--list` shows the datasets), or point --data_dir at a folder with train.bin and val.bin")
        sizes[split] = token_count(path)  # an empty split fails the block_size check below
        if sizes[split] < block_size + 1:
            raise PrepareError(f"{path} has {sizes[split]} tokens but block_size={block_size} needs at least "
                               f"{block_size + 1}; use a smaller --block_size or a bigger dataset")
    meta = read_meta(folder)  # meta.json, or nanoGPT's meta.pkl
    vocab = meta.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or not 0 < vocab <= MAX_VOCAB):
        raise PrepareError(f"{folder}: vocab_size {vocab!r} in the metadata is not a uint16 vocabulary size; "
                           f"prepare the dataset again")
    big = {split for split in split_paths if vocab is not None and sizes[split] > 2**27}
    for split in split_paths:
        if vocab is not None and split not in big:
            check_token_ids(split_paths[split], vocab)
    masks = [os.path.isfile(mask_path(path)) for path in split_paths.values()]
    if meta.get("mask") or any(masks):  # chat data: every split has its mask
        for split, path in split_paths.items():
            if not os.path.isfile(mask_path(path)):
                raise PrepareError(f"no {mask_path(path)}: {folder} is chat data (a loss mask per split) "
                                   f"but this split's mask is missing; prepare the dataset again")
            check_mask(path, sizes[split])
    return sizes, meta, big


def small_data_notice(train_tokens, n_params, tokens_to_read):
    """A notice when a run will memorize its training split, else None. The rule of prepare.py's
    notice (the quick start's model memorizes under SMALL_DATA tokens within a few hundred steps),
    per parameter: under SMALL_DATA_PER_PARAMETER tokens per parameter, read 5 times or more; and
    any split read over 100 times, or under 0.01 tokens per parameter.

    The old rule (only the last two) let memorizing runs start silently: README's own-text command
    on 45,000 characters (0.023 per parameter, read 76 times) and 200 steps on a 512-token BPE of
    them (0.010 per parameter, 22 times; train loss 0.81, val 4.52). Not named: nanoGPT's baby GPT
    (0.094 per parameter, 82 times) and README's settings for small texts (0.4 per parameter)."""
    reads, per_parameter = tokens_to_read / train_tokens, train_tokens / n_params
    memorizes = (reads > 100 or per_parameter < 0.01
                 or (per_parameter < SMALL_DATA_PER_PARAMETER and reads >= 5))
    if not memorizes:
        return None
    return (f"notice: the training split holds {train_tokens:,} tokens for {n_params:,} parameters "
            f"({per_parameter:.2g} per parameter) and the run reads it ~{reads:,.0f} times: expect the "
            f"model to memorize it (val loss rising); README, 'Train on your own text', has settings for it")


def write_tokens(path, arrays, vocab_size, dtype=TOKEN_DTYPE):
    """Stream id arrays into path's temp name ('.NAME.tmp', same folder, fsynced); returns (tmp, count).

    The caller renames with os.replace only after every split is complete, so an interrupted
    run never leaves a truncated .bin behind; on any failure the temp file is removed here.
    A loss mask is written the same way: vocab_size 2, dtype MASK_DTYPE.
    """
    # same folder as the target so os.replace is a rename on one filesystem (atomic);
    # a fixed name means a run killed with SIGKILL leaves at most one stale file per split
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with open(tmp, "wb") as f:
            for ids in arrays:
                ids = np.asarray(ids, dtype=np.int64)
                # checked before the cast: astype(uint16) would silently wrap 70000 to 4464
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
                    raise PrepareError(f"token id {bad} out of range for vocab_size {vocab_size} "
                                       f"while writing {path.name}; the tokenizer and metadata disagree")
                f.write(ids.astype(dtype).tobytes())
                count += ids.size
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, or a crash could expose zeros
    except OSError as e:  # disk full, read-only folder: one line naming the file
        tmp.unlink(missing_ok=True)
        raise PrepareError(f"cannot write {path}: {e.strerror or e} (nothing half-written was kept)") from None
    except BaseException:  # KeyboardInterrupt too: nothing half-written survives
        tmp.unlink(missing_ok=True)
        raise
    return tmp, count


def write_json(path, obj):
    """Atomic like the .bin files; meta.json is written last, so its presence means complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PrepareError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- metadata

class _PlainUnpickler(pickle.Unpickler):
    # Plain dicts, lists, strings and numbers need no class lookup; anything that does
    # (os.system in a __reduce__, any custom object) is refused before it can run.
    def find_class(self, module, name):
        raise PrepareError(f"meta.pkl wants {module}.{name}; refused: only plain dicts, lists, "
                           "strings and numbers are read (an arbitrary pickle can run code)")


def read_meta(dataset_dir):
    """meta.json, else nanoGPT's meta.pkl (restricted unpickler), else {}."""
    dataset_dir = Path(dataset_dir)
    # JSON first: it is what we write, readable by eye, and loading it runs nothing
    path = dataset_dir / "meta.json"
    if path.exists():
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise PrepareError(f"{path} is not valid JSON ({e}); re-run prepare.py") from None
        if not isinstance(meta, dict):
            raise PrepareError(f"{path} holds a JSON {type(meta).__name__}, expected an object; re-run prepare.py")
        return meta
    path = dataset_dir / "meta.pkl"
    if path.exists():
        with open(path, "rb") as f:
            try:
                meta = _PlainUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, ValueError) as e:  # truncated or not a pickle
                raise PrepareError(f"{path} is not a readable pickle ({e})") from None
        if not isinstance(meta, dict):
            raise PrepareError(f"{path} holds a {type(meta).__name__}, expected a dict")
        return meta
    return {}

