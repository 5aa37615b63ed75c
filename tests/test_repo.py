"""Repository hygiene that CI relies on."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tests", 1)[1]
    return re.search(r"```sh\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f"README's test command {command!r} is not a line of .ci/run"


def test_runtime_requirements_are_the_four_packages():
    reqs = [line.split(">=")[0].split("==")[0].strip()
            for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert sorted(reqs) == ["numpy", "requests", "tiktoken", "torch"], reqs


def test_torch_floor_is_stated_once_and_enforced():
    """requirements.txt's torch floor is cli.MIN_TORCH, and an older torch gets one clear line."""
    from lib import cli
    floor = re.search(r"^torch>=([0-9.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert tuple(int(x) for x in floor.split(".")) == cli.MIN_TORCH
    assert "too old" in cli.torch_too_old("2.2.2+cu121") and "pip install -U torch" in cli.torch_too_old("2.1.0")
    assert cli.torch_too_old("2.3.1") is None and cli.torch_too_old("2.13.0+cpu") is None
    assert cli.torch_too_old("3.0.0a0+git1234") is None


def test_readme_pictures_and_numbers_come_from_the_current_quick_start_config():
    """assets/loss.png and attention.png record (PNG Description) the run that drew them: its
    knobs must be those of config/train_shakespeare_char_cpu.py as it is now, and README must
    state that run's val loss and steps. Changing the recipe without redrawing fails here."""
    import json
    Image = __import__('pytest').importorskip('PIL.Image')
    from lib import cli
    from helpers import train_defaults
    recipe = cli.load_config(train_defaults(), [str(ROOT / 'config' / 'train_shakespeare_char_cpu.py')])
    readme = (ROOT / 'README.md').read_text()
    for name in ('loss.png', 'attention.png'):
        described = json.loads(Image.open(ROOT / 'assets' / name).text['Description'])
        run = described['runs'][0]
        assert {k: run['config'][k] for k in recipe} == recipe, f"assets/{name} was drawn from another recipe"
    assert f"{run['best_val_loss']:.4f} after {run['iterations']:,} steps" in readme


def test_markdown_links_point_at_files_in_the_repository():
    """Every local link and picture in README.md, docs/*.md and dev/*.md names a file git tracks (in a
    clean clone: a file that exists), so a picture kept out by .gitignore cannot go unnoticed."""
    import subprocess
    git = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True)
    tracked = set(git.stdout.split()) if git.returncode == 0 and git.stdout else None
    missing = []
    for md in [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md')), *sorted((ROOT / 'dev').glob('*.md'))]:
        for target in re.findall(r'\]\(([^)\s]+)\)', md.read_text()):
            if re.match(r'[a-z]+:', target) or target.startswith('#'):
                continue  # a web address or an anchor on the same page
            path = (md.parent / target.split('#')[0]).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else None
            known = path.exists() if tracked is None else (
                rel in tracked or any(t.startswith(f'{rel}/') for t in tracked))
            if not known:
                missing.append(f'{md.relative_to(ROOT)}: {target}')
    assert not missing, missing


# Where the text of the repository lives: what a reader or a contributor opens.
TEXT_SUFFIXES = {'.py', '.md', '.sh', '.html', '.txt', '.ini', '.toml', '.cfg', '.yml', '.yaml'}
SKIP_DIRS = {'.git', '.venv', 'venv', 'data', '__pycache__', '.pytest_cache'}


def repository_text_files():
    """The tracked text files (every text file outside data and environments without git)."""
    import subprocess
    git = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True)
    if git.returncode == 0 and git.stdout:
        paths = [ROOT / line for line in git.stdout.splitlines()]
    else:
        paths = [p for p in ROOT.rglob('*') if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in paths if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.parent.name == '.ci'))


# The word issue followed by a number (with or without '#'), or a bare number after '#' in
# parentheses: a tracker's number means nothing to a reader of a clone, and goes stale.
ISSUE_NUMBER = re.compile(r"\bissues? #?\d+|\(#\d+\)", re.I)


def test_no_issue_numbers_in_readme_docs_code_or_tests():
    """README, docs/, dev/, the code and the tests say what a thing is and why, never which
    tracker issue asked for it."""
    found = []
    for path in repository_text_files():
        for n, line in enumerate(path.read_text(encoding='utf-8', errors='replace').splitlines(), 1):
            if ISSUE_NUMBER.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "issue numbers (say what and why instead):\n" + "\n".join(found)


