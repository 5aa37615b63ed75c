"""
Your own tokenizer: a byte-level BPE trained on your training text (prepare.py --tokenizer=bpe),
saved beside the data and read back with tiktoken, so training, sampling and evaluation need no
package beyond the runtime four.

    ranks = train_bpe(documents, vocab_size=4096)    # needs `pip install rustbpe` (training only)
    save_ranks(folder / "tokenizer.tiktoken", ranks)
    enc = load_encoding(folder / "tokenizer.tiktoken", vocab_size=4096)   # a tiktoken.Encoding

Byte-level: the 256 byte values are the first tokens, so any UTF-8 text (every script, emoji)
encodes with no unknown token and decodes back byte for byte. <|endoftext|> is the last id.
Trainer: rustbpe (nanochat's), measured against Hugging Face tokenizers in docs/tokenizer.md.
Nothing in the saved file is executed: it is tiktoken's text format, one 'base64 rank' per line.
"""

import base64
import os
import sys
import time

# GPT-4's split pattern (tiktoken's cl100k_base): text is cut into words, numbers of at most 3
# digits, punctuation runs and whitespace before merges are learned, so no token spans a word
# and a number. Chosen over GPT-2's for its case-insensitive contractions ('S, 'LL) and its
# bounded digit groups, which keep a small vocabulary from spending merges on long numbers.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"  # marks where documents are joined; the one special token, id vocab_size - 1
MIN_VOCAB = 256 + 1  # the byte values and <|endoftext|>
MAX_VOCAB = 2 ** 16  # token ids are stored as uint16


def train_bpe(documents, vocab_size, label="training BPE"):
    """Mergeable ranks {token bytes: rank} of a byte-level BPE with vocab_size - 1 tokens (the last
    id is <|endoftext|>), learned from documents (an iterable of str). ValueError when the text is
    too small for that many merges; ImportError with the install line when rustbpe is missing."""
    try:
        import rustbpe
    except ImportError:
        raise ImportError("training a BPE tokenizer needs rustbpe: pip install rustbpe") from None
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be between {MIN_VOCAB} (the 256 bytes and {EOT}) and {MAX_VOCAB:,} "
                         f"(uint16 ids), got {vocab_size:,}")
    read, t0 = [0], time.time()

    def counted(docs):  # progress while rustbpe reads the text; its merges follow in one call
        for doc in docs:
            read[0] += len(doc)
            if time.time() - t0 > 2:
                print(f"\r{label}: read {read[0] / 1e6:,.1f} MB", end="", file=sys.stderr, flush=True)
            yield doc
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(counted(documents), vocab_size - 1, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in tokenizer.get_mergeable_ranks()}
    size = f"{read[0] / 1e6:,.1f} MB" if read[0] >= 1e5 else f"{read[0] / 1e3:,.1f} kB"
    print(f"{'' if time.time() - t0 <= 2 else chr(13)}{label}: {len(ranks) - 256:,} merges learned from "
          f"{size} of text in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    if len(ranks) < vocab_size - 1:
        raise ValueError(f"the training text supports only {len(ranks) - 256:,} merges, fewer than the "
                         f"{vocab_size - MIN_VOCAB:,} that vocab_size={vocab_size:,} needs: use --vocab_size="
                         f"{len(ranks) + 1} or less, or more text")
    return ranks


def save_ranks(path, ranks):
    """Write ranks in tiktoken's format (ranks_text), through a temporary name."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(ranks_text(ranks))
    os.replace(tmp, path)


def ranks_text(ranks):
    """tiktoken's format: one line 'base64(token bytes) rank' per token, by rank."""
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def parse_ranks(text, where="the ranks"):
    """{token bytes: rank} from tiktoken's format; base64 and integers only: nothing is executed."""
    ranks = {}
    for n, line in enumerate(text.splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{where}: line {n} is not 'base64 rank'") from None
    return ranks


def load_encoding(path, vocab_size, text=None):
    """The tiktoken.Encoding of a saved BPE (from path, or from its text, as a checkpoint keeps
    it): its ranks, GPT-4's split pattern, <|endoftext|> last."""
    import tiktoken
    if text is None:
        with open(path, encoding="ascii") as f:
            text = f.read()
    ranks = parse_ranks(text, str(path))
    if len(ranks) != vocab_size - 1 or sorted(ranks.values()) != list(range(vocab_size - 1)):
        raise ValueError(f"{path} holds {len(ranks):,} tokens, not the {vocab_size - 1:,} ranks 0..{vocab_size - 2} "
                         f"its meta.json promises: prepare the dataset again")
    return tiktoken.Encoding(name=f"bpe{vocab_size}", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: vocab_size - 1})
