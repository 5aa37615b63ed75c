"""
Numbers about a trained model: perplexity over a whole split, counting accuracy, HellaSwag, and
a chat model's exact answers.

Perplexity of a checkpoint (out_dir/ckpt.pt) or of a Hugging Face GPT-2 (name or local folder)
on any prepared split, every token scored exactly once:
$ python evaluate.py perplexity --out_dir=out-shakespeare-char-cpu      # its own dataset's val split
$ python evaluate.py perplexity --init_from=gpt2 --dataset=wikitext2 --split=test --stride=512

Counting accuracy of a model trained on `python prepare.py counting` (greedy decoding from
start values held out of training):
$ python evaluate.py counting --out_dir=out-counting

HellaSwag accuracy (10,042 validation examples, downloaded once into data/hellaswag/) of a GPT-2
BPE model; GPT-2 124M gets acc_norm ~0.29:
$ python evaluate.py hellaswag --init_from=gpt2
$ python evaluate.py hellaswag --out_dir=out-gpt2 --limit=1000

Chat: the share of held-out questions a run fine-tuned on chat data answers exactly (greedy
decoding until <|end|>); the questions are its dataset's eval.jsonl (prepare.py chat_reverse
writes one), or --input=FILE.jsonl, conversations whose last message is the expected reply.
A base run and --data_dir=CHAT_DATA score the base, its vocabulary grown as fine-tuning would:
$ python evaluate.py chat --out_dir=out-chat-reverse
$ python evaluate.py chat --init_from=out-shakespeare-char-cpu/ckpt.pt --data_dir=data/chat_reverse

Without --out_dir, the newest run folder here (one holding ckpt.pt) is used. Knobs are
--key=value flags (or config files), checked like train.py's; `python evaluate.py perplexity
--help` lists them with their defaults.
"""

import os
import sys

from lib import cli  # first: a missing package is one line naming the fix, not a traceback

from lib import chat, loading, runs, tokenizers
from lib.evaluation import (counting_accuracy, gpt2_tokenizer_or_die, hellaswag_counts, hellaswag_path, perplexity,
                            read_hellaswag)
from lib.quantize import QUANTIZE, quantize_model
from lib.tokenfiles import DATA_DIR, PrepareError, open_tokens, read_meta
from lib.tokenizers import token_bytes_of


def run_hellaswag(cfg):
    # cheap checks before costly work: a given --input file is read first; a missing run is found
    # before the data set is downloaded; both before the model loads
    examples = read_hellaswag(hellaswag_path(cfg['input']), cfg['limit']) if cfg['input'] else None
    if cfg['init_from'] == 'resume':
        cfg['out_dir'] = runs.find_run_dir(cfg['out_dir'], cfg['_out_dir_given'], what='evaluate')
        cfg['_out_dir_given'] = True
        if not os.path.isfile(os.path.join(cfg['out_dir'], 'ckpt.pt')):
            runs.load_checkpoint(os.path.join(cfg['out_dir'], 'ckpt.pt'))  # its one-line error
    examples = examples or read_hellaswag(hellaswag_path(cfg['input']), cfg['limit'])
    model, info, dev = load_model(cfg)
    tokenizer = gpt2_tokenizer_or_die(info, cfg['data_dir'] or None)
    n, c, cn = hellaswag_counts(model, examples, tokenizer.encode, cfg['batch_size'], dev.autocast,
                                label='hellaswag')
    print(f"hellaswag: {n} examples, acc {c / n:.4f}, acc_norm {cn / n:.4f}")
    return dict(examples=n, acc=c / n, acc_norm=cn / n)


# -----------------------------------------------------------------------------
# command line

MODEL_KNOBS = dict(
    out_dir='out',  # the run folder holding ckpt.pt (init_from='resume')
    init_from='resume',  # 'resume' (out_dir/ckpt.pt), 'gpt2'..'gpt2-xl', or a local Hugging Face folder
    device='auto',  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype='auto',  # 'auto', 'float32', 'bfloat16' or 'float16'
    quantize='none',  # 'none' or 'int8' (int8 weights, float activations)
)
DEFAULTS = {
    'perplexity': dict(
        MODEL_KNOBS,
        dataset='',  # reads data/<dataset>/<split>.bin; '' = the checkpoint's dataset (wikitext2 for GPT-2)
        data_dir='',  # a folder with <split>.bin instead of data/<dataset>
        split='',  # train, val or test; '' = test where the dataset has one, else val
        stride=0,  # tokens between window starts; 0 means block_size // 2
        block_size=0,  # window length; 0 means the model's block_size (a smaller one crops the model)
        batch_size=8,  # windows per forward pass
    ),
    'counting': dict(
        MODEL_KNOBS,
        data_dir='',  # the counting data's folder (meta.json: separator, held-out starts); '' means the run's
        starts='',  # comma-separated start values, e.g. '1,10'; '' means the held-out val starts
        prompt_len=3,  # numbers in each prompt
        max_new_tokens=5,  # numbers generated and checked per prompt
    ),
    'chat': dict(
        MODEL_KNOBS,
        input='',  # .jsonl conversations, each ending with the expected reply; '' = the data's eval.jsonl
        data_dir='',  # the chat data's folder (its tokenizer, its eval.jsonl); '' means the run's
        limit=0,  # score only the first N questions; 0 means all
    ),
    'hellaswag': dict(
        MODEL_KNOBS,
        input='',  # a HellaSwag .jsonl file; '' downloads hellaswag_val.jsonl into data/hellaswag/
        limit=0,  # score only the first N examples; 0 means all (10,042)
        batch_size=16,  # examples per forward pass (4 rows each)
        data_dir='',  # the run's tokenizer metadata folder; '' means the run's own (or GPT-2 BPE)
    ),
}


