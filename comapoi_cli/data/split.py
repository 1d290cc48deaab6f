"""``split_file``: a seeded, reproducible training / holdout split of a JSONL file.

Same input bytes + same seed + same options = byte-identical outputs. The default names are the
original's (``{stem}_all.jsonl`` and ``{stem}_100.jsonl``); the holdout holds ``test_size``
records (a count, default 100, or a fraction in (0, 1)). Records keep their input order in both
outputs unless ``shuffle`` is set (the trainer shuffles anyway). With ``group_by="user"`` every
record of one user lands on the same side: the user id comes from the role plugin's
``group_key`` (the CoMaPOI roles read it from the prompt), and whole users are moved to the
holdout in a seeded order until it holds at least ``test_size`` records.
"""

from __future__ import annotations

import os
import random
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from comapoi_cli.data.layout import split_names, stem_of
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import atomic_writer, loads, read_json, sha256_file, write_json_atomic

GROUP_BY = ("user",)


@dataclass
class SplitSummary:
    input: str
    train_path: str
    holdout_path: str
    records: int = 0
    train: int = 0
    holdout: int = 0
    requested_holdout: int = 0
    seed: int = 42
    group_by: str | None = None
    groups: int | None = None          # distinct users
    holdout_groups: int | None = None
    ungrouped: int = 0                 # records without a user key (each is its own group)
    blank_lines: int = 0
    shuffled: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def holdout_count(test_size: int | float, records: int) -> int:
    """How many records ``test_size`` means for a file of ``records`` records."""
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise UsageError(f"--test-size must be a count or a fraction, got {test_size!r}.")
    if test_size < 0:
        raise UsageError("--test-size cannot be negative.")
    if isinstance(test_size, float) and 0 < test_size < 1:
        return max(1, round(records * test_size)) if records > 1 else 0
    if isinstance(test_size, float) and not test_size.is_integer():
        raise UsageError(f"--test-size {test_size} is neither a whole count nor a fraction between 0 and 1.")
    return int(test_size)


def parse_test_size(text: str) -> int | float:
    """``"100"`` -> 100, ``"0.1"`` -> 0.1, ``"10%"`` -> 0.1."""
    value = text.strip()
    try:
        if value.endswith("%"):
            percent = float(value[:-1])
            if not 0 <= percent < 100:
                raise UsageError(f"--test-size {value} must be a percentage from 0% to below 100% "
                                 f"(100% would leave nothing to train on).")
            return percent / 100
        if any(ch in value for ch in ".eE"):
            number = float(value)
            return int(number) if number >= 1 and number.is_integer() else number
        return int(value)
    except (ValueError, OverflowError):
        raise UsageError(f"--test-size must be a count (100) or a fraction (0.1 or 10%), got '{text}'.") from None


def _index(path: Path) -> tuple[array, array, int]:
    """Offsets and lengths of the non-blank lines (newline excluded), and the blank-line count."""
    offsets, lengths = array("q"), array("q")
    blank = 0
    position = 0
    with open(path, "rb") as handle:
        for line in handle:
            stripped = line.rstrip(b"\r\n")
            if stripped.strip():
                offsets.append(position)
                lengths.append(len(stripped))
            else:
                blank += 1
            position += len(line)
    return offsets, lengths, blank


def _group_keys(path: Path, offsets: array, lengths: array, role, registry) -> list[str | None]:
    roles = registry.roles
    keys: list[str | None] = []
    with open(path, "rb") as handle:
        for offset, length in zip(offsets, lengths):
            handle.seek(offset)
            raw = handle.read(length)
            try:
                record = loads(raw)
            except ValueError:
                keys.append(None)
                continue
            if not isinstance(record, dict):
                keys.append(None)
                continue
            record_role = role
            if record_role is None and isinstance(record.get("agent"), str):
                record_role = roles.get(record["agent"])
            if record_role is not None:
                key = record_role.group_key(record)
            else:  # no role known: the first registered role that finds a key
                key = next((k for k in (r.group_key(record) for r in roles.values()) if k is not None), None)
            keys.append(None if key is None else str(key))
    return keys


