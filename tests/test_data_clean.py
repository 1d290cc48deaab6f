"""``comapoi data clean``: each rule, on real records and hand-made broken lines; nothing is lost."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from test_data_tokens import real_lines, synth_dir  # noqa: F401  (fixture)

from comapoi_cli.data import clean_file, read_rejects
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.plugins import get_registry as _REGISTRY

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def rec(user: str = "hello", answer: str = "world", **extra) -> dict:
    return {"messages": [SYSTEM, {"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


def line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def write(path: Path, lines: list, *, newline: str = "\n", end: bool = True) -> Path:
    data = b""
    for item in lines:
        data += (item if isinstance(item, bytes) else item.encode("utf-8")) + newline.encode()
    if not end:
        data = data[: -len(newline)]
    path.write_bytes(data)
    return path


def by_line(summary) -> dict[int, dict]:
    return {entry["line"]: entry for entry in read_rejects(summary.rejects)}


def test_real_records_pass_untouched(tmp_path):
    source = write(tmp_path / "nyc_train.jsonl", real_lines())
    summary = clean_file(source, tmp_path / "out.jsonl", dataset="nyc", registry=_REGISTRY())
    assert summary.lines_in == summary.kept == 25 and summary.rejected == {}
    assert (tmp_path / "out.jsonl").read_bytes() == source.read_bytes()  # unchanged lines are copied as they are
    assert (tmp_path / "out.rejects.jsonl").read_text() == ""


def test_every_broken_line_lands_in_the_rejects_file(tmp_path):
    real = real_lines()
    good = json.loads(real[0])
    no_user = {"messages": [SYSTEM, {"role": "assistant", "content": "x"}]}
    no_assistant = {"messages": [SYSTEM, {"role": "user", "content": "x"}]}
    not_last = {"messages": good["messages"] + [{"role": "user", "content": "and then?"}]}
    empty = rec(answer="   ")
    tool = {"messages": [SYSTEM, {"role": "tool", "content": "x"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a"}]}
    dict_content = rec(user="u")
    dict_content["messages"][1]["content"] = {"text": "u"}
    image = rec()
    image["messages"][1]["content"] = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    lines = [
        real[0],                                   # 1 kept
        "",                                        # 2 blank_line
        b'{"messages": "\xff\xfe broken"}',        # 3 invalid_utf8
        '{"messages": [',                          # 4 bad_json
        "[1, 2, 3]",                               # 5 no_messages (not an object)
        line({"text": "no messages"}),             # 6 no_messages
        line({"messages": "a string"}),            # 7 no_messages
        line({"messages": [SYSTEM, "just text"]}), # 8 bad_message
        line(tool),                                # 9 unknown_role
        line(dict_content),                        # 10 content_type
        line(image),                               # 11 content_type
        line(no_user),                             # 12 no_user
        line(no_assistant),                        # 13 no_assistant
        line(not_last),                            # 14 assistant_not_last
        line(empty),                               # 15 empty_answer
        real[0],                                   # 16 duplicate of line 1
        real[1],                                   # 17 kept
        '{"messages": [{"role": "user", "content": "cut off',  # 18 truncated_line (no newline)
    ]
    source = write(tmp_path / "mixed.jsonl", lines, end=False)
    summary = clean_file(source, tmp_path / "out.jsonl", dataset="nyc", registry=_REGISTRY())
    expected = {2: "blank_line", 3: "invalid_utf8", 4: "bad_json", 5: "no_messages", 6: "no_messages",
                7: "no_messages", 8: "bad_message", 9: "unknown_role", 10: "content_type", 11: "content_type",
                12: "no_user", 13: "no_assistant", 14: "assistant_not_last", 15: "empty_answer", 16: "duplicate",
                18: "truncated_line"}
    rejects = by_line(summary)
    assert {n: r["reason"] for n, r in rejects.items()} == expected
    assert summary.lines_in == 18 == summary.kept + summary.rejected_total
    assert summary.kept == 2
    # the original text is kept verbatim; invalid UTF-8 also as base64 bytes
    assert rejects[4]["text"] == '{"messages": ['
    assert rejects[16]["text"] == real[0] and "line 1" in rejects[16]["detail"]
    assert base64.b64decode(rejects[3]["raw_base64"]) == b'{"messages": "\xff\xfe broken"}'
    assert "image_url" in rejects[11]["detail"]
    out = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert out == [real[0], real[1]]


def test_conversions_bom_crlf_sharegpt_content_parts_numbers(tmp_path):
    real = real_lines()
    share = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "there"}], "id": 7}
    parts = rec()
    parts["messages"][1]["content"] = [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]
    number = rec(answer="x")
    number["messages"][2]["content"] = 22
    lines = [b"\xef\xbb\xbf" + real[0].encode(), real[1], line(share), line(parts), line(number)]
    source = write(tmp_path / "in.jsonl", lines, newline="\r\n")
    summary = clean_file(source, tmp_path / "out.jsonl", registry=_REGISTRY())
    assert summary.kept == 5 and summary.rejected == {}
    assert summary.converted == {"bom": 1, "crlf": 5, "sharegpt": 1, "role_names": 2, "content_parts": 1,
                                 "numbers_to_text": 1}
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert out[0] == json.loads(real[0])
    assert out[2] == {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "there"}]}
    assert out[3]["messages"][1]["content"] == "part one, part two"
    assert out[4]["messages"][2]["content"] == "22"
    assert b"\r" not in (tmp_path / "out.jsonl").read_bytes()


def test_huge_line_and_empty_file(tmp_path):
    big = rec(user="x" * (1 << 20))
    source = write(tmp_path / "big.jsonl", [line(big), real_lines()[0]])
    summary = clean_file(source, tmp_path / "out.jsonl", registry=_REGISTRY())
    assert summary.kept == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    summary = clean_file(empty, tmp_path / "out2.jsonl", registry=_REGISTRY())
    assert summary.lines_in == 0 and (tmp_path / "out2.jsonl").read_bytes() == b""


def _candidates(ids) -> str:
    return ", ".join(map(str, ids))


@pytest.mark.parametrize("answer, reason", [
    (_candidates(range(100, 125)), None),
    ('{"next_poi_id": ["' + '", "'.join(map(str, range(100, 125))) + '"]}', None),
    ("The user likes coffee shops in the morning.", None),                     # a profile text
    (_candidates(range(100, 124)), "candidate list has 24 ids, expected 25"),
    (_candidates([100] * 2 + list(range(101, 124))), "repeats ids"),
    (_candidates(list(range(100, 124)) + [6000]), "outside 0..5091"),
    (_candidates(list(range(100, 124)) + [-3]), "outside 0..5091"),
])
def test_candidate_lists_must_hold_25_unique_ids_in_range(tmp_path, answer, reason):
    record = json.loads(real_lines()[0])
    record["messages"][0]["content"] = "You are a helpful assistant."
    record["messages"][1]["content"] = "user_id: 0, subtrajectory_id: 1\nList 25 candidates.\n" + record["messages"][1]["content"]
    record["messages"][2]["content"] = answer
    source = write(tmp_path / "agent1.jsonl", [line(record)])
    summary = clean_file(source, tmp_path / "out.jsonl", role="agent1", dataset="nyc", registry=_REGISTRY())
    if reason is None:
        assert summary.kept == 1
    else:
        rejects = read_rejects(summary.rejects)
        assert rejects[0]["reason"] == "wrong_answer" and reason in rejects[0]["detail"]


def test_max_poi_id_without_a_preset(tmp_path):
    record = rec(user="user_id: 1, subtrajectory_id: 1", answer=_candidates(range(0, 25)))
    source = write(tmp_path / "a.jsonl", [line(record)])
    assert clean_file(source, tmp_path / "o.jsonl", role="agent2", registry=_REGISTRY()).kept == 1            # no range known
    assert clean_file(source, tmp_path / "o.jsonl", role="agent2", max_poi_id=20, registry=_REGISTRY()).kept == 0


def test_label_leak_as_in_the_original_prompts(tmp_path):
    real = real_lines()
    leaking = json.loads(real[0])
    leaking["messages"][1]["content"] += "\n###True Next POI Information:\n- POI ID: 22\n- Category: Bar"
    stated = json.loads(real[1])
    stated["messages"][1]["content"] += "\nThe next POI ID is 40."
    placeholder = json.loads(real[2])
    placeholder["messages"][1]["content"] += '\nAnswer in JSON: {"next_poi_id": ["value1", "value2"]}'
    source = write(tmp_path / "in.jsonl", [line(leaking), line(stated), line(placeholder)])
    summary = clean_file(source, tmp_path / "out.jsonl", registry=_REGISTRY())
    assert summary.rejected == {"label_leak": 2} and summary.kept == 1
    rejects = by_line(summary)
    assert "True Next POI" in rejects[1]["detail"] and "40" in rejects[2]["detail"]
    warned = clean_file(source, tmp_path / "out2.jsonl", policies={"label_leak": "warn"}, registry=_REGISTRY())
    assert warned.kept == 3 and warned.warnings == {"label_leak": 2} and warned.warning_lines == {"label_leak": [1, 2]}


def test_agent3_target_that_is_a_candidate_list(tmp_path):
    candidates = list(range(300, 325))
    prompt = ("For User_id: 3, Subtrajectory_id: 1\nRank the candidates.\n"
              f"Candidates from the Profiler: {_candidates(candidates[::-1])}\n"
              f"Candidates from the Forecaster: {_candidates(candidates)}")
    mixed_up = rec(user=prompt, answer=_candidates(candidates))                         # the original's mix-up
    copied = rec(user=prompt, answer=json.dumps({"next_poi_id": candidates[::-1]}))    # a prompt list, copied
    final = rec(user=prompt, answer=json.dumps({"next_poi_id": [307, 300, 301]}))     # a ranked prediction
    prefix = rec(user=prompt + "!", answer=json.dumps({"next_poi_id": candidates[:10]}))  # top-10 of a list: fine
    out_of_range = rec(user=prompt + "?", answer=json.dumps({"next_poi_id": [9999]}))
    source = write(tmp_path / "agent3.jsonl", [line(mixed_up), line(copied), line(final), line(prefix), line(out_of_range)])
    summary = clean_file(source, tmp_path / "out.jsonl", role="agent3", dataset="nyc", registry=_REGISTRY())
    reasons = {n: r["reason"] for n, r in by_line(summary).items()}
    assert reasons == {1: "wrong_target", 2: "wrong_target", 5: "wrong_answer"}
    assert summary.kept == 2


def test_merged_files_use_each_records_agent_field(tmp_path):
    bad_candidates = rec(user="user_id: 1, subtrajectory_id: 1", answer=_candidates(range(10)), agent="agent1")
    bad_final = rec(user="For User_id: 1, Subtrajectory_id: 1", answer=_candidates(range(25)), agent="agent3")
    fine = rec(user="user_id: 2, subtrajectory_id: 1", answer="profile", agent="agent2")
    source = write(tmp_path / "merged.jsonl", [line(bad_candidates), line(bad_final), line(fine)])
    summary = clean_file(source, tmp_path / "out.jsonl", registry=_REGISTRY())
    assert summary.rejected == {"wrong_answer": 1, "wrong_target": 1}
    assert summary.roles == {"agent2": 1}


def test_policy_fail_stops_and_writes_nothing(tmp_path):
    source = write(tmp_path / "in.jsonl", [real_lines()[0], "{broken"])
    target = tmp_path / "out.jsonl"
    target.write_text("previous output\n")
    with pytest.raises(DataError, match="Line 2 .* 'bad_json'"):
        clean_file(source, target, policies={"bad_json": "fail"}, registry=_REGISTRY())
    assert target.read_text() == "previous output\n"  # atomic: the old output survives
    with pytest.raises(DataError):
        clean_file(source, target, strict=True, registry=_REGISTRY())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporary left behind


def test_bad_policy_options_are_usage_errors(tmp_path):
    source = write(tmp_path / "in.jsonl", [real_lines()[0]])
    with pytest.raises(UsageError, match="Unknown check"):
        clean_file(source, tmp_path / "o.jsonl", policies={"nope": "drop"}, registry=_REGISTRY())
    with pytest.raises(UsageError, match="cannot be kept"):
        clean_file(source, tmp_path / "o.jsonl", policies={"bad_json": "keep"}, registry=_REGISTRY())
    with pytest.raises(DataError, match="does not exist"):
        clean_file(tmp_path / "missing.jsonl", tmp_path / "o.jsonl", registry=_REGISTRY())


def test_duplicate_policies(tmp_path):
    real = real_lines()
    reformatted = json.dumps(json.loads(real[0]), indent=None, separators=(",", ":"))  # same conversation, other bytes
    source = write(tmp_path / "in.jsonl", [real[0], reformatted, real[0]])
    assert clean_file(source, tmp_path / "o.jsonl", registry=_REGISTRY()).rejected == {"duplicate": 2}
    assert clean_file(source, tmp_path / "o.jsonl", policies={"duplicate": "keep"}, registry=_REGISTRY()).kept == 3


def test_parallel_workers_give_identical_outputs(tmp_path, synth_dir, monkeypatch):
    import comapoi_cli.data.clean as clean_module

    parts = [(synth_dir / "nyc" / f"agent{i}_train_samples.jsonl").read_text(encoding="utf-8").splitlines() for i in (1, 2, 3)]
    lines = [x for part in parts for x in part]
    lines[5] = "{bad json"
    lines.insert(40, lines[10])  # a duplicate across the block boundary
    source = write(tmp_path / "all.jsonl", lines)
    single = clean_file(source, tmp_path / "single.jsonl", workers=1, dataset="nyc", registry=_REGISTRY())
    monkeypatch.setattr(clean_module, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(clean_module, "BLOCK_SIZE", 64 << 10)
    multi = clean_file(source, tmp_path / "multi.jsonl", workers=2, dataset="nyc", registry=_REGISTRY())
    assert multi.workers == 2 and single.workers == 1
    assert (tmp_path / "single.jsonl").read_bytes() == (tmp_path / "multi.jsonl").read_bytes()
    assert (tmp_path / "single.rejects.jsonl").read_bytes() == (tmp_path / "multi.rejects.jsonl").read_bytes()
    assert multi.rejected == {"bad_json": 1, "duplicate": 1}


def test_the_orjson_fast_path_changes_nothing(tmp_path, monkeypatch):
    """orjson reads clean records; json stays the reference for everything else. Lines where the two
    parsers differ (NaN, integers beyond 64 bits, unpaired surrogates, duplicate keys) and broken
    lines must give byte-identical outputs and rejects with and without orjson."""
    import comapoi_cli.data.records as records

    assert records.fast_loads is not None, "orjson is a dependency: the fast path must be in use"
    real = real_lines()
    lines = [
        real[0], real[1],
        '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "score": NaN}',
        '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": 123456789012345678901234567890}]}',
        '{"messages": [{"role": "user", "content": "\\ud800 alone"}, {"role": "assistant", "content": "a"}]}',
        '{"messages": [{"role": "user", "content": "first"}, {"role": "user", "content": "x"}, '
        '{"role": "assistant", "content": "a", "content": "second"}]}',
        '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]',  # bad_json
        real[0],  # duplicate
        "\ufeff" + real[2],  # a BOM inside the file (not its first line) is no JSON
    ]
    source = write(tmp_path / "mixed.jsonl", lines, newline="\r\n")
    outputs = {}
    for mode in ("orjson", "json"):
        if mode == "json":
            monkeypatch.setattr(records, "fast_loads", None)
        summary = clean_file(source, tmp_path / f"{mode}.jsonl", dataset="nyc", workers=1, registry=_REGISTRY())
        outputs[mode] = ((tmp_path / f"{mode}.jsonl").read_bytes(), (tmp_path / f"{mode}.rejects.jsonl").read_bytes(),
                         summary.kept, summary.rejected)
    assert outputs["orjson"] == outputs["json"]
    assert outputs["json"][2] == 6 and outputs["json"][3] == {"bad_json": 2, "duplicate": 1}
