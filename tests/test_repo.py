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
    import cli
    floor = re.search(r"^torch>=([0-9.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert tuple(int(x) for x in floor.split(".")) == cli.MIN_TORCH
    assert "too old" in cli.torch_too_old("2.2.2+cu121") and "pip install -U torch" in cli.torch_too_old("2.1.0")
    assert cli.torch_too_old("2.3.1") is None and cli.torch_too_old("2.13.0+cpu") is None
    assert cli.torch_too_old("3.0.0a0+git1234") is None
