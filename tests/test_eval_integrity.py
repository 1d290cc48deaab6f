"""No wrong number (issue 19), the parts of eval and pipeline scoring, through the real CLI.

- eval's holdout check catches training records that differ only in form (no system turn, a
  trailing space) or that ask the same role about the same trajectory (``user_U_subtrajectory_S``);
- eval refuses a run folder another process is writing (its lock), naming the holder;
- lock files that are symbolic links are refused, their targets never written;
- ``pipeline score`` / ``pipeline run`` show unparsable answers, empty candidate lists and rejected
  test lines in the table; a merged run's adapter is called ``merged``;
- ``{"next_poi_id": 1e400}`` and ``Infinity`` are misses with a reason under ``--compat comapoi``;
- a hostile predictions file: every line scored or reported, duplicates once, ``label: true`` is no POI;
- SIGTERM during eval is a clean stop (exit 130, nothing half written), like Ctrl-C;
- the smaller things: data clean's role from the file name and its report when nothing survives,
  ``pipeline score --help``, one "Warning:", the tiny base's dataset label, the synth hint.

The eval tests share the session's ``trained_run`` (a tiny merged run); copies are made where a
test writes into a run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REAL_DATA, REPO, run_comapoi


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    return " ".join(result.stderr.split())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _labelled_holdout(trained_run, path: Path) -> Path:
    """The run's held-out records (agent1/agent2 of the merged run) with the true next POI beside them,
    so that they can be scored (the labels are made up: these tests check what is refused, not scores)."""
    holdout = Path(trained_run.run_json["data"]["holdout_file"])
    records = [json.loads(line) for line in holdout.read_text(encoding="utf-8").splitlines() if line.strip()]
    path.write_text("".join(json.dumps({**r, "next_poi_id": 5}) + "\n" for r in records), encoding="utf-8")
    return path


def _copy_run(trained_run, tmp_path: Path) -> Path:
    """A private copy of the session's trained run folder (a test may write into it)."""
    target = tmp_path / "runs" / trained_run.run_dir.name
    shutil.copytree(trained_run.run_dir, target)
    return target


# -- item 2: the holdout check compares normalised content and trajectory keys ----------------------------

@pytest.mark.slow
def test_eval_counts_a_training_record_in_another_form_as_trained_on(trained_run, tmp_path):
    train_file = Path(trained_run.run_json["data"]["train_file"])
    records = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    agent3 = [r for r in records if r.get("agent") == "agent3"]
    assert len(agent3) >= 3
    no_system = {**agent3[0], "messages": [m for m in agent3[0]["messages"] if m["role"] != "system"]}
    spaced = {**agent3[1], "messages": [{**m, "content": m["content"] + " "} if m["role"] == "user" else m
                                        for m in agent3[1]["messages"]]}
    reworded = {**agent3[2], "messages": [
        {**m, "content": m["content"].replace("You are the Final_Predictor", "You, the final predictor,")}
        if m["role"] == "user" else m for m in agent3[2]["messages"]]}
    assert reworded["messages"] != agent3[2]["messages"]  # the prompt text really differs
    data = tmp_path / "disguised.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (no_system, spaced, reworded)), encoding="utf-8")

    refused = run_comapoi("eval", "--adapter", str(trained_run.run_dir), "--data", str(data), "--max-new-tokens", "4")
    message = _error_line(refused)
    assert f"3 of the 3 records of {data} were in this adapter's training data" in message, message
    assert "2 by content" in message and "1 by trajectory" in message and "--allow-train-overlap" in message

    allowed = run_comapoi("eval", "--adapter", str(trained_run.run_dir), "--data", str(data), "--max-new-tokens", "4",
                          "--allow-train-overlap", "--output-dir", str(tmp_path / "scored"), "--json")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert json.loads(allowed.stdout)["train_overlap"] == 3

    # the run's held-out records are still held out, although training saw their trajectories in other roles
    from comapoi_cli.models.generation import record_messages
    from comapoi_cli.runs.datakeys import trajectory_key

    held_out = _labelled_holdout(trained_run, tmp_path / "held_out.jsonl")
    def trajectory(record: dict) -> str | None:
        key = trajectory_key(record_messages(record)[:-1], None)
        return key.split(":")[-1] if key else None

    held = {trajectory(r) for r in _jsonl(held_out)}
    assert held & {trajectory(r) for r in records}  # training saw these trajectories (other roles or steps)
    own = run_comapoi("eval", "--adapter", str(trained_run.run_dir), "--data", str(held_out), "--max-new-tokens", "4",
                      "--output-dir", str(tmp_path / "own"), "--json")
    assert own.returncode == 0, own.stdout + own.stderr
    assert json.loads(own.stdout)["train_overlap"] == 0


