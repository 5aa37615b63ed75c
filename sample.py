"""
Sample text from a trained model (out_dir/ckpt.pt) or from pretrained GPT-2.

$ python sample.py --start="ROMEO:"                      # the newest run folder here (one with ckpt.pt)
$ python sample.py --out_dir=out-shakespeare-char-cpu --num_samples=5 --max_new_tokens=200 --temperature=0.9
$ python sample.py --init_from=gpt2 --start="FILE:prompt.txt" --top_p=0.9   # GPT-2 weights from the HF cache
$ python sample.py --init_from=path/to/hf_folder --temperature=0              # greedy
$ python sample.py config/my_sampling.py --seed=7                             # a config file, then flags
$ python sample.py --out_dir=out-chat-reverse --chat                          # chat with a fine-tuned run
$ python sample.py --out_dir=out-chat-reverse --chat --start="reverse: wodnik" --temperature=0   # one reply

With num_samples=1 the text streams to stdout as it is generated; several samples are drawn
as one batch and printed one after another, each followed by a line of dashes. The prompt is
printed too. Notices (device, model, prompt handling) go to stderr, so `> out.txt` keeps only
the samples. Config files and --key=value flags are checked like train.py's.

--chat (a run fine-tuned on chat data, docs/chat.md): each line read from stdin is a user
message; the reply streams to stdout until the model writes <|end|>, then a newline. The chat is
remembered within the model's context (the oldest turns are dropped, said on stderr); Ctrl-D or
Ctrl-C ends it. With --start, one reply to that message, then exit.
"""

import os
import sys
from contextlib import redirect_stdout

from lib import cli  # first: a missing package is one line naming the fix, not a traceback

import torch

from lib import loading, runs
from lib.chat import fit_history, prompt_limit, reply_tokens
from lib.quantize import QUANTIZE, quantize_model
from lib.sampling import StreamPrinter, encode_prompt, notice, read_prompt
from lib.tokenfiles import PrepareError

# -----------------------------------------------------------------------------
# defaults; config files and --key=value flags change them
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or an HF folder
out_dir = 'out'  # the training run's folder (init_from='resume')
data_dir = ''  # folder with the tokenizer metadata (meta.json or meta.pkl); '' = the checkpoint's dataset
start = ''  # the prompt, or FILE:path to read it from a file; '' = start of text (newline or <|endoftext|>)
num_samples = 1  # samples to draw; 1 streams tokens as they come, more are drawn as one batch
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 = the model's distribution, < 1 sharper, > 1 flatter, 0 = greedy
top_k = 200  # sample only among the k likeliest tokens; 0 = no limit
top_p = 1.0  # sample only from the smallest set of tokens holding this much probability; 1.0 = no limit
seed = 1337  # seeds the sampling generator: the same seed gives the same samples
stream = True  # with num_samples=1, print tokens as they are generated (False: print at the end)
device = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto', 'float32', 'bfloat16' or 'float16'
compile = False  # torch.compile each transformer block (worth it only for long generations on a GPU)
quantize = 'none'  # 'none' or 'int8' (int8 weights, float activations: ~2x faster CPU decoding)
chat = False  # chat on stdin/stdout with a run fine-tuned on chat data; with start, one reply (docs/chat.md)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
RULES = dict(num_samples='>= 1', max_new_tokens='>= 0', temperature='>= 0', top_k='>= 0', top_p='(0, 1]',
             quantize=QUANTIZE)  # what each knob may be (cli.check_knobs)
SEPARATOR = '-' * 40


