"""``comapoi data prepare``: raw check-ins -> CoMaPOI's plain next-POI trajectories (see docs/data.md).

Steps, in order (defaults follow the published LLM4POI / STHGCN preprocessing; every setting is
recorded in ``prepare.json``):

1. read (a reader plugin; unreadable rows go to ``prepare.rejects.jsonl`` with line and reason);
2. region (``--region ca`` / ``--bbox``, optional);
3. drop users and POIs with fewer than ``--min-user-checkins`` / ``--min-poi-checkins`` check-ins,
   repeated until nothing changes;
4. local time = UTC + the row's offset in minutes;
5. sessions: a user's check-ins are cut where two follow each other more than
   ``--session-gap-hours`` apart (0: no cut; a source's own sessions, e.g. GETNext's
   ``trajectory_id``, are used when the flag is not given);
6. split: all check-ins of the city ordered by UTC time (then input file and line), the first
   80% train, the next 10% validation, the last 10% test (``--split``);
7. validation and test keep only check-ins of users and POIs seen in training (``--keep-unseen``
   keeps them);
8. ids: users in the order of their raw ids (numerically when every id is a whole number) get
   0..U-1; POIs get 0..P-1 in the order of their first visit, walking the users in id order and
   each user's training check-ins by time (ids of the ``comapoi`` format are kept);
9. trajectories: each training session is cut into windows of at most ``--window`` check-ins
   (the last is the label, the others the history); validation and test hold one trajectory
   per user: the last check-in of the split that has an earlier check-in in its session, with up
   to ``--window - 1`` check-ins before it as the history.

Everything is columnar (pyarrow + numpy): no Python loop runs per check-in, only per POI and per
rejected row. Outputs are built in a temporary folder and moved into place at the end.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from comapoi_cli.checkins import CheckinTable, ReadOptions, arrow
from comapoi_cli.data.checkins.readers import checkin_reader
from comapoi_cli.data.layout import plain_file_name
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import jsonl_line
from comapoi_cli.reporting import SILENT, Reporter

#: Bounding boxes of named regions: (lat_min, lat_max, lon_min, lon_max), a union of boxes.
#: ca = California + Nevada (the states' bounding boxes; STHGCN/LLM4POI's CA subset of Gowalla).
REGIONS: dict[str, tuple[tuple[float, float, float, float], ...]] = {
    "ca": ((32.53, 42.01, -124.48, -114.13), (35.00, 42.00, -120.01, -114.04)),
}
SYSTEM_PROMPT = ("Please predict the next one POI ID that user_{user} will visit based on the user's historical "
                 "check-in trajectory data. Only output the value of the POI ID in JSON format "
                 "[ {{ 'next POI ID': value }} ].")
PREPARE_RECORD = "prepare.json"
REJECTS_FILE = "prepare.rejects.jsonl"
LINES_PER_CHUNK = 50_000  # trajectories turned into text at a time (bounds the memory of the writing)
DATASET_FILE = "dataset.json"
WORKERS = max(2, min(4, os.cpu_count() or 1))  # threads beside the main one (pyarrow and hashlib release the GIL)


@dataclass
class PrepareSettings:
    fmt: str
    min_user_checkins: int = 10
    min_poi_checkins: int = 10
    session_gap_hours: float | None = None   # None: the source's sessions if it has them, else 24
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    keep_unseen: bool = False
    window: int = 30
    region: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    utc_offset: int | None = None
    encoding: str = "auto"
    coord_decimals: int | None = None
    spots: Path | None = None
    keep_ids: bool | None = None             # None: the reader decides (comapoi: keep)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.fmt, "min_user_checkins": self.min_user_checkins,
            "min_poi_checkins": self.min_poi_checkins, "session_gap_hours": self.session_gap_hours,
            "split": list(self.split), "keep_unseen": self.keep_unseen, "window": self.window,
            "region": self.region, "bbox": list(self.bbox) if self.bbox else None, "utc_offset": self.utc_offset,
            "encoding": self.encoding, "coord_decimals": self.coord_decimals,
            "spots": str(self.spots) if self.spots else None, "keep_ids": self.keep_ids,
        }


@dataclass
class PrepareResult:
    folder: Path
    record: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rejected: int = 0
    registered: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "files": {k: str(v) for k, v in self.files.items()},
                "notes": self.notes, "registered": str(self.registered) if self.registered else None, **self.record}


def parse_split(text: str) -> tuple[float, float, float]:
    """``80/10/10``, ``0.8,0.1,0.1`` -> fractions that sum to 1."""
    parts = [p for p in text.replace(",", "/").replace(":", "/").split("/") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0 or values[0] <= 0 or values[2] <= 0:
        raise UsageError(f"--split must be three shares train/val/test such as 80/10/10 (train and test above 0), not '{text}'.")
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(p) for p in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not (values[0] < values[1] and values[2] < values[3]):
        raise UsageError(f"--bbox must be LAT_MIN,LAT_MAX,LON_MIN,LON_MAX with min < max, not '{text}'.")
    return values  # type: ignore[return-value]


def format_coord(value: float, decimals: int | None) -> str:
    """A coordinate as CoMaPOI writes it: the shortest text that reads back (``--coord-decimals``: rounded)."""
    if decimals is not None:
        value = round(value, decimals)
    text = repr(float(value))
    if "e" in text or "E" in text:
        text = f"{value:.12f}".rstrip("0").rstrip(".")
        if "." not in text:
            text += ".0"
    return text


def _coord_texts(values: Any, decimals: int | None) -> list[str]:
    """``format_coord`` of every value of a float64 array (without rounding: ``repr`` of each, the few
    in exponent form redone)."""
    if decimals is not None:
        return [format_coord(v, decimals) for v in values]
    texts = list(map(repr, values.tolist()))
    return [format_coord(float(values[i]), None) if "e" in t else t for i, t in enumerate(texts)]


# -- the steps ------------------------------------------------------------------------------------------
def _user_order(users: Any) -> Any:
    """Rank of each dictionary entry of the user ids: numeric order when all are whole numbers, else text order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(users) and pc.all(pc.match_substring_regex(users, r"^\d{1,18}$")).as_py():
        keys = np.asarray(pc.cast(users, pa.int64()))
        order = np.argsort(keys, kind="stable")
    else:
        order = np.asarray(pc.sort_indices(users))
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = np.arange(len(users))
    return rank


