"""ruff and mypy, configured in pyproject.toml, pass on the whole repository (part of `bash scripts/test.sh`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> list[str]:
    """Run a tool of this interpreter's environment (the `test` extra installs both)."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return [str(beside)]
    if shutil.which(name):
        return [name]
    pytest.fail(f"{name} is not installed: pip install -c constraints/default.txt -e '.[test]'")


def test_ruff_is_clean():
    result = subprocess.run([*_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_is_clean(tmp_path):
    result = subprocess.run([*_tool("mypy"), "--cache-dir", str(tmp_path / "mypy-cache")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_lint_config_is_where_the_tools_read_it():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "[tool.ruff.lint]" in text and "[tool.mypy]" in text and "ignore_missing_imports = true" in text
    for constraints in ("constraints/default.txt", "constraints/unsloth.txt"):
        pins = (ROOT / constraints).read_text(encoding="utf-8").split()
        assert any(p.startswith("ruff==") for p in pins) and any(p.startswith("mypy==") for p in pins), constraints