def main(argv):
    cfg = dict(DEFAULTS)
    overrides = cli.load_config(DEFAULTS, argv)
    cfg.update(overrides)
    cli.check_knobs(cfg, RULES)

    with redirect_stdout(sys.stderr):  # status lines from the shared helpers go to stderr
        if cfg['init_from'] == 'resume':  # no --out_dir and no out/ckpt.pt: the newest run folder here
            cfg['out_dir'] = runs.find_run_dir(cfg['out_dir'], 'out_dir' in overrides, what='sample from')
        model, info, dev = loading.load_model_on_device(cfg['init_from'], cfg['out_dir'], cfg['device'], cfg['dtype'])
        tokenizer = loading.load_tokenizer_for(info, cfg['data_dir'] or None)
    notice(f"model: {info['source']}, {model.get_num_params() / 1e6:.2f}M parameters; "
           f"tokenizer: {tokenizer.name} ({tokenizer.vocab_size} ids)")
    with redirect_stdout(sys.stderr):
        quantize_model(model, cfg['quantize'])  # after the count above: int8 weights are buffers
    if cfg['compile']:
        for block in model.transformer.h:
            block.compile()

    if cfg['chat']:
        return chat_loop(model, tokenizer, dev, cfg, sampling_knobs(cfg, tokenizer, model, dev))
    prompt = encode_prompt(read_prompt(cfg['start']), tokenizer, model.config.block_size)
    # an empty prompt starts from GPT-2's <|endoftext|>: context for the model, not text to print
    hidden = 1 if cfg['start'] == '' and tokenizer.name in ('gpt2', 'bpe') else 0
    x = torch.tensor(prompt, dtype=torch.long, device=dev.device)[None, :].repeat(cfg['num_samples'], 1)  # (B, T)
    sampling = sampling_knobs(cfg, tokenizer, model, dev)
    with dev.autocast():
        if cfg['num_samples'] == 1 and cfg['stream']:
            printer = StreamPrinter(tokenizer, unprinted=prompt[:hidden])
            printer.add(prompt[hidden:])
            for token in model.generate_stream(x, cfg['max_new_tokens'], **sampling):
                printer.add([token.item()])
            printer.finish()
            print(f"\n{SEPARATOR}")
        else:
            y = model.generate(x, cfg['max_new_tokens'], **sampling)  # (B, T + max_new_tokens)
            for row in y.tolist():
                print(tokenizer.decode(row[hidden:]))
                print(SEPARATOR)


def sampling_knobs(cfg, tokenizer, model, dev):
    """model.generate_stream's sampling arguments from the knobs, with a seeded generator."""
    generator = torch.Generator(device=dev.device)
    generator.manual_seed(cfg['seed'])
    return dict(
        temperature=cfg['temperature'],
        top_k=cfg['top_k'] or None,
        top_p=cfg['top_p'] if cfg['top_p'] < 1.0 else None,
        # a padded vocabulary (50304 for GPT-2's 50257) has ids no tokenizer can decode
        vocab_limit=tokenizer.vocab_size if tokenizer.vocab_size < model.config.vocab_size else None,
        generator=generator,
    )


def chat_loop(model, tokenizer, dev, cfg, sampling):
    """--chat: user messages from stdin (or the one in --start), replies streamed to stdout."""
    if not tokenizer.special_ids:
        cli.die(f"{cfg['out_dir'] if cfg['init_from'] == 'resume' else cfg['init_from']} was not trained for "
                f"chat (its tokenizer has no chat tokens): fine-tune it on chat data first, docs/chat.md")
    if cfg['num_samples'] != 1:
        cli.die("--chat writes one reply at a time: leave out --num_samples")
    block_size = model.config.block_size
    limit = prompt_limit(block_size, cfg['max_new_tokens'])  # the prompt leaves room for the reply
    messages, one_reply = [], cfg['start'] != ''
    try:
        while True:
            if one_reply:
                text = read_prompt(cfg['start'])
            else:
                if sys.stdin.isatty():
                    print('> ', end='', file=sys.stderr, flush=True)
                text = sys.stdin.readline()
                if not text:  # Ctrl-D, or the end of piped input
                    break
                text = text.rstrip('\n')
                if not text.strip():
                    continue
            try:
                prompt, messages, dropped, cut = fit_history(messages + [{'role': 'user', 'content': text}],
                                                             tokenizer, limit)
            except PrepareError as e:  # a character the vocabulary lacks: this message only
                if one_reply:
                    cli.die(f"cannot encode the message: {e}")
                notice(f"notice: {e}; say it without them")
                continue
            if dropped:
                notice(f"notice: dropped the oldest {dropped} turn(s) to keep the chat within the model's "
                       f"{block_size}-token context")
            if cut:
                notice(f"notice: the message is longer than the room the context leaves it ({limit} tokens): "
                       f"keeping its last {limit} tokens")
            printer, reply = StreamPrinter(tokenizer), []
            with dev.autocast():
                for token in reply_tokens(model, tokenizer, prompt, cfg['max_new_tokens'], **sampling):
                    reply.append(token)
                    printer.add([token])
            printer.finish()
            print(flush=True)
            messages.append({'role': 'assistant', 'content': tokenizer.decode(reply)})
            if one_reply:
                break
    except KeyboardInterrupt:  # Ctrl-C ends the chat like Ctrl-D
        print(file=sys.stderr)
    return 0


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ValueError as e:  # e.g. a prompt with token ids the model's vocabulary does not have
        cli.die(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python sample.py | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
