"""One tiny base per dataset: every role's data trains its tokenizer, and the per-role and merged runs share it.

Real CLI, real training (2 steps of agent3 beside the session's merged run).
"""

from __future__ import annotations

import json
import shutil

from comapoi_cli.models import tiny
from tests.conftest import TRAIN_FAST
from tests.support import run_comapoi


def _base(run_json: dict) -> dict:
    return run_json["base_model"]


def test_role_and_merged_runs_share_the_dataset_base_and_export_together(trained_run, agent_data_dir, tmp_path):
    output = tmp_path / "output"
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), "--type", "agent3",
                         *TRAIN_FAST, "--max_steps", "2", "--save_freq", "2", "--output_dir", str(output))
    assert result.returncode == 0, result.stdout + result.stderr
    (run_json_path,) = output.glob("*/sft-nyc/*/run.json")
    role_run = json.loads(run_json_path.read_text())
    merged, agent3 = _base(trained_run.run_json), _base(role_run)
    assert merged["path"] == agent3["path"] and merged["kind"] == agent3["kind"] == "tiny"
    assert agent3["name"] == f"tiny:nyc:{agent3['key'][:tiny.LABEL_KEY_CHARS]}" and agent3["dataset"] == "nyc"
    corpus = sorted(item["file"].rsplit("/", 1)[1] for item in agent3["corpus"])
    assert corpus == ["agent1_train_samples.jsonl", "agent2_train_samples.jsonl", "agent3_train_samples.jsonl"]

    listed = run_comapoi("adapters", "list", str(output), "--json")
    assert listed.returncode == 0, listed.stderr
    assert agent3["name"] in listed.stdout

    to = tmp_path / "serve"
    exported = run_comapoi("adapters", "export", str(trained_run.run_dir), str(run_json_path.parent), "--to", str(to))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    serve = next(line for line in exported.stdout.splitlines() if line.startswith("vllm serve"))
    assert agent3["path"] in serve and "merged=" in serve and "agent3=" in serve


def test_a_base_from_other_data_has_another_label(agent_data_dir, tmp_path):
    corpus = tiny.tiny_corpus(agent_data_dir / "nyc", ["agent3_train_samples.jsonl", "agent1_train_samples.jsonl",
                                                       "missing_train_samples.jsonl"])
    assert [p.name for p in corpus] == ["agent1_train_samples.jsonl", "agent3_train_samples.jsonl"]
    one = tiny.ensure_tiny_model(corpus[:1], cache=tmp_path, dataset="nyc")
    two = tiny.ensure_tiny_model(corpus, cache=tmp_path, dataset="nyc")
    assert one != two and tiny.tiny_label(one) != tiny.tiny_label(two)
    assert tiny.tiny_label(one).startswith("tiny:nyc:") and tiny.tiny_label(tmp_path) == "tiny"


def test_the_build_reports_progress(agent_data_dir, tmp_path):
    from tests.test_models import Recorder

    reporter = Recorder()
    folder = tiny.ensure_tiny_model([agent_data_dir / "nyc" / "agent2_train_samples.jsonl"], cache=tmp_path,
                                    dataset="nyc", reporter=reporter)
    kinds = [e[0] for e in reporter.events]
    assert kinds == ["info", "start", "update", "update", "update", "stop"]
    assert reporter.events[1] == ("start", 3, "building the tiny model", "steps")
    assert tiny.tiny_label(folder) in reporter.events[0][1]
    again = Recorder()
    tiny.ensure_tiny_model([agent_data_dir / "nyc" / "agent2_train_samples.jsonl"], cache=tmp_path, reporter=again)
    assert again.events == []  # cached: nothing to say


def test_eval_rebuilds_a_cleared_tiny_base_from_the_recorded_corpus(trained_run, tmp_path, monkeypatch):
    from comapoi_cli.models import resolve_base_model
    from comapoi_cli.runs.info import locate_run

    run = locate_run(trained_run.run_dir)
    recorded = _base(trained_run.run_json)["path"]
    monkeypatch.setenv("COMAPOI_CACHE", str(tmp_path / "fresh-cache"))
    copy = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, copy)
    data = json.loads((copy / "run.json").read_text())
    data["base_model"]["path"] = str(tmp_path / "gone")
    (copy / "run.json").write_text(json.dumps(data))
    rebuilt = resolve_base_model(None, locate_run(copy))
    assert rebuilt.startswith(str(tmp_path / "fresh-cache")) and rebuilt.endswith(recorded.rsplit("/", 1)[1])
    assert resolve_base_model(None, run) == recorded
