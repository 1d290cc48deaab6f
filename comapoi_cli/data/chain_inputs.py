"""The inputs of ``comapoi pipeline run``: test trajectories, the POI table, the training trajectories.

Every test line is either a chain item or a line of the rejects file with its reason, whatever it
holds (invalid UTF-8, JSON nested too deeply, a 5000-digit id, an impossible date, a coordinate
that is not a finite latitude/longitude): one bad line never aborts the run. A record must be a
*plain* trajectory as CoMaPOI's ``{ds}_train.jsonl`` / ``{ds}_test.jsonl`` hold them (a user
turn that is the ``<historical trajectory of user_U_subtrajectory_S>`` header and check-ins,
nothing else; an answer that is one next POI id): an agent's training record (which embeds a
trajectory among its instructions, and answers with a list) is not one. A POI table row whose id
is outside the dataset's range or whose coordinates are not finite is skipped with its reason.
A missing or unreadable input is one sentence (``DataError``).
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from comapoi_cli.chain import ChainItem
from comapoi_cli.data import synth
from comapoi_cli.errors import DataError
from comapoi_cli.fileio import iter_jsonl

POI_COLUMNS = ("poi_id", "category", "lat", "lon")
#: The longest id (user, subtrajectory, POI) read, in digits: longer ones are not ids (and ``int()``
#: of thousands of digits is refused by Python, or slow).
MAX_ID_DIGITS = 12
#: Reasons that mark a record as an agent's training record rather than a plain trajectory.
AGENT_RECORD = "an agent's training record, not a plain trajectory"
#: The reason of a line whose check-ins lie outside the dataset's city (another dataset's line).
OUTSIDE = "outside the dataset's area"
_SHOWN = 200  # characters of an offending value quoted in a reason


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
    #: the POI table rows skipped, with their reasons (``line`` is the CSV line number)
    poi_rejected: list[Rejected] = field(default_factory=list)
    #: per input ("test", "train", "poi_info"): how many coordinates lie in each known city's area
    #: (``comapoi_cli.presets``), "elsewhere" for none; the dataset identity check reads it
    areas: dict[str, Counter] = field(default_factory=dict)
    #: the first check-in (time, POI) of each training trajectory, by ``user_U_subtrajectory_S``
    train_keys: dict[str, set[tuple[str, int]]] = field(default_factory=dict)


def _need_file(path: Path, what: str, hint: str | None = None) -> None:
    if not path.exists():
        raise DataError(f"Cannot find the {what} {path}.", hint=hint)
    if not path.is_file():
        raise DataError(f"The {what} {path} is not a file.")


def _quote(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _coordinate_problem(lat: float, lon: float) -> str | None:
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return "is not a finite coordinate"
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return "is not a latitude,longitude (-90..90, -180..180)"
    return None


def _id(text: str) -> int | None:
    """An id written in ASCII digits (at most ``MAX_ID_DIGITS``), else None."""
    text = text.strip()
    if not text or len(text) > MAX_ID_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def area_of(lat: float, lon: float, margin: float = 0.5) -> str:
    """The known city (``presets``) whose area holds the point (with ``margin`` degrees), or "elsewhere"."""
    from comapoi_cli.presets import PRESETS

    for name, preset in PRESETS.items():
        lat0, lat1, lon0, lon1 = preset.bbox
        if lat0 - margin <= lat <= lat1 + margin and lon0 - margin <= lon <= lon1 + margin:
            return name
    return "elsewhere"


def line_area(points: list[tuple[float, float]]) -> str:
    """The area most of a trajectory's check-ins lie in."""
    return Counter(area_of(lat, lon) for lat, lon in points).most_common(1)[0][0]


def _refuse_other_area(what: str, path: Path, counter: Counter, dataset: str, unit: str) -> None:
    """Most of a file's lines (or rows) lie outside the dataset's city: it is another dataset's file."""
    total = sum(counter.values())
    inside = counter.get(dataset, 0)
    if not total or inside * 2 >= total:
        return
    others = [(name, n) for name, n in counter.most_common() if name != dataset]
    where = f"{others[0][0]}'s area" if others and others[0][0] != "elsewhere" else "no known city's area"
    raise DataError(f"{path} ({what}) is not {dataset} data: {total - inside} of its {total} {unit} lie outside "
                    f"{dataset}'s area (most in {where}).",
                    hint="Pass the files of one dataset: --dataset, --test, --train and --poi-info must agree.")


