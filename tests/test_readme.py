"""The README's commands work exactly as written, where they can run on a CPU in seconds.

The scripts and configs are copied into a temporary folder and every `python ...` command of
the README's sh blocks runs there in README order (one command per line; a line continued with a
backslash is joined, commands joined by && are split), so runs,
data and pictures land under tmp_path, never in the checkout. Commands that cannot run here
(installs, GPUs, downloads, the test suite itself) are skipped by the rules in SKIP; long ones
run as written plus flags that make them short (SHORTEN), which the scripts apply last.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from local_data import NO_SHAKESPEARE, SHAKESPEARE

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ['train.py', 'sample.py', 'prepare.py', 'evaluate.py', 'plot.py', 'bench.py', 'serve.py', 'export.py']

# (substring, why it is not run here)
SKIP = [
    ('venv', 'sets up a virtual environment'),
    ('activate', 'sets up a virtual environment'),
    ('pip install', 'installs packages'),
    ('-m pytest', 'the test suite itself'),
    ('torchrun', 'several processes, GPUs'),
    ('--init_from=gpt2', 'needs the GPT-2 weights (network or Hugging Face cache)'),
    ('config/train_shakespeare_char.py', 'a GPU-sized model'),
    ('config/bench_gpt2.py', 'GPT-2 124M'),
    ('--dataset=wikitext2', 'needs WikiText-2'),
    ('config/gpt2', 'a GPU-sized model'),
    ('fineweb', 'downloads a corpus'),
    ('openwebtext', 'downloads a corpus'),
    ('hellaswag', 'downloads HellaSwag'),
    ('prepare.py shakespeare$', 'downloads Tiny Shakespeare for GPT-2 BPE (only the char version is copied here)'),
    ('out-shakespeare-lora', 'reads the LoRA run, which starts from GPT-2 weights'),
]
# a key ending in '$' matches the end of a command only
# (substring, flags appended so the command takes seconds; later flags win)
SHORTEN = [
    ('train.py', '--max_iters=8 --eval_interval=4 --eval_iters=1 --log_interval=4 --batch_size=8'),
    ('sample.py', '--max_new_tokens=20'),
    ('evaluate.py perplexity', '--batch_size=1024'),
    ('evaluate.py chat', '--limit=20'),
    ('bench.py', '--n_layer=1 --n_embd=32 --n_head=2 --block_size=32 --burn_in=0 --num_iters=1 --repeats=1'),
]


def readme_sh_blocks():
    """The text of every ```sh block of README.md, in order."""
    return re.findall(r"```sh\n(.*?)```", (ROOT / 'README.md').read_text(), re.S)


def readme_commands():
    """Every command of the README's ```sh blocks, in order, split at &&, comments removed."""
    commands = []
    for block in readme_sh_blocks():
        for line in block.replace('\\\n', ' ').splitlines():
            for part in line.split(' && '):
                words = shlex.split(part, comments=True, posix=False)
                if words:
                    commands.append(' '.join(words))
    return commands


def plan():
    """[(command as run, None)] or [(command, reason skipped)], each README command once."""
    out, seen = [], set()
    for command in readme_commands():
        if command in seen:
            continue
        seen.add(command)
        reason = next((why for key, why in SKIP
                       if (command.endswith(key[:-1]) if key.endswith('$') else key in command)), None)
        if reason is None and not command.startswith('python '):
            reason = 'not a python command'
        extra = next((flags for key, flags in SHORTEN if key in command), '')
        out.append((f"{command} {extra}".strip(), reason))
    return out


def copy_repo(tmp_path):
    repo = tmp_path / 'repo'
    repo.mkdir()
    for path in ROOT.glob('*.py'):
        if not path.name.startswith('test_'):
            shutil.copy(path, repo / path.name)
    shutil.copytree(ROOT / 'lib', repo / 'lib', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copytree(ROOT / 'config', repo / 'config')
    return repo


def serve_as_written(command, repo):
    """Start the README's serve.py command on a free port, run the README's Python client block
    against it (its address swapped for the one printed), stop the server with SIGTERM."""
    words = shlex.split(command)
    proc = subprocess.Popen([sys.executable, *words[1:], '--port=0', '--device=cpu'], cwd=repo, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    try:
        seen = ''
        for line in proc.stdout:  # the device line, then 'serving ... at http://...'
            seen += line
            if address := re.search(r"at (http://127\.0\.0\.1:\d+)", line):
                break
        assert address, seen + proc.stderr.read()
        client = re.search(r"```python\n(.*?)```", (ROOT / 'README.md').read_text(), re.S).group(1)
        assert 'http://127.0.0.1:8000' in client
        client = client.replace('http://127.0.0.1:8000', address.group(1))
        r = subprocess.run([sys.executable, '-c', client], cwd=repo, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-1500:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and 'stopped' in out, (out, err)
        assert 'Traceback' not in err, err
        return r
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run(command, cwd):
    words = shlex.split(command)
    assert words[0] == 'python'
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    # stdin is empty: a command that reads it (sample.py --chat) ends as it does at Ctrl-D
    return subprocess.run([sys.executable, *words[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env, stdin=subprocess.DEVNULL)


def test_the_readme_lists_the_commands_a_new_user_needs():
    commands = readme_commands()
    assert commands[0].startswith('python3 -m venv')  # the quick start comes first, from nothing
    assert 'python prepare.py shakespeare_char' in commands
    assert 'python train.py config/train_shakespeare_char_cpu.py' in commands
    assert 'python sample.py --start="ROMEO:"' in commands  # no --out_dir: the newest run folder
    assert 'python -m pytest' in commands
    assert 'python sample.py --out_dir=out-chat-reverse --chat' in commands  # a chat in the terminal
    for script in SCRIPTS:
        assert any(c.startswith(f'python {script}') for c in commands), f"no example of {script}"
    # every run folder a README command reads is one that a README command creates: a train.py
    # command's --out_dir, or the out_dir of a config file it names
    made = set()
    for command in commands:
        if command.startswith(('python train.py', 'torchrun')):
            made.update(re.findall(r"--out_dir=(\S+)", command))
            for config in re.findall(r"(config/\w+\.py)", command):
                made.update(re.findall(r"^out_dir = '(.+?)'", (ROOT / config).read_text(), re.M))
    assert 'out-shakespeare-char-cpu' in made
    for command in commands:
        for folder in re.findall(r"--out_dir=(\S+)", command) + re.findall(r"plot.py loss (\S+)", command):
            assert folder in made, f"{command!r} reads {folder}, which no README command creates"


def test_the_quick_start_is_one_block_from_nothing_to_samples():
    """The first sh block sets up, prepares, trains and samples: one copy-paste, one command per
    line (no && chain, no continuation), in that order."""
    lines = [line.strip() for line in readme_sh_blocks()[0].splitlines() if line.strip()]
    assert lines[0] == 'python3 -m venv .venv', lines
    assert lines[-1] == 'python sample.py --start="ROMEO:"', lines  # no --out_dir: the newest run
    assert not [line for line in lines if '&&' in line or line.endswith('\\')], lines
    order = ['. .venv/bin/activate', 'python prepare.py shakespeare_char',
             'python train.py config/train_shakespeare_char_cpu.py']
    assert all(step in lines for step in order), lines
    assert [lines.index(step) for step in order] == sorted(lines.index(step) for step in order), lines
    assert any(line.startswith('pip install torch') for line in lines[:lines.index(order[1])]), lines


# a knob of each script whose help line is checked: (name, default as in the source, fewest knobs listed)
HELP_KNOB = {'train.py': ('out_dir', "'out'", 12), 'sample.py': ('max_new_tokens', '500', 12),
             'bench.py': ('n_layer', '6', 12), 'serve.py': ('port', '8000', 10)}


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_script_answers_help(script):
    r = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'usage' in r.stdout.lower() and 'Traceback' not in r.stderr
    if script in HELP_KNOB:
        # every knob with its default and its comment from the source
        knob_lines = [line for line in r.stdout.splitlines() if line.startswith('  --')]
        name, default, fewest = HELP_KNOB[script]
        assert len(knob_lines) >= fewest and all(len(line.split(None, 1)) == 2 for line in knob_lines), knob_lines
        source = (ROOT / script).read_text()
        comment = re.search(rf"^{name} = {re.escape(default)}  # (.*)$", source, re.M).group(1)
        assert f"  --{name}={default} " in r.stdout, r.stdout[:500]
        line = next(line for line in knob_lines if line.split()[0] == f"--{name}={default}")
        assert line.split(None, 1)[1] == comment, (line, comment)


def test_help_into_a_closed_pipe_ends_quietly():
    for script in ('prepare.py', 'train.py'):
        r = subprocess.run(f"{shlex.quote(sys.executable)} {script} --help | head -2", shell=True, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert 'Traceback' not in r.stderr and 'BrokenPipe' not in r.stderr, r.stderr
        assert len(r.stdout.splitlines()) == 2


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    repo = copy_repo(tmp_path)
    data = repo / 'data' / 'shakespeare_char'
    if (ROOT / 'data' / 'shakespeare_char' / 'meta.json').is_file():
        shutil.copytree(ROOT / 'data' / 'shakespeare_char', data)
    elif SHAKESPEARE is not None:
        r = run(f"python prepare.py shakespeare_char --input={SHAKESPEARE}", repo)
        assert r.returncode == 0, r.stderr
    else:
        pytest.skip(NO_SHAKESPEARE)
    (repo / 'notes').mkdir()  # the README's own-text example reads notes/
    # the own-text examples read notes/: 30 kB of real text (a BPE of 512 tokens needs enough pairs)
    (repo / "notes" / "a.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30000] if SHAKESPEARE else
                                          "".join(f"Line {i}: to be, or not to be, that is question {i * 7}.\n"
                                                  for i in range(1000)))

    ran = []
    for command, skipped in plan():
        if skipped:
            continue
        if command.startswith('python serve.py'):
            ran.append((command, serve_as_written(command, repo)))
            continue
        r = run(command, repo)
        assert r.returncode == 0, f"{command}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
        assert 'Traceback' not in r.stderr, f"{command}\n{r.stderr[-1500:]}"
        ran.append((command, r))
    outputs = {c.split(' --')[0]: r for c, r in ran}
    # prepare.py NAME on prepared data: says so, downloads nothing
    assert 'already prepared' in outputs['python prepare.py shakespeare_char'].stdout
    # the training run ends with a summary naming the next commands
    train = next(r for c, r in ran if c.startswith('python train.py config/train_shakespeare_char_cpu.py'))
    assert 'best val loss' in train.stdout and 'python sample.py --out_dir=out-shakespeare-char-cpu' in train.stdout
    # the bare sample command found the quick start's run and said so
    sample = next(r for c, r in ran if c.startswith('python sample.py --start="ROMEO:"'))
    assert 'out-shakespeare-char-cpu' in sample.stderr and sample.stdout.startswith('ROMEO:')
    assert (repo / 'out-shakespeare-char-cpu' / 'loss.png').is_file()
    assert (repo / 'out-shakespeare-char-cpu' / 'attention.png').is_file()
    # chat: data in the quick start's characters, a fine-tune of its run on the replies only, a score
    tuned = next(r for c, r in ran if c.startswith('python train.py config/finetune_chat_reverse_cpu.py'))
    assert "loss: on the assistant's tokens only" in tuned.stdout, tuned.stdout
    assert 'vocabulary grows from 65 to 69 ids' in tuned.stdout, tuned.stdout
    scored = next(r for c, r in ran if c.startswith('python evaluate.py chat'))
    assert re.search(r"chat: 20 questions, accuracy [01]\.\d{3}$", scored.stdout.strip()), scored.stdout
    # the README's client got a completion from the README's server
    served = next(r for c, r in ran if c.startswith('python serve.py'))
    assert served.stdout.strip(), served
    # the exported run loads in llama.cpp itself (the test extra llama-cpp-python) and continues text
    exported = repo / 'out-export' / 'model-q8_0.gguf'
    assert exported.is_file(), [c for c, _ in ran if 'export' in c]
    llama_cpp = pytest.importorskip('llama_cpp', reason='loading the GGUF file needs llama-cpp-python')
    llm = llama_cpp.Llama(model_path=str(exported), n_ctx=0, verbose=False)
    assert llm.n_ctx() == 256  # the quick start's block_size, read from the file
    assert llm('ROMEO:', max_tokens=5, temperature=0)['choices'][0]['text']
    assert len(ran) >= 10, [c for c, _ in ran]