# -- item 5: a run folder being written ----------------------------------------------------------------------

HOLD_LOCK = ("import sys, time\nfrom pathlib import Path\nfrom comapoi_cli.runs.lock import lock_run\n"
             "lock = lock_run(Path(sys.argv[1]))\nprint('locked', flush=True)\ntime.sleep(120)\n")


@pytest.mark.slow
def test_eval_refuses_a_run_folder_another_process_is_writing_and_names_it(trained_run, tmp_path):
    run_dir = _copy_run(trained_run, tmp_path)
    data = _labelled_holdout(trained_run, tmp_path / "h.jsonl")  # records this run can score
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked", holder.stderr
        refused = run_comapoi("eval", "--adapter", str(run_dir), "--data", str(data), "--max-new-tokens", "4")
        message = _error_line(refused)
        assert f"The run folder {run_dir} is being written by process {holder.pid} on {socket.gethostname()}" in message
        assert not (run_dir / "metrics.json").exists()
        checkpoint = next(run_dir.glob("checkpoint-*"))
        assert f"is being written by process {holder.pid}" in _error_line(
            run_comapoi("eval", "--adapter", str(checkpoint), "--data", str(data), "--max-new-tokens", "4"))
    finally:
        holder.kill()
        holder.communicate()
    freed = run_comapoi("eval", "--adapter", str(run_dir), "--data", str(data), "--num-samples", "1", "--max-new-tokens", "4",
                        "--json")
    assert freed.returncode == 0, freed.stdout + freed.stderr


# -- item 9: lock files that are symbolic links -------------------------------------------------------------

