"""Every command in the README and docs/ runs when pasted: lunaseg command lines parse, the
benchmark scripts they name exist and answer --help."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lunaseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_lines(path: Path) -> list[str]:
    """The commands in a Markdown file's fenced bash blocks, continuations joined."""
    lines, block, current = [], False, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh", "```shell") if not block else False
            continue
        if not block:
            continue
        text = line.split("  #")[0].strip() if "  #" in line else line.strip()
        if not text or text.startswith("#"):
            continue
        current += text.rstrip("\\").strip() + " "
        if not text.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return lines


def commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for line in shell_lines(path):
            for command in line.split("&&"):
                found.append((path.name, command.strip()))
    return found


def lunaseg_argv(command: str) -> list[str] | None:
    """The arguments of a lunaseg command line (None when the line runs something else)."""
    words = shlex.split(command)
    for prefix in (["lunaseg"], [".venv/bin/lunaseg"], ["python", "-m", "lunaseg"],
                   [".venv/bin/python", "-m", "lunaseg"]):
        if words[:len(prefix)] == prefix:
            return words[len(prefix):]
    if words and words[0] == "torchrun" and "-m" in words:
        after = words[words.index("-m") + 1:]
        return after[1:] if after and after[0] == "lunaseg" else None
    return None


def test_the_docs_hold_commands():
    assert len([c for _, c in commands() if lunaseg_argv(c) is not None]) >= 10


@pytest.mark.parametrize("where, command", [c for c in commands() if lunaseg_argv(c[1])])
def test_every_lunaseg_command_parses(where, command):
    try:
        build_parser().parse_args(lunaseg_argv(command))
    except SystemExit as error:  # argparse's way to refuse
        pytest.fail(f"{where}: `{command}` does not parse (exit {error.code})")


def scripts_named() -> list[str]:
    """Every benchmark or helper script the docs name, in commands or in tables."""
    named = set()
    for path in DOCS:
        for name in re.findall(r"(?:benchmarks/|scripts/)?\b(bench_\w+\.py|\w+_heldout\.py)", path.read_text()):
            named.add(f"benchmarks/{name}")
    for _, command in commands():
        words = shlex.split(command)
        if words[:1] in (["python"], [".venv/bin/python"]) and len(words) > 1 \
                and words[1].endswith(".py"):
            named.add(words[1])
    return sorted(named)


SCRIPTS = scripts_named()


def test_the_docs_name_scripts():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_named_exists_and_answers_help(script):
    path = ROOT / script
    assert path.is_file(), f"{script} is named in the docs but does not exist"
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
