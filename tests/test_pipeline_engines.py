"""The openai engine's HTTP client and the concurrent scheduler, through the real CLI, against real
servers on localhost (tests/openai_server.py --scripted: real HTTP, scripted answers and faults).

Retries (503 then success; 429 with Retry-After), deadlines, the size cap, redirects to another
origin, wrong JSON types, secrets in answers and URLs, escaped server names; the concurrent
scheduler's test-file order, --resume after a deleted line and after Ctrl-C; eval through the
openai engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REAL_DATA, REPO, run_comapoi

KEY = "sk-test-secret-0123456789"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _no_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "timings"} for row in rows]


class Server:
    def __init__(self, *extra: str, names=("agent1", "agent2", "agent3"), log: Path | None = None):
        cmd = [sys.executable, str(REPO / "tests" / "openai_server.py"), "--scripted"]
        for name in names:
            cmd += ["--adapter", f"{name}=-"]
        if log is not None:
            cmd += ["--log", str(log)]
        self.log = log
        self.process = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        assert line.startswith("READY"), line
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> list[dict]:
        return _rows(self.log) if self.log is not None and self.log.exists() else []

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def chain(run: Path, out: Path, url: str, *extra: str, test: Path = REAL_DATA / "nyc_test.jsonl") -> list[str]:
    return ["pipeline", "run", "--dataset", "nyc", "--test", str(test), "--poi-info", str(REAL_DATA / "nyc_poi_info.csv"),
            "--train", str(REAL_DATA / "nyc_train.jsonl"), "--merged", str(run), "--output-dir", str(out),
            "--max-new-tokens", "8", "--engine", "openai", "--url", url, "--api-key", KEY, *extra]


def _files_text(folder: Path) -> str:
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in folder.rglob("*") if p.is_file())


def test_503_then_success_is_retried_and_recorded(trained_run, tmp_path):
    with Server("--fail-first", "2", "--fail-status", "503", log=tmp_path / "log.jsonl") as server:
        result = run_comapoi(*chain(trained_run.run_dir, tmp_path / "out", server.url, "--limit", "1", "--json"))
        assert result.returncode == 0, result.stderr
        chats = [r for r in server.requests() if r["path"].endswith("/chat/completions")]
    (row,) = _rows(tmp_path / "out" / "predictions.jsonl")
    assert len(chats) == 5 + 2  # five chain steps, the first asked three times
    assert row["problems"] == [] and row["timings"]["retries"] == {"agent1.profile": 2}
    assert row["agents"]["agent1"]["profile"]["raw"] == '{"next_poi_id": [1, 2, 3]}'
    assert all(r["authorization"] == f"Bearer {KEY}" for r in chats)
    assert KEY not in _files_text(tmp_path / "out")


def test_429_waits_for_retry_after(trained_run, tmp_path):
    with Server("--fail-first", "1", "--fail-status", "429", "--retry-after", "2", log=tmp_path / "log.jsonl") as server:
        result = run_comapoi(*chain(trained_run.run_dir, tmp_path / "out", server.url, "--limit", "1"))
        assert result.returncode == 0, result.stderr
        chats = [r for r in server.requests() if r["path"].endswith("/chat/completions")]
    assert chats[1]["time"] - chats[0]["time"] >= 1.9  # Retry-After: 2, not the 0.5 s backoff
    (row,) = _rows(tmp_path / "out" / "predictions.jsonl")
    assert row["problems"] == [] and row["timings"]["retries"] == {"agent1.profile": 1}


def test_retries_give_up_with_the_reason(trained_run, tmp_path):
    with Server("--fail-first", "100", "--fail-status", "500") as server:
        result = run_comapoi(*chain(trained_run.run_dir, tmp_path / "out", server.url, "--limit", "1", "--retries", "1"))
    assert result.returncode == 0, result.stderr
    (row,) = _rows(tmp_path / "out" / "predictions.jsonl")
    assert row["agents"]["agent1"]["profile"]["problem"] == "server answered 500: scripted failure 2 (attempt 2)"
    assert len(row["problems"]) == 5 and row["ranking"] == []


@pytest.mark.parametrize("mode, reason", [
    ("number", "the server's answer has a content of type int, not text"),
    ("blank", "the server's answer is blank"),
    ("null", "the server's answer has a null content"),
    ("usage-list", "the server's answer has a usage of type list, not an object"),
    ("huge", "the server's answer is larger than 1,000,000 bytes (not read further)"),
    ("short-body", "request failed: peer closed connection without sending complete message body"),
    ("drip", "no whole answer within --request-timeout 1.5 s"),
])
def test_a_bad_answer_is_a_miss_with_its_reason(trained_run, tmp_path, mode, reason):
    with Server("--chat", mode) as server:
        started = time.monotonic()
        result = run_comapoi(*chain(trained_run.run_dir, tmp_path / "out", server.url, "--limit", "1",
                                    "--request-timeout", "1.5", "--retries", "0"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    (row,) = _rows(tmp_path / "out" / "predictions.jsonl")
    steps = [step for steps in row["agents"].values() for step in steps.values()]
    assert len(steps) == 5 and all(step["raw"] is None and step["problem"].startswith(reason) for step in steps)
    if mode == "drip":
        assert time.monotonic() - started < 60  # five 1.5 s deadlines, not a slow drip of a few hundred bytes


def test_redirect_to_another_origin_is_not_followed(trained_run, tmp_path):
    with Server(log=tmp_path / "elsewhere.jsonl") as elsewhere:
        # 127.0.0.1 and localhost are different origins, even on the same port
        target = f"http://localhost:{elsewhere.port}"
        for status in ("302", "307"):
            with Server("--chat", "redirect", "--redirect-to", target, "--redirect-status", status) as server:
                out = tmp_path / f"out{status}"
                result = run_comapoi(*chain(trained_run.run_dir, out, server.url, "--limit", "1"))
                assert result.returncode == 0, result.stderr
            (row,) = _rows(out / "predictions.jsonl")
            problem = row["agents"]["agent1"]["profile"]["problem"]
            assert problem == (f"server redirected to another origin (http://localhost:{elsewhere.port}/): "
                               "not followed, the API key stays with --url")
        assert elsewhere.requests() == []  # the key never reached the other origin


@pytest.mark.parametrize("with_key", [True, False])
def test_secrets_are_never_recorded(trained_run, tmp_path, with_key):
    import base64

    with Server("--chat", "echo-key", log=tmp_path / "log.jsonl") as server:
        url = f"http://alice:hunter2pass@127.0.0.1:{server.port}/v1"
        args = chain(trained_run.run_dir, tmp_path / "out", url, "--limit", "1")
        if not with_key:
            at = args.index("--api-key")
            args = args[:at] + args[at + 2:]  # no --api-key: the URL's user:pass is the Basic auth
        result = run_comapoi(*args)
        sent = {r["authorization"] for r in server.requests()}
    assert result.returncode == 0, result.stderr
    basic = base64.b64encode(b"alice:hunter2pass").decode()
    assert sent == ({f"Bearer {KEY}"} if with_key else {f"Basic {basic}"})
    (row,) = _rows(tmp_path / "out" / "predictions.jsonl")
    assert row["agents"]["agent1"]["profile"]["raw"] == "your key is " + ("[redacted]" if with_key else "Basic [redacted]")
    recorded = _files_text(tmp_path / "out") + result.stdout + result.stderr
    assert KEY not in recorded and "hunter2pass" not in recorded and basic not in recorded
    record = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert record["settings"]["url"] == f"http://alice:[redacted]@127.0.0.1:{server.port}/v1"


@pytest.mark.parametrize("mode, message", [
    ("list", "answered /v1/models with a JSON list, not a list of models"),
    ("data5", "answered /v1/models with an object whose data is int, not a list of models"),
    ("no-id", "does not serve agent1 (it serves: agent2, agent3)"),
    ("escape", "does not serve agent1 (it serves: agent2, agent3, evil\\x1b[31mRED)"),
])
def test_a_bad_model_list_is_one_sentence(trained_run, tmp_path, mode, message):
    with Server("--models", mode) as server:
        result = run_comapoi(*chain(trained_run.run_dir, tmp_path / "out", server.url, "--limit", "1"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "\x1b[31m" not in result.stderr and "None" not in result.stderr


@pytest.fixture(scope="module")
def concurrent_run(trained_run, tmp_path_factory):
    """All 24 real nyc test trajectories, 8 requests in flight, against a scripted server."""
    out = tmp_path_factory.mktemp("concurrent") / "out"
    with Server() as server:
        result = run_comapoi(*chain(trained_run.run_dir, out, server.url, "--concurrency", "8", "--json"))
    assert result.returncode == 0, result.stderr
    return out


def test_concurrent_lines_are_in_test_order_and_equal_lockstep(concurrent_run, trained_run, tmp_path):
    rows = _rows(concurrent_run / "predictions.jsonl")
    assert [r["user"] for r in rows] == list(range(24))
    assert all(set(r["timings"]) == {"seconds", "stage_seconds"} for r in rows)
    with Server() as server:
        result = run_comapoi(*chain(trained_run.run_dir, tmp_path / "lock", server.url, "--scheduler", "lockstep",
                                    "--batch-size", "8"))
    assert result.returncode == 0, result.stderr
    assert _no_timings(_rows(tmp_path / "lock" / "predictions.jsonl")) == _no_timings(rows)


def test_a_deleted_line_is_run_again_in_its_place(concurrent_run, trained_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(concurrent_run, out)
    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:5] + lines[6:]), encoding="utf-8")
    with Server() as server:
        result = run_comapoi(*chain(trained_run.run_dir, out, server.url, "--concurrency", "8", "--resume", "--json"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["processed"] == 1
    assert _no_timings(_rows(out / "predictions.jsonl")) == _no_timings(_rows(concurrent_run / "predictions.jsonl"))


def test_ctrl_c_stops_cleanly_and_resume_finishes_the_same_file(concurrent_run, trained_run, tmp_path):
    out = tmp_path / "out"
    with Server("--delay", "0.3") as server:
        args = chain(trained_run.run_dir, out, server.url, "--concurrency", "2")
        process = subprocess.Popen([sys.executable, "-m", "comapoi_cli", *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
        predictions = out / "predictions.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if predictions.exists() and predictions.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr
        assert "Interrupted" in stderr and "Traceback" not in stderr
        partial = _rows(predictions)
        assert 2 <= len(partial) < 24 and [r["user"] for r in partial] == list(range(len(partial)))
        resumed = run_comapoi(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert _no_timings(_rows(predictions)) == _no_timings(_rows(concurrent_run / "predictions.jsonl"))


def test_eval_scores_an_adapter_served_by_a_server(trained_run, tmp_path):
    import shutil

    holdout = REAL_DATA / "nyc_test.jsonl"  # plain next-POI records: each answer's first id is scored
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run, ignore=shutil.ignore_patterns("checkpoint-*"))  # eval appends to run.json
    with Server(names=("merged",), log=tmp_path / "log.jsonl") as server:
        result = run_comapoi("eval", "--adapter", str(run), "--engine", "openai", "--url", server.url,
                             "--api-key", KEY, "--data", str(holdout), "--max-new-tokens", "8", "--output-dir", str(tmp_path / "eval"),
                             "--concurrency", "4", "--json")
        chats = [r for r in server.requests() if r["path"].endswith("/chat/completions")]
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)
    rows = _rows(tmp_path / "eval" / "predictions.jsonl")
    records = sum(1 for line in Path(holdout).read_text(encoding="utf-8").splitlines() if line.strip())
    assert len(rows) == len(chats) == records == 24 and entry["skipped"] == 0
    assert all(r["output"] == '{"next_poi_id": [1, 2, 3]}' and r["predicted_poi_ids"][0] == 1 for r in rows)
    assert entry["metrics"]["n"] == 24 and entry["metrics"]["unparsable"] == 0
    assert entry["generation"]["engine"] == "openai" and entry["generation"]["served_name"] == "merged"
    assert KEY not in _files_text(tmp_path / "eval") and KEY not in (run / "run.json").read_text()


def test_eval_scores_a_server_failure_as_a_miss_with_its_reason(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    with Server("--chat", "null", names=("served-merged",)) as server:
        result = run_comapoi("eval", "--adapter", str(run), "--engine", "openai", "--url", server.url, "--served-name",
                             "served-merged", "--data", str(REAL_DATA / "nyc_test.jsonl"),
                             "--retries", "0", "--output-dir", str(tmp_path / "eval"), "--json")
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)
    assert entry["metrics"]["n"] == 24 and entry["metrics"]["acc@20"] == 0 and entry["no_answer"] == 24
    assert entry["generation"]["max_new_tokens"] > 16  # sized with the run's tokenizer, without a local model
    assert "24 records got no answer, scored as misses: the server's answer has a null content" in entry["notes"]
    rows = _rows(tmp_path / "eval" / "predictions.jsonl")
    assert all(r["problem"] == "the server's answer has a null content" and r["rank"] is None for r in rows)
