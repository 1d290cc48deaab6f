"""``merge_files``: the agent files into one file, each record tagged with its role.

Like the original, files are concatenated in role order (agent1, agent2, agent3, then plugin
roles); unlike it, every record gets an ``agent`` field (the trainer and the stats use it), and
optionally a seeded shuffle and per-role weights: a weight of 2 writes each record twice, 0.5
keeps a seeded half, 1.5 writes each record once and a seeded half of them twice.
Lines that are not JSON objects are copied unchanged, so that the clean step reports them.
"""

from __future__ import annotations

import json
import math
import os
import random
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import (
    atomic_writer,
    fs_error,
    loads,
    remove_stale_temps,
    sha256_file,
    temp_prefix,
    write_json_atomic,
)


@dataclass
class MergeSummary:
    output: str
    inputs: dict[str, str] = field(default_factory=dict)      # role -> file
    records_in: dict[str, int] = field(default_factory=dict)  # role -> records read
    records_out: dict[str, int] = field(default_factory=dict) # role -> records written (after weights)
    weights: dict[str, float] = field(default_factory=dict)
    retagged: int = 0     # records whose existing 'agent' field named another role
    blank_lines: int = 0
    shuffled: bool = False
    seed: int = 42

    @property
    def total(self) -> int:
        return sum(self.records_out.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["total"] = self.total
        return data


#: The largest ``--weight``: a role written 100 times over is already far past any useful mix,
#: and an unbounded weight (``agent3=1e9``) would fill the disk.
MAX_WEIGHT = 100.0


def merge_record_path(output: str | os.PathLike[str]) -> Path:
    """``total_agent_train_samples.jsonl`` -> ``total_agent_train_samples.merge.json`` beside it:
    what ``merge_files`` wrote it from (inputs and their hashes, weights, seed), for ``train``."""
    path = Path(output)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return path.with_name(f"{stem}.merge.json")


def parse_role_files(items: Iterable[str], registry) -> dict[str, Path]:
    """``["agent1=a.jsonl", "agent3=b.jsonl"]`` -> ``{role: path}``; an unknown role, a missing
    ``=`` or a role named twice is a ``UsageError``."""
    files: dict[str, Path] = {}
    for item in items:
        role_id, sep, path = str(item).partition("=")
        role_id = role_id.strip()
        if not sep or not path:
            raise UsageError(f"Expected ROLE=FILE, got '{item}' (e.g. agent1=data/nyc/agent1_train_samples.jsonl).")
        registry.role(role_id)
        if role_id in files:
            raise UsageError(f"{role_id} is given twice ({files[role_id]} and {path}); merge one file per role "
                             f"(concatenate them first to use both).")
        files[role_id] = Path(path)
    return files


def check_weight(role: str, weight: float) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
            or not 0 <= weight <= MAX_WEIGHT:
        raise UsageError(f"The weight of {role} must be a number from 0 to {MAX_WEIGHT:g}, got {weight!r} (e.g. --weight {role}=2).")


def parse_weights(values: Iterable[str] | None) -> dict[str, float]:
    """``["agent3=2", "agent1=0.5"]`` (or comma lists) -> ``{"agent3": 2.0, "agent1": 0.5}``.

    A weight is a number from 0 to :data:`MAX_WEIGHT`; a role given twice is a ``UsageError``.
    """
    out: dict[str, float] = {}
    for value in values or ():
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, number = item.partition("=")
            try:
                weight = float(number)
            except ValueError:
                weight = -1.0
            if not sep or not math.isfinite(weight) or weight < 0:
                raise UsageError(f"Expected ROLE=WEIGHT with a weight from 0 to {MAX_WEIGHT:g}, got '{item}' (e.g. --weight agent3=2).")
            if weight > MAX_WEIGHT:
                raise UsageError(f"The weight of {name.strip()} must be at most {MAX_WEIGHT:g}, got '{number.strip()}' "
                                 f"(a weight of W writes each record W times).")
            if name.strip() in out:
                raise UsageError(f"--weight gives {name.strip()} twice ({out[name.strip()]:g} and {weight:g}); give it once.")
            out[name.strip()] = weight
    return out


def _tag(line: bytes, tag: bytes, role: str, summary: MergeSummary) -> bytes:
    """The line with ``"agent": role`` set; unchanged if it is not a JSON object."""
    body = line.strip()
    if body.startswith(b"{") and body.endswith(b"}") and b'"agent"' not in body and body[1:-1].strip():
        return body[:-1].rstrip() + tag  # fast path: no parse, no re-serialisation
    try:
        record = loads(body)
    except ValueError:
        return body
    if not isinstance(record, dict):
        return body
    if record.get("agent") not in (None, role):
        summary.retagged += 1
    record["agent"] = role
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def merge_files(
    inputs: Mapping[str, str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    shuffle: bool = False,
    seed: int = 42,
    weights: Mapping[str, float] | None = None,
    record: bool = True,
) -> MergeSummary:
    """Merge ``{role: file}`` (in that order) into ``output`` with an ``agent`` field per record.

    ``record``: also write :func:`merge_record_path` (what ``train --type merged`` reads the
    weights from; ``prepare_training_data`` merges with ``record=False``)."""
    if not inputs:
        raise UsageError("Nothing to merge: no input files.")
    target = Path(output)
    weights = dict(weights or {})
    for role, weight in weights.items():
        check_weight(role, weight)
    unknown = set(weights) - set(inputs)
    if unknown:
        raise UsageError(f"--weight names roles that are not merged: {', '.join(sorted(unknown))}.")
    for role, path in inputs.items():
        if not Path(path).is_file():
            raise DataError(f"Cannot find the {role} file {path}.")
        if Path(path).resolve() == target.resolve():
            raise UsageError(f"The output {target} is also an input.")
    summary = MergeSummary(str(target), {r: str(p) for r, p in inputs.items()},
                           weights={r: weights.get(r, 1.0) for r in inputs}, shuffled=shuffle, seed=seed)
    rng = random.Random(seed)
    try:
        _write(inputs, target, weights, shuffle, rng, summary)
    except OSError as exc:
        raise fs_error(exc, target) from None
    if not record:
        return summary
    inputs_record = {role: {"path": str(Path(path).resolve()), "sha256": sha256_file(path)} for role, path in inputs.items()}
    write_json_atomic(merge_record_path(target), {"inputs": inputs_record, "weights": summary.weights, "seed": seed,
                                                  "shuffled": shuffle, "output_sha256": sha256_file(target),
                                                  "records_out": summary.records_out})
    return summary


def _write(inputs, target: Path, weights, shuffle: bool, rng: random.Random, summary: MergeSummary) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    first_target = target.with_name(f"{temp_prefix(target.name)}unshuffled.tmp") if shuffle else target
    try:
        _write_all(inputs, target, first_target, weights, shuffle, rng, summary)
    except BaseException:
        if shuffle:
            first_target.unlink(missing_ok=True)
        raise


def _write_all(inputs, target, first_target, weights, shuffle, rng, summary) -> None:
    offsets, lengths = array("q"), array("q")
    position = 0
    with (open(first_target, "wb") if shuffle else atomic_writer(first_target, "wb")) as out:
        for role, path in inputs.items():
            tag = (', "agent": ' + json.dumps(role) + "}").encode("utf-8")
            weight = weights.get(role, 1.0)
            whole, frac = int(weight), weight - int(weight)
            read = written = 0
            with open(path, "rb") as handle:
                for line in handle:
                    if not line.strip():
                        summary.blank_lines += 1
                        continue
                    read += 1
                    copies = whole + (1 if frac and rng.random() < frac else 0)
                    if not copies:
                        continue
                    data = _tag(line.rstrip(b"\r\n").lstrip(b"\xef\xbb\xbf") if read == 1 else line.rstrip(b"\r\n"),
                                tag, role, summary) + b"\n"
                    for _ in range(copies):
                        out.write(data)
                        if shuffle:
                            offsets.append(position)
                            lengths.append(len(data))
                        position += len(data)
                    written += copies
            summary.records_in[role] = read
            summary.records_out[role] = written
    if shuffle:
        order = list(range(len(offsets)))
        rng.shuffle(order)
        try:
            with open(first_target, "rb") as handle, atomic_writer(target, "wb") as out:
                for index in order:
                    handle.seek(offsets[index])
                    out.write(handle.read(lengths[index]))
        finally:
            first_target.unlink(missing_ok=True)


def weight_file(source: str | os.PathLike[str], output: str | os.PathLike[str], weights: Mapping[str, float],
                *, seed: int = 42) -> dict[str, int]:
    """Write ``source`` (records tagged with ``agent``) to ``output`` with each role's records
    repeated by its weight (2: twice; 0.5: a seeded half; 1.5: once, a seeded half twice), in
    input order; return the records written per role. Used on the training side only, after the
    duplicate check and the split, so that the copies are the intended mix, not duplicates."""
    for role, weight in weights.items():
        check_weight(role, weight)
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    with open(source, "rb") as handle, atomic_writer(output, "wb") as out:
        for line in handle:
            body = line.rstrip(b"\r\n")
            if not body.strip():
                continue
            role = _agent(body)
            weight = weights.get(role, 1.0)
            whole, frac = int(weight), weight - int(weight)
            copies = whole + (1 if frac and rng.random() < frac else 0)
            for _ in range(copies):
                out.write(body + b"\n")
            counts[role] = counts.get(role, 0) + copies
    return counts


def role_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """Records per ``agent`` field of a JSONL file ("-" for records without one)."""
    counts: dict[str, int] = {}
    with open(path, "rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            role = _agent(line)
            counts[role] = counts.get(role, 0) + 1
    return counts


def _agent(line: bytes) -> str:
    """The ``agent`` of a JSON line; "-" when it names none or is not a JSON object."""
    try:
        return loads(line).get("agent") or "-"
    except (ValueError, AttributeError):
        return "-"
