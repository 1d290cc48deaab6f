"""comapoi pipeline end to end on the real nyc test trajectories (../shared/data/real/), with the
session's tiny merged run as agent1, agent2 and agent3, through both engines: the local
transformers engine and the openai engine against a real OpenAI-compatible server on localhost
(tests/openai_server.py). Also: resume after kill -9, re-scoring, the critic plugin in the chain."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REAL_DATA, REPO, run_comapoi

NEW_TOKENS = "8"  # the tiny model's answers are noise; a few tokens per agent answer keep this fast


def _no_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "timings"} for row in rows]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _chain_args(test: Path, run: Path, out: Path, *extra: str) -> list[str]:
    return ["pipeline", "run", "--dataset", "nyc", "--test", str(test), "--poi-info", str(REAL_DATA / "nyc_poi_info.csv"),
            "--train", str(REAL_DATA / "nyc_train.jsonl"), "--merged", str(run), "--output-dir", str(out),
            "--max-new-tokens", NEW_TOKENS, *extra]


@pytest.fixture(scope="module")
def test_file(tmp_path_factory) -> Path:
    """The 24 real nyc test trajectories with two broken lines among them (they must land in the rejects)."""
    lines = (REAL_DATA / "nyc_test.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path_factory.mktemp("chain-test") / "nyc_test.jsonl"
    broken = ['{"messages": [{"role": "user", "content": "no trajectory here"}, {"role": "assistant", "content": "1"}]}\n',
              '{"messages": [truncated\n']
    path.write_text("".join(lines[:3] + broken[:1] + lines[3:10] + broken[1:] + lines[10:]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory, trained_run, test_file):
    out = tmp_path_factory.mktemp("chain") / "out"
    result = run_comapoi(*_chain_args(test_file, trained_run.run_dir, out, "--batch-size", "8", "--compat", "comapoi", "--json"))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, json.loads(result.stdout)


def test_chain_runs_end_to_end_on_the_real_test_trajectories(chain_run, test_file):
    out, summary = chain_run
    rows = _rows(out / "predictions.jsonl")
    real = [json.loads(line) for line in (REAL_DATA / "nyc_test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 24 and summary["processed"] == 24
    assert [r["label"] for r in rows] == [json.loads(r["messages"][2]["content"])["next_poi_id"] for r in real]
    assert [r["user"] for r in rows] == list(range(24))
    rejects = _rows(out / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (4, "no '<historical trajectory of user_U_subtrajectory_S>' header"), (12, "not JSON (Expecting value)")]
    for row in rows:
        assert list(row["agents"]) == ["agent1", "agent2", "agent3"]
        assert list(row["agents"]["agent1"]) == ["profile", "candidates"] and list(row["agents"]["agent2"]) == ["pattern", "candidates"]
        assert all(isinstance(step["raw"], str) for steps in row["agents"].values() for step in steps.values())
        assert row["final_step"] == "agent3.ranking" and row["ranking"] == row["agents"]["agent3"]["ranking"]["ranking"]
        assert len(row["retrieved"]) == 100 and row["baselines"]["frequent"]
        assert set(row["timings"]) == {"batch", "batch_size", "batch_seconds", "stage_seconds"}
    scores = summary["scores"]
    assert scores["n"] == 24 and set(scores["stages"]) == {"agent1 candidates", "retrieved", "agent2 candidates", "final top-10"}
    assert scores["baselines"]["frequent"]["acc@20"] > 0  # the users' own POIs find some labels
    record = json.loads((out / "pipeline.json").read_text())
    assert record["scores"] == scores and record["settings"]["chain"][-1] == "agent3.ranking"
    assert len(set(record["settings"]["adapters"])) == 1  # one merged run: one adapter loaded, for three roles
    # pipeline score reproduces the run's numbers from the file alone
    rescored = run_comapoi("pipeline", "score", str(out / "predictions.jsonl"), "--compat", "comapoi", "--json")
    assert rescored.returncode == 0 and json.loads(rescored.stdout) == scores
    table = run_comapoi("pipeline", "score", str(out / "predictions.jsonl"), "--compat", "comapoi")
    assert "CoMaPOI's eval would print" in table.stdout and "final top-10" in table.stdout


def test_existing_predictions_need_resume_or_overwrite(chain_run, trained_run, test_file):
    out, _ = chain_run
    again = run_comapoi(*_chain_args(test_file, trained_run.run_dir, out, "--batch-size", "8"))
    assert again.returncode != 0 and "already holds predictions" in again.stderr and "Traceback" not in again.stderr
    changed = run_comapoi(*_chain_args(test_file, trained_run.run_dir, out, "--batch-size", "4", "--resume"))
    assert changed.returncode != 0 and "other settings (batch_size)" in changed.stderr


def test_killed_run_resumes_to_the_same_file(chain_run, trained_run, test_file, tmp_path):
    full, _ = chain_run
    out = tmp_path / "killed"
    args = _chain_args(test_file, trained_run.run_dir, out, "--batch-size", "8", "--limit", "16")
    env = {**os.environ, "NO_COLOR": "1"}
    process = subprocess.Popen([sys.executable, "-m", "comapoi_cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    predictions = out / "predictions.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if predictions.exists() and predictions.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert predictions.read_bytes().count(b"\n") == 8  # the first batch made it, the second did not
    resumed = run_comapoi(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["done_before"] == 8 and summary["processed"] == 8
    # the same file as the uninterrupted run's first 16 lines, timings aside
    assert _no_timings(_rows(predictions)) == _no_timings(_rows(full / "predictions.jsonl")[:16])


def _server(base: str, tokenizer: str, adapters: dict[str, Path]) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, str(REPO / "tests" / "openai_server.py"), "--base-model", base, "--tokenizer", tokenizer]
    for name, folder in adapters.items():
        cmd += ["--adapter", f"{name}={folder}"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if not line.startswith("READY"):
        server.kill()
        raise AssertionError(f"the test server did not start: {line}{server.stderr.read()}")
    return server, int(line.split()[1])


def test_openai_engine_against_a_real_local_server_equals_the_local_engine(role_runs, test_file, tmp_path):
    """Three per-role runs on the dataset's shared tiny base: served as agent1/agent2/agent3 by a real
    OpenAI-compatible server, and loaded on one base by the local engine; the answers are the same."""
    from comapoi_cli.models.loading import tokenizer_folder
    from comapoi_cli.runs.info import locate_run

    bases = {json.loads((run / "run.json").read_text())["base_model"]["path"] for run in role_runs.values()}
    assert len(bases) == 1  # one shared base
    base = bases.pop()
    agents = [arg for role, run in role_runs.items() for arg in (f"--{role}", str(run))]

    def chain(out: Path, *extra: str) -> list[str]:
        return ["pipeline", "run", "--dataset", "nyc", "--test", str(test_file), "--train", str(REAL_DATA / "nyc_train.jsonl"),
                "--poi-info", str(REAL_DATA / "nyc_poi_info.csv"), *agents, "--output-dir", str(out), "--max-new-tokens", NEW_TOKENS,
                "--limit", "2", *extra]

    server, port = _server(base, str(tokenizer_folder(locate_run(role_runs["agent1"]), base)), role_runs)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        served = run_comapoi(*chain(tmp_path / "http", "--engine", "openai", "--url", url, "--batch-size", "2"))
        assert served.returncode == 0, served.stderr
        wrong = run_comapoi(*chain(tmp_path / "wrong", "--engine", "openai", "--url", url, "--served-name", "agent3=final"))
        assert wrong.returncode != 0 and "does not serve final" in wrong.stderr and "Traceback" not in wrong.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
    down = run_comapoi(*chain(tmp_path / "down", "--engine", "openai", "--url", url))
    assert down.returncode != 0 and "Cannot reach an OpenAI-compatible server" in down.stderr
    local = run_comapoi(*chain(tmp_path / "local", "--batch-size", "1"))
    assert local.returncode == 0, local.stderr
    record = json.loads((tmp_path / "local" / "pipeline.json").read_text())
    assert sorted(record["settings"]["adapters"]) == ["agent1", "agent2", "agent3"]  # three adapters on one base
    http_rows, local_rows = _rows(tmp_path / "http" / "predictions.jsonl"), _rows(tmp_path / "local" / "predictions.jsonl")
    assert len(http_rows) == 2
    raw = lambda rows: [{r: {s: v["raw"] for s, v in steps.items()} for r, steps in row["agents"].items()} for row in rows]  # noqa: E731
    assert raw(http_rows) == raw(local_rows)
    assert [r["ranking"] for r in http_rows] == [r["ranking"] for r in local_rows]


def test_base_models_must_match(trained_run, test_file, tmp_path):
    other = tmp_path / "other-run"
    shutil.copytree(trained_run.run_dir, other, ignore=shutil.ignore_patterns("checkpoint-*"))
    base = tmp_path / "other-base"
    shutil.copytree(trained_run.run_json["base_model"]["path"], base)
    record = json.loads((other / "run.json").read_text())
    record["base_model"]["path"] = str(base)
    (other / "run.json").write_text(json.dumps(record))
    result = run_comapoi("pipeline", "run", "--dataset", "nyc", "--test", str(test_file), "--train", str(REAL_DATA / "nyc_train.jsonl"),
                         "--poi-info", str(REAL_DATA / "nyc_poi_info.csv"), "--agent1", str(trained_run.run_dir),
                         "--agent2", str(other), "--agent3", str(trained_run.run_dir), "--output-dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "do not share their base model" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def critic_site(tmp_path_factory) -> Path:
    """The example critic plugin (plugins/comapoi-critic) installed with pip into a folder of its own."""
    target = tmp_path_factory.mktemp("critic-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(REPO / "plugins" / "comapoi-critic")],
                   check=True, capture_output=True, text=True)
    return target


def test_critic_plugin_joins_the_chain_after_agent3(critic_site, trained_run, test_file, tmp_path):
    out = tmp_path / "critic"
    result = run_comapoi(*_chain_args(test_file, trained_run.run_dir, out, "--role", f"agent4={trained_run.run_dir}",
                                      "--limit", "1", "--batch-size", "1", "--json"),
                         env={"PYTHONPATH": str(critic_site), "COMAPOI_PLUGINS": "critic"})
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "pipeline.json").read_text())
    assert record["settings"]["chain"] == ["agent1.profile", "agent1.candidates", "agent2.pattern", "agent2.candidates",
                                           "agent3.ranking", "agent4.rerank"]
    row = _rows(out / "predictions.jsonl")[0]
    assert list(row["agents"]) == ["agent1", "agent2", "agent3", "agent4"]
    assert row["final_step"] == "agent4.rerank" and row["ranking"] == row["agents"]["agent4"]["rerank"]["ranking"]


def test_transformers_engine_one_base_switched_adapters_and_context_misses(trained_run):
    from comapoi_cli.default_plugins.pipeline_engines import TransformersEngine
    from comapoi_cli.engines import EngineSpec
    from comapoi_cli.models.loading import tokenizer_folder
    from comapoi_cli.reporting import Reporter
    from comapoi_cli.runs.info import locate_run

    run = locate_run(trained_run.run_dir)
    base = trained_run.run_json["base_model"]["path"]
    first = trained_run.run_dir / "checkpoint-4"
    spec = EngineSpec(base_model=base, adapters={"early": first, "final": trained_run.run_dir},
                      role_adapters={"agent1": "early", "agent3": "final"}, tokenizer=str(tokenizer_folder(run, base)),
                      device="cpu", quant="none", batch_size=2)
    session = TransformersEngine().open(spec, Reporter())
    model = session.loaded.model
    assert session.loaded.adapter_names == ["early", "final"] and sorted(model.peft_config) == ["early", "final"]
    prompts = [[{"role": "user", "content": "user_id: 0, subtrajectory_id: 1\nList the next POI ids."}],
               [{"role": "user", "content": "At 2012-04-04 15:36:09, Wednesday, user 0 visit POI ID 12. " * 40}]]
    early = session.generate("early", prompts[:1], 6)
    final = session.generate("final", prompts[:1], 6)
    assert session.loaded.model is model and session.loaded.active_adapter == "final"  # switched, not reloaded
    assert early[0].text is not None and final[0].text is not None
    session.max_context = early[0].prompt_tokens + 10  # as if the model's context were that short
    answers = session.generate("final", prompts, 6)
    assert answers[0].text == final[0].text and answers[0].problem is None
    assert answers[1].text is None and "exceeds the model's context" in answers[1].problem and "never truncated" in answers[1].problem
