"""Issue 12's data defects, each reproduced through the real CLI: a 4,300+-digit integer, orphaned
workers and SIGTERM, stale temporary files, unbounded merge weights, failed cleans, pipes, bad
output paths, out-of-range options and non-integer agent3 answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import REPO, run_comapoi

HUGE = "9" * 5000  # Python refuses to convert integers of more than 4,300 digits


def _agent3_lines(agent_data_dir: Path) -> list[str]:
    return (agent_data_dir / "nyc" / "agent3_train_samples.jsonl").read_text().splitlines()


def _with_answer(line: str, answer: str) -> str:
    record = json.loads(line)
    record["messages"][-1]["content"] = answer
    return json.dumps(record)


def _rejects(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_huge_integer_rejects_one_line_in_clean_stats_and_prepare(tmp_path, agent_data_dir):
    good = _agent3_lines(agent_data_dir)[:6]
    bad = [_with_answer(good[0], '{"next_poi_id": [' + HUGE + ", 3]}"),
           _with_answer(good[1], "The next POI is " + HUGE),
           good[2].replace('"content": "', '"content": ' + HUGE + ', "x": "', 1)]  # a JSON integer literal
    data = tmp_path / "data" / "nyc"
    data.mkdir(parents=True)
    source = data / "agent3_train_samples.jsonl"
    source.write_text("\n".join(good + bad) + "\n")

    clean = run_comapoi("data", "clean", str(source), "--type", "agent3", "--dataset", "nyc", "--json")
    assert clean.returncode == 0, clean.stderr
    summary = json.loads(clean.stdout)
    assert summary["kept"] == 6 and summary["lines_in"] == 9
    rejects = _rejects(data / "agent3_train_samples_clean.rejects.jsonl")
    assert [r["line"] for r in rejects] == [7, 8, 9]
    assert "5000 digits" in rejects[0]["detail"] and "5000 digits" in rejects[1]["detail"]
    assert rejects[2]["reason"] == "bad_json"

    stats = run_comapoi("data", "stats", str(source), "--type", "agent3", "--dataset", "nyc", "--json")
    assert stats.returncode == 0, stats.stderr
    report = json.loads(stats.stdout)
    assert report["lines"] == 9 and report["roles"]["agent3"]["wrong_answers"] == 2

    prepared = run_comapoi("data", "clean", "--dataset", "nyc", "--data-dir", str(tmp_path / "data"), "--type", "agent3",
                           "--test-size", "2", "--json")  # train's preparation (prepare_training_data)
    assert prepared.returncode == 0, prepared.stderr
    assert json.loads(prepared.stdout)["kept"] == 6


def test_agent3_answers_that_are_not_whole_ids_fail_the_answer_check(tmp_path, agent_data_dir):
    line = _agent3_lines(agent_data_dir)[0]
    answers = ["[NaN, Infinity, 1e400, 3]", "[1.5, 2]", "-0", '{"next_poi_id": [-0, 4]}', '{"next_poi_id": [7, 4]}']
    source = tmp_path / "answers.jsonl"
    source.write_text("".join(_with_answer(line, a) + "\n" for a in answers))
    result = run_comapoi("data", "clean", str(source), "--type", "agent3", "--dataset", "nyc", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kept"] == 1
    rejects = _rejects(tmp_path / "answers_clean.rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(1, "wrong_answer"), (2, "wrong_answer"),
                                                            (3, "wrong_answer"), (4, "wrong_answer")]
    assert "NaN" in rejects[0]["detail"] and "1.5" in rejects[1]["detail"] and "-0" in rejects[2]["detail"]


def test_merge_weights_are_bounded_and_a_role_given_twice_is_an_error(tmp_path, agent_data_dir):
    folder = agent_data_dir / "nyc"
    out = tmp_path / "merged.jsonl"
    big = run_comapoi("data", "merge", f"agent3={folder / 'agent3_train_samples.jsonl'}", "-o", str(out),
                      "--weight", "agent3=1e9")
    assert big.returncode == 2 and "at most 100" in big.stderr and "Traceback" not in big.stderr
    assert not out.exists()
    twice = run_comapoi("data", "merge", f"agent1={folder / 'agent1_train_samples.jsonl'}",
                        f"agent1={folder / 'agent2_train_samples.jsonl'}", "-o", str(out))
    assert twice.returncode == 2 and "agent1 is given twice" in twice.stderr and not out.exists()
    weight_twice = run_comapoi("data", "merge", f"agent3={folder / 'agent3_train_samples.jsonl'}", "-o", str(out),
                               "--weight", "agent3=2", "--weight", "agent3=3")
    assert weight_twice.returncode == 2 and "twice" in weight_twice.stderr


def test_a_failed_clean_keeps_the_previous_outputs(tmp_path, agent_data_dir):
    source = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    source.write_text("\n".join(_agent3_lines(agent_data_dir)[:4]) + "\n")
    assert run_comapoi("data", "clean", str(source), "-o", str(out), "--type", "agent3").returncode == 0
    before = out.read_bytes()
    source.write_text("")
    empty = run_comapoi("data", "clean", str(source), "-o", str(out), "--type", "agent3")
    assert empty.returncode == 1 and "is empty" in empty.stderr and "left as it was" in empty.stderr
    assert out.read_bytes() == before
    source.write_text("{broken\nnot json\n")
    broken = run_comapoi("data", "clean", str(source), "-o", str(out), "--type", "agent3")
    assert broken.returncode == 1 and "survived" in broken.stderr
    assert out.read_bytes() == before
    assert [r["reason"] for r in _rejects(tmp_path / "out.rejects.jsonl")] == ["bad_json", "bad_json"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_pipes_fifos_and_dev_stdin_are_read(tmp_path, agent_data_dir):
    lines = "\n".join(_agent3_lines(agent_data_dir)[:5]) + "\n"
    with open(tmp_path / "in.jsonl", "w") as handle:
        handle.write(lines)
    with open(tmp_path / "in.jsonl") as stdin:
        piped = subprocess.run([sys.executable, "-m", "comapoi_cli", "data", "clean", "/dev/stdin", "-o",
                                str(tmp_path / "a.jsonl"), "--json"], stdin=stdin, capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["kept"] == 5
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "w") as writer:
            writer.write(lines)

    thread = threading.Thread(target=feed)
    thread.start()
    result = run_comapoi("data", "clean", str(fifo), "-o", str(tmp_path / "b.jsonl"), "--json", timeout=120)
    thread.join()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kept"] == 5 and (tmp_path / "b.jsonl").read_text().count("\n") == 5


def test_bad_output_paths_give_one_sentence(tmp_path, agent_data_dir):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_agent3_lines(agent_data_dir)[:3]) + "\n")
    folder = tmp_path / "outdir"
    folder.mkdir()
    result = run_comapoi("data", "clean", str(source), "-o", str(folder))
    assert result.returncode == 2 and "is a folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "outdir"]  # no stray rejects file
    proc = run_comapoi("data", "clean", str(source), "-o", "/proc/comapoi-test/out.jsonl")
    assert proc.returncode == 1 and "Cannot write" in proc.stderr and "Unexpected" not in proc.stderr, proc.stderr
    device = run_comapoi("data", "clean", str(source), "-o", "/dev/null")
    assert device.returncode == 2 and "not a regular file" in device.stderr


def test_out_of_range_options_are_refused(tmp_path, agent_data_dir):
    source = agent_data_dir / "nyc" / "agent3_train_samples.jsonl"
    for args, words in ((["data", "split", str(source), "--train-out", str(tmp_path / "t.jsonl"), "--holdout-out",
                          str(tmp_path / "h.jsonl"), "--test-size", "100%"], "100%"),
                        (["data", "clean", str(source), "-o", str(tmp_path / "c.jsonl"), "--max-poi-id", "-1"], "--max-poi-id"),
                        (["data", "clean", str(source), "-o", str(tmp_path / "c.jsonl"), "--workers", "-3"], "--workers")):
        result = run_comapoi(*args)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert not list(tmp_path.iterdir())


def test_the_prepared_data_cache_honours_comapoi_cache(tmp_path, monkeypatch):
    from comapoi_cli.data.prepare import _cache_dir_for

    monkeypatch.setenv("COMAPOI_CACHE", str(tmp_path / "cache"))
    assert _cache_dir_for(Path("/x/y.jsonl")).parent == tmp_path / "cache" / "prepared"


# -- workers, signals, stale temporaries ----------------------------------------------------------
@pytest.fixture(scope="module")
def big_file(tmp_path_factory, agent_data_dir) -> Path:
    """About 64 MB of agent3 records: cleaned by worker processes for some seconds."""
    lines = _agent3_lines(agent_data_dir)
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    with open(path, "w") as out:
        n = 0
        while out.tell() < 64 << 20:
            for line in lines:
                out.write(line[:-1] + f', "n": {n}}}\n')
                n += 1
    return path


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_clean(big_file: Path, out: Path) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-m", "comapoi_cli", "data", "clean", str(big_file), "-o", str(out),
                             "--workers", "2", "--type", "agent3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the clean never started its workers"
    time.sleep(0.3)  # the workers are judging blocks
    return proc, workers


def _wait_gone(pids: list[int], seconds: float = 15) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_parent_and_the_next_run_removes_its_temporaries(tmp_path, big_file):
    out = tmp_path / "out.jsonl"
    proc, workers = _start_clean(big_file, out)
    proc.kill()
    proc.wait()
    assert _wait_gone(workers) == [], "workers outlived their parent"
    left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert left, "kill -9 should leave the killed run's temporaries"  # what the next run must clean up
    small = tmp_path / "small.jsonl"
    small.write_text(big_file.open().readline())
    again = run_comapoi("data", "clean", str(small), "-o", str(out), "--type", "agent3")
    assert again.returncode == 0, again.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_is_handled_like_ctrl_c(tmp_path, big_file):
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    proc, workers = _start_clean(big_file, out)
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr  # as for Ctrl-C (KeyboardInterrupt)
    assert _wait_gone(workers) == []
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
