"""comapoi pipeline run refuses what would make its scores a lie, and survives hostile input (issue 19).

Through the real CLI, with the session's tiny runs and the real nyc/tky trajectories of ../shared/data/real/:
dataset identity (1), test trajectories that were training data (2), a retrained adapter on --resume (3),
agents' training records given as test data (4), a run folder being written (5), two runs on one
output folder (7), an output that is an input (8), hostile test lines (13) and POI rows (14), an
--output-dir that is a file (20), SIGTERM (21). Most checks refuse before a model is loaded; the runs
that do load one use --limit 1-2 and 2 new tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REAL_DATA, run_comapoi

NEW_TOKENS = "2"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _chain(out: Path, *, test: Path = REAL_DATA / "nyc_test.jsonl", run: Path | None = None, dataset: str = "nyc",
           train: Path | None = REAL_DATA / "nyc_train.jsonl", poi: Path | None = REAL_DATA / "nyc_poi_info.csv",
           agents: dict[str, Path] | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["pipeline", "run", "--dataset", dataset, "--test", str(test), "--output-dir", str(out),
            "--max-new-tokens", NEW_TOKENS]
    if train is not None:
        args += ["--train", str(train)]
    if poi is not None:
        args += ["--poi-info", str(poi)]
    if run is not None:
        args += ["--merged", str(run)]
    for role, folder in (agents or {}).items():
        args += [f"--{role}", str(folder)]
    return [*args, *extra]


def _refused(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Unexpected" not in result.stderr, result.stderr
    text = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in text, text


def _copy_run(trained_run, target: Path, **changes) -> Path:
    """A copy of the session's tiny run (final adapter, run.json), with run.json sections changed."""
    shutil.copytree(trained_run.run_dir, target, ignore=shutil.ignore_patterns("checkpoint-*", ".comapoi.lock"))
    record = json.loads((target / "run.json").read_text())
    for section, values in changes.items():
        record.setdefault(section, {}).update(values)
    (target / "run.json").write_text(json.dumps(record))
    return target


def _hold_lock(path: Path, command: str) -> subprocess.Popen:
    """Another process holding a comapoi lock (as `comapoi train --resume` holds its run folder's)."""
    code = ("import sys, time; from pathlib import Path; from comapoi_cli.runs.lock import acquire; "
            f"acquire(Path(sys.argv[1]), 'x', command={command.split()!r}); print('READY', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "READY"
    return holder


# -- 1. dataset identity ---------------------------------------------------------------------------
def test_an_unknown_dataset_is_one_sentence_for_the_chain_and_the_build(tmp_path):
    """presets.require_preset: the chain and data build say which of them needs the POI id range."""
    for command, needed_by in ((["pipeline", "run", "--test", str(REAL_DATA / "nyc_test.jsonl"), "--merged", str(tmp_path / "run"),
                                 "--output-dir", str(tmp_path / "chain")], "the chain"),
                               (["data", "build", "--train", str(REAL_DATA / "nyc_train.jsonl"), "--teacher", "template",
                                 "--output-dir", str(tmp_path / "build")], "the build")):
        result = run_comapoi(*command, "--dataset", "nowhere")
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"Unknown dataset 'nowhere'; {needed_by} needs its POI id range (nyc, tky, ca)." in " ".join(result.stderr.split())
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "chain").exists() and not (tmp_path / "build").exists()


