"""``comapoi eval --dataset --type`` on a run that records no holdout prepares the data as the run's
training did: its seed, test size and data policies (``--on``, ``--strict``)."""

from __future__ import annotations

import json
from pathlib import Path

from comapoi_cli.evaluation.runner import EvalRequest, _prepared_holdout
from comapoi_cli.plugins import get_registry
from comapoi_cli.runs.info import RunInfo


def _run(tmp_path: Path, data_dir: Path, job_extra: dict) -> RunInfo:
    job = {"type": "agent3", "dataset": "nyc", "data_dir": str(data_dir), "seed": 42, "test_size": 4, **job_extra}
    return RunInfo(adapter_dir=tmp_path, run_dir=tmp_path, run_json=None, run={"job": job}, is_checkpoint=False)


def _prepared_summary(data_dir: Path) -> dict:
    meta = json.loads((data_dir / "nyc" / "agent3_train_samples.prepared.json").read_text())
    return meta["summary"]


def test_the_recorded_data_policies_prepare_the_holdout(copy_data_dir, tmp_path):
    source = copy_data_dir / "nyc" / "agent3_train_samples.jsonl"
    first = source.read_text().splitlines()[0]
    source.write_text(source.read_text() + first + "\n")  # one exact duplicate
    request = EvalRequest(adapter=tmp_path)

    holdout = _prepared_holdout(request, _run(tmp_path, copy_data_dir, {}), "agent3", "nyc", get_registry())
    assert holdout.is_file()
    assert _prepared_summary(copy_data_dir)["rejected"].get("duplicate") == 1  # the default drops it

    _prepared_holdout(request, _run(tmp_path, copy_data_dir, {"on": ["duplicate=keep"]}), "agent3", "nyc",
                      get_registry())
    summary = _prepared_summary(copy_data_dir)
    assert "duplicate" not in summary["rejected"]  # the run trained with --on duplicate=keep: so is its holdout
    assert summary["policies"]["duplicate"] == "keep"
