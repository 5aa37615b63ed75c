"""
A chat dataset on disk (prepare.py chat, chat_reverse, chitchat): conversations rendered with the
chat template (lib/chat.py) into SPLIT.bin tokens and a SPLIT.mask.bin loss mask (1 where the token
is the assistant's), on the tokenizer of a base run or a new one, plus meta.json written last.
"""

import json
import os

import numpy as np

from lib import bpe, chat
from lib.tokenfiles import MASK_DTYPE, TOKEN_DTYPE, PrepareError, sha256_of, write_json, write_tokens
from lib.tokenizers import chat_tokenizer, char_tokenizer, gpt2_tokenizer, tiktoken_tokenizer


def base_tokenizer(raw, opts, kind, bpe_file, meta):
    """The tokenizer the chat tokens are added to: the --base run's, or one of kind ('char', 'gpt2',
    'bpe'; its metadata goes into meta, an own BPE's ranks into bpe_file)."""
    if opts["base"]:
        tokenizer, record = chat.run_tokenizer(opts["base"])
        if tokenizer.name == "counting":
            raise PrepareError(f"--base={opts['base']} reads the counting task's numbers, not text")
        meta["base"] = str(opts["base"])
        if tokenizer.name == "bpe":
            bpe_file.write_text(record["bpe_ranks"], encoding="ascii")
    else:
        contents = {split: [m["content"] for c in convs for m in c] for split, convs in raw.splits.items()}
        if kind == "char":  # the characters of every split, as for text
            tokenizer = char_tokenizer(sorted(set("".join("".join(texts) for texts in contents.values()))))
        elif kind == "gpt2":
            tokenizer = gpt2_tokenizer()
        else:  # an own BPE, learned from the training conversations only
            try:
                ranks = bpe.train_bpe(contents["train"], opts["vocab_size"], label=f"a {opts['vocab_size']:,}"
                                      "-token BPE on the training conversations")
            except (ImportError, ValueError) as e:
                raise PrepareError(str(e)) from None
            bpe.save_ranks(bpe_file, ranks)
            tokenizer = tiktoken_tokenizer("bpe", bpe.load_encoding(bpe_file, opts["vocab_size"]))
    if tokenizer.name == "char":  # id i is character i
        meta["chars"] = list(tokenizer.decode(list(range(tokenizer.vocab_size))))
    if tokenizer.name == "bpe":
        meta["bpe"] = {"file": "tokenizer.tiktoken", "sha256": sha256_of(bpe_file), "pattern": "GPT-4 (bpe.py)",
                       "trainer": "rustbpe", "eot": tokenizer.vocab_size - 1}
    return tokenizer


def write_chat_dataset(dataset, raw, opts, kind, folder, out_dir, options):
    """Chat data: every conversation rendered with the chat template (lib/chat.py); a split's
    tokens in SPLIT.bin, its loss mask in SPLIT.mask.bin (1 where the token is the assistant's,
    learned), meta.json last; nothing half-written survives a failure. raw: prepare.py's Raw (splits
    of conversations, where each came from, source, extra); options: what meta.json records."""
    meta, temps = {"dataset": dataset}, {}  # temps: final name -> temporary file
    bpe_file = out_dir / ".tokenizer.tiktoken.tmp"
    limit = opts["max_tokens_per_conversation"]
    try:
        base = base_tokenizer(raw, opts, kind, bpe_file, meta)
        tokenizer = chat_tokenizer(base)
        meta.update(tokenizer=base.name, vocab_size=tokenizer.vocab_size, chat=chat.chat_entry(tokenizer))
        splits, counts, learned = {}, {}, {}
        for split, conversations in raw.splits.items():
            where = raw.where.get(split) or [f"{dataset}'s {split} conversation {i + 1}"
                                             for i in range(len(conversations))]
            ids, mask, counts[split] = chat.render_split(conversations, tokenizer, limit, where)
            if not ids:
                raise PrepareError(f"no {split} conversation has a reply within "
                                   f"--max_tokens_per_conversation={limit}; raise it")
            temps[f"{split}.bin"], splits[split] = write_tokens(out_dir / f"{split}.bin", [ids],
                                                                tokenizer.vocab_size)
            temps[f"{split}.mask.bin"] = write_tokens(out_dir / f"{split}.mask.bin", [mask], 2, MASK_DTYPE)[0]
            learned[split] = sum(mask)
        if "eval" in raw.extra:  # the held-out questions: the val conversations, whole
            temps["eval.jsonl"] = out_dir / ".eval.jsonl.tmp"
            temps["eval.jsonl"].write_text("".join(json.dumps({"messages": c}) + "\n"
                                                   for c in raw.splits["val"]))
    except BaseException:
        for tmp in [*temps.values(), bpe_file]:
            tmp.unlink(missing_ok=True)
        raise
    (out_dir / "meta.json").unlink(missing_ok=True)  # as for text: no meta.json reads as unfinished
    for name, tmp in temps.items():
        os.replace(tmp, out_dir / name)
    if "bpe" in meta:
        os.replace(bpe_file, out_dir / "tokenizer.tiktoken")
    meta.update(dtype=np.dtype(TOKEN_DTYPE).name, splits=splits, source=raw.source,
                source_sha256=raw.sha256,
                mask={"file": "SPLIT.mask.bin", "dtype": np.dtype(MASK_DTYPE).name, "learned": learned},
                conversations=counts, **raw.extra)
    meta["options"] = options
    write_json(out_dir / "meta.json", meta)
    for split, n in splits.items():
        c = counts[split]
        print(f"{folder}/{split}.bin: {n:,} tokens, {learned[split] / n:.0%} of them the assistant's "
              f"(learned); {c['kept'] + c['cut']:,} conversations"
              + (f", {c['cut']:,} cut" if c["cut"] else "")
              + (f", {c['skipped']:,} skipped" if c["skipped"] else ""))
    if any(c["cut"] or c["skipped"] for c in counts.values()):
        print(f"notice: conversations longer than --max_tokens_per_conversation={limit} tokens were cut "
              f"to it, or skipped where the cut kept no reply")
    if "eval" in raw.extra:
        print(f"{folder}/eval.jsonl: {len(raw.splits['val']):,} held-out questions (python evaluate.py chat)")
    return meta
