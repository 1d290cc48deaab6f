"""Issue 13: what ``data`` writes is what ``train`` uses, and what train prints about its data is true.

Each test runs the real CLI: ``data merge --weight`` then ``train --type merged`` trains on the
weighted mix; ``data split --group-by user`` then ``train --type agent1`` keeps that split; train
says what cleaning did and writes its own rejects files; the token estimate and ``--tokenizer tiny``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from comapoi_cli.default_plugins.comapoi_roles import user_key  # test-only: the CoMaPOI roles' user key
from tests.conftest import TRAIN_FAST
from tests.support import run_comapoi


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _conversation(record: dict) -> str:
    return json.dumps(record["messages"], sort_keys=True)


def test_train_merged_uses_the_weights_of_data_merge(tmp_path, copy_data_dir):
    data = copy_data_dir
    folder = data / "nyc"
    clean = run_comapoi("data", "clean", "--dataset", "nyc", "--data-dir", str(data), "--test-size", "4")
    assert clean.returncode == 0, clean.stderr
    clean_rejects = {p.name: p.read_bytes() for p in folder.glob("*_samples.rejects.jsonl")}  # data clean's own
    assert clean_rejects
    merge = run_comapoi("data", "merge", "--dataset", "nyc", "--data-dir", str(data), "--weight", "agent3=2")
    assert merge.returncode == 0, merge.stderr
    merged_bytes = (folder / "total_agent_train_samples.jsonl").read_bytes()

    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(data), "--type", "merged", *TRAIN_FAST,
                         "--max_steps", "1", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    said = result.stdout + result.stderr
    train = _records(folder / "cleaned_total_agent_train_samples_all.jsonl")
    holdout = _records(folder / "cleaned_total_agent_train_samples_100.jsonl")
    roles = Counter(r["agent"] for r in train)
    copies = Counter(_conversation(r) for r in train)
    agent3_copies = {n for r, n in ((r, copies[_conversation(r)]) for r in train) if r["agent"] == "agent3"}
    assert agent3_copies == {2} and max(copies[_conversation(r)] for r in train if r["agent"] != "agent3") == 1
    assert len({_conversation(r) for r in holdout}) == len(holdout)  # the holdout: one copy of each record
    assert not {_conversation(r) for r in holdout} & set(copies)  # and none of them trained on
    assert (f"Training records per role: agent1 {roles['agent1']}, agent2 {roles['agent2']}, agent3 {roles['agent3']} "
            "(weights agent3=2") in said
    assert "Cleaning: 120 lines in, 120 kept, 0 rejected." in said
    assert "agent1_train_samples.train.rejects.jsonl" in said
    # data merge's output and data clean's rejects files are left as they were
    assert (folder / "total_agent_train_samples.jsonl").read_bytes() == merged_bytes
    assert {p.name: p.read_bytes() for p in folder.glob("*_samples.rejects.jsonl")} == clean_rejects
    assert sorted(p.name for p in folder.glob("*.train.rejects.jsonl")) == [
        "agent1_train_samples.train.rejects.jsonl", "agent2_train_samples.train.rejects.jsonl",
        "agent3_train_samples.train.rejects.jsonl"]


def test_train_keeps_the_user_grouped_split_and_says_so(tmp_path, copy_data_dir):
    data = copy_data_dir
    folder = data / "nyc"
    split = run_comapoi("data", "split", "--dataset", "nyc", "--data-dir", str(data), "--type", "agent1",
                        "--group-by", "user", "--test-size", "6", "--seed", "5", "--json")
    assert split.returncode == 0, split.stderr
    held = {_conversation(r) for r in _records(folder / "agent1_train_samples_100.jsonl")}

    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(data), "--type", "agent1", *TRAIN_FAST,
                         "--max_steps", "1", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert "Using the split made by data split --group-by user (seed 5)" in said
    train = _records(folder / "agent1_train_samples_all.jsonl")
    holdout = _records(folder / "agent1_train_samples_100.jsonl")
    assert {_conversation(r) for r in holdout} == held
    assert not {user_key(r) for r in train} & {user_key(r) for r in holdout}

    # run again: the prepared split is current and reused, and it says so
    again = run_comapoi("data", "clean", "--dataset", "nyc", "--data-dir", str(data), "--type", "agent1", "--json")
    assert again.returncode == 0, again.stderr
    assert {_conversation(r) for r in _records(folder / "agent1_train_samples_100.jsonl")} == held
    # a changed input: the user's split no longer holds, a new one is made and the reason is given
    source = folder / "agent1_train_samples.jsonl"
    source.write_text("\n".join(source.read_text().splitlines()[:-1]) + "\n")
    rebuilt = run_comapoi("data", "clean", "--dataset", "nyc", "--data-dir", str(data), "--type", "agent1",
                          "--test-size", "4", "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    summary = json.loads(rebuilt.stdout)
    assert summary["rebuilt_because"] == "the input files changed"
    assert any("changed since data split" in note for note in summary["notes"])


def test_the_token_estimate_is_within_a_quarter_of_the_tiny_tokenizer(tmp_path):
    env = {"COMAPOI_DATA_DIR": str(tmp_path / "data")}
    assert run_comapoi("data", "synth", "--dataset", "nyc", "-n", "30", env=env).returncode == 0
    estimated = run_comapoi("data", "stats", "--dataset", "nyc", "--json", env=env)
    counted = run_comapoi("data", "stats", "--dataset", "nyc", "--tokenizer", "tiny", "--seq-length", "2048", "--json",
                          env=env)
    assert estimated.returncode == 0 and counted.returncode == 0, counted.stderr
    est, real = json.loads(estimated.stdout), json.loads(counted.stdout)
    assert real["tokenizer"] and real["template"] == "chat_template"
    for role, stats in real["roles"].items():
        ratio = est["roles"][role]["total_tokens"] / stats["total_tokens"]
        assert 0.75 <= ratio <= 1.25, (role, ratio)
    cleaned = run_comapoi("data", "clean", str(tmp_path / "data" / "nyc" / "agent3_train_samples.jsonl"), "-o",
                          str(tmp_path / "a3.jsonl"), "--tokenizer", "tiny", "--seq-length", "100000", "--json", env=env)
    assert cleaned.returncode == 0, cleaned.stderr
    assert json.loads(cleaned.stdout)["tokens"]["total"] > 0


class _Recorder:
    """A reporter that keeps what it was told (the services' side of the protocol)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_services_report_progress_through_the_reporter(tmp_path, agent_data_dir, tiny_model_dir, monkeypatch):
    from comapoi_cli.data import clean_file
    from comapoi_cli.data import synth as synth_module
    from comapoi_cli.data.stats import compute_stats
    from comapoi_cli.plugins import get_registry

    source = agent_data_dir / "nyc" / "agent3_train_samples.jsonl"
    for run in (lambda r: compute_stats([source], tokenizer=tiny_model_dir, registry=get_registry(), reporter=r),
                lambda r: clean_file(source, tmp_path / "c.jsonl", tokenizer=tiny_model_dir, seq_length=4096,
                                     registry=get_registry(), reporter=r)):
        recorder = _Recorder()
        run(recorder)
        names = [c[0] for c in recorder.calls]
        assert names[0] == "progress_start" and names[-1] == "progress_stop" and "progress_update" in names
        assert recorder.calls[0][2]["unit"] == "bytes" and recorder.calls[0][1][0] == source.stat().st_size
        assert [c[1][0] for c in recorder.calls if c[0] == "progress_update"][-1] == source.stat().st_size
    monkeypatch.setattr(synth_module, "PROGRESS_MIN_TRAJECTORIES", 5)
    recorder = _Recorder()
    synth_module.synth_dataset("nyc", tmp_path / "s", trajectories=200, seed=1, plain=False, reporter=recorder, registry=get_registry())
    starts = [c for c in recorder.calls if c[0] == "progress_start"]
    assert starts and starts[0][2]["unit"] == "trajectories" and starts[0][1][0] == 200
    assert [c[1][0] for c in recorder.calls if c[0] == "progress_update"][-1] == 200
