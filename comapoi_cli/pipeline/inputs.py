"""The inputs of ``comapoi pipeline run``: test trajectories, the POI table, the training trajectories.

Every test line is either a chain item or a line of the rejects file with its reason; a missing
or unreadable input is one sentence (``DataError``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comapoi_cli.chain import ChainItem
from comapoi_cli.data import synth
from comapoi_cli.errors import DataError

POI_COLUMNS = ("poi_id", "category", "lat", "lon")


@dataclass
class Rejected:
    line: int
    reason: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason, "text": self.text}


@dataclass
class ChainInputs:
    world: Any
    items: list[ChainItem]
    labels: dict[str, int]
    train: list[Any]
    histories: dict[int, Any]
    rejected: list[Rejected] = field(default_factory=list)
    train_skipped: int = 0
    poi_rows: int = 0
    poi_bad_rows: int = 0


def _need_file(path: Path, what: str, hint: str | None = None) -> None:
    if not path.exists():
        raise DataError(f"Cannot find the {what} {path}.", hint=hint)
    if not path.is_file():
        raise DataError(f"The {what} {path} is not a file.")


def read_poi_table(path: Path, world: Any) -> tuple[int, int]:
    """Add ``poi_id,category,lat,lon`` rows to ``world``; returns (rows read, rows that are not POIs)."""
    _need_file(path, "POI table", hint="Pass it with --poi-info FILE ({dataset}_poi_info.csv: poi_id,category,lat,lon).")
    good = bad = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in POI_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"The POI table {path} lacks the column{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(missing)} (expected poi_id,category,lat,lon).")
            for row in reader:
                try:
                    world.add(int(row["poi_id"]), row["category"], float(row["lat"]), float(row["lon"]), row["lat"], row["lon"])
                    good += 1
                except (TypeError, ValueError):
                    bad += 1
    except UnicodeDecodeError:
        raise DataError(f"The POI table {path} is not UTF-8 text.") from None
    if not good:
        raise DataError(f"The POI table {path} holds no POI rows.")
    return good, bad


def _records(path: Path, what: str):
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield number, line, json.loads(line), None
                except ValueError as exc:
                    yield number, line, None, f"not JSON ({getattr(exc, 'msg', exc)})"
    except UnicodeDecodeError:
        raise DataError(f"The {what} {path} is not UTF-8 text.") from None


def load_inputs(dataset: str, max_poi_id: int, decimals: int, test: Path, poi_info: Path, train: Path) -> ChainInputs:
    """Read the POI table, then the training trajectories (histories, retrieval), then the test ones."""
    _need_file(test, "test trajectories", hint="Pass CoMaPOI's plain next-POI file, e.g. --test data/nyc/nyc_test.jsonl.")
    _need_file(train, "training trajectories",
               hint="History and retrieval come from them: pass --train FILE (e.g. nyc_train.jsonl).")
    world = synth.PoiWorld(max_poi_id, decimals)
    rows, bad_rows = read_poi_table(poi_info, world)
    trains: list[Any] = []
    histories: dict[int, Any] = {}
    skipped = 0
    for _number, _line, value, problem in _records(train, "training trajectories"):
        traj = synth.trajectory_from_record(value, world) if problem is None else problem
        if isinstance(traj, str):
            skipped += 1
            continue
        trains.append(traj)
        histories.setdefault(traj.user, synth._Stats()).add(traj.checkins, world)
    if not trains:
        raise DataError(f"The training trajectories {train} hold no CoMaPOI trajectory.")
    items: list[ChainItem] = []
    labels: dict[str, int] = {}
    rejected: list[Rejected] = []
    for number, line, value, problem in _records(test, "test trajectories"):
        traj = synth.trajectory_from_record(value, world) if problem is None else problem
        if isinstance(traj, str):
            rejected.append(Rejected(number, traj, line.rstrip("\n")))
            continue
        if not 0 <= traj.next_poi <= max_poi_id:
            rejected.append(Rejected(number, f"the label {traj.next_poi} is outside 0..{max_poi_id}", line.rstrip("\n")))
            continue
        key = f"user_{traj.user}_subtrajectory_{traj.sub}"
        if key in labels:
            rejected.append(Rejected(number, f"a second trajectory {key} (the first is kept)", line.rstrip("\n")))
            continue
        labels[key] = traj.next_poi
        hidden = synth.Trajectory(traj.user, traj.sub, traj.checkins, None)  # type: ignore[arg-type]
        items.append(ChainItem(key=key, line=number, trajectory=hidden, history=histories.get(traj.user)))
    return ChainInputs(world=world, items=items, labels=labels, train=trains, histories=histories, rejected=rejected,
                       train_skipped=skipped, poi_rows=rows, poi_bad_rows=bad_rows)
