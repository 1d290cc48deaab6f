"""``data split`` (seeded, reproducible, by user) and ``data merge`` (tags, weights, shuffle)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from test_data_tokens import real_lines, synth_dir  # noqa: F401  (fixture)

from comapoi_cli.data import merge_files, parse_test_size, parse_weights, split_file
from comapoi_cli.default_plugins.comapoi_roles import user_key
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.plugins import get_registry as _REGISTRY


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def test_split_is_seeded_and_byte_identical(tmp_path, synth_dir):
    source = _copy(synth_dir / "nyc" / "agent1_train_samples.jsonl", tmp_path / "agent1_train_samples.jsonl")
    first = split_file(source, test_size=30, seed=1, registry=_REGISTRY())
    assert Path(first.train_path).name == "agent1_train_samples_all.jsonl"
    assert Path(first.holdout_path).name == "agent1_train_samples_100.jsonl"
    train1, hold1 = Path(first.train_path).read_bytes(), Path(first.holdout_path).read_bytes()
    again = split_file(source, test_size=30, seed=1, registry=_REGISTRY())
    assert Path(again.train_path).read_bytes() == train1 and Path(again.holdout_path).read_bytes() == hold1
    other = split_file(source, tmp_path / "t.jsonl", tmp_path / "h.jsonl", test_size=30, seed=2, registry=_REGISTRY())
    assert (tmp_path / "h.jsonl").read_bytes() != hold1
    assert (first.records, first.train, first.holdout) == (120, 90, 30) and other.holdout == 30
    # nothing lost, nothing doubled, input order kept on both sides
    original = source.read_text().splitlines()
    train, hold = Path(first.train_path).read_text().splitlines(), Path(first.holdout_path).read_text().splitlines()
    assert sorted(train + hold) == sorted(original)
    assert train == [x for x in original if x in set(train)]


def test_split_fraction_shuffle_and_errors(tmp_path):
    lines = real_lines()
    source = tmp_path / "real.jsonl"
    source.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a trailing blank line is skipped
    result = split_file(source, test_size=0.2, seed=3, shuffle=True, registry=_REGISTRY())
    assert (result.holdout, result.train, result.blank_lines) == (5, 20, 1)
    again = split_file(source, tmp_path / "a.jsonl", tmp_path / "b.jsonl", test_size=0.2, seed=3, shuffle=True, registry=_REGISTRY())
    assert (tmp_path / "b.jsonl").read_bytes() == Path(result.holdout_path).read_bytes()
    assert again.shuffled
    with pytest.raises(UsageError, match="leaves nothing to train on"):
        split_file(source, test_size=25, registry=_REGISTRY())
    with pytest.raises(UsageError):
        split_file(source, test_size=-1, registry=_REGISTRY())
    with pytest.raises(DataError):
        split_file(tmp_path / "missing.jsonl", registry=_REGISTRY())
    assert parse_test_size("100") == 100 and parse_test_size("0.1") == 0.1 and parse_test_size("10%") == 0.1
    with pytest.raises(UsageError):
        parse_test_size("ten")


def test_split_by_user_keeps_users_on_one_side(tmp_path):
    lines = real_lines()  # 25 trajectories of users 0-9
    source = tmp_path / "nyc_train.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = split_file(source, test_size=6, seed=5, group_by="user", registry=_REGISTRY())
    users = lambda path: {user_key(json.loads(x)) for x in Path(path).read_text().splitlines()}  # noqa: E731
    train_users, hold_users = users(result.train_path), users(result.holdout_path)
    assert train_users and hold_users and not (train_users & hold_users)
    assert None not in train_users | hold_users
    assert result.groups == 10 and result.holdout >= 6 and result.ungrouped == 0
    with pytest.raises(UsageError, match="--group-by"):
        split_file(source, group_by="city", registry=_REGISTRY())


def test_user_key_reads_every_comapoi_prompt_style():
    def record(text):
        return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]}

    assert user_key(record("user_id: 12, subtrajectory_id: 3\n...")) == "12"
    assert user_key(record("For User_id: 7, Subtrajectory_id: 1")) == "7"
    assert user_key(record('{"User": "User ID:5, Subtrajectory ID:2"}')) == "5"
    assert user_key(record("<historical trajectory of user_9_subtrajectory_1>\nAt ...")) == "9"
    assert user_key(record("nothing here")) is None


def test_merge_tags_weights_and_shuffle(tmp_path, synth_dir):
    folder = synth_dir / "nyc"
    inputs = {f"agent{i}": folder / f"agent{i}_train_samples.jsonl" for i in (1, 2, 3)}
    plain = merge_files(inputs, tmp_path / "total.jsonl")
    assert plain.records_out == {"agent1": 120, "agent2": 120, "agent3": 60} and plain.total == 300
    records = [json.loads(x) for x in (tmp_path / "total.jsonl").read_text().splitlines()]
    assert [r["agent"] for r in records] == ["agent1"] * 120 + ["agent2"] * 120 + ["agent3"] * 60
    assert records[0]["messages"] == json.loads(inputs["agent1"].read_text().splitlines()[0])["messages"]

    weighted = merge_files(inputs, tmp_path / "w.jsonl", weights={"agent3": 2, "agent1": 0.5}, shuffle=True, seed=9)
    assert weighted.records_out["agent3"] == 120 and weighted.records_out["agent2"] == 120
    assert 35 <= weighted.records_out["agent1"] <= 85
    tags = Counter(json.loads(x)["agent"] for x in (tmp_path / "w.jsonl").read_text().splitlines())
    assert tags == Counter(weighted.records_out)
    again = merge_files(inputs, tmp_path / "w2.jsonl", weights={"agent3": 2, "agent1": 0.5}, shuffle=True, seed=9)
    assert (tmp_path / "w2.jsonl").read_bytes() == (tmp_path / "w.jsonl").read_bytes() and again.total == weighted.total
    assert not list(tmp_path.glob(".*unshuffled*"))


def test_merge_retags_and_passes_broken_lines_through(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"messages": [], "agent": "agent2"}\n{broken\n\n[1]\n', encoding="utf-8")
    result = merge_files({"agent1": a}, tmp_path / "m.jsonl")
    assert result.retagged == 1 and result.blank_lines == 1 and result.total == 3
    assert (tmp_path / "m.jsonl").read_text().splitlines() == [
        '{"messages": [], "agent": "agent1"}', "{broken", "[1]"]
    with pytest.raises(UsageError):
        parse_weights(["agent1=-1"])
    with pytest.raises(UsageError, match="not merged"):
        merge_files({"agent1": a}, tmp_path / "m.jsonl", weights={"agent9": 2})
    with pytest.raises(DataError):
        merge_files({"agent1": tmp_path / "missing.jsonl"}, tmp_path / "m.jsonl")