def load_model(cfg):
    """(model, info, device setup) for init_from/out_dir: see loading.load_model."""
    if cfg['init_from'] == 'resume':
        cfg['out_dir'] = runs.find_run_dir(cfg['out_dir'], cfg['_out_dir_given'], what='evaluate')
    model, info, dev = loading.load_model_on_device(cfg['init_from'], cfg['out_dir'], cfg['device'], cfg['dtype'])
    print(f"model: {info['source']}")
    quantize_model(model, cfg['quantize'])
    return model, info, dev


def run_perplexity(cfg):
    model, info, dev = load_model(cfg)
    dataset = cfg['dataset'] or info.get('dataset') or 'wikitext2'  # a checkpoint's own data; GPT-2: wikitext2
    if cfg['data_dir']:
        folder = cfg['data_dir']
    elif not cfg['dataset'] and info.get('data_dir'):
        folder = info['data_dir']  # where the checkpoint's dataset was found
    else:
        folder = os.path.join(DATA_DIR, dataset)
    split = cfg['split'] or ('test' if os.path.isfile(os.path.join(folder, 'test.bin')) else 'val')
    path = os.path.join(folder, f"{split}.bin")
    if not os.path.isfile(path):
        cli.die(f"no {path}: prepare it with `python prepare.py {dataset}` "
                   f"(or point --data_dir at a folder with {split}.bin)")
    try:
        tokens = open_tokens(path)
    except PrepareError as e:
        cli.die(str(e))
    if cfg['block_size']:
        if cfg['block_size'] > model.config.block_size:
            cli.die(f"block_size={cfg['block_size']} is longer than the model's {model.config.block_size}")
        model.crop_block_size(cfg['block_size'])
    if len(tokens) and int(tokens.max()) >= model.config.vocab_size:
        cli.die(f"{path} has token id {int(tokens.max())} but the model's vocab_size is "
                   f"{model.config.vocab_size}: this model was not trained with this tokenizer")
    try:
        token_bytes, no_bpb = token_bytes_of(read_meta(folder), folder)
    except PrepareError as e:
        cli.die(str(e))
    try:
        r = perplexity(model, tokens, cfg['stride'] or None, cfg['batch_size'], dev.autocast, token_bytes)
    except ValueError as e:
        cli.die(str(e))
    print(f"{os.path.relpath(path)}: {r['tokens']:,} tokens scored in {r['windows']} windows "
          f"(block_size {r['block_size']}, stride {r['stride']})")
    print(f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f}"
          + (f", bpb {r['bpb']:.4f} ({r['bytes']:,} bytes of text)" if r['bpb'] is not None else f" (bpb: {no_bpb})"))
    print(f"(every token scored once, with at least {r['block_size'] - r['stride']} tokens of context except near "
          f"the start; train.py's val loss averages random windows whose first positions see little context, so "
          f"it reads higher)")
    return r


def run_counting(cfg):
    model, info, _ = load_model(cfg)
    folder = cfg['data_dir'] or info.get('data_dir') or os.path.join(DATA_DIR, 'counting')
    try:
        meta = read_meta(folder)
    except PrepareError as e:
        cli.die(str(e))
    if not meta and not cfg['starts']:  # the held-out starts are in meta.json; guessing could score train starts
        cli.die(f"no counting metadata (meta.json) in {folder}: point --data_dir at the folder "
                   f"`python prepare.py counting` made, or name the starts, e.g. --starts=1,10")
    if meta.get('tokenizer', 'counting') != 'counting':  # numbers are token ids only in counting data
        cli.die(f"counting accuracy needs a model trained on `python prepare.py counting`; {folder} holds "
                   f"{meta['tokenizer']} data (or point --data_dir at the counting data's folder)")
    separator = meta.get('separator', model.config.vocab_size - 1)
    if cfg['starts']:
        starts = parse_starts(cfg['starts'])
    else:
        starts = meta.get('val_starts', [1, 10])
    # a prompt and its continuation must stay below the separator (the largest number + 1)
    span = cfg['prompt_len'] + cfg['max_new_tokens']
    starts = [s for s in starts if 0 <= s and s + span <= separator]
    if not starts:
        cli.die(f"no start value leaves room for {span} numbers below {separator}; use --starts=1,10")
    results, accuracy = counting_accuracy(model, starts, separator, cfg['prompt_len'], cfg['max_new_tokens'])
    for r in results:
        print(f"prompt {r['prompt']} -> {r['generated']} {r['correct']}/{len(r['generated'])} correct")
    print(f"accuracy {accuracy:.1%} ({len(results)} prompts, greedy)")
    return accuracy