def test_docs_holds_guides_not_scripts():
    """docs/ is for reading; a script that measures or compares lives in dev/ beside the lab
    notebook (dev/LOG.md)."""
    scripts = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / 'docs').rglob('*')
                     if p.suffix in ('.py', '.sh') or (p.is_file() and p.read_bytes()[:2] == b'#!'))
    assert not scripts, f"scripts in docs/ (move them to dev/): {scripts}"


def test_readme_stays_short():
    """README is a newcomer's first page: at most 250 lines; details belong in docs/, measurements
    in docs/benchmarks.md and dev/LOG.md."""
    lines = (ROOT / 'README.md').read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details to docs/"


def test_lab_notebook_entries_are_dated_newest_first():
    """dev/LOG.md: every entry is a '## YYYY-MM-DD...' heading, newest first."""
    import datetime
    headings = re.findall(r"^## (.*)$", (ROOT / 'dev' / 'LOG.md').read_text(), re.M)
    assert headings
    dates = []
    for heading in headings:
        match = re.match(r"(\d{4}-\d{2}-\d{2})\b", heading)
        assert match, f"dev/LOG.md entry without a date first: {heading!r}"
        dates.append(datetime.date.fromisoformat(match.group(1)))
    assert dates == sorted(dates, reverse=True), [str(d) for d in dates]


def test_each_lib_module_is_listed_with_its_job_and_stays_under_650_lines():
    """lib/ holds one job per file: lib/__init__.py names every module, and none grows past
    ~650 lines (a bigger one holds two jobs: split it, as runs.py and loading.py were)."""
    index = (ROOT / 'lib' / '__init__.py').read_text()
    for path in sorted((ROOT / 'lib').glob('*.py')):
        if path.name == '__init__.py':
            continue
        assert re.search(rf"^    {re.escape(path.name)}\s", index, re.M), f"lib/__init__.py does not list {path.name}"
        lines = len(path.read_text().splitlines())
        assert lines <= 650, f"lib/{path.name} has {lines} lines: split it by job"


SCRIPTS = {'train', 'sample', 'prepare', 'evaluate', 'plot', 'bench', 'serve', 'export'}


def project_imports(path):
    """The project modules path imports, at the top or inside a function: 'model', 'lib.NAME',
    a script's name, or a test module's (tests/ is on the path while the suite runs)."""
    import ast
    ours = SCRIPTS | {'model', 'lib'} | {p.stem for p in (ROOT / 'tests').glob('*.py')}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = ([f"lib.{alias.name}" for alias in node.names] if node.module == 'lib' else [node.module])
        else:
            continue
        found |= {name for name in names if name.split('.')[0] in ours and name != 'lib'}
    return found


def test_imports_go_one_way():
    """model.py imports nothing of ours; lib/ imports model.py and lib/ only, without cycles;
    no script imports another script; no test module imports another (helpers.py, conftest.py
    and local_data.py are not test modules)."""
    assert project_imports(ROOT / 'model.py') == set()
    graph = {f"lib.{p.stem}": project_imports(p) for p in (ROOT / 'lib').glob('*.py') if p.stem != '__init__'}
    for module, imports in graph.items():
        assert imports <= set(graph) | {'model'}, f"{module} imports {sorted(imports - set(graph) - {'model'})}"
    for name in SCRIPTS:
        assert not project_imports(ROOT / f'{name}.py') & SCRIPTS, f"{name}.py imports another script"
    for path in (ROOT / 'tests').glob('test_*.py'):
        others = {m for m in project_imports(path) if m.startswith('test_')}
        assert not others, f"{path.name} imports the test modules {sorted(others)}"

    def cycle_from(module, trail):
        for nxt in sorted(graph.get(module, ())):
            if nxt in trail:
                return trail[trail.index(nxt):] + [nxt]
            found = cycle_from(nxt, trail + [nxt])
            if found:
                return found
        return None
    for module in sorted(graph):
        cycle = cycle_from(module, [module])
        assert cycle is None, "lib/ imports in a circle: " + " -> ".join(cycle)
