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
from comapoi_cli.fileio import atomic_writer


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


def parse_weights(values: Iterable[str] | None) -> dict[str, float]:
    """``["agent3=2", "agent1=0.5"]`` (or comma lists) -> ``{"agent3": 2.0, "agent1": 0.5}``."""
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
                raise UsageError(f"Expected ROLE=WEIGHT with a weight >= 0, got '{item}' (e.g. --weight agent3=2).")
            out[name.strip()] = weight
    return out


def _tag(line: bytes, tag: bytes, role: str, summary: MergeSummary) -> bytes:
    """The line with ``"agent": role`` set; unchanged if it is not a JSON object."""
    body = line.strip()
    if body.startswith(b"{") and body.endswith(b"}") and b'"agent"' not in body and body[1:-1].strip():
        return body[:-1].rstrip() + tag  # fast path: no parse, no re-serialisation
    try:
        record = json.loads(body)
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
) -> MergeSummary:
    """Merge ``{role: file}`` (in that order) into ``output`` with an ``agent`` field per record."""
    if not inputs:
        raise UsageError("Nothing to merge: no input files.")
    target = Path(output)
    weights = dict(weights or {})
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
    offsets, lengths = array("q"), array("q")
    position = 0
    first_target = target.with_name(f".{target.name}.unshuffled") if shuffle else target
    with atomic_writer(first_target, "wb") as out:
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
    return summary
