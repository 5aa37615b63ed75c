"""Where the tests find the raw texts they need offline (tests skip, saying how to get them, when
a text is absent): the folder named by GPT_TEST_DATA, then what `python prepare.py NAME` kept in
this repository's data/ when it downloaded them, then a copy beside the checkout (this project's CI)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = [Path(os.environ['GPT_TEST_DATA'])] if os.environ.get('GPT_TEST_DATA') else []
FOLDERS += [ROOT / 'data', ROOT.parent / 'shared' / 'data']

if 'TIKTOKEN_CACHE_DIR' not in os.environ and (ROOT.parent / 'shared' / 'tiktoken_cache').is_dir():
    os.environ['TIKTOKEN_CACHE_DIR'] = str(ROOT.parent / 'shared' / 'tiktoken_cache')  # offline GPT-2 BPE files


def find(*names):
    """The first existing path among FOLDERS / name for each name (alternative layouts), else None."""
    for folder in FOLDERS:
        for name in names:
            if (folder / name).exists():
                return folder / name
    return None


SHAKESPEARE = find('tinyshakespeare/input.txt', 'shakespeare_char/input.txt', 'shakespeare/input.txt')
WIKITEXT = find('wikitext-2/valid.txt', 'wikitext2/valid.txt')
WIKITEXT = WIKITEXT.parent if WIKITEXT else None
HOW = ("run `python prepare.py {name}` once with network (it keeps the raw text in data/), or set GPT_TEST_DATA "
       "to a folder holding {file}")
NO_SHAKESPEARE = "needs Tiny Shakespeare's input.txt: " + HOW.format(name='shakespeare_char', file='tinyshakespeare/input.txt')
NO_WIKITEXT = "needs WikiText-2's text files: " + HOW.format(name='wikitext2', file='wikitext-2/{train,valid,test}.txt')
