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

import json
import os
import random
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from comapoi_cli.data.layout import split_names, stem_of
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import atomic_writer

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
            return float(value[:-1]) / 100
        if any(ch in value for ch in ".eE"):
            number = float(value)
            return int(number) if number >= 1 and number.is_integer() else number
        return int(value)
    except ValueError:
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
    from comapoi_cli.default_plugins.comapoi_roles import user_key

    roles = registry.roles if registry is not None else {}
    keys: list[str | None] = []
    with open(path, "rb") as handle:
        for offset, length in zip(offsets, lengths):
            handle.seek(offset)
            raw = handle.read(length)
            try:
                record = json.loads(raw)
            except ValueError:
                keys.append(None)
                continue
            if not isinstance(record, dict):
                keys.append(None)
                continue
            record_role = role
            if record_role is None and isinstance(record.get("agent"), str):
                record_role = roles.get(record["agent"])
            key = record_role.group_key(record) if record_role is not None else None
            if key is None:
                key = user_key(record)
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
    registry=None,
    cap_fraction: float | None = None,
) -> SplitSummary:
    """Split ``input`` into ``train_path`` and ``holdout_path`` (default: the original's names beside it).

    ``cap_fraction`` (used by ``prepare_training_data``) shrinks a holdout that would take more
    than that share of the records, with a note, instead of failing.
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
        if registry is None:
            from comapoi_cli.plugins import get_registry

            registry = get_registry()
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
        if registry is None:
            from comapoi_cli.plugins import get_registry

            registry = get_registry()
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
    return summary