def read_poi_table(path: Path, world: Any, max_poi_id: int | None = None,
                   rejected: list[Rejected] | None = None, areas: Counter | None = None) -> tuple[int, int]:
    """Add ``poi_id,category,lat,lon`` rows to ``world``; returns (rows read, rows that are not POIs).

    A row is skipped, with its reason in ``rejected``, when its id is not an id (or is outside
    ``0..max_poi_id``) or its coordinates are not a finite latitude/longitude (``inf``, ``nan``, ``1e308``).
    """
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
                problem = _poi_row(row, world, max_poi_id, areas)
                if problem is None:
                    good += 1
                    continue
                bad += 1
                if rejected is not None:
                    text = ",".join(str(row.get(c)) for c in POI_COLUMNS)
                    rejected.append(Rejected(reader.line_num, problem, text[:1000]))
    except UnicodeDecodeError:
        raise DataError(f"The POI table {path} is not UTF-8 text.") from None
    except csv.Error as exc:
        raise DataError(f"The POI table {path} is not a CSV table ({exc}).") from None
    if not good:
        raise DataError(f"The POI table {path} holds no POI rows.")
    return good, bad


def _poi_row(row: dict[str, Any], world: Any, max_poi_id: int | None, areas: Counter | None) -> str | None:
    poi_text, lat_text, lon_text = (row.get(c) for c in ("poi_id", "lat", "lon"))
    if not all(isinstance(v, str) for v in (poi_text, lat_text, lon_text, row.get("category"))):
        return "a row without its four columns"
    poi = _id(poi_text)  # type: ignore[arg-type]
    if poi is None:
        return f"poi_id {_quote(str(poi_text))} is not an id"
    if max_poi_id is not None and poi > max_poi_id:
        return f"poi_id {poi} is outside 0..{max_poi_id}"
    try:
        lat, lon = float(lat_text), float(lon_text)  # type: ignore[arg-type]
    except ValueError:
        return f"lat,lon {_quote(f'{lat_text},{lon_text}')} are not numbers"
    problem = _coordinate_problem(lat, lon)
    if problem:
        return f"lat,lon {_quote(f'{lat_text},{lon_text}')} {problem}"
    if poi in world.info:
        return f"a second row for POI {poi} (the first is kept)"
    world.add(poi, row["category"], lat, lon, lat_text.strip(), lon_text.strip())  # type: ignore[union-attr]
    if areas is not None:
        areas[area_of(lat, lon)] += 1
    return None


def _records(path: Path) -> Iterator[tuple[int, str, Any, str | None]]:
    """``(line number, text, value, problem)``: a line that is not UTF-8 JSON has a problem, never raises."""
    for number, raw, value, error in iter_jsonl(path):
        text = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
        if error is None:
            yield number, text, value, None
        elif isinstance(error, UnicodeDecodeError):
            yield number, text, None, "not UTF-8 text"
        elif isinstance(error, RecursionError):
            yield number, text, None, "not JSON (nested too deeply)"
        else:
            yield number, text, None, f"not JSON ({getattr(error, 'msg', str(error)[:120])})"


def _answer(answer: Any) -> int | str:
    """The next POI id of a plain record's answer (``{"next_poi_id": N}``), or why it holds none."""
    value = answer
    if isinstance(answer, str):
        try:
            value = json.loads(answer)
        except RecursionError:
            return "the answer is nested too deeply"
        except ValueError:
            value = answer
    if isinstance(value, dict):
        if len(value) != 1:
            return "the answer is not {\"next_poi_id\": N}"
        value = next(iter(value.values()))
    if isinstance(value, list):
        if len(value) != 1:
            return f"the answer lists {len(value)} ids, not one next POI ({AGENT_RECORD})"
        value = value[0]
    if isinstance(value, bool) or value is None:
        return "the answer holds no next POI id"
    if isinstance(value, int):
        if value < 0 or value >= 10 ** MAX_ID_DIGITS:
            return f"the label {value if value < 0 else str(value)[:20] + '...'} is not a POI id"
        return value
    if isinstance(value, str):
        poi = _id(value)
        if poi is None:
            return f"the label {_quote(value)} is not a POI id"
        return poi
    return f"the label {_quote(json.dumps(value)[:_SHOWN])} is not a POI id"