def split_file(
    input: str | os.PathLike[str],
    train_path: str | os.PathLike[str] | None = None,
    holdout_path: str | os.PathLike[str] | None = None,
    *,
    test_size: int | float = 100,
    seed: int = 42,
    group_by: str | None = None,
    shuffle: bool = False,
    role=None,
    registry,
    cap_fraction: float | None = None,
    record: bool = True,
) -> SplitSummary:
    """Split ``input`` into ``train_path`` and ``holdout_path`` (default: the original's names beside it).

    ``cap_fraction`` (used by ``prepare_training_data``) shrinks a holdout that would take more
    than that share of the records, with a note, instead of failing. ``record`` writes
    :func:`split_record_path` beside the input (``prepare_training_data`` passes False).
    """
    source = Path(input)
    if not source.is_file():
        raise DataError(f"Input file {source} does not exist.")
    stem = stem_of(source)
    if stem.endswith("_clean"):
        stem = stem[: -len("_clean")]
    default_train, default_holdout = split_names(stem)
    train_target = Path(train_path) if train_path is not None else source.with_name(default_train)
    holdout_target = Path(holdout_path) if holdout_path is not None else source.with_name(default_holdout)
    if len({source.resolve(), train_target.resolve(), holdout_target.resolve()}) != 3:
        raise UsageError("The input, training and holdout paths must be three different files.")
    if group_by is not None and group_by not in GROUP_BY:
        raise UsageError(f"--group-by accepts {', '.join(GROUP_BY)}, got '{group_by}'.")
    if role is not None and isinstance(role, str):
        role = registry.role(role)

    offsets, lengths, blank = _index(source)
    n = len(offsets)
    summary = SplitSummary(str(source), str(train_target), str(holdout_target), records=n, seed=seed,
                           group_by=group_by, blank_lines=blank, shuffled=shuffle)
    if n == 0:
        raise DataError(f"{source} holds no records to split.")
    k = holdout_count(test_size, n)
    summary.requested_holdout = k
    if cap_fraction is not None and n > 1 and k > max(1, int(n * cap_fraction)):
        capped = max(1, int(n * cap_fraction))
        summary.notes.append(f"holdout reduced from {k} to {capped} records: the file has only {n}")
        k = capped
    if k >= n:
        raise UsageError(f"A holdout of {k} records leaves nothing to train on: {source} has {n} records. "
                         f"Use a smaller --test-size (a count or a fraction such as 0.1).")
    rng = random.Random(seed)
    if group_by is None:
        holdout = set(rng.sample(range(n), k)) if k else set()
    else:
        keys = _group_keys(source, offsets, lengths, role, registry)
        members: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            if key is None:
                summary.ungrouped += 1
                key = f"\x00line{index}"  # no user: the record is a group of its own
            members.setdefault(key, []).append(index)
        order = sorted(members)
        rng.shuffle(order)
        holdout = set()
        chosen = 0
        for key in order:
            if len(holdout) >= k:
                break
            if len(holdout) + len(members[key]) >= n:
                continue  # never move every record to the holdout
            holdout.update(members[key])
            chosen += 1
        summary.groups = sum(1 for key in members if not key.startswith("\x00"))
        summary.holdout_groups = chosen
        if summary.ungrouped:
            summary.notes.append(f"{summary.ungrouped} records have no user id; each was treated as its own user")
    train_order = [i for i in range(n) if i not in holdout]
    holdout_order = sorted(holdout)
    if shuffle:
        rng.shuffle(train_order)
        rng.shuffle(holdout_order)
    with open(source, "rb") as handle, atomic_writer(train_target, "wb") as train_out, \
            atomic_writer(holdout_target, "wb") as hold_out:
        if shuffle:
            for order, out in ((train_order, train_out), (holdout_order, hold_out)):
                for index in order:
                    handle.seek(offsets[index])
                    out.write(handle.read(lengths[index]) + b"\n")
        else:  # one sequential pass, input order kept
            index = 0
            for line in handle:
                stripped = line.rstrip(b"\r\n")
                if not stripped.strip():
                    continue
                (hold_out if index in holdout else train_out).write(stripped + b"\n")
                index += 1
    summary.train = len(train_order)
    summary.holdout = len(holdout_order)
    if record:
        write_json_atomic(split_record_path(source), {
            "input": str(source.resolve()), "input_sha256": sha256_file(source),
            "train_path": str(train_target.resolve()), "holdout_path": str(holdout_target.resolve()),
            "train_sha256": sha256_file(train_target), "holdout_sha256": sha256_file(holdout_target),
            "seed": seed, "test_size": test_size, "group_by": group_by, "shuffled": shuffle,
            "train": summary.train, "holdout": summary.holdout})
    return summary


def split_record_path(input: str | os.PathLike[str]) -> Path:
    """``agent1_train_samples.jsonl`` -> ``agent1_train_samples.split.json`` beside it: what
    ``data split`` made of this file (``train`` uses that split while it is current)."""
    return Path(input).with_name(f"{stem_of(input)}.split.json")


def current_split(input: str | os.PathLike[str], derived: Mapping[str, str] | None = None) -> tuple[dict[str, Any] | None, str]:
    """The record of the ``data split`` of ``input`` when it still holds (same input bytes, both
    outputs unchanged, or replaced by the files ``derived`` names: ``{file name: sha256}`` of
    what preparation made of them), else None; and why not, in words."""
    path = split_record_path(input)
    if not path.is_file():
        return None, "no split made by data split"
    try:
        meta = read_json(path)
        if meta.get("input_sha256") != sha256_file(input):
            return None, f"{Path(input).name} changed since data split"
        for side in ("train", "holdout"):
            digest = sha256_file(meta[f"{side}_path"])
            if digest != meta.get(f"{side}_sha256") and digest != (derived or {}).get(Path(meta[f"{side}_path"]).name):
                return None, f"the split's {side} file {meta[f'{side}_path']} changed since data split"
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"the split record {path} cannot be read or its files are gone"
    return meta, "current"


def split_by_membership(input: str | os.PathLike[str], train_path: str | os.PathLike[str],
                        holdout_path: str | os.PathLike[str], holdout_source: str | os.PathLike[str],
                        keys_of) -> tuple[int, int]:
    """Split ``input`` so that its records whose conversation is in ``holdout_source`` (an
    earlier split's holdout) form the holdout, in input order; ``keys_of(raw_line)`` gives a
    line's conversation key (or None). Returns (train, holdout) record counts."""
    held = set()
    with open(holdout_source, "rb") as handle:
        for line in handle:
            key = keys_of(line.rstrip(b"\r\n")) if line.strip() else None
            if key is not None:
                held.add(key)
    counts = [0, 0]
    with open(input, "rb") as handle, atomic_writer(train_path, "wb") as train_out, \
            atomic_writer(holdout_path, "wb") as hold_out:
        for line in handle:
            body = line.rstrip(b"\r\n")
            if not body.strip():
                continue
            side = 1 if keys_of(body) in held else 0
            (hold_out if side else train_out).write(body + b"\n")
            counts[side] += 1
    return counts[0], counts[1]
