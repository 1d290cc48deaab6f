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