def _in_input_order(fidx: Any, line: Any) -> bool:
    """Whether the rows come by file index, then line number (as every built-in reader returns them)."""
    import numpy as np

    if len(fidx) < 2:
        return True
    step = np.diff(fidx)
    return bool(((step > 0) | ((step == 0) & (np.diff(line) > 0))).all())


def _sort_by(major: Any, minor: Any, *, tie: tuple[Any, ...] | None) -> Any:
    """Indices that sort by ``major``, then ``minor`` (``None``: none), then the row order, or ``tie``'s
    keys (numpy lexsort order, last key first) when given. Two whole-number keys that fit one int64
    are sorted as one key (a stable argsort: 3-4x faster than lexsort's pass per key)."""
    import numpy as np

    if tie is None and len(major):
        major = np.asarray(major, dtype=np.int64)
        lo, span = int(major.min()), int(major.max()) - int(major.min()) + 1
        if minor is None:
            return np.argsort(major, kind="stable")
        minor = np.asarray(minor, dtype=np.int64)
        mlo, mspan = int(minor.min()), int(minor.max()) - int(minor.min()) + 1
        if span * mspan < 2 ** 62:
            return np.argsort((major - lo) * mspan + (minor - mlo), kind="stable")
    keys = (*(tie or ()), *(() if minor is None else (minor,)), major)
    return np.lexsort(keys)


def _empty(step: str, why: str) -> DataError:
    return DataError(f"No check-in is left after {step} ({why}).",
                     hint="Loosen that setting, or check that the files are the format given to --from.")