def run_chat(cfg):
    model, info, dev = load_model(cfg)
    folder = cfg['data_dir'] or info.get('data_dir')
    try:
        meta = tokenizers.read_meta(folder) if folder else {}
        if not meta.get('chat') and not (info.get('tokenizer_record') or {}).get('chat'):
            cli.die(f"{info['source']} was not trained for chat (no chat tokens in its tokenizer) and "
                    f"{folder or 'no --data_dir'} holds no chat data: pass --data_dir=CHAT_DATA to score "
                    f"a base")
        if meta.get('chat') and model.config.vocab_size < meta['vocab_size']:  # a base, before fine-tuning
            chat.fit_base_model(model, info, meta, notice=print)
            tokenizer = tokenizers.load_tokenizer(folder)
        else:
            tokenizer = loading.load_tokenizer_for(info, cfg['data_dir'] or None)
        path = cfg['input'] or os.path.join(folder or '', (meta.get('eval') or {}).get('file', ''))
        if not os.path.isfile(path):
            cli.die(f"no held-out questions: {folder or 'the run'} has no eval.jsonl (prepare.py "
                    f"chat_reverse writes one); pass --input=FILE.jsonl of conversations ending with the "
                    f"expected reply")
        questions = chat.read_conversations(path)[:cfg['limit'] or None]
    except PrepareError as e:
        cli.die(str(e))
    print(f"{len(questions)} questions from {path}, scored by exact match (greedy decoding)")
    try:
        results = chat.answer_questions(model, tokenizer, questions, dev.autocast)
    except ValueError as e:
        cli.die(f"{path}: {e}")
    wrong = [f"  {q[:60]!r} -> {a[:60]!r} (expected {e[:60]!r})" for q, a, e in results
             if not chat.score_answer(a, e)]
    if wrong:
        print("wrong, e.g.:\n" + "\n".join(wrong[:5]))
    right = sum(chat.score_answer(a, e) for _, a, e in results)
    accuracy = right / len(questions)
    print(f"chat: {len(questions)} questions, accuracy {accuracy:.3f}")
    return accuracy


COMMANDS = {'perplexity': run_perplexity, 'counting': run_counting, 'chat': run_chat,
            'hellaswag': run_hellaswag}


# what each knob may be (cli.check_knobs), for the knobs a command has
RULES = dict(batch_size='>= 1', prompt_len='>= 1', max_new_tokens='>= 1', stride='>= 0', block_size='>= 0',
             limit='>= 0', split=('', 'train', 'val', 'test'), quantize=QUANTIZE)


def check_config(command, cfg):
    """Every knob checked before a model or a file is touched."""
    cli.check_knobs(cfg, {k: rule for k, rule in RULES.items() if k in cfg})
    if command == 'perplexity':
        if cfg['stride'] and cfg['block_size'] and cfg['stride'] > cfg['block_size']:
            cli.die(f"stride={cfg['stride']} must be at most block_size={cfg['block_size']}")
    if command == 'counting' and cfg['starts']:
        cfg['starts'] = parse_starts(cfg['starts'])


def parse_starts(text):
    """'1,10' -> [1, 10]; anything else is a one-line error."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, list):  # already parsed by check_config
        return text
    if isinstance(text, tuple):
        text = ','.join(map(str, text))
    try:
        starts = [int(s) for s in str(text).split(',')]
    except ValueError:
        cli.die(f"starts must be comma-separated whole numbers like --starts=1,10, got {text!r}")
    if any(s < 0 for s in starts):
        cli.die(f"starts must be >= 0, got {text!r}")
    return starts


def main(argv):
    if not argv or argv[0] in ('-h', '--help'):
        cli.print_stdout(f"usage: python evaluate.py {{{','.join(COMMANDS)}}} [--key=value ...]\n{__doc__.strip()}")
        if argv:
            for command, defaults in DEFAULTS.items():
                cli.print_stdout('')
                cli.print_help(defaults, __file__, f"python evaluate.py {command} [--key=value ...]")
            return 0
        cli.die(f"name a command: python evaluate.py {{{','.join(COMMANDS)}}} (usage above)")
    if argv[0] not in COMMANDS:
        cli.die(cli.unknown_command(argv[0], COMMANDS, 'evaluate.py'))
    command, rest = argv[0], argv[1:]
    defaults = DEFAULTS[command]
    overrides = cli.load_config(defaults, rest, usage=f"python evaluate.py {command} [--key=value ...]")
    cfg = dict(defaults, **overrides, _out_dir_given='out_dir' in overrides)
    check_config(command, cfg)
    COMMANDS[command](cfg)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
