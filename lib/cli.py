"""
What every script shares on the command line: knobs from config files and --key=value flags
(every key and type checked, --help from the comments beside the defaults), the allowed
values of knobs declared as one table, one-line errors, progress lines, and the printed
summaries (the changed knobs, a model's parameter table).

    overrides = cli.load_config(defaults, sys.argv[1:])   # config/a.py --batch_size=32
    cli.check_knobs(config, RULES)                          # e.g. RULES = dict(batch_size='>= 1')
    cli.die("what is wrong; what to do")                    # 'error: ...' on stderr, exit status 1

User mistakes raise ConfigError, a SystemExit: a script that does not catch it prints its
one line to stderr and exits with status 1, without a traceback.
"""

import ast
import difflib
import math
import os
import re
import sys
import textwrap
import time
import tokenize

try:  # the runtime packages (requirements.txt); without them, one line instead of a traceback
    import numpy  # noqa: F401
    import requests  # noqa: F401
    import tiktoken  # noqa: F401
    import torch
except ModuleNotFoundError as e:
    raise SystemExit(f"error: no module named {e.name!r}: activate the project's virtual environment "
                     f"(. .venv/bin/activate), or install the packages: README, Quick start") from None


class ConfigError(SystemExit):
    """A user error with a one-line message that says what to change.

    Under torchrun every rank runs the same checks on the same input, so rank 0 prints the
    line and the other ranks exit with status 1 quietly; this_rank_only=True is for a problem
    only this process sees (its own batch, its own file), printed with the rank named."""

    def __init__(self, message, this_rank_only=False):
        global last_error, last_error_quiet
        last_error = message  # hardware.py hands it to torchrun's failure summary
        rank = os.environ.get('RANK', '0')
        if this_rank_only and rank != '0':
            message = f"rank {rank}: {message}"
        last_error_quiet = rank != '0' and not this_rank_only  # rank 0 prints it (hardware.py waits)
        super().__init__(1 if last_error_quiet else f"error: {message}")
        self.message = message
        self.this_rank_only = this_rank_only


last_error = None  # the message of the latest ConfigError
last_error_quiet = False  # whether that error is rank 0's to print


def die(message):
    """Stop the script with a one-line error on stderr and exit status 1."""
    raise ConfigError(message)


MIN_TORCH = (2, 3)  # torch.amp.GradScaler(device), torch.compiler; requirements.txt says the same


def torch_too_old(version):
    """The one-line complaint for a torch older than MIN_TORCH (e.g. '2.1.2+cu121'), else None."""
    major_minor = tuple(int(part) for part in version.split('+')[0].split('.')[:2])
    if major_minor < MIN_TORCH:
        return (f"torch {version} is too old: this project needs torch >= {'.'.join(map(str, MIN_TORCH))} "
                f"(pip install -U torch, or see requirements.txt)")
    return None


if torch_too_old(torch.__version__):  # every script imports cli first: say it once, clearly
    die(torch_too_old(torch.__version__))


# -----------------------------------------------------------------------------
# knobs: config files, then --key=value flags

