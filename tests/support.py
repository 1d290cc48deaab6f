"""Helpers shared by the tests: running the real CLI in a subprocess, locating ../shared."""

from __future__ import annotations

import json
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


def plant_remote_code(folder: Path, marker: Path) -> None:
    """A model folder whose tokenizer and model ask for their own code, which writes ``marker`` when run."""
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (folder / "tokenization_evil.py").write_text(
        code + "from transformers import PreTrainedTokenizerFast\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (folder / "modeling_evil.py").write_text(
        code + "from transformers import Qwen2ForCausalLM\n\nclass EvilModel(Qwen2ForCausalLM):\n    pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
