"""``data stats`` and ``data clean`` with ``--tokenizer DIR`` never run a tokenizer folder's own code
(``tokenization_*.py`` named by ``auto_map``), even with ``y`` on standard input; ``--trust-remote-code`` does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.support import REPO, plant_remote_code


def _comapoi(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "comapoi_cli", *args], input="y\n" * 50, capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)


def test_data_commands_never_run_a_tokenizers_code_unless_trusted(tiny_model_dir, agent_data_dir, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "remote-code-ran"
    plant_remote_code(folder, marker)
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    data = str(agent_data_dir / "nyc" / "agent3_train_samples.jsonl")

    stats = _comapoi("data", "stats", data, "--tokenizer", str(folder), "--seq-length", "2048", env=env)
    clean = _comapoi("data", "clean", data, "-o", str(tmp_path / "clean.jsonl"), "--tokenizer", str(folder),
                     "--seq-length", "2048", env=env)
    assert not marker.exists(), "the planted tokenization code ran"
    for result in (stats, clean):
        assert "Traceback" not in result.stderr and "[y/N]" not in result.stdout + result.stderr, result.stderr
        assert result.returncode == 0, result.stderr  # the fast tokenizer files load without the planted class

    trusted = _comapoi("data", "stats", data, "--tokenizer", str(folder), "--seq-length", "2048",
                       "--trust-remote-code", env=env)
    assert marker.exists(), trusted.stderr  # the same folder with trust given runs it: the test above can fail
