"""Helpers shared by the tests: running the real CLI in a subprocess, locating ../shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: ``../shared`` beside the checkout (CI has it there): real CoMaPOI samples, the reference notes.
SHARED = REPO.parent / "shared"
REAL_DATA = SHARED / "data" / "real"


def run_comapoi(*args: str, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python -m comapoi_cli ARGS`` in a fresh process and capture its output (never raises on exit code)."""
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "comapoi_cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)
