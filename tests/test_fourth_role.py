"""A fourth agent role from a plugin joins every workflow with no change outside the plugin.

The example critic (``plugins/comapoi-critic``, role ``agent4``, installed with pip into a folder of its
own) is the plugin: ``data synth --role agent4`` writes its training file, ``train --type agent4``
trains on it, ``eval`` scores the run with the role's parser, and ``pipeline run --agent4 RUN`` (a flag
made from the registered roles) puts it in the chain after the Final_Predictor. Real CLI, real tiny
models on the CPU.
"""

from __future__ import annotations

import json

from tests.conftest import TRAIN_FAST
from tests.support import run_comapoi
from tests.test_plugins import critic_site  # noqa: F401  (the installed example plugin, a fixture)


def _run_dir(output, role: str):
    (run_json,) = [p for p in output.glob("*/sft-*/*/run.json") if f"-{role}-" in p.parent.name]
    return run_json.parent


def test_a_plugin_role_joins_synth_train_eval_and_the_chain(critic_site, tmp_path):  # noqa: F811
    env = {"PYTHONPATH": str(critic_site), "COMAPOI_PLUGINS": "critic"}
    data = tmp_path / "data"
    synth = run_comapoi("data", "synth", "--dataset", "nyc", "--output-dir", str(data), "--trajectories", "24",
                        "--seed", "3", "--min-checkins", "3", "--max-checkins", "6", "--role", "agent4", "--json", env=env)
    assert synth.returncode == 0, synth.stderr
    records = json.loads(synth.stdout)["records"]
    assert records["agent4_train_samples.jsonl"] == 24 and records["agent3_train_samples.jsonl"] == 24
    first = json.loads((data / "nyc" / "agent4_train_samples.jsonl").read_text().splitlines()[0])
    assert "Rerank the Final_Predictor's list" in first["messages"][1]["content"]
    assert len(json.loads(first["messages"][2]["content"])["reranked_poi_ids"]) == 10
    # not asked for, the optional role writes nothing; without the plugin, --role agent4 is one sentence
    plain = run_comapoi("data", "synth", "--dataset", "nyc", "--output-dir", str(tmp_path / "plain"), "-n", "3",
                        "--json", env=env)
    assert "agent4_train_samples.jsonl" not in json.loads(plain.stdout)["records"]
    unknown = run_comapoi("data", "synth", "--output-dir", str(tmp_path / "x"), "-n", "3", "--role", "agent4",
                          env={"COMAPOI_PLUGINS": ""})
    assert unknown.returncode == 2 and "Unknown agent role 'agent4'" in unknown.stderr

    output = tmp_path / "output"
    for type_, steps in (("merged", "4"), ("agent4", "2")):
        trained = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(data), "--type", type_, *TRAIN_FAST,
                              "--max_steps", steps, "--save_freq", steps, "--output_dir", str(output), env=env)
        assert trained.returncode == 0, trained.stdout + trained.stderr
    merged, critic = _run_dir(output, "merged"), _run_dir(output, "agent4")
    assert json.loads((critic / "run.json").read_text())["job"]["type"] == "agent4"

    evaluated = run_comapoi("eval", "--adapter", str(critic), "--max-new-tokens", "8", "--json", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    entry = json.loads(evaluated.stdout)
    assert entry["role"] == "agent4" and entry["metrics"]["n"] == 4  # the role's holdout: --test-size 4

    help_text = run_comapoi("pipeline", "run", "--help", env=env).stdout
    assert "--agent4" in help_text and "Critic" in help_text
    out = tmp_path / "chain"
    chain = run_comapoi("pipeline", "run", "--dataset", "nyc", "--test", str(data / "nyc" / "nyc_test.jsonl"),
                        "--merged", str(merged), "--agent4", str(critic), "--output-dir", str(out), "--limit", "1",
                        "--batch-size", "1", "--max-new-tokens", "8", "--json", env=env)
    assert chain.returncode == 0, chain.stderr
    record = json.loads((out / "pipeline.json").read_text())
    assert record["settings"]["chain"][-2:] == ["agent3.ranking", "agent4.rerank"]
    row = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert list(row["agents"]) == ["agent1", "agent2", "agent3", "agent4"] and row["final_step"] == "agent4.rerank"
    # --merged serves the required roles only: without --agent4 the chain is CoMaPOI's three
    three = run_comapoi("pipeline", "run", "--dataset", "nyc", "--test", str(data / "nyc" / "nyc_test.jsonl"),
                        "--merged", str(merged), "--output-dir", str(tmp_path / "three"), "--limit", "1",
                        "--batch-size", "1", "--max-new-tokens", "8", "--json", env=env)
    assert three.returncode == 0, three.stderr
    assert json.loads((tmp_path / "three" / "pipeline.json").read_text())["settings"]["chain"][-1] == "agent3.ranking"
