"""``data synth``, ``prepare_training_data`` (the training step's data), ``data stats``, and the CLI demo."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pytest
from test_data_tokens import REAL, real_lines, run_cli, synth_dir  # noqa: F401  (fixture)

from comapoi_cli.data import clean_file, prepare_training_data
from comapoi_cli.data.synth import synth_dataset
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.plugins import get_registry as _REGISTRY

CHECKIN = re.compile(r"At (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}), ([A-Za-z]+), user (\d+) visit POI ID (\d+) "
                     r"\((.+?), (-?\d+\.\d+),(-?\d+\.\d+)\)\.")


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_synth_from_real_trajectories(tmp_path):
    summary = synth_dataset("nyc", tmp_path, source=REAL / "nyc_train.jsonl", poi_info=REAL / "nyc_poi_info.csv", registry=_REGISTRY())
    folder = tmp_path / "nyc"
    truths = [json.loads(json.loads(x)["messages"][2]["content"])["next_poi_id"] for x in real_lines()]
    a1, a2, a3 = (_records(folder / f"agent{i}_train_samples.jsonl") for i in (1, 2, 3))
    assert (len(a1), len(a2), len(a3)) == (50, 50, 25) and summary.trajectories == 25
    for i, truth in enumerate(truths):
        final = json.loads(a3[i]["messages"][2]["content"])["next_poi_id"]
        assert final[0] == truth and len(final) == 10 == len(set(final))          # the true id first
        for records in (a1, a2):
            candidates = [int(x) for x in records[2 * i + 1]["messages"][2]["content"].split(", ")]
            assert candidates[0] == truth and len(set(candidates)) == 25
        assert a3[i]["messages"][1]["content"].startswith("For User_id: ")
        assert a1[2 * i]["messages"][1]["content"].startswith("user_id: ")
    assert not (folder / "nyc_train.jsonl").exists()  # real samples are not copied
    # the clean step finds nothing wrong: no leak, valid candidate lists, agent3 targets are predictions
    for role in ("agent1", "agent2", "agent3"):
        result = clean_file(folder / f"{role}_train_samples.jsonl", tmp_path / f"{role}.jsonl", role=role,
                            dataset="nyc", strict=True, registry=_REGISTRY())
        assert result.rejected == {} and result.warnings == {}


def test_synth_simulated_city_is_deterministic_and_realistic(tmp_path):
    first = synth_dataset("tky", tmp_path / "a", trajectories=40, seed=3, registry=_REGISTRY())
    synth_dataset("tky", tmp_path / "b", trajectories=40, seed=3, registry=_REGISTRY())
    other = synth_dataset("tky", tmp_path / "c", trajectories=40, seed=4, registry=_REGISTRY())
    names = sorted(p.name for p in (tmp_path / "a" / "tky").iterdir())
    assert names == ["agent1_train_samples.jsonl", "agent2_train_samples.jsonl", "agent3_train_samples.jsonl",
                     "tky_poi_info.csv", "tky_test.jsonl", "tky_train.jsonl"]
    for name in names:
        assert (tmp_path / "a" / "tky" / name).read_bytes() == (tmp_path / "b" / "tky" / name).read_bytes()
    assert (tmp_path / "a" / "tky" / "agent3_train_samples.jsonl").read_bytes() != \
        (tmp_path / "c" / "tky" / "agent3_train_samples.jsonl").read_bytes()
    assert first.records["agent1_train_samples.jsonl"] == 80 and first.records["agent3_train_samples.jsonl"] == 40
    assert first.records["tky_test.jsonl"] == first.users and other.trajectories == 40
    # check-ins use the original wording: weekday matches the date, coordinates inside Tokyo, ids in range
    plain = _records(tmp_path / "a" / "tky" / "tky_train.jsonl")
    for record in plain[:10]:
        for stamp, day, _user, poi, _cat, lat, lon in CHECKIN.findall(record["messages"][1]["content"]):
            assert datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").strftime("%A") == day
            assert 35.51 <= float(lat) <= 35.87 and 139.47 <= float(lon) <= 139.91
            assert 0 <= int(poi) <= 7851 and stamp[:4] in ("2012", "2013", "2014")
        assert json.loads(record["messages"][2]["content"])["next_poi_id"] <= 7851
    lengths = [len(r["messages"][1]["content"]) for r in _records(tmp_path / "a" / "tky" / "agent1_train_samples.jsonl")]
    assert 1000 < min(lengths) and max(lengths) < 40000  # hundreds to a few thousand tokens
    for role in ("agent1", "agent2", "agent3"):
        result = clean_file(tmp_path / "a" / "tky" / f"{role}_train_samples.jsonl", tmp_path / f"{role}.jsonl",
                            role=role, dataset="tky", strict=True, registry=_REGISTRY())
        assert result.rejected == {}


def test_synth_errors(tmp_path):
    with pytest.raises(UsageError, match="No city preset"):
        synth_dataset("mycity", tmp_path, registry=_REGISTRY())
    assert synth_dataset("mycity", tmp_path, preset="ca", trajectories=5, registry=_REGISTRY()).trajectories == 5
    with pytest.raises(DataError, match="Cannot find"):
        synth_dataset("nyc", tmp_path, source=tmp_path / "missing.jsonl", registry=_REGISTRY())
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"a": 1}\n')
    with pytest.raises(DataError, match="no CoMaPOI trajectories"):
        synth_dataset("nyc", tmp_path, source=junk, registry=_REGISTRY())


def test_prepare_reuses_only_while_inputs_are_unchanged(tmp_path, synth_dir):
    data = tmp_path / "data"
    (data / "nyc").mkdir(parents=True)
    for i in (1, 2, 3):
        name = f"agent{i}_train_samples.jsonl"
        (data / "nyc" / name).write_bytes((synth_dir / "nyc" / name).read_bytes())
    first = prepare_training_data(type_="merged", dataset="nyc", data_dir=data, registry=_REGISTRY())
    assert first.train_path.name == "cleaned_total_agent_train_samples_all.jsonl"
    assert first.holdout_path.name == "cleaned_total_agent_train_samples_100.jsonl"
    assert not first.summary["reused"] and first.summary["in"] == 300 == first.summary["kept"]
    assert first.summary["train"] + first.summary["holdout"] == 300
    assert first.summary["holdout"] == 60 and first.summary["notes"]  # 100 would be a third of the data: capped
    assert (data / "nyc" / "total_agent_train_samples.jsonl").is_file()
    agents = {json.loads(x)["agent"] for x in first.train_path.read_text().splitlines()}
    assert agents == {"agent1", "agent2", "agent3"}
    assert set(first.input_hashes) == {str(data / "nyc" / f"agent{i}_train_samples.jsonl") for i in (1, 2, 3)}

    second = prepare_training_data(type_="merged", dataset="nyc", data_dir=data, registry=_REGISTRY())
    assert second.summary["reused"] and second.train_path.read_bytes() == first.train_path.read_bytes()

    agent3 = data / "nyc" / "agent3_train_samples.jsonl"
    agent3.write_text(agent3.read_text() + "{broken line\n")  # the input changed: rebuild
    third = prepare_training_data(type_="merged", dataset="nyc", data_dir=data, registry=_REGISTRY())
    assert not third.summary["reused"] and third.summary["rejected"] == {"bad_json": 1}
    assert third.input_hashes != first.input_hashes

    seeded = prepare_training_data(type_="merged", dataset="nyc", data_dir=data, seed=1, registry=_REGISTRY())
    assert not seeded.summary["reused"]  # other options: rebuild

    role = prepare_training_data(type_="agent3", dataset="nyc", data_dir=data, registry=_REGISTRY())
    assert role.train_path.name == "agent3_train_samples_all.jsonl" and role.summary["rejects_file"].endswith(
        "agent3_train_samples.rejects.jsonl")


def test_prepare_explicit_file_and_errors(tmp_path, synth_dir, monkeypatch):
    source = tmp_path / "mine.jsonl"
    source.write_bytes((synth_dir / "nyc" / "agent3_train_samples.jsonl").read_bytes())
    prepared = prepare_training_data(type_="agent3", data_path=source, registry=_REGISTRY())
    assert prepared.holdout_path is None and prepared.train_path == tmp_path / "mine_clean.jsonl"
    assert prepared.summary["train"] == 60
    split = prepare_training_data(type_="agent3", data_path=source, split=True, test_size=10, registry=_REGISTRY())
    assert split.holdout_path == tmp_path / "mine_100.jsonl" and split.summary["holdout"] == 10

    monkeypatch.setenv("COMAPOI_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as info:
        prepare_training_data(type_="agent1", dataset="nyc", registry=_REGISTRY())
    assert "nowhere/nyc/agent1_train_samples.jsonl" in info.value.message
    assert "comapoi data synth --dataset nyc" in info.value.hint
    with pytest.raises(DataError, match="Cannot find any agent training file"):
        prepare_training_data(type_="merged", dataset="nyc", registry=_REGISTRY())
    with pytest.raises(UsageError, match="Unknown agent role"):
        prepare_training_data(type_="agent9", dataset="nyc", registry=_REGISTRY())
    with pytest.raises(UsageError):
        prepare_training_data(type_="agent1", registry=_REGISTRY())

    leaky = tmp_path / "leaky.jsonl"
    record = json.loads(real_lines()[0])
    record["messages"][1]["content"] += "\nTrue Next POI Information: POI ID 22"
    leaky.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match="No training record survived cleaning \\(1 label_leak\\)") as info:
        prepare_training_data(type_="agent3", data_path=leaky, registry=_REGISTRY())
    assert "--on label_leak=warn" in info.value.hint


def test_stats_without_tokenizer(tmp_path, synth_dir):
    from comapoi_cli.data.stats import compute_stats, dataset_files, plot_lengths

    files = dataset_files("nyc", synth_dir, registry=_REGISTRY())
    leaky = tmp_path / "agent1_train_samples.jsonl"
    lines = (synth_dir / "nyc" / "agent1_train_samples.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["messages"][1]["content"] += "\nThe true next POI is 12."
    leaky.write_text("\n".join(lines + [lines[1], json.dumps(record), "{bad"]) + "\n")
    report = compute_stats(files, dataset="nyc", seq_length=1200, registry=_REGISTRY())
    for role, n in (("agent1", 120), ("agent2", 120), ("agent3", 60)):
        stats = report.roles[role]
        assert stats.records == n and stats.tokens_estimated and stats.duplicates == 0
        assert stats.tokens["p50"] <= stats.tokens["p90"] <= stats.tokens["p99"] <= stats.tokens["max"]
        assert 0 < stats.loss_share < 0.5 and stats.over_seq_length is not None
        assert sum(stats.histogram["counts"]) == n
    assert report.roles["agent3"].distinct_targets > 10
    own = compute_stats([leaky], dataset="nyc", registry=_REGISTRY())
    assert list(own.roles) == ["agent1"]  # the role comes from the file name
    assert own.roles["agent1"].duplicates == 1 and own.roles["agent1"].label_leaks == 1
    assert own.unusable == {"bad_json": 1}
    png = plot_lengths(report, tmp_path / "lengths.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_demo_pipeline(tmp_path):
    env = {"COMAPOI_DATA_DIR": str(tmp_path / "data")}
    steps = [
        ["data", "synth", "--dataset", "nyc", "-n", "40", "--json"],
        ["data", "clean", "--dataset", "nyc", "--type", "merged", "--json"],
        ["data", "split", "--dataset", "nyc", "--type", "agent1", "--test-size", "0.1", "--group-by", "user", "--json"],
        ["data", "merge", "--dataset", "nyc", "--weight", "agent3=2", "--shuffle", "--json"],
        ["data", "stats", "--dataset", "nyc", "--seq-length", "1200", "--plot", str(tmp_path / "p.png"), "--json"],
    ]
    outputs = []
    for args in steps:
        result = run_cli(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
        outputs.append(json.loads(result.stdout))
    synth, cleaned, split, merged, stats = outputs
    assert synth["records"]["agent3_train_samples.jsonl"] == 40
    assert cleaned["in"] == 200 == cleaned["kept"] and cleaned["train"] + cleaned["holdout"] == 200
    assert split["group_by"] == "user" and split["holdout"] >= 8
    assert merged["records_out"]["agent3"] == 80
    assert set(stats["roles"]) == {"agent1", "agent2", "agent3"} and (tmp_path / "p.png").is_file()
    table = run_cli("data", "stats", "--dataset", "nyc", env=env)
    assert table.returncode == 0 and "loss share" in table.stdout and "█" in table.stdout


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage\n", b'{"messages": [\n'])
def test_cli_bad_input_never_gives_a_traceback(tmp_path, content):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    result = run_cli("data", "clean", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Error:" in result.stderr
    if content:
        rejects = [json.loads(x) for x in (tmp_path / "bad_clean.rejects.jsonl").read_text().splitlines()]
        assert len(rejects) == 1


def test_cli_usage_errors_are_sentences(tmp_path):
    for args in (["data", "clean"], ["data", "clean", str(tmp_path)], ["data", "stats"],
                 ["data", "clean", str(REAL / "nyc_train.jsonl"), "--on", "bad_json=keep"],
                 ["data", "split", str(REAL / "nyc_train.jsonl"), "--test-size", "ten"],
                 ["data", "clean", "--dataset", "nyc", "--data-dir", str(tmp_path)]):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode in (1, 2), args
        assert "Traceback" not in result.stderr and "Error" in result.stderr, (args, result.stderr)
    listed = run_cli("data", "clean", "--list-checks", "--json")
    assert {c["check"] for c in json.loads(listed.stdout)} >= {"label_leak", "wrong_target", "duplicate", "too_long"}
