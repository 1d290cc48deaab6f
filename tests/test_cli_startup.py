"""`comapoi --help` and every sub-command's `--help` start fast: no torch, transformers, trl, ..."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from tests.support import run_comapoi

HEAVY = ("torch", "transformers", "trl", "datasets", "peft", "bitsandbytes", "accelerate", "unsloth")


def command_paths() -> list[list[str]]:
    """Every command path of the real app, e.g. ['data', 'clean'], found by walking its click tree."""
    from comapoi_cli.cli.app import app

    paths: list[list[str]] = [[]]

    def walk(command, prefix):
        for name, sub in getattr(command, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


def imported_modules(args: list[str]) -> set[str]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "comapoi_cli", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    modules = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if not name.startswith("package"):
                modules.add(name)
    return modules


def test_every_group_exists():
    paths = {" ".join(p) for p in command_paths()}
    for expected in ("data clean", "data split", "data merge", "data stats", "data synth", "train",
                     "adapters list", "plugins list", "env"):
        assert expected in paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "comapoi")
def test_help_imports_no_heavy_package(path):
    modules = imported_modules([*path, "--help"])
    assert "comapoi_cli.cli.app" in modules  # the measurement itself works
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"`comapoi {' '.join(path)} --help` imported {heavy[:5]}"


def test_bad_flag_is_one_message_and_exit_2():
    result = run_comapoi("train", "--no-such-flag")
    assert result.returncode == 2
    assert "No such option" in result.stderr
    assert "Traceback" not in result.stderr