def test_dataset_identity_runs_flags_and_files_must_agree(trained_run, tmp_path):
    # the case: tky test trajectories with --dataset nyc took nyc's POI table and history from beside the file
    tky = run_comapoi(*_chain(tmp_path / "a", test=REAL_DATA / "tky_test.jsonl", train=None, poi=None, run=trained_run.run_dir))
    _refused(tky, "tky_test.jsonl (test trajectories) is not nyc data", "lie outside nyc's area (most in tky's area)")
    assert not (tmp_path / "a").exists()
    # a POI table of another city
    poi = run_comapoi(*_chain(tmp_path / "b", poi=REAL_DATA / "tky_poi_info.csv", run=trained_run.run_dir))
    _refused(poi, "tky_poi_info.csv (POI table) is not nyc data")
    # runs trained on nyc, scored as tky
    flag = run_comapoi(*_chain(tmp_path / "c", dataset="tky", test=REAL_DATA / "tky_test.jsonl", train=REAL_DATA / "tky_test.jsonl",
                               poi=REAL_DATA / "tky_poi_info.csv", run=trained_run.run_dir))
    _refused(flag, "The runs were trained on nyc data, not --dataset tky")
    # agents of two datasets on one (shared) base model
    other = _copy_run(trained_run, tmp_path / "tky-run", job={"dataset": "tky"})
    mixed = run_comapoi(*_chain(tmp_path / "d", agents={"agent1": trained_run.run_dir, "agent2": other, "agent3": trained_run.run_dir}))
    _refused(mixed, "trained on different datasets (agent1 on nyc, agent2 on tky, agent3 on nyc)")
    # a POI table larger than the dataset's id range
    rows = ["poi_id,category,lat,lon"] + [f"{i},Bar,40.7,-73.9" for i in range(5093)]
    (tmp_path / "big.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    big = run_comapoi(*_chain(tmp_path / "e", poi=tmp_path / "big.csv", run=trained_run.run_dir))
    _refused(big, "has 5093 rows, more than nyc's 5092 POIs")


# -- 2. leakage ------------------------------------------------------------------------------------
def test_train_equal_to_test_is_refused(trained_run, tmp_path):
    same = run_comapoi(*_chain(tmp_path / "out", train=REAL_DATA / "nyc_test.jsonl", run=trained_run.run_dir))
    _refused(same, "Test trajectories were training data", "24 in --train", "--allow-train-overlap")
    # overlapping: two of the test trajectories appended to the training file
    test_lines = (REAL_DATA / "nyc_test.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    train = tmp_path / "train.jsonl"
    train.write_text((REAL_DATA / "nyc_train.jsonl").read_text(encoding="utf-8") + test_lines[5] + test_lines[7], encoding="utf-8")
    some = run_comapoi(*_chain(tmp_path / "out2", train=train, run=trained_run.run_dir))
    _refused(some, "of the 24 test trajectories, 2 in --train", "user_5_subtrajectory")


def test_agents_trained_on_the_test_trajectories_are_refused_or_said_loudly(trained_run, tmp_path):
    from comapoi_cli.data.synth import synth_dataset
    from comapoi_cli.plugins import get_registry

    # agent data built from the test trajectories themselves (what a careless `data synth --source nyc_test.jsonl` makes)
    synth_dataset("nyc", tmp_path / "synth", source=REAL_DATA / "nyc_test.jsonl", poi_info=REAL_DATA / "nyc_poi_info.csv",
                  registry=get_registry())
    leaked = _copy_run(trained_run, tmp_path / "leaked-run",
                       data={"train_file": str(tmp_path / "synth" / "nyc" / "agent1_train_samples.jsonl")})
    agents = {"agent1": leaked, "agent2": trained_run.run_dir, "agent3": trained_run.run_dir}
    refused = run_comapoi(*_chain(tmp_path / "out", agents=agents))
    _refused(refused, "Test trajectories were training data", "24 in agent1's training data", "agent1_train_samples.jsonl")
    # the session's own runs trained on a simulated city whose keys (user_0_subtrajectory_1, ...) the real
    # test file reuses: not the same trajectories, not refused (the other tests run them on the real data)
    out = tmp_path / "allowed"
    allowed = run_comapoi(*_chain(out, agents=agents, extra=("--allow-train-overlap", "--limit", "1", "--batch-size", "1")))
    assert allowed.returncode == 0, allowed.stderr
    assert "NOT HELD OUT" in allowed.stdout and "24 in agent1's training data" in " ".join(allowed.stdout.split())
    assert "these scores are NOT held-out scores" in " ".join(allowed.stderr.split())
    record = json.loads((out / "pipeline.json").read_text())
    overlap = record["scores"]["train_overlap"]
    assert overlap["allowed"] is True and record["train_overlap"] == overlap
    (source,) = overlap["sources"]
    assert source.startswith("agent1's training data") and overlap["sources"][source]["count"] == 24
    rescored = run_comapoi("pipeline", "run", *_chain(out, agents=agents, extra=("--resume", "--limit", "1"))[2:])
    _refused(rescored, "Test trajectories were training data")  # a resume without the flag is refused too


# -- 3. adapter identity on resume -----------------------------------------------------------------
def test_resume_refuses_an_adapter_retrained_in_place(trained_run, tmp_path):
    from comapoi_cli.fileio import sha256_file

    run = _copy_run(trained_run, tmp_path / "run")
    out = tmp_path / "out"
    first = run_comapoi(*_chain(out, run=run, extra=("--limit", "1", "--batch-size", "1")))
    assert first.returncode == 0, first.stderr
    settings = json.loads((out / "pipeline.json").read_text())["settings"]
    assert settings["adapter_sha256"] == {"merged": sha256_file(run / "adapter_model.safetensors")}  # one adapter for all
    # retrained in place: other weights under the same folder
    shutil.copy(trained_run.run_dir / "checkpoint-4" / "adapter_model.safetensors", run / "adapter_model.safetensors")
    resumed = run_comapoi(*_chain(out, run=run, extra=("--limit", "2", "--batch-size", "1", "--resume")))
    _refused(resumed, "--resume: the adapter weights changed since this run started", "merged (")
    assert len(_rows(out / "predictions.jsonl")) == 1


# -- 4. a training file is not a test file ---------------------------------------------------------
def test_agent_training_records_are_not_test_trajectories(trained_run, agent_data_dir, tmp_path):
    for name in ("agent3_train_samples.jsonl", "agent1_train_samples.jsonl"):
        result = run_comapoi(*_chain(tmp_path / name, test=agent_data_dir / "nyc" / name, run=trained_run.run_dir))
        _refused(result, f"{name} holds agents' training records, not plain trajectories")
    train = run_comapoi(*_chain(tmp_path / "t", train=agent_data_dir / "nyc" / "agent2_train_samples.jsonl", run=trained_run.run_dir))
    _refused(train, "hold no plain CoMaPOI trajectory (its records are agents' training records)")


# -- 5. a run folder being written -----------------------------------------------------------------
def test_run_folder_locked_by_training_is_refused_naming_the_holder(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run")
    holder = _hold_lock(run / ".comapoi.lock", "comapoi train --resume")
    try:
        result = run_comapoi(*_chain(tmp_path / "out", run=run))
    finally:
        holder.kill()
        holder.wait()
    _refused(result, f"The run folder {run} is being written by process {holder.pid}", "(comapoi train --resume)")


# -- 7. one writer per output folder ---------------------------------------------------------------
def test_output_folder_is_locked(trained_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out / ".comapoi.lock", "comapoi pipeline run --output-dir out")
    try:
        result = run_comapoi(*_chain(out, run=trained_run.run_dir))
    finally:
        holder.kill()
        holder.wait()
    _refused(result, f"The output folder {out} is being written by process {holder.pid}")
    assert not (out / "predictions.jsonl").exists() and not (out / "pipeline.json").exists()


# -- 8. an output that is an input -----------------------------------------------------------------
def test_an_output_that_is_an_input_is_refused_before_anything_is_written(trained_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    test = out / "rejects.jsonl"
    shutil.copy(REAL_DATA / "nyc_test.jsonl", test)
    before = test.read_bytes()
    result = run_comapoi(*_chain(out, test=test, run=trained_run.run_dir))
    _refused(result, f"--test {test} is also an output of this run (rejects.jsonl in --output-dir)")
    assert test.read_bytes() == before
    poi = out / "pipeline.json"
    shutil.copy(REAL_DATA / "nyc_poi_info.csv", poi)
    linked = tmp_path / "poi-link.csv"
    linked.symlink_to(poi)
    result = run_comapoi(*_chain(out, poi=linked, run=trained_run.run_dir))
    _refused(result, "--poi-info", "is also an output of this run (pipeline.json in --output-dir)")


# -- 13 + 14. hostile test lines and POI rows ------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_run(trained_run, tmp_path_factory):
    """The real test file with one hostile line in each of lines 11-18, and a POI table with inf/-inf/1e308/nan rows."""
    folder = tmp_path_factory.mktemp("hostile")
    lines = (REAL_DATA / "nyc_test.jsonl").read_text(encoding="utf-8").splitlines()

    def changed(index: int, user=None, answer=None) -> bytes:
        record = json.loads(lines[index])
        if user:
            record["messages"][1]["content"] = user(record["messages"][1]["content"])
        if answer is not None:
            record["messages"][2]["content"] = answer
        return json.dumps(record, ensure_ascii=False).encode("utf-8")

    def first(pattern: str, new: str):
        return lambda text: re.sub(pattern, new, text, count=1)

    hostile = [
        changed(10, user=first(r"At \d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", "At 2012-13-45 25:61:61")),  # bad date
        changed(11, user=first(r"visit POI ID \d+ ", "visit POI ID " + "9" * 5000 + " ")),      # 5000-digit id
        changed(12, answer='{"next_poi_id": "\u00b2"}'),                                          # label "²"
        b"[" * 100_000 + b"]" * 100_000,                                                            # deep nesting
        changed(14, user=first(r", -?\d+\.\d+,", ", 1" + "0" * 400 + ".5,")),                    # huge coordinate
        changed(15, user=first(r"user_15_", "user_5000_")),                                         # user out of range
        changed(16, user=first(r", -?\d+\.\d+,-?\d+\.\d+\)", ", nan,nan)")),                 # NaN coordinate
        lines[17].encode("utf-8").replace(b"visit POI ID", b"visit \xff POI ID", 1),               # invalid UTF-8
    ]
    data = b"".join(line.encode("utf-8") + b"\n" for line in lines[:10])
    data += b"".join(line + b"\n" for line in hostile)
    data += b"".join(line.encode("utf-8") + b"\n" for line in lines[18:])
    test = folder / "nyc_test.jsonl"
    test.write_bytes(data)
    poi = folder / "nyc_poi_info.csv"
    table = (REAL_DATA / "nyc_poi_info.csv").read_text(encoding="utf-8").splitlines()
    kept = [row for row in table if row.split(",")[0] not in ("3", "4", "5", "6")]
    bad_rows = ["3,Bar,inf,-73.9", "4,Bar,40.7,-inf", "5,Bar,1e308,-73.9", "6,Bar,nan,-73.9"]
    poi.write_text("\n".join(kept + bad_rows) + "\n", encoding="utf-8")
    out = folder / "out"
    result = run_comapoi(*_chain(out, test=test, poi=poi, run=trained_run.run_dir, extra=("--limit", "2", "--batch-size", "2", "--json")))
    return result, out


def test_hostile_test_lines_go_to_the_rejects_with_a_reason(hostile_run):
    result, out = hostile_run
    assert result.returncode == 0, result.stderr
    rejects = {r["line"]: r["reason"] for r in _rows(out / "rejects.jsonl")}
    assert sorted(rejects) == list(range(11, 19)), rejects
    assert "impossible time '2012-13-45 25:61:61'" in rejects[11]
    assert "is not an id" in rejects[12]
    assert rejects[13] == "the label '²' is not a POI id"
    assert rejects[14] == "not JSON (nested too deeply)"
    assert "is not a finite coordinate" in rejects[15]
    assert "user 5000 is outside this dataset's users 0..987" in rejects[16]
    assert "check-in 1 has no coordinates" in rejects[17] and "nan,nan" in rejects[17]
    assert rejects[18] == "not UTF-8 text"
    summary = json.loads(result.stdout)
    assert summary["processed"] == 2
    # every line is predicted (the first two, --limit 2) or rejected; the other good lines are still there to run
    assert len(_rows(out / "predictions.jsonl")) == 2


def test_poi_rows_with_infinite_coordinates_are_rejected_with_a_reason(hostile_run):
    result, out = hostile_run
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "pipeline.json").read_text())
    reasons = {r["text"].split(",")[0]: r["reason"] for r in record["poi_rejected"]}
    assert set(reasons) == {"3", "4", "5", "6"}
    assert all("is not a finite coordinate" in reasons[k] for k in ("3", "4", "6")), reasons
    assert "is not a latitude,longitude" in reasons["5"]  # 1e308 is finite, and no latitude
    assert any("4 rows of" in note and "are not POIs (skipped" in note for note in json.loads(result.stdout)["notes"])


# -- 20. --output-dir that is a file ---------------------------------------------------------------
def test_output_dir_naming_a_file_is_one_sentence(trained_run, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    result = run_comapoi(*_chain(file, run=trained_run.run_dir))
    _refused(result, f"--output-dir {file} is a file, not a folder")
    under = run_comapoi(*_chain(file / "sub" / "out", run=trained_run.run_dir))
    _refused(under, f"lies under {file}, which is a file")
    assert file.read_text() == "x"


# -- 21. SIGTERM ------------------------------------------------------------------------------------
def test_sigterm_is_a_clean_resumable_stop(trained_run, tmp_path):
    out = tmp_path / "out"
    args = _chain(out, run=trained_run.run_dir, extra=("--batch-size", "1", "--max-new-tokens", "8"))
    process = subprocess.Popen([sys.executable, "-m", "comapoi_cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})
    predictions = out / "predictions.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if predictions.exists() and predictions.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert not (out / ".comapoi.lock").exists()  # the lock went with the process
    done = len(_rows(predictions))
    assert 1 <= done < 24
    resumed = run_comapoi(*args[:-2], "--max-new-tokens", "8", "--resume", "--limit", str(done + 1), "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["done_before"] == done and summary["processed"] == 1
    assert [r["line"] for r in _rows(predictions)] == list(range(1, done + 2))