def load_config(defaults, argv, usage=None):
    """Return {key: value} for the keys that config files and flags in argv override.

    argv items are config files or --key=value flags. A config file is EXECUTED as Python (as in
    nanoGPT): it can run any code with your permissions, so only use config files you trust,
    exactly as you would a script. Files are applied in order; --key=value
    flags (applied after all files, in order; the later one wins). Every key must be in
    defaults. A value must have the type of its default: an int may stand for a float, bools
    are only True/False (a bare --key means --key=True), and a string may be written without
    quotes. A default of None accepts
    any value; the script checks what it means. --help or -h prints the usage line (usage, or
    one made from the script's name) and every knob with its default and comment, then exits 0.
    """
    if '--help' in argv or '-h' in argv:
        # the caller's source file holds the defaults and their trailing comments
        caller = sys._getframe(1).f_globals
        print_help(defaults, caller.get('__file__'), usage, caller.get('__doc__'))
        sys.exit(0)
    current = dict(defaults)
    overrides = {}
    files = [a for a in argv if not a.startswith('--')]
    flags = [a for a in argv if a.startswith('--')]
    def switch(flag):  # a bare --key of a bool knob: True
        return '=' not in flag and isinstance(defaults.get(flag[2:]), bool)
    for before, word in zip(argv, argv[1:]):  # `--max_iters 50`: a value after a flag with no '='
        if before.startswith('--') and '=' not in before and before[2:] in defaults \
                and not os.path.isfile(word) and not (switch(before) and word.startswith('--')):
            raise ConfigError(f"{before} {word}: flags take their value after '=': did you mean {before}={word}?")
    for path in files:
        for key, value in _read_config_file(path, current).items():
            value = _check_value(defaults, key, value, f"in {path}")
            current[key] = overrides[key] = value
    for flag in flags:
        key, sep, text = flag[2:].partition('=') if not switch(flag) else (flag[2:], '=', 'True')
        if not sep or not key:
            raise ConfigError(f"cannot read flag {flag!r}: write it as --key=value")
        if key == 'config' and key not in defaults:
            raise ConfigError(f"{flag}: a config file is a plain argument, not a flag: python "
                              f"{os.path.basename(sys.argv[0]) or 'train.py'} {text} [--key=value ...]")
        _check_key(defaults, key, f"(flag {flag})")
        value = _parse_flag_value(defaults[key], text)
        value = _check_value(defaults, key, value, f"(flag {flag})")
        current[key] = overrides[key] = value
    return overrides


MODEL_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'model.py')


def model_knobs(script_knobs, leave_out=('vocab_size',)):
    """{field: default} of the GPTConfig fields a script does not set itself: every model knob
    is a knob of train.py and bench.py (settable, checked, recorded) without a line there.
    vocab_size is left out: the data decides it."""
    from dataclasses import fields
    from model import GPTConfig
    return {f.name: f.default for f in fields(GPTConfig) if f.name not in script_knobs and f.name not in leave_out}


def model_config(config, **extra):
    """GPTConfig from the model knobs in config (plus extra, e.g. vocab_size), or a one-line
    error naming the knob and its allowed values."""
    from dataclasses import fields
    from model import GPTConfig
    args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
    try:
        return GPTConfig(**{**args, **extra})
    except ValueError as e:
        die(str(e).replace('GPTConfig.', ''))


def unknown_command(name, commands, script):
    """One line for an unknown subcommand, naming the nearest one."""
    nearest = difflib.get_close_matches(name, list(commands), n=1, cutoff=0.0)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    return f"unknown command {name!r}{hint} (commands: {', '.join(commands)}; python {script} --help)"


def knob_comments(path):
    """[(name, comment, line)] for each line of a source file that assigns a name and ends in a
    comment: `name = value  # comment` at module level, or `name=value,  # comment` in a dict(...).
    Read with tokenize, so a '#' inside a string is not mistaken for a comment."""
    return _read_comments(path)[0]