def prepare_checkins(paths: Sequence[str | os.PathLike[str]], dataset: str, settings: PrepareSettings, *,
                     registry: Any, output_dir: str | os.PathLike[str] | None = None, overwrite: bool = False,
                     register: bool = True, reporter: Reporter = SILENT) -> PrepareResult:
    """Prepare raw check-ins into ``{output_dir}/{dataset}/`` (see the module doc).

    The outputs are made in a temporary folder ``.{dataset}.{pid}-XXXX.tmp`` beside the target,
    created first and renamed into place last: a run that fails or is killed leaves no partial
    output (a killed run's folder is removed by the next run)."""
    from comapoi_cli.data.layout import default_data_dir
    from comapoi_cli.fileio import fs_error, remove_stale_temps, temp_prefix

    if not dataset or "/" in dataset or dataset.startswith(".") or dataset != dataset.strip():
        raise UsageError(f"--dataset must be a plain name such as nyc or mycity, not '{dataset}'.")
    out_root = Path(output_dir) if output_dir is not None else default_data_dir()
    folder = out_root / dataset
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), suffix=".tmp", dir=out_root))
    except OSError as exc:
        raise fs_error(exc, out_root) from None
    try:
        # threads for work that releases the GIL beside the main line (hashing the inputs, encoding two
        # columns at once, building the next chunk of lines while one is written): wall time, not CPU time
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="comapoi-prepare") as pool:
            return _prepare(paths, dataset, settings, registry=registry, out_root=out_root, tmp=tmp,
                            overwrite=overwrite, register=register, reporter=reporter, pool=pool)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare(paths: Sequence[str | os.PathLike[str]], dataset: str, settings: PrepareSettings, *, registry: Any,
             out_root: Path, tmp: Path, overwrite: bool, register: bool, reporter: Reporter,
             pool: ThreadPoolExecutor) -> PrepareResult:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from comapoi_cli.presets import PRESETS

    if not paths:
        raise UsageError("Give the raw check-in file(s) to prepare.")
    if settings.window < 2:
        raise UsageError("--window must be at least 2 (one check-in of history and the label).")
    if settings.region and settings.region.lower() not in REGIONS:
        raise UsageError(f"Unknown --region '{settings.region}'; known regions: {', '.join(REGIONS)} (or --bbox).")
    files = [Path(p) for p in paths]
    for path in files:
        if not path.is_file():
            raise DataError(f"Cannot find the check-in file {path}.")
    if settings.spots is not None and not Path(settings.spots).is_file():
        raise DataError(f"Cannot find the spots file {settings.spots}.")
    folder = out_root / dataset
    names = {
        "train": plain_file_name(dataset, "train"), "val": plain_file_name(dataset, "val"),
        "test": plain_file_name(dataset, "test"),
        "poi_info": f"{dataset}_poi_info.csv", "poi_ids": f"{dataset}_poi_ids.csv",
        "user_ids": f"{dataset}_user_ids.csv", "rejects": REJECTS_FILE, "dataset": DATASET_FILE,
        "record": PREPARE_RECORD,
    }
    if not overwrite:
        existing = [n for n in names.values() if (folder / n).exists()]
        if existing:
            raise UsageError(f"{folder} already holds {existing[0]}; pass --overwrite to replace the prepared files.")
    preset = PRESETS.get(dataset.lower())  # a built-in city: its id range must hold the result

    from comapoi_cli.fileio import sha256_file

    hashed = [pool.submit(sha256_file, f) for f in [*files, *([Path(settings.spots)] if settings.spots else [])]]
    reader = checkin_reader(registry, settings.fmt)
    options = ReadOptions(encoding=settings.encoding, utc_offset=settings.utc_offset,
                          spots=Path(settings.spots) if settings.spots else None)
    reporter.info(f"Reading {len(files)} file(s) as {reader.name}")
    table: CheckinTable = reader.read(files, options)
    notes = list(table.notes)
    steps: list[dict[str, Any]] = []
    cols = table.columns
    n_read = table.rows
    reasons: dict[str, int] = {}
    for reject in table.rejects:
        reasons[reject.reason] = reasons.get(reject.reason, 0) + 1
    steps.append({"step": "read", "lines": table.lines_read, "rows": n_read, "rejected": len(table.rejects),
                  "rejected_by_reason": dict(sorted(reasons.items()))})
    if n_read == 0:
        first = table.rejects[0] if table.rejects else None
        why = f"; line {first.line}: {first.reason}, {first.detail}" if first else ""
        raise DataError(f"No check-in could be read from {', '.join(map(str, files))} as {reader.name} "
                        f"({len(table.rejects)} line(s) rejected{why}).", hint="Check --from (data prepare --list-formats).")
    keep_ids = table.keep_ids if settings.keep_ids is None else settings.keep_ids

    encoding_users = pool.submit(_encoded, cols["user"])
    poi_codes_arr = _encoded(cols["poi"])
    user_codes_arr = encoding_users.result()
    session_codes = np.asarray(_encoded(cols["session"]).indices) if "session" in cols else None
    user_dict, poi_dict = user_codes_arr.dictionary, poi_codes_arr.dictionary
    u = np.asarray(user_codes_arr.indices).astype(np.int64)
    p = np.asarray(poi_codes_arr.indices).astype(np.int64)
    utc = np.asarray(cols["utc"], dtype=np.int64)
    offset = np.asarray(cols["offset"], dtype=np.int64)
    fidx = np.asarray(cols["file"], dtype=np.int64)
    line = np.asarray(cols["line"], dtype=np.int64)
    lat = np.asarray(cols["lat"], dtype=np.float64)
    lon = np.asarray(cols["lon"], dtype=np.float64)
    if keep_ids and not (pc.all(pc.match_substring_regex(poi_dict, r"^\d{1,12}$")).as_py()
                         and pc.all(pc.match_substring_regex(user_dict, r"^\d{1,12}$")).as_py()):
        raise DataError("The user or POI ids are not whole numbers, so they cannot be kept; use --remap-ids.")
    # The first row of each POI (input order) gives its category and coordinates.
    first_row = np.full(len(poi_dict), len(p), dtype=np.int64)
    first_row[p[::-1]] = np.arange(len(p) - 1, -1, -1)  # the last write wins: each POI's first row
    poi_category = cols["category"].take(arrow(first_row.astype(np.int64)))
    poi_lat, poi_lon = lat[first_row], lon[first_row]
    table.columns = {}  # the text columns are not needed any more (the codes and the POI rows hold them)
    del cols, user_codes_arr, poi_codes_arr
    keep = np.ones(len(u), dtype=bool)

    def counts(mask: Any) -> dict[str, int]:
        return {"rows": int(mask.sum()), "users": int(np.count_nonzero(np.bincount(u[mask]))),
                "pois": int(np.count_nonzero(np.bincount(p[mask])))}

    # 2. region
    boxes = ((settings.bbox,) if settings.bbox else REGIONS[settings.region.lower()] if settings.region else ())
    if boxes:
        inside = np.zeros(len(u), dtype=bool)
        for lat0, lat1, lon0, lon1 in boxes:
            inside |= (lat >= lat0) & (lat <= lat1) & (lon >= lon0) & (lon <= lon1)
        keep &= inside
        steps.append({"step": "region", "boxes": [list(b) for b in boxes], **counts(keep)})
        if not keep.any():
            raise _empty("keeping the check-ins inside the region",
                         f"--region {settings.region}" if settings.region else f"--bbox {','.join(map(str, settings.bbox or ()))}")

    # 3. users and POIs with too few check-ins, until stable
    rounds = 0
    while True:
        uc = np.bincount(u[keep], minlength=len(user_dict))
        pcnt = np.bincount(p[keep], minlength=len(poi_dict))
        new = keep & (uc[u] >= settings.min_user_checkins) & (pcnt[p] >= settings.min_poi_checkins)
        rounds += 1
        if new.sum() == keep.sum():
            break
        keep = new
    steps.append({"step": "min_checkins", "min_user_checkins": settings.min_user_checkins,
                  "min_poi_checkins": settings.min_poi_checkins, "rounds": rounds, **counts(keep)})
    if not keep.any():
        raise _empty("dropping users and POIs with too few check-ins",
                     f"--min-user-checkins {settings.min_user_checkins}, --min-poi-checkins {settings.min_poi_checkins}")

    # 4. local time; sort every user's check-ins by time
    idx = np.nonzero(keep)[0]
    user_rank = _user_order(user_dict)
    in_input_order = _in_input_order(fidx, line)  # rows by file, then line: ties need no more keys
    order = idx[_sort_by(user_rank[u[idx]], utc[idx], tie=None if in_input_order else (line[idx], fidx[idx]))]
    su, sp, sutc = u[order], p[order], utc[order]
    slocal = sutc + offset[order] * 60
    n = len(order)
    steps.append({"step": "local_time", "rule": "UTC time + the row's offset in minutes"
                  + (f" (rows without an offset: {settings.utc_offset or 0})" if reader.name == "gowalla" else "")})

    # 5. sessions
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = su[1:] != su[:-1]
    gap = settings.session_gap_hours
    if gap is None and session_codes is not None:
        source_sessions = session_codes[order]
        boundary = new_user.copy()
        boundary[1:] |= source_sessions[1:] != source_sessions[:-1]
        session_rule = "the source's own sessions (trajectory_id)"
    else:
        gap = 24.0 if gap is None else gap
        boundary = new_user.copy()
        if gap > 0:
            boundary[1:] |= (sutc[1:] - sutc[:-1]) > gap * 3600
        session_rule = f"cut at gaps over {gap:g} hours" if gap > 0 else "none (one sequence per user)"
    session = np.cumsum(boundary) - 1
    steps.append({"step": "sessions", "rule": session_rule, "session_gap_hours": gap, "sessions": int(session[-1] + 1)})

    # 6. chronological split of the whole city
    by_time = _sort_by(sutc, order if in_input_order else None, tie=None if in_input_order else (line[order], fidx[order]))
    n_train = int(n * settings.split[0])
    n_val = int(n * (settings.split[0] + settings.split[1])) - n_train
    part = np.empty(n, dtype=np.int8)
    part[by_time[:n_train]] = 0
    part[by_time[n_train:n_train + n_val]] = 1
    part[by_time[n_train + n_val:]] = 2
    if n_train == 0:
        raise _empty("the chronological split", f"--split {settings.split}: the training part is empty")
    train_until = int(sutc[by_time[n_train - 1]])
    steps.append({"step": "split", "split": list(settings.split), "rule": "all check-ins by UTC time",
                  "train": n_train, "val": n_val, "test": n - n_train - n_val,
                  "train_until_utc": _iso(train_until)})

    # 7. validation / test: only users and POIs seen in training
    train_mask = part == 0
    seen_user = np.zeros(len(user_dict), dtype=bool)
    seen_user[su[train_mask]] = True
    seen_poi = np.zeros(len(poi_dict), dtype=bool)
    seen_poi[sp[train_mask]] = True
    drop_user = ~train_mask & ~seen_user[su]
    drop_poi = ~train_mask & ~drop_user & ~seen_poi[sp]
    if not settings.keep_unseen:
        stay = ~(drop_user | drop_poi)
        steps.append({"step": "seen_in_training", "unseen_user_rows": int(drop_user.sum()),
                      "unseen_poi_rows": int(drop_poi.sum()), "val": int((stay & (part == 1)).sum()),
                      "test": int((stay & (part == 2)).sum())})
        if not (stay & (part == 2)).any():
            raise _empty("keeping only the test check-ins of users and POIs seen in training",
                         f"{int(drop_user[part == 2].sum())} of unseen users, {int(drop_poi[part == 2].sum())} of unseen POIs; "
                         "--keep-unseen keeps them")
        order, su, sp, sutc, slocal, session, part = (a[stay] for a in (order, su, sp, sutc, slocal, session, part))
        n = len(order)
        train_mask = part == 0
    else:
        steps.append({"step": "seen_in_training", "kept": True, "unseen_user_rows": int(drop_user.sum()),
                      "unseen_poi_rows": int(drop_poi.sum())})

    # 8. ids
    if keep_ids:
        user_new = np.asarray(pc.cast(user_dict, pa.int64()))
        poi_new = np.asarray(pc.cast(poi_dict, pa.int64()))
        rule = "kept as in the source"
    else:
        user_new = np.full(len(user_dict), -1, dtype=np.int64)
        train_users = np.nonzero(np.bincount(su[train_mask], minlength=len(user_dict)))[0]
        train_users = train_users[np.argsort(user_rank[train_users], kind="stable")]
        user_new[train_users] = np.arange(len(train_users))
        rest = np.setdiff1d(np.nonzero(np.bincount(su, minlength=len(user_dict)))[0], train_users)
        rest = rest[np.argsort(user_rank[rest], kind="stable")]
        user_new[rest] = np.arange(len(train_users), len(train_users) + len(rest))
        poi_new = np.full(len(poi_dict), -1, dtype=np.int64)
        firsts = pc.unique(arrow(sp[train_mask])).to_numpy()
        poi_new[firsts] = np.arange(len(firsts))
        others = pc.unique(arrow(sp[~train_mask])).to_numpy()
        others = others[poi_new[others] < 0]
        poi_new[others] = np.arange(len(firsts), len(firsts) + len(others))
        rule = ("users by raw id (numeric when whole numbers), POIs by first visit walking users in id order "
                "and their training check-ins by time")
    uid, pid = user_new[su], poi_new[sp]
    used_users = np.nonzero(np.bincount(su, minlength=len(user_dict)))[0]
    used_pois = np.nonzero(np.bincount(sp, minlength=len(poi_dict)))[0]
    steps.append({"step": "ids", "rule": rule, "users": int(len(used_users)), "pois": int(len(used_pois)),
                  "max_poi_id": int(poi_new[used_pois].max()), "id_base": 0})

    # 9. trajectories
    w = settings.window
    seg_new = np.ones(n, dtype=bool)
    seg_new[1:] = session[1:] != session[:-1]
    seg_start = np.maximum.accumulate(np.where(seg_new, np.arange(n), 0))
    tr = np.nonzero(train_mask)[0]
    t_new = np.ones(len(tr), dtype=bool)
    if len(tr) > 1:
        t_new[1:] = (session[tr][1:] != session[tr][:-1]) | (tr[1:] != tr[:-1] + 1)
    t_seg_start = np.maximum.accumulate(np.where(t_new, np.arange(len(tr)), 0))
    position = np.arange(len(tr)) - t_seg_start
    win_new = t_new | (position % w == 0)
    win_start = np.nonzero(win_new)[0]
    win_end = np.append(win_start[1:], len(tr))
    good_win = (win_end - win_start) >= 2
    t_starts, t_labels = tr[win_start[good_win]], tr[win_end[good_win] - 1]

    def last_per_user(which: int) -> tuple[Any, Any]:
        cand = np.nonzero((part == which) & (np.arange(n) > seg_start))[0]
        if not len(cand):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        last = np.ones(len(cand), dtype=bool)
        last[:-1] = uid[cand][1:] != uid[cand][:-1]
        labels = cand[last]
        starts = np.maximum(seg_start[labels], labels - (w - 1))
        return starts, labels

    v_starts, v_labels = last_per_user(1)
    e_starts, e_labels = last_per_user(2)
    trajectories = {"train": int(len(t_labels)), "val": int(len(v_labels)), "test": int(len(e_labels))}
    steps.append({"step": "trajectories", "window": w, "train": trajectories["train"], "val": trajectories["val"],
                  "test": trajectories["test"], "rule": "train: every session cut into windows of at most "
                  f"{w} check-ins (the last is the label); val/test: one per user, its last check-in with history"})
    if not len(t_labels):
        raise _empty("cutting the training sessions into trajectories",
                     f"no session has 2 check-ins; --session-gap-hours {gap:g}" if gap else "no user has 2 check-ins")
    if not len(e_labels):
        raise DataError("No test trajectory is left: no user has a test check-in with an earlier check-in in its "
                        f"session (--session-gap-hours {gap:g}, --split {'/'.join(f'{x:g}' for x in settings.split)}).",
                        hint="Use a wider --session-gap-hours, or a larger test share.")
    if settings.split[1] > 0 and not len(v_labels):
        notes.append("the validation file is empty: no user has a validation check-in with history")

    # text of every check-in: "At 2012-04-04 15:36:09, Wednesday, user 0 visit POI ID 0 (Cafe, 40.7,-73.9)."
    decimals = settings.coord_decimals
    poi_piece = [""] * len(poi_dict)
    poi_rows = []
    used_categories = poi_category.take(arrow(used_pois)).to_pylist()
    used_raw = poi_dict.take(arrow(used_pois)).to_pylist()
    category_text: dict[str, str] = {}  # a category's JSON-escaped text, made once per category
    for code, new_id, category, raw_id, lat_t, lon_t in zip(
            used_pois.tolist(), poi_new[used_pois].tolist(), used_categories, used_raw,
            _coord_texts(poi_lat[used_pois], decimals), _coord_texts(poi_lon[used_pois], decimals)):
        escaped = category_text.get(category)
        if escaped is None:
            escaped = category_text[category] = json.dumps(category, ensure_ascii=False)[1:-1]
        poi_piece[code] = f" visit POI ID {new_id} ({escaped}, {lat_t},{lon_t})."
        poi_rows.append((new_id, category, lat_t, lon_t, raw_id))
    poi_rows.sort()
    pieces = pa.array(poi_piece, pa.large_string())
    # "At 2012-04-04 15:36:09, Wednesday, user ": looked up, not formatted per check-in: the day's
    # "At 2012-04-04 " (pyarrow's timestamp-to-text cast of the day's midnight, " 00:00:00" cut off) and
    # "15:36:09, Wednesday, user " by second of the day and weekday (1970-01-01 was a Thursday)
    day_all = slocal // 86400
    day_lo, day_hi = (int(day_all.min()), int(day_all.max())) if n else (0, 0)
    dense_days = day_hi - day_lo < 1_000_000
    days = np.arange(day_lo, day_hi + 1, dtype=np.int64) if dense_days else np.unique(day_all)
    del day_all
    day_text = pc.utf8_slice_codeunits(arrow(days * 86400, pa.timestamp("s")).cast(pa.large_string()), 0, -9)
    day_text = _join("At ", day_text, " ")
    clock = pc.utf8_slice_codeunits(arrow(np.arange(86400, dtype=np.int64), pa.timestamp("s")).cast(pa.large_string()), -8)
    weekday = pa.array([", Monday, user ", ", Tuesday, user ", ", Wednesday, user ", ", Thursday, user ", ", Friday, user ",
                        ", Saturday, user ", ", Sunday, user "], pa.large_string())
    clock_day = _join(clock.take(arrow(np.repeat(np.arange(86400, dtype=np.int64), 7))),
                      weekday.take(arrow(np.tile(np.arange(7, dtype=np.int64), 86400))))  # index: second * 7 + weekday
    system = SYSTEM_PROMPT.split("{user}")

    def chunk_lines(starts: Any, labels: Any, subs: Any) -> Any:
        """The lines of the trajectories ending at ``labels`` (histories from ``starts``).

        One text per history check-in, made by one element-wise join: the line's head (JSON up to the
        history) before its first check-in and " " before the others, the check-in, and the line's tail
        (the label, the JSON's end) after its last; the lines are then these texts back to back."""
        lengths = labels - starts
        if len(lengths) and int(lengths.min()) < 1:  # every trajectory has history (step 9)
            raise AssertionError("a trajectory without history")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        rows = (np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])).astype(np.int64)
        local = slocal[rows]
        day = local // 86400
        second = local - day * 86400
        day_index = day - day_lo if dense_days else np.searchsorted(days, day)
        users = arrow(uid[labels]).cast(pa.large_string())
        subs_t = arrow(np.asarray(subs, dtype=np.int64)).cast(pa.large_string())
        label_t = arrow(pid[labels]).cast(pa.large_string())
        heads = _join('{"messages": [{"role": "system", "content": "', json_text(system[0]), users,
                      json_text(system[1]), '"}, {"role": "user", "content": "<historical trajectory of user_',
                      users, "_subtrajectory_", subs_t, ">\\n")
        tails = _join('"}, {"role": "assistant", "content": "{\\"next_poi_id\\": ', label_t, '}"}]}\n')
        head_index = np.zeros(len(rows), dtype=np.int64)
        head_index[offsets[:-1]] = np.arange(1, len(labels) + 1)
        tail_index = np.zeros(len(rows), dtype=np.int64)
        tail_index[offsets[1:] - 1] = np.arange(1, len(labels) + 1)
        heads = pa.concat_arrays([pa.array([" "], pa.large_string()), heads])
        tails = pa.concat_arrays([pa.array([""], pa.large_string()), tails])
        return _join(heads.take(arrow(head_index)), day_text.take(arrow(day_index.astype(np.int64))),
                     clock_day.take(arrow(second * 7 + (day + 3) % 7)), arrow(uid[rows]).cast(pa.large_string()),
                     pieces.take(arrow(sp[rows])), tails.take(arrow(tail_index)))

    def write_lines(path: Path, starts: Any, labels: Any, subs: Any) -> str:
        """Write the lines, ``LINES_PER_CHUNK`` at a time (up to ``WORKERS`` chunks built at once, written
        in order); return the file's SHA-256."""
        digest = hashlib.sha256()
        pending: deque[Any] = deque()

        def flush() -> None:
            for buffer in _value_buffers(pending.popleft().result()):
                handle.write(buffer)
                digest.update(buffer)

        with open(path, "wb") as handle:
            for first in range(0, len(labels), LINES_PER_CHUNK):
                part_ = slice(first, first + LINES_PER_CHUNK)
                pending.append(pool.submit(chunk_lines, starts[part_], labels[part_], subs[part_]))
                if len(pending) > WORKERS:
                    flush()
            while pending:
                flush()
        return digest.hexdigest()

    t_users = uid[t_labels]
    first_of_user = np.ones(len(t_users), dtype=bool)
    first_of_user[1:] = t_users[1:] != t_users[:-1]
    t_subs = np.arange(len(t_users)) - np.maximum.accumulate(np.where(first_of_user, np.arange(len(t_users)), 0)) + 1
    try:
        line_hashes = {
            "train": write_lines(tmp / names["train"], t_starts, t_labels, t_subs),
            "val": write_lines(tmp / names["val"], v_starts, v_labels, np.ones(len(v_labels), dtype=np.int64)),
            "test": write_lines(tmp / names["test"], e_starts, e_labels, np.ones(len(e_labels), dtype=np.int64)),
        }
    except OSError as exc:
        from comapoi_cli.fileio import fs_error

        raise fs_error(exc, tmp) from None

    # summaries
    def split_summary(mask: Any, labels: Any) -> dict[str, int]:
        return {"checkins": int(mask.sum()), "users": int(np.count_nonzero(np.bincount(uid[mask]))),
                "pois": int(np.count_nonzero(np.bincount(pid[mask]))), "trajectories": int(len(labels))}

    summary = {"train": split_summary(part == 0, t_labels), "val": split_summary(part == 1, v_labels),
               "test": split_summary(part == 2, e_labels)}
    year_index = slocal.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64)
    years = [int(y) + 1970 + int(year_index.min()) for y in np.nonzero(np.bincount(year_index - year_index.min()))[0]]
    lats, lons = poi_lat[used_pois], poi_lon[used_pois]
    max_poi = int(poi_new[used_pois].max())
    if preset is not None and max_poi > preset.max_poi_id:
        raise DataError(f"The prepared POI ids run to {max_poi}, beyond the {preset.name} preset's 0..{preset.max_poi_id} "
                        "that train, eval and pipeline check ids against.",
                        hint=f"Prepare it under another name (--dataset {preset.name}-prepared), which records its own range.")
    dataset_record = _dataset_record(dataset, reader.name, max_poi, trajectories, lats, lons, years, poi_rows,
                                     decimals, preset)

    # write everything into a temporary folder, then move it into place
    from comapoi_cli import __version__
    try:
        _write_csv(tmp / names["poi_info"], ["poi_id", "category", "lat", "lon"], [r[:4] for r in poi_rows])
        _write_csv(tmp / names["poi_ids"], ["poi_id", "raw_poi_id"], [(r[0], r[4]) for r in poi_rows])
        user_rows = sorted(zip(user_new[used_users].tolist(), user_dict.take(arrow(used_users)).to_pylist()))
        _write_csv(tmp / names["user_ids"], ["user_id", "raw_user_id"], user_rows)
        with open(tmp / names["rejects"], "w", encoding="utf-8", newline="") as handle:
            for reject in sorted(table.rejects, key=lambda r: (files.index(Path(r.file)) if Path(r.file) in files else -1, r.line)):
                handle.write(jsonl_line(reject.to_dict()))
        (tmp / names["dataset"]).write_text(json.dumps(dataset_record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        inputs = [{"path": str(f), "sha256": hashed[i].result(), "bytes": f.stat().st_size,
                   "encoding": table.encodings.get(str(f))} for i, f in enumerate(files)]
        if settings.spots:
            inputs.append({"path": str(settings.spots), "role": "spots", "sha256": hashed[-1].result(),
                           "bytes": Path(settings.spots).stat().st_size})
        record = {
            "comapoi": __version__, "dataset": dataset, "format": reader.name, "inputs": inputs,
            "settings": {**settings.to_dict(), "keep_ids": keep_ids, "session_gap_hours": gap,
                         "session_rule": session_rule},
            "steps": steps, "summary": summary,
            "id_maps": {"users": int(len(used_users)), "pois": int(len(used_pois)), "id_base": 0,
                        "max_poi_id": max_poi, "user_file": names["user_ids"], "poi_file": names["poi_ids"]},
            "notes": notes,
            "outputs": {names[k]: line_hashes[k] if k in line_hashes else sha256_file(tmp / names[k])
                        for k in ("train", "val", "test", "poi_info", "poi_ids", "user_ids", "rejects", "dataset")},
        }
        (tmp / names["record"]).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for child in tmp.iterdir():
            os.chmod(child, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        if not folder.exists():
            os.replace(tmp, folder)
        else:
            for key in [k for k in names if k != "record"] + ["record"]:  # the record last: it names what is there
                os.replace(tmp / names[key], folder / names[key])
    except OSError as exc:
        from comapoi_cli.fileio import fs_error

        raise fs_error(exc, folder) from None
    result = PrepareResult(folder, record, {k: folder / v for k, v in names.items()}, notes, len(table.rejects))
    if register and preset is None:
        from comapoi_cli.presets import register_dataset

        try:
            result.registered = register_dataset(dataset_record, folder / names["dataset"])
        except OSError as exc:
            result.notes.append(f"could not record the dataset {dataset} for other commands ({exc.strerror}); "
                                f"set COMAPOI_DATA_DIR={out_root} so that they find {folder / names['dataset']}")
    return result


def _join(*parts: Any) -> Any:
    """Element-wise concatenation of string arrays and constant texts, as one large_string array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    args = [pa.scalar(p, pa.large_string()) if isinstance(p, str)
            else p if p.type == pa.large_string() else p.cast(pa.large_string()) for p in parts]
    return pc.binary_join_element_wise(*args, pa.scalar("", pa.large_string()))


def _encoded(values: Any) -> Any:
    """Dictionary-encode a (chunked) string column into one DictionaryArray with one dictionary."""
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(values)
    return encoded.combine_chunks() if hasattr(encoded, "combine_chunks") else encoded


def json_text(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _value_buffers(array: Any) -> list[Any]:
    """The bytes of a string array's values, back to back (each value is one output line)."""
    import numpy as np
    import pyarrow as pa

    chunks = array.chunks if hasattr(array, "chunks") else [array]
    out = []
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64 if pa.types.is_large_string(chunk.type) else np.int32)
        start, end = int(offsets[chunk.offset]), int(offsets[chunk.offset + len(chunk)])
        out.append(chunk.buffers()[2].slice(start, end - start))
    return out


def _iso(seconds: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_csv(path: Path, header: list[str], rows: Any) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def _dataset_record(dataset: str, fmt: str, max_poi: int, trajectories: dict[str, int], lats: Any, lons: Any,
                    years: list[int], poi_rows: list[tuple[Any, ...]], decimals: int | None, preset: Any) -> dict[str, Any]:
    from collections import Counter

    common = Counter(r[1] for r in poi_rows)
    categories = [c for c, _ in sorted(common.items(), key=lambda kv: (-kv[1], kv[0]))[:80]]
    digits = decimals if decimals is not None else max(
        (len(r[2].split(".", 1)[1]) if "." in r[2] else 0 for r in poi_rows), default=8)
    return {
        "name": dataset, "description": f"prepared by comapoi data prepare from {fmt} check-ins",
        "preset": preset.name if preset else None,
        "max_poi_id": max_poi, "train_trajectories": trajectories["train"], "test_trajectories": trajectories["test"],
        "bbox": [round(float(lats.min()), 6), round(float(lats.max()), 6), round(float(lons.min()), 6),
                 round(float(lons.max()), 6)],
        "years": years, "categories": categories, "coord_decimals": int(digits),
    }
