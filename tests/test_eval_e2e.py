"""End to end on the CPU, through the real CLI: train the tiny model, evaluate it on the run's
holdout with ``comapoi eval``, and score the written predictions again with ``comapoi eval score``."""

from __future__ import annotations

import json

import pytest

from tests.support import run_comapoi

METRICS = {"acc@1", "acc@5", "acc@10", "acc@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr", "unparsable", "n"}


@pytest.mark.slow
def test_train_eval_then_score_gives_identical_numbers(tmp_path, copy_data_dir):
    output = tmp_path / "output"
    trained = run_comapoi(
        "train", "--dataset", "nyc", "--data-dir", str(copy_data_dir), "--type", "agent3", "--model", "tiny",
        "--seq-length", "4096", "--batch-size", "2", "--learning-rate", "3e-3", "--warmup-steps", "0",
        "--neftune-alpha", "0", "--test-size", "4", "--max_steps", "2", "--save_freq", "2",
        "--output_dir", str(output))
    assert trained.returncode == 0, trained.stdout + trained.stderr
    (run_json,) = output.glob("*/sft-nyc/*/run.json")
    run_dir = run_json.parent
    holdout = json.loads(run_json.read_text())["data"]["holdout_file"]
    assert holdout.endswith("agent3_train_samples_100.jsonl")

    evaluated = run_comapoi("eval", "--adapter", str(run_dir), "--max-new-tokens", "12", "--batch-size", "3")
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert "acc@1" in evaluated.stdout and "with the adapter" in evaluated.stderr  # the table, the loading note
    assert "Traceback" not in evaluated.stderr

    entry = json.loads((run_dir / "metrics.json").read_text())
    metrics = entry["metrics"]
    assert set(metrics) == METRICS and metrics["n"] == 4
    run = json.loads(run_json.read_text())
    (recorded,) = run["evaluations"]
    assert recorded["metrics"] == metrics and recorded["data"].endswith("agent3_train_samples_100.jsonl")
    assert len(recorded["data_sha256"]) == 64 and recorded["time"]
    assert run["job"]["type"] == "agent3" and run["status"]  # training's sections are kept
    assert (run_dir / "metrics.csv").read_text().startswith("scope,acc@1,")

    lines = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert {"id", "prompt_sha256", "output", "predicted_poi_ids", "label"} <= set(line)
        assert isinstance(line["label"], int) and isinstance(line["output"], str)

    for extra in ((), ("--reparse",)):
        scored = run_comapoi("eval", "score", str(run_dir / "predictions.jsonl"), "--json", *extra)
        assert scored.returncode == 0, scored.stderr
        assert json.loads(scored.stdout)["metrics"] == metrics
