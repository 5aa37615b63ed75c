"""
What sample.py and serve.py share: a prompt read (from --start or a FILE:), encoded for a model
(the start-of-text fallback, cropping to the context, one line for a character the vocabulary
lacks), and tokens printed as text while they stream.
"""
import os
import sys

from lib import cli
from lib.tokenfiles import PrepareError


def notice(message):
    print(message, file=sys.stderr, flush=True)


def read_prompt(start):
    """The prompt text: start itself, or the contents of the file in 'FILE:path'."""
    if not start.startswith('FILE:'):
        return start
    path = start[len('FILE:'):]
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        cli.die(f"cannot read the prompt file {path}: {e.strerror if isinstance(e, OSError) else e}")


def encode_prompt(text, tokenizer, block_size, quiet=False):
    """Token ids for the prompt, with the start-of-text fallback for an empty prompt and
    cropping to the model's context; explains each adjustment on stderr (unless quiet)."""
    say = (lambda message: None) if quiet else notice
    if text == '':
        if tokenizer.encoding is not None:  # GPT-2's or an own BPE: the id that joins documents
            eot = tokenizer.encoding.eot_token  # (a chat run's encode() would spell it out)
            say(f"empty prompt: starting from <|endoftext|> (id {eot})")
            return [eot]
        try:
            ids = tokenizer.encode('\n')
        except PrepareError:
            cli.die("empty prompt and the vocabulary has no newline to start from; pass --start=TEXT")
        say("empty prompt: starting from a newline")
        return ids
    try:
        ids = tokenizer.encode(text)
    except PrepareError as e:
        if tokenizer.name == 'char':
            missing = []
            for ch in dict.fromkeys(text):  # unique characters in prompt order
                try:
                    tokenizer.encode(ch)
                except PrepareError:
                    missing.append(ch)
            cli.die(f"the prompt has {len(missing)} character(s) missing from the model's "
                       f"{tokenizer.vocab_size}-character vocabulary: {' '.join(repr(c) for c in missing)}")
        cli.die(f"cannot encode the prompt: {e}")
    if not ids:
        cli.die(f"the prompt {text!r} encodes to no tokens; pass a different --start")
    if len(ids) > block_size:
        say(f"prompt is {len(ids)} tokens, longer than the context of {block_size}: "
            f"keeping its last {block_size} tokens")
        ids = ids[-block_size:]
    return ids


class StreamPrinter:
    """Prints a growing token sequence as text, piece by piece, so that the pieces add up to
    tokenizer.decode(all ids). Each step decodes the whole sequence and prints the new suffix:
    GPT-2 BPE tokens can end in the middle of a multi-byte character (decoded as U+FFFD until
    the next token completes it), and the counting tokenizer puts spaces between numbers."""

    def __init__(self, tokenizer, out=None, unprinted=()):
        self.tokenizer = tokenizer
        self.out = out or sys.stdout
        self.ids = list(unprinted)  # context that is not printed (the start-of-text token)
        self.shown = tokenizer.decode(self.ids) if self.ids else ''

    def add(self, ids):
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith('\ufffd'):
            return  # maybe half a character: wait for the next token
        self._emit(text)

    def finish(self):
        self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text):
        if text.startswith(self.shown):
            piece = text[len(self.shown):]
        else:  # an earlier piece changed meaning (not seen with our tokenizers): print the rest anyway
            piece = text[len(os.path.commonprefix([text, self.shown])):]
        self.out.write(piece)
        self.out.flush()
        self.shown = text
