"""`comapoi env` tells the truth about this machine."""

from __future__ import annotations

import json
from importlib import metadata

from tests.support import run_comapoi


def test_env_json_matches_this_machine():
    import torch

    result = run_comapoi("env", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["packages"]["torch"] == metadata.version("torch")
    assert report["packages"]["trl"] == metadata.version("trl")
    assert report["packages"]["transformers"] == metadata.version("transformers")
    try:
        unsloth = metadata.version("unsloth")
    except metadata.PackageNotFoundError:
        unsloth = None
    assert report["packages"]["unsloth"] == unsloth
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    backends = {b["name"]: b for b in report["backends"]}
    assert backends["trl"]["usable"] is True
    if unsloth is None:
        assert backends["unsloth"] == {**backends["unsloth"], "usable": False, "reason": "Unsloth is not installed"}


def test_env_table_names_backends_and_cuda():
    result = run_comapoi("env")
    assert result.returncode == 0, result.stderr
    assert "CUDA:" in result.stdout
    assert "unsloth" in result.stdout and "trl" in result.stdout
