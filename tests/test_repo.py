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
    """Every local link and picture in README.md and docs/*.md names a file git tracks (in a
    clean clone: a file that exists), so a picture kept out by .gitignore cannot go unnoticed."""
    import subprocess
    git = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True)
    tracked = set(git.stdout.split()) if git.returncode == 0 and git.stdout else None
    missing = []
    for md in [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]:
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
