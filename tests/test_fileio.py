"""Atomic writes: all or nothing, and the usual file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from comapoi_cli.fileio import atomic_folder, atomic_writer, read_json, sha256_file, write_json_atomic


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_writer(target) as handle:
            handle.write("half of the new content")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a" / "run.json", {"steps": 3})
    finally:
        os.umask(old)
    path = tmp_path / "a" / "run.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert read_json(path) == {"steps": 3}
    assert len(sha256_file(path)) == 64


def test_atomic_folder_replaces_a_folder_only_when_complete(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    try:
        with atomic_folder(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    except RuntimeError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]  # the old folder untouched
    with atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert sorted(p.name for p in target.iterdir()) == ["old.txt"]  # nothing visible before the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


# -- JSON lines: one reader and writer ---------------------------------------------------------------------------
def test_iter_jsonl_reads_a_bom_skips_blank_lines_and_gives_each_broken_line_its_reason(tmp_path):
    from comapoi_cli.fileio import iter_jsonl

    path = tmp_path / "in.jsonl"
    path.write_bytes(b''.join([b'\xef\xbb\xbf{"a": 1}\r\n',  # 1: a BOM and a CRLF end
                               b"\n",                          # 2: blank
                               b"   \t\n",                     # 3: blank (white space only)
                               b'{"a": 2\n',                   # 4: broken JSON
                               b'"\xff"\n',                    # 5: not UTF-8
                               b"[" * 100_000 + b"\n",         # 6: nested too deeply for json
                               b"1" + b"2" * 40 + b"\n",       # 7: an integer beyond 64 bits, kept exact
                               b'{"b": "\xc3\xa9"}']))          # 8: no final newline
    rows = list(iter_jsonl(path))
    assert [row[0] for row in rows] == [1, 4, 5, 6, 7, 8]
    by_line = {number: (value, error) for number, _raw, value, error in rows}
    assert by_line[1] == ({"a": 1}, None)
    assert by_line[7] == (int("1" + "2" * 40), None) and type(by_line[7][0]) is int
    assert by_line[8] == ({"b": "é"}, None)
    assert isinstance(by_line[4][1], ValueError) and by_line[4][1].msg.startswith("Expecting")
    assert isinstance(by_line[5][1], UnicodeDecodeError) and by_line[5][0] is None
    assert isinstance(by_line[6][1], (RecursionError, ValueError))
    # errors="replace": bad bytes read as U+FFFD, the line keeps its value
    replaced = {number: value for number, _raw, value, _error in iter_jsonl(path, errors="replace")}
    assert replaced[5] == "\ufffd"


def test_loads_gives_json_values_and_errors_with_or_without_orjson(monkeypatch):
    import json

    from comapoi_cli import fileio

    orjson_loads = fileio.fast_loads
    assert orjson_loads is not None, "orjson is a dependency: the fast path must be in use"
    cases = ['{"a": [1, -2.5e3, true, null], "b": "\\u00e9"}', "NaN", '"\\ud800"', "1" * 30, "-" + "9" * 19,
             "0.1234567890123456789012", "1e400", "[1,]", "", "\ufeff1", b"\xef\xbb\xbf[2]", b'"\xff"', '{"a":1,"a":2}']
    for case in cases:
        try:
            expected = ("value", repr(json.loads(case)))
        except ValueError as exc:
            expected = ("error", str(exc))
        for fast in (orjson_loads, None):
            monkeypatch.setattr(fileio, "fast_loads", fast)
            try:
                got = ("value", repr(fileio.loads(case)))
            except ValueError as exc:
                got = ("error", str(exc))
            assert got == expected, (case, fast)


def test_wire_json_reads_back_as_the_value_with_or_without_orjson(monkeypatch):
    import json

    from comapoi_cli import fileio

    assert fileio.fast_dumps is not None, "orjson is a dependency: the fast path must be in use"
    body = {"model": "agent3", "messages": [{"role": "user", "content": "é ✓ \u2028 \"q\""}], "temperature": 0, "max_tokens": 8}
    lone = {"messages": [{"role": "user", "content": json.loads('"\\ud800"')}]}  # orjson refuses it: json writes it
    for fast in (fileio.fast_dumps, None):
        monkeypatch.setattr(fileio, "fast_dumps", fast)
        assert json.loads(fileio.wire_json(body)) == body
        assert fileio.wire_json(lone) == json.dumps(lone).encode("utf-8")


def test_write_jsonl_is_atomic_and_byte_stable(tmp_path):
    from comapoi_cli.fileio import jsonl_line, read_jsonl, write_jsonl

    target = tmp_path / "rejects.jsonl"
    target.write_text('{"old": true}\n')

    def rows():
        yield {"line": 3, "reason": "bad_json", "text": "é \u2028 x"}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(target, rows())
    assert target.read_text() == '{"old": true}\n' and os.listdir(tmp_path) == ["rejects.jsonl"]
    assert write_jsonl(target, [{"line": 3, "text": "é \u2028 x", "n": 1.5}, [1, 2]]) == 2
    # json's separators, UTF-8 as it is: the same bytes on every machine, orjson or not
    assert target.read_bytes() == '{"line": 3, "text": "é \u2028 x", "n": 1.5}\n[1, 2]\n'.encode()
    assert jsonl_line({"a": "é"}) == '{"a": "é"}\n'
    # a raw U+2028 inside a string does not split the line when it is read back
    assert read_jsonl(target) == [{"line": 3, "text": "é \u2028 x", "n": 1.5}, [1, 2]]


def test_read_jsonl_names_the_broken_line_in_one_sentence(tmp_path):
    from comapoi_cli.errors import DataError
    from comapoi_cli.fileio import read_jsonl

    path = tmp_path / "rejects.jsonl"
    path.write_bytes(b'{"line": 1}\n\n{"line": \n')
    with pytest.raises(DataError) as caught:
        read_jsonl(path)
    assert str(caught.value) == f"Line 3 of {path} is not JSON (Expecting value)."