def _read_comments(path):
    """(knob_comments(path), {line: text} of the lines that hold only a comment)."""
    try:
        with open(path, encoding='utf-8') as f:
            tokens = list(tokenize.generate_tokens(f.readline))
    except (OSError, SyntaxError, tokenize.TokenError):
        return [], {}
    found, alone, line_tokens = [], {}, []
    for tok in tokens:
        if tok.type in (tokenize.NL, tokenize.NEWLINE):
            line_tokens = []
        elif tok.type == tokenize.COMMENT:
            code = [t for t in line_tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
            # `name = value`, or a dataclass field `name: type = value`
            assigns = len(code) >= 2 and (code[1].string == '=' or (code[1].string == ':' and
                                                                   any(t.string == '=' for t in code[2:])))
            if code and code[0].type == tokenize.NAME and assigns:
                found.append((code[0].string, tok.string.lstrip('#').strip(), tok.start[0]))
            elif not code:
                alone[tok.start[0]] = tok.string.lstrip('#').strip()
        else:
            line_tokens.append(tok)
    return found, alone


def _comments_for(keys, path):
    """{key: comment} for keys; a name commented on several lines (evaluate.py's data_dir in two
    sub-commands) takes the line nearest to its neighbours in keys, which sit in the same block."""
    return {k: comment for k, (_, comment) in _knob_lines(keys, path).items()}


def _knob_lines(keys, path):
    """{key: (line, comment)} of the keys commented in the source file at path (see _comments_for)."""
    lines = {}
    for name, comment, line in knob_comments(path) if path else []:
        lines.setdefault(name, []).append((line, comment))
    chosen = {k: lines[k][0] for k in keys if len(lines.get(k, [])) == 1}
    for i, key in enumerate(keys):
        if len(lines.get(key, [])) > 1:
            # the next key's line, else the previous key's: a block's knobs sit together
            near = [k for k in keys[i + 1:i + 2] + keys[max(0, i - 1):i] if k in chosen][:1]
            anchor = chosen[near[0]][0] if near else 0
            chosen[key] = min(lines[key], key=lambda lc: abs(lc[0] - anchor))
    return chosen


def knob_sections(keys, path):
    """[(heading, [key, ...])]: the knobs in order, grouped under the comment lines that stand
    right above a knob in the source file, from one that opens with a label (`# data`, or
    `# model: its shape here`) on; heading None before the first. A knob not commented in that file (a GPTConfig field from model.py) stays in the
    section of the knob before it. A file with fewer than two headings gives one section."""
    _, alone = _read_comments(path) if path else ([], {})
    knob_lines = _knob_lines(keys, path)
    sections = [(None, [])]
    for key in keys:
        line = knob_lines[key][0] if key in knob_lines else None
        run = []  # the comment-only lines directly above the knob, top to bottom
        while line is not None and line - 1 - len(run) in alone:
            run.insert(0, alone[line - 1 - len(run)])
        # the heading opens with a label (`# data`, `# model: its shape ...`); lines above it are not
        # its own (`# defaults; ...`), lines below continue it
        starts = [i for i, text in enumerate(run) if re.match(r"[A-Za-z][\w &/'-]*(:|$)", text)]
        heading = ' '.join(run[starts[-1]:]) if starts else ''
        if heading:
            sections.append((heading, []))
        sections[-1][1].append(key)
    sections = [(heading, ks) for heading, ks in sections if ks]
    if sum(heading is not None for heading, _ in sections) < 2:
        return [(None, list(keys))]
    return sections


def print_help(defaults, path=None, usage=None, doc=None, width=100):
    """Usage line, the first line of doc, then the knobs: --key=default and its comment from the
    source file, grouped under the file's headings (knob_sections), wrapped to width columns."""
    script = os.path.basename(path) if path else os.path.basename(sys.argv[0])
    usage = usage or f"python {script} [config/file.py ...] [--key=value ...]"
    # a script's own comments, then model.py's for the GPTConfig fields it takes from there
    comments = {**_comments_for(list(defaults), MODEL_PY), **_comments_for(list(defaults), path)}
    flags = {k: f"--{k}={v!r}" for k, v in defaults.items()}
    column = max((len(f) for f in flags.values() if len(f) <= 32), default=0)  # longer ones stick out
    summary = next((line.strip() for line in (doc or '').splitlines() if line.strip()), '')
    lines = [f"usage: {usage}"] + ([summary] if summary else []) + ["",
             "knobs (--key=default, then what it does; config files set them the same way):"]
    indent = ' ' * (column + 4)
    for heading, keys in knob_sections(list(defaults), path):
        if heading:
            lines += [""] + textwrap.wrap(heading if ':' in heading else heading + ':', width)
        for key in keys:
            flag, text = flags[key], comments.get(key, '')
            # a long --key=default pushes its comment's first line right; the rest keep the column
            lines += textwrap.wrap(text, width, initial_indent=f"  {flag:<{column}}  ", subsequent_indent=indent,
                                   break_long_words=False, break_on_hyphens=False) or [f"  {flag}"]
    print_stdout('\n'.join(lines))


def print_stdout(text):
    """print(text) that ends quietly when the reader goes away (`python x.py --help | head`)."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader closed the pipe: point stdout at devnull so the exit flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


def config_summary(config, defaults, saved_at=None, width=100):
    """The knobs whose value differs from the default, as readable wrapped lines."""
    changed = [f"{k}={v!r}" for k, v in config.items() if k not in defaults or defaults[k] != v]
    where = f"; all of them go into {saved_at}" if saved_at else ""
    head = f"config ({len(changed)} knobs differ from the defaults{where}):"
    if not changed:
        return head + " none"
    return head + "\n" + textwrap.fill(', '.join(changed), width=width, initial_indent='  ',
                                       subsequent_indent='  ', break_long_words=False, break_on_hyphens=False)


def param_table(counts):
    """GPT.param_breakdown()'s counts as a small table: kind, count, share of the total."""
    lines = [f"{'parameters':<12}{'count':>14}{'share':>8}"]
    for kind, n in counts.items():
        lines.append(f"{kind:<12}{n:>14,}{100 * n / counts['total']:>7.1f}%")
    return "\n".join(lines)


def _read_config_file(path, current):
    """Run a config file and return the knobs it assigns (names it adds or changes)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (flags must look like --key=value)")
    with open(path) as f:
        source = f.read()
    # The file sees the values so far, so `lr_decay_iters = max_iters` works as in nanoGPT.
    namespace = dict(current)
    try:
        exec(compile(source, path, 'exec'), namespace)
    except Exception as e:
        raise ConfigError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    assigned = {}
    for key, value in namespace.items():
        if key.startswith('_') or callable(value) or type(value).__name__ == 'module':
            continue  # __builtins__, imports and helper functions are not knobs
        if key not in current:
            _check_key(current, key, f"in {path}")
        if key not in current or value is not current[key]:
            assigned[key] = value
    return assigned


def config_file_knobs(path, knobs):
    """knobs with those a config file sets (the file is executed: only for files of this repository)."""
    return {**knobs, **_read_config_file(path, knobs)}


def _check_key(defaults, key, where):
    if key not in defaults:
        nearest = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.0)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        raise ConfigError(f"unknown config key {key!r} {where}{hint}")


def _parse_flag_value(default, text):
    """Python literal if it parses (1, 3e-4, True, 'x'), else the plain text for string knobs."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain word such as --device=cuda:1; the type check decides if that is fine
    if isinstance(default, str) and not isinstance(value, str):
        return text  # --wandb_run_name=2024 means the string '2024'
    return value


def _check_value(defaults, key, value, where):
    default = defaults[key]
    if default is None:
        ok, expected = True, "any"
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "bool (True or False)"
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 5e3 means 5000
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "int"
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "float"
        value = float(value) if ok else value
    else:
        ok, expected = isinstance(value, type(default)), type(default).__name__
    if not ok:
        raise ConfigError(f"config key {key!r} {where}: got {value!r} ({type(value).__name__}), "
                          f"expected {expected} like the default {default!r}")
    return value


# -----------------------------------------------------------------------------
# allowed values, declared as data: {knob: rule}, checked by one function

def check_knobs(config, rules):
    """Stop with one line at the first knob outside its rule. A rule is a tuple of allowed
    values, or a string: '>= 0', '> 0', '[0, 1)' or '(0, 1]' (intervals), '1..20' (a whole
    number in that range). Every float knob must be finite."""
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            die(f"{key} must be a finite number, got {value}")
    for key, rule in rules.items():
        value = config[key]
        if isinstance(rule, tuple):
            if not any(value is v or (type(value) is type(v) and value == v) for v in rule):  # 1 is not True
                die(f"{key} must be {', '.join(map(repr, rule[:-1]))} or {rule[-1]!r}, got {value!r}")
        elif not _in_range(value, rule):
            die(f"{key} must be {rule}, got {value}")


def _in_range(value, rule):
    if '..' in rule:
        low, high = rule.split('..')
        return int(low) <= value <= int(high)
    if rule[0] in '[(':
        low, high = (float(x) for x in rule[1:-1].split(','))
        return (low <= value if rule[0] == '[' else low < value) and (value <= high if rule[-1] == ']' else value < high)
    op, bound = rule.split()
    return value >= float(bound) if op == '>=' else value > float(bound)


def optional_import(name, message):
    """The optional package name, or a one-line error (message: what needs it and how to install it)."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        die(message)


def quiet_interrupt(message):
    """From now on an uncaught Ctrl-C prints message (one line) instead of a traceback; the
    exit status stays the interrupted one (130 in a shell)."""
    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print(message, file=sys.stderr)
        else:
            sys.__excepthook__(kind, value, traceback)
    sys.excepthook = hook


# -----------------------------------------------------------------------------
# progress of long work

class Progress:
    """Progress of a long loop on stderr, silent for work that ends within `after` seconds.

    On a terminal, a bar redrawn in place; otherwise (a log file, CI) a plain line every `every`
    seconds. close() (or leaving a `with` block) prints a last line if anything was shown; with
    keep=False it erases the bar instead (the caller prints its own result line).

        with cli.Progress('perplexity', total=len(batches), unit='windows') as bar:
            for b in batches:
                ...
                bar.update(len(b))
    """

    def __init__(self, label, total=None, unit='', after=3.0, every=10.0, stream=None, keep=True):
        self.label, self.total, self.unit, self.keep = label, total, unit, keep
        self.after, self.every = after, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
        self.done, self.start, self.shown_at = 0, time.monotonic(), None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _text(self, now):
        elapsed = now - self.start
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            frac = min(self.done / self.total, 1.0)
            left = f", ~{duration(elapsed / frac - elapsed)} left" if 0 < frac < 1 else ""
            count = f"{self.done:,}/{self.total:,}{unit} ({100 * frac:.0f}%)"
            bar = f"[{'#' * int(20 * frac):<20}] " if self.tty else ""
            return f"{self.label}: {bar}{count}, {duration(elapsed)}{left}"
        return f"{self.label}: {self.done:,}{unit}, {duration(elapsed)}"

    def update(self, n=1):
        self.done += n
        now = time.monotonic()
        if now - self.start < self.after:
            return
        wait = 0.5 if self.tty else self.every
        if self.shown_at is not None and now - self.shown_at < wait:
            return
        self.shown_at = now
        self.stream.write(('\r' + self._text(now) + '\033[K') if self.tty else self._text(now) + '\n')
        self.stream.flush()

    def close(self):
        if self.shown_at is None:
            return  # quick work stays silent
        text = self._text(time.monotonic())
        if not self.keep:
            self.stream.write('\r\033[K' if self.tty else '')
        else:
            self.stream.write(('\r' + text + '\033[K\n') if self.tty else text + '\n')
        self.stream.flush()
        self.shown_at = None

class TimeLeft:
    """The time left of a training run: the remaining iterations at a smoothed pace, plus the
    evaluations still to come at the duration of the last one.

    The pace is a moving average over iterations, not over progress lines: a line that averages 50
    iterations outweighs one of a single step. The first line's pace, which holds the start-up cost
    (allocation, compilation), is used until the next line replaces it."""

    def __init__(self, max_iters, eval_interval, hint=""):
        self.max_iters, self.eval_interval, self.hint = max_iters, eval_interval, hint  # hint: for a long run
        self.pace, self.evaluation, self.told = None, 0.0, False
        self.last_iter, self.warm = None, False  # the previous line's iteration; past the first line

    def evaluation_took(self, seconds):
        self.evaluation = seconds

    def after_step(self, iter_num, seconds_per_iter):
        """Seconds left once iter_num iterations are done, each since the last call at seconds_per_iter."""
        if self.pace is None or not self.warm:
            self.warm = self.pace is not None
            self.pace = seconds_per_iter
        else:
            keep = 0.8 ** max(1, iter_num - self.last_iter)  # 0.8 per iteration
            self.pace = keep * self.pace + (1 - keep) * seconds_per_iter
        self.last_iter = iter_num
        next_eval = iter_num + self.eval_interval - iter_num % self.eval_interval
        evaluations = len(range(next_eval, self.max_iters + 1, self.eval_interval))
        return (self.max_iters - iter_num) * self.pace + evaluations * self.evaluation

    def long_run_once(self, seconds_left, limit):
        """True the first time seconds_left exceeds limit, then never again."""
        if self.told or seconds_left <= limit:
            return False
        self.told = True
        return True

    def long_run_notice(self, iter_num, seconds_left, limit=1800):
        """The one line that says a run will take longer than limit seconds (once; else None), at
        the pace in the progress line's words, then the hint (what to run instead)."""
        if not self.long_run_once(seconds_left, limit):
            return None
        return (f"notice: at {self.pace * 1000:.2f}ms/iter, the {self.max_iters - iter_num:,} iterations "
                f"left take about {duration(seconds_left)}{self.hint}")


def duration(seconds):
    """'45s', '3m05s', '2h10m' or '3d4h'."""
    seconds = int(round(seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