def parse_plain(record: Any, max_poi_id: int, max_user: int | None = None) -> tuple[Any, list[tuple[float, float]]] | str:
    """A plain CoMaPOI trajectory (label kept) and its check-ins' coordinates, or the reason it is none.

    Nothing is added to any POI table here: a line that fails half way leaves no trace.
    """
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return "not a conversation with a user turn and an assistant answer"
    messages = [m for m in record["messages"] if isinstance(m, dict)]
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    answers = [m.get("content") for m in messages if m.get("role") == "assistant"]
    if not users or not answers:
        return "not a conversation with a user turn and an assistant answer"
    if len(users) > 1 or len(answers) > 1:
        return f"a conversation of several turns ({AGENT_RECORD})"
    text = users[0]
    if not isinstance(text, str):
        return "the user turn is not text"
    header = synth._HEADER.search(text)
    if header is None:
        return "no '<historical trajectory of user_U_subtrajectory_S>' header"
    if text[:header.start()].strip():
        return f"the user turn holds text before the trajectory header ({AGENT_RECORD})"
    user, sub = _id(header.group(1)), _id(header.group(2))
    if user is None or sub is None:
        return f"the header's user or subtrajectory {_quote(header.group(0))} is not an id"
    if max_user is not None and user > max_user:
        return f"user {user} is outside this dataset's users 0..{max_user}"
    checkins: list[synth.Checkin] = []
    points: list[tuple[float, float]] = []
    position = header.end()
    for number, match in enumerate(synth._CHECKIN.finditer(text, header.end()), 1):
        between = text[position:match.start()]
        if between.strip():
            return f"text that is not a check-in before check-in {number}: {_quote(between.strip())} ({AGENT_RECORD}?)"
        position = match.end()
        stamp, _day, who, poi_text, category, lat_text, lon_text = match.groups()
        if " visit POI ID " in category:  # the lazy category ran into the next check-in: this one has no coordinates
            return f"check-in {number} has no coordinates 'lat,lon' ({_quote(category.split(')')[0] + ')')})"
        try:
            when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return f"check-in {number} has an impossible time {_quote(stamp)}"
        poi = _id(poi_text)
        if poi is None or _id(who) is None:
            return f"check-in {number}'s POI or user id {_quote(poi_text if poi is None else who)} is not an id"
        if poi > max_poi_id:
            return f"check-in {number}'s POI {poi} is outside 0..{max_poi_id}"
        lat, lon = float(lat_text), float(lon_text)
        problem = _coordinate_problem(lat, lon)
        if problem:
            return f"check-in {number}'s coordinates {_quote(f'{lat_text},{lon_text}')} {problem}"
        checkins.append(synth.Checkin(when, poi, category, lat_text, lon_text))
        points.append((lat, lon))
    rest = text[position:].strip()
    if not checkins:
        return "no check-in ('At YYYY-MM-DD HH:MM:SS, Weekday, user U visit POI ID P (...).')"
    if rest:
        return f"text that is not a check-in after the last one: {_quote(rest)} ({AGENT_RECORD}?)"
    label = _answer(answers[0])
    if isinstance(label, str):
        return label
    return synth.Trajectory(user, sub, checkins, label), points


def _add(world: Any, traj: Any, points: list[tuple[float, float]]) -> None:
    for checkin, (lat, lon) in zip(traj.checkins, points):
        world.add(checkin.poi, checkin.category, lat, lon, checkin.lat, checkin.lon)


def trajectory_key(traj: Any) -> str:
    return f"user_{traj.user}_subtrajectory_{traj.sub}"


def first_checkin(traj: Any) -> tuple[str, int]:
    """What tells two trajectories with the same key apart: their first check-in (time, POI)."""
    first = traj.checkins[0]
    return f"{first.time:%Y-%m-%d %H:%M:%S}", int(first.poi)


def _outside(where: str, dataset: str) -> str:
    place = f"in {where}'s area" if where != "elsewhere" else "outside every known city"
    return f"its check-ins lie {place}, {OUTSIDE} ({dataset})"