def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_kept(trained_run, copy_data_dir, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not overwrite\n")
    output = tmp_path / "merged"
    (tmp_path / f".{output.name}.comapoi.lock").symlink_to(victim)  # the merge output's lock
    merged = run_comapoi("adapters", "merge", str(trained_run.run_dir), "--output-dir", str(output))
    message = _error_line(merged)
    assert f"The lock file {tmp_path / '.merged.comapoi.lock'} is a symbolic link" in message, message
    assert victim.read_text() == "do not overwrite\n" and not output.exists()

    (copy_data_dir / "nyc" / ".comapoi-prepare.lock").symlink_to(victim)  # the prepared data's lock
    cleaned = run_comapoi("data", "clean", "--dataset", "nyc", "--data-dir", str(copy_data_dir), "--type", "agent3")
    assert "is a symbolic link" in _error_line(cleaned)
    assert victim.read_text() == "do not overwrite\n"


# -- items 6, 16, 17: pipeline scores -----------------------------------------------------------------------

def _line(key: str, label, ranking, raw: str = "", **changes) -> dict:
    line = {"key": key, "dataset": "nyc", "label": label, "retrieved": [label, 3] if isinstance(label, int) else [3],
            "agents": {"agent1": {"candidates": {"raw": "", "candidates": list(ranking[:2])}},
                       "agent2": {"candidates": {"raw": "", "candidates": []}},
                       "agent3": {"ranking": {"raw": raw, "ranking": ranking}}},
            "ranking": ranking, "final_step": "agent3.ranking", "baselines": {"frequent": [1]}, "problems": []}
    line.update(changes)
    return line


def _write(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join(x if isinstance(x, bytes) else (json.dumps(x) + "\n").encode() for x in lines))
    return path


def test_pipeline_score_shows_unparsable_answers_empty_lists_and_rejected_lines(tmp_path):
    predictions = _write(tmp_path / "predictions.jsonl", [
        _line("a", 5, [5, 6], '{"next_poi_id": [5, 6]}'),
        _line("b", 7, [], "no idea"),      # unparsable: an empty final ranking
        _line("c", 9, [], ""),
    ])
    (tmp_path / "rejects.jsonl").write_text('{"line": 4, "reason": "not JSON"}\n{"line": 9, "reason": "bad date"}\n')
    result = run_comapoi("pipeline", "score", str(predictions))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "│ unparsable │ 66.67" in out, out
    assert "label found in (candidate recall %)" in out.splitlines()  # the title on one line
    assert "empty lists" in out and "3 of 3" in out  # agent2's lists are all empty
    assert "66.7% of the final answers could not be parsed" in out
    assert "agent2 candidates: empty for 3 of 3 trajectories" in out
    assert f"2 test lines rejected before the run, not scored (reasons in {tmp_path / 'rejects.jsonl'})" in " ".join(out.split())
    scores = json.loads(run_comapoi("pipeline", "score", str(predictions), "--json").stdout)
    assert scores["stages_empty"]["agent2 candidates"] == 3 and scores["stages_empty"]["final top-10"] == 2


def test_compat_scoring_counts_an_infinite_answer_as_a_miss_with_its_reason(tmp_path):
    predictions = _write(tmp_path / "predictions.jsonl", [
        _line("inf", 5, [5], '{"next_poi_id": 1e400}'),
        _line("infinity", 6, [6], '{"next_poi_id": Infinity}'),
        _line("ok", 7, [7], '{"next_poi_id": [7]}'),
    ])
    result = run_comapoi("pipeline", "score", str(predictions), "--compat", "comapoi", "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    scores = json.loads(result.stdout)
    assert scores["n"] == 3 and scores["chain"]["acc@1"] == 100.0
    compat = scores["compat"]
    assert compat["acc@1"] == pytest.approx(100 / 3, abs=1e-3) and compat["unparsable"] == pytest.approx(200 / 3, abs=1e-3)
    assert compat["misses"] == {"next_poi_id inf is not a finite number": 2}
    table = run_comapoi("pipeline", "score", str(predictions), "--compat", "comapoi")
    assert "CoMaPOI's eval: 2 answers unreadable (next_poi_id inf is not a finite number)" in table.stdout


def test_pipeline_score_of_a_hostile_file_scores_or_reports_every_line(tmp_path):
    good = _line("g", 7, [7, 1], "7")
    predictions = _write(tmp_path / "predictions.jsonl", [
        b"\xef\xbb\xbf" + (json.dumps(_line("a", 5, [5, 6], "5")) + "\n").encode(),  # 1: a BOM first
        _line("a", 5, [6, 5], "6"),                          # 2: the key of line 1 again: scored once
        _line("t", True, [1], "1"),                          # 3: label true is no POI id (not POI 1)
        _line("s", 1, [1], "1", agents=5),                   # 4
        _line("r", 1, "12", "1"),                            # 5
        _line("b", 1, [1], "1", baselines=[1]),              # 6
        _line("f", 1, [1], "1", baselines={"frequent": "x"}),  # 7
        _line("n", 1, [True], "1"),                          # 8: a bool in the ranking
        ("[" * 100000 + "]" * 100000 + "\n").encode(),       # 9: nested too deeply
        b'{"key": "\xff", "label": 1, "ranking": []}\n',     # 10: invalid UTF-8
        b"\n",                                               # 11: blank, skipped
        good,                                                # 12
        [1, 2],                                              # 13: not an object
    ])
    result = run_comapoi("pipeline", "score", str(predictions), "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    scores = json.loads(result.stdout)
    assert scores["n"] == 2 and scores["chain"]["acc@1"] == 100.0  # lines 1 and 12
    invalid = {item["line"]: item["reason"] for item in scores["invalid_lines"]}
    assert sorted(invalid) == [3, 4, 5, 6, 7, 8, 9, 10, 13], invalid
    assert invalid[3] == "label true is not a POI id (a non-negative integer)"
    assert invalid[9] == "nested too deeply to read" and invalid[10].startswith("not valid UTF-8")
    assert "'agents' is not an object" in invalid[4] and "'ranking' is not a list of POI ids" in invalid[5]
    assert [d["line"] for d in scores["duplicates"]] == [2] and "repeats line 1's key 'a'" in scores["duplicates"][0]["reason"]
    table = run_comapoi("pipeline", "score", str(predictions))
    assert table.returncode == 0 and "9 lines of the predictions file not scored (line 3: label true" in table.stdout
    assert "1 line of the predictions file scored once (line 2: repeats line 1's key 'a'" in table.stdout

    only_bad = _write(tmp_path / "bad.jsonl", [_line("t", True, [1], "1")])
    assert "No predictions to score (1 invalid line: line 1: label true" in _error_line(
        run_comapoi("pipeline", "score", str(only_bad)))
    # a test file given instead of predictions: each reason once, with its lines
    wrong = run_comapoi("pipeline", "score", str(REAL_DATA / "tky_test.jsonl"))
    assert wrong.returncode != 0 and _error_line(wrong).count("no 'label'") == 1
    assert "No predictions to score (24 invalid lines: lines 1-24: no 'label'" in _error_line(wrong)


@pytest.mark.slow
def test_pipeline_run_names_the_merged_adapter_and_shows_failures_in_its_summary(trained_run, tmp_path):
    lines = (REAL_DATA / "nyc_test.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    test = tmp_path / "nyc_test.jsonl"
    test.write_text("".join(lines[:2]) + '{"messages": [truncated\n', encoding="utf-8")
    out = tmp_path / "out"
    result = run_comapoi("pipeline", "run", "--dataset", "nyc", "--test", str(test), "--poi-info",
                         str(REAL_DATA / "nyc_poi_info.csv"), "--train", str(REAL_DATA / "nyc_train.jsonl"),
                         "--merged", str(trained_run.run_dir), "--output-dir", str(out), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    settings = json.loads((out / "pipeline.json").read_text())["settings"]
    assert list(settings["adapters"]) == ["merged"], settings["adapters"]
    assert "unparsable" in result.stdout and "empty lists" in result.stdout
    assert f"1 test line rejected before the run, not scored (reasons in {out / 'rejects.jsonl'})" in " ".join(result.stdout.split())


# -- item 21: SIGTERM during eval ---------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_eval_is_a_clean_stop_like_ctrl_c(trained_run, tmp_path):
    run_dir = _copy_run(trained_run, tmp_path)
    before = (run_dir / "run.json").read_bytes()
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    data = _labelled_holdout(trained_run, tmp_path / "h.jsonl")
    process = subprocess.Popen([sys.executable, "-m", "comapoi_cli", "eval", "--adapter", str(run_dir), "--data", str(data),
                                "--max-new-tokens", "512", "--batch-size", "1"], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the model is being loaded: the eval is under way
            line = process.stderr.readline()
            if not line or line.startswith("loading "):
                break
        time.sleep(1.0)
        assert process.poll() is None, "eval ended before it could be stopped"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, (process.returncode, err)
    assert "Traceback" not in err and "Error: Interrupted; nothing is half written" in " ".join(err.split()), err
    assert (run_dir / "run.json").read_bytes() == before
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "predictions.jsonl").exists()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    again = run_comapoi("eval", "--adapter", str(run_dir), "--data", str(data), "--num-samples", "1", "--max-new-tokens", "4",
                        "--json")
    assert again.returncode == 0, again.stdout + again.stderr


# -- the smaller things ----------------------------------------------------------------------------------------

def test_data_clean_takes_the_role_from_a_canonical_file_name_and_reports_when_nothing_survives(agent_data_dir, tmp_path):
    source = agent_data_dir / "nyc" / "agent3_train_samples.jsonl"
    folder = tmp_path / "nyc"
    folder.mkdir()
    shutil.copy(source, folder / source.name)
    record = json.loads(source.read_text(encoding="utf-8").splitlines()[0])
    # an agent3 answer that is a candidate list (the original's mix-up): only agent3's checks catch it
    mixed = {**record, "messages": [*record["messages"][:-1],
                                    {"role": "assistant", "content": ", ".join(str(i) for i in range(1, 26))}]}
    with open(folder / source.name, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(mixed) + "\n")
    result = run_comapoi("data", "clean", str(folder / source.name), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["role"] == "agent3" and report["rejected"].get("wrong_target") == 1, report
    table = run_comapoi("data", "clean", str(folder / source.name), "-o", str(tmp_path / "again.jsonl"))
    assert "checked as agent3 records (from the file name agent3_train_samples.jsonl" in table.stdout

    dead = tmp_path / "agent3_train_samples.jsonl"
    dead.write_text('{"messages": []}\nnot json\n', encoding="utf-8")
    nothing = run_comapoi("data", "clean", str(dead), "--json")
    assert "No record of" in _error_line(nothing) and nothing.returncode == 1
    report = json.loads(nothing.stdout)  # the report still printed, before the error
    assert report["lines_in"] == 2 and report["kept"] == 0 and report["rejected"] == {"bad_json": 1, "no_messages": 1}


def test_help_hint_and_labels_say_what_they_mean(agent_data_dir, tmp_path):
    help_text = run_comapoi("pipeline", "score", "--help").stdout
    assert "pipeline score [OPTIONS] FILE" in help_text and "{file}" not in help_text
    assert "eval score [OPTIONS] FILE" in run_comapoi("eval", "score", "--help").stdout

    missing = _error_line(run_comapoi("data", "stats", "--dataset", "tky", "--data-dir", str(tmp_path / "none")))
    assert f"comapoi data synth --dataset tky --output-dir {tmp_path / 'none'}" in missing and "--out " not in missing

    cache = tmp_path / "cache"
    stats = run_comapoi("data", "stats", str(agent_data_dir / "nyc" / "agent2_train_samples.jsonl"), "--tokenizer", "tiny",
                        "--json", env={"COMAPOI_CACHE": str(cache)})
    assert stats.returncode == 0, stats.stderr
    (marker,) = cache.rglob("comapoi_tiny.json") if list(cache.rglob("comapoi_tiny.json")) else [None]
    assert marker is not None, sorted(p.name for p in cache.rglob("*"))
    label = json.loads(marker.read_text())["label"]
    assert label.startswith("tiny:nyc:"), label