def load_inputs(dataset: str, max_poi_id: int, decimals: int, test: Path, poi_info: Path, train: Path,
                *, max_user: int | None = None) -> ChainInputs:
    """Read the POI table, then the training trajectories (histories, retrieval), then the test ones.

    For a known dataset (``presets``), a file most of whose rows or lines lie outside its city is
    refused (another dataset's file), and a single line that does is rejected (test) or skipped (train).
    """
    from comapoi_cli.presets import PRESETS

    _need_file(test, "test trajectories", hint="Pass CoMaPOI's plain next-POI file, e.g. --test data/nyc/nyc_test.jsonl.")
    _need_file(train, "training trajectories",
               hint="History and retrieval come from them: pass --train FILE (e.g. nyc_train.jsonl).")
    known = dataset in PRESETS
    world = synth.PoiWorld(max_poi_id, decimals)
    areas: dict[str, Counter] = {"poi_info": Counter(), "train": Counter(), "test": Counter()}
    poi_rejected: list[Rejected] = []
    rows, bad_rows = read_poi_table(poi_info, world, max_poi_id, poi_rejected, areas["poi_info"])
    if known:
        _refuse_other_area("POI table", poi_info, areas["poi_info"], dataset, "POIs")
        if rows + bad_rows > max_poi_id + 1:
            raise DataError(f"The POI table {poi_info} has {rows + bad_rows} rows, more than {dataset}'s "
                            f"{max_poi_id + 1} POIs (ids 0..{max_poi_id}): is it another dataset's?")

    def parsed_lines(path: Path, what: str) -> Iterator[tuple[int, str, Any]]:
        """``(line, text, (trajectory, points) or reason)``; refuses a file that is another dataset's."""
        out = []
        for number, text, value, problem in _records(path):
            parsed = parse_plain(value, max_poi_id, max_user) if problem is None else problem
            if not isinstance(parsed, str):
                where = line_area(parsed[1])
                areas[what][where] += 1
                if known and where != dataset:
                    parsed = _outside(where, dataset)
            out.append((number, text, parsed))
        if known:
            _refuse_other_area(f"{'test' if what == 'test' else 'training'} trajectories", path, areas[what],
                               dataset, "trajectories")
        return iter(out)

    trains: list[Any] = []
    histories: dict[int, Any] = {}
    train_keys: dict[str, set[tuple[str, int]]] = {}
    skipped = 0
    agent_like = 0
    for _number, _text, parsed in parsed_lines(train, "train"):
        if isinstance(parsed, str):
            skipped += 1
            agent_like += AGENT_RECORD in parsed
            continue
        traj, points = parsed
        _add(world, traj, points)
        trains.append(traj)
        train_keys.setdefault(trajectory_key(traj), set()).add(first_checkin(traj))
        histories.setdefault(traj.user, synth._Stats()).add(traj.checkins, world)
    if not trains:
        what = " (its records are agents' training records)" if agent_like else ""
        raise DataError(f"The training trajectories {train} hold no plain CoMaPOI trajectory{what}.",
                        hint="Pass the plain next-POI file with --train, e.g. nyc_train.jsonl.")
    items: list[ChainItem] = []
    labels: dict[str, int] = {}
    rejected: list[Rejected] = []
    for number, text, parsed in parsed_lines(test, "test"):
        if isinstance(parsed, str):
            rejected.append(Rejected(number, parsed, text))
            continue
        traj, points = parsed
        if not 0 <= traj.next_poi <= max_poi_id:
            rejected.append(Rejected(number, f"the label {traj.next_poi} is outside 0..{max_poi_id}", text))
            continue
        key = trajectory_key(traj)
        if key in labels:
            rejected.append(Rejected(number, f"a second trajectory {key} (the first is kept)", text))
            continue
        _add(world, traj, points)
        labels[key] = traj.next_poi
        hidden = synth.Trajectory(traj.user, traj.sub, traj.checkins, None)  # type: ignore[arg-type]
        items.append(ChainItem(key=key, line=number, trajectory=hidden, history=histories.get(traj.user)))
    if rejected and not items and all(AGENT_RECORD in r.reason for r in rejected):
        raise DataError(f"The test file {test} holds agents' training records, not plain trajectories "
                        f"(line {rejected[0].line}: {rejected[0].reason}).",
                        hint="Pass CoMaPOI's plain next-POI test file, e.g. --test data/nyc/nyc_test.jsonl.")
    return ChainInputs(world=world, items=items, labels=labels, train=trains, histories=histories, rejected=rejected,
                       train_skipped=skipped, poi_rows=rows, poi_bad_rows=bad_rows, poi_rejected=poi_rejected,
                       areas=areas, train_keys=train_keys)
