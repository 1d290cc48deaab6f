"""``synth_dataset``: deterministic CoMaPOI-format data for the demo, tests and benchmarks.

Two sources of trajectories:

- **real** (``source=FILE``): next-POI trajectories in CoMaPOI's chat format, such as
  ``nyc_train.jsonl`` (user turn ``<historical trajectory of user_U_subtrajectory_S>`` + check-ins,
  answer ``{"next_poi_id": N}``);
- **simulated** (no source): a city from a dataset preset (id range, category names, coordinates
  in the city's bounding box with its number of decimals, dates in its years with the right
  weekday), users with home and work areas and favourite places.

From each training trajectory it writes the original layout, ``{out}/{dataset}/``:

- ``agent1_train_samples.jsonl``: 2 records (a long-term profile; 25 candidate ids, true first),
- ``agent2_train_samples.jsonl``: 2 records (a short-term mobility pattern; 25 candidates refined
  from a 100-id "Similar POI List", true first),
- ``agent3_train_samples.jsonl``: 1 record whose target is the final ranked prediction
  ``{"next_poi_id": [true, ...]}`` (10 ids, true first).

No prompt states the label: the candidate lists shown to agent3 are noisy (the true id is in
them at a random place, or missing), as at inference. Simulated mode also writes the plain
next-POI files ``{dataset}_train.jsonl`` / ``{dataset}_test.jsonl`` (one test trajectory per
user) and ``{dataset}_poi_info.csv``. Output is streamed (constant memory) and identical for the
same arguments and seed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import atomic_writer, iter_jsonl, jsonl_line
from comapoi_cli.presets import PRESETS, DatasetPreset, preset_for
from comapoi_cli.reporting import SILENT, Reporter
from comapoi_cli.retrievers import extend_unseen
from comapoi_cli.roles import AgentRole

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry

SYSTEM_PROMPT = "You are a helpful assistant."
PLAIN_SYSTEM = ("Please predict the next one POI ID that user_{u} will visit based on the user's historical "
                "check-in trajectory data. Only output the value of the POI ID in JSON format "
                "[ {{{{ 'next POI ID': value }}}} ].")
CANDIDATES = 25
SIMILAR = 100
FINAL_TOP_K = 10
#: Runs of this many trajectories and more report progress (about 2 s of writing).
PROGRESS_MIN_TRAJECTORIES = 2000

_HEADER = re.compile(r"<historical trajectory of user_(\d+)_subtrajectory_(\d+)>")
_CHECKIN = re.compile(
    r"At (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}), ([A-Za-z]+), user (\d+) visit POI ID (\d+) \((.*?), (-?\d+\.?\d*),(-?\d+\.?\d*)\)\.")


@dataclass
class Checkin:
    time: datetime
    poi: int
    category: str
    lat: str  # kept as text: the source's own digits
    lon: str

    def text(self, user: int) -> str:
        when = self.__dict__.get("_when")  # formatted once: every step of a chain shows the trajectory again
        if when is None:
            when = self.__dict__["_when"] = f"{self.time:%Y-%m-%d %H:%M:%S}, {self.time:%A}"
        return f"At {when}, user {user} visit POI ID {self.poi} ({self.category}, {self.lat},{self.lon})."


@dataclass
class Trajectory:
    user: int
    sub: int
    checkins: list[Checkin]
    next_poi: int
    next_category: str | None = None


@dataclass
class SynthSummary:
    dataset: str
    folder: str
    mode: str                      # "real" or "simulated"
    source: str | None
    seed: int
    trajectories: int = 0
    users: int = 0
    test_trajectories: int = 0
    records: dict[str, int] = field(default_factory=dict)   # file name -> records
    files: list[str] = field(default_factory=list)
    skipped_lines: int = 0         # source lines that are not trajectories
    seconds: float = 0.0
    bytes_written: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- POI world -----------------------------------------------------------------------------
class PoiWorld:
    """POIs with categories and coordinates, and a grid to find POIs near a place."""

    def __init__(self, max_id: int, decimals: int):
        self.max_id = max_id
        self.decimals = decimals
        self.info: dict[int, tuple[str, float, float, str, str]] = {}
        self._grid: dict[tuple[int, int], list[int]] = {}
        self.cell = 0.02

    def add(self, poi: int, category: str, lat: float, lon: float, lat_text: str | None = None,
            lon_text: str | None = None) -> None:
        if poi in self.info:
            return
        fmt = f"{{:.{self.decimals}f}}"
        self.info[poi] = (category, lat, lon, lat_text or fmt.format(lat), lon_text or fmt.format(lon))
        self._grid.setdefault((int(lat // self.cell), int(lon // self.cell)), []).append(poi)

    def near(self, lat: float, lon: float, rng: random.Random, count: int, exclude: set[int]) -> list[int]:
        """Up to ``count`` POIs from the cells around (lat, lon), nearest rings first, seeded order."""
        out: list[int] = []
        ci, cj = int(lat // self.cell), int(lon // self.cell)
        for radius in range(0, 12):
            ring: list[int] = []
            for di in range(-radius, radius + 1):
                for dj in range(-radius, radius + 1):
                    if max(abs(di), abs(dj)) != radius:
                        continue
                    ring.extend(self._grid.get((ci + di, cj + dj), ()))
            rng.shuffle(ring)
            if extend_unseen(out, ring, exclude, count):
                return out
        return out

    def checkin(self, poi: int, when: datetime) -> Checkin:
        category, _lat, _lon, lat_text, lon_text = self.info[poi]
        return Checkin(when, poi, category, lat_text, lon_text)


# -- simulated city ------------------------------------------------------------------------
def _simulated_world(preset: DatasetPreset, seed: int) -> tuple[PoiWorld, list[tuple[float, float]]]:
    rng = random.Random(f"{seed}:{preset.name}:world")
    lat0, lat1, lon0, lon1 = preset.bbox
    centres = [(rng.uniform(lat0, lat1), rng.uniform(lon0, lon1)) for _ in range(preset.neighbourhoods)]
    spread = min(lat1 - lat0, lon1 - lon0) / 25
    weights = [1.0 / (i + 1) ** 0.6 for i in range(len(preset.categories))]
    world = PoiWorld(preset.max_poi_id, preset.coord_decimals)
    categories = rng.choices(preset.categories, weights=weights, k=preset.max_poi_id + 1)
    for poi in range(preset.max_poi_id + 1):
        clat, clon = centres[rng.randrange(len(centres))]
        lat = min(max(rng.gauss(clat, spread), lat0), lat1)
        lon = min(max(rng.gauss(clon, spread), lon0), lon1)
        world.add(poi, categories[poi], lat, lon)
    return world, centres


def _simulated_users(preset: DatasetPreset, world: PoiWorld, centres, seed: int, trajectories: int,
                     min_len: int, max_len: int) -> Iterator[tuple[int, list[Trajectory], Trajectory]]:
    """Yield ``(user, training trajectories, test trajectory)`` until ``trajectories`` training ones."""
    made = 0
    user = 0
    while made < trajectories:
        rng = random.Random(seed * 1_000_003 + user)
        home = centres[rng.randrange(len(centres))]
        work = centres[rng.randrange(len(centres))]
        favourites = world.near(home[0], home[1], rng, rng.randint(6, 14), set())
        favourites += world.near(work[0], work[1], rng, rng.randint(4, 10), set(favourites))
        fav_weights = [1.0 / (i + 1) for i in range(len(favourites))]
        n_sub = min(rng.randint(2, 6), trajectories - made + 1)
        year = preset.years[0]
        when = datetime(year, 1, 1) + timedelta(days=rng.uniform(0, 300), seconds=rng.randrange(86400))
        subs: list[Trajectory] = []
        for sub in range(1, n_sub + 1):
            length = rng.randint(min_len, max_len)
            visits: list[Checkin] = []
            lat, lon = home
            for _ in range(length + 1):
                when += timedelta(minutes=rng.choice((rng.uniform(8, 240), rng.uniform(240, 1440), rng.uniform(1440, 4320))))
                if rng.random() < 0.55 and favourites:
                    poi = rng.choices(favourites, weights=fav_weights)[0]
                else:
                    near = world.near(lat, lon, rng, 1, set()) or [rng.randrange(preset.max_poi_id + 1)]
                    poi = near[0]
                visits.append(world.checkin(poi, when))
                lat, lon = world.info[poi][1], world.info[poi][2]
            target = visits.pop()
            subs.append(Trajectory(user, sub, visits, target.poi, target.category))
            when += timedelta(days=rng.uniform(1, 30))
        train, test = subs[:-1], subs[-1]
        made += len(train)
        yield user, train, test
        user += 1


# -- real trajectories -----------------------------------------------------------------------
def _read_real(source: Path, world: PoiWorld, summary: SynthSummary) -> Iterator[Trajectory]:
    for _number, _raw, record, error in iter_jsonl(source):
        if isinstance(error, UnicodeDecodeError):
            raise DataError(f"The trajectory file {source} is not UTF-8 text.")
        traj = trajectory_from_record(record, world) if error is None else "not JSON"
        if isinstance(traj, str):
            summary.skipped_lines += 1
            continue
        yield traj


def trajectory_from_record(record: Any, world: PoiWorld) -> Trajectory | str:
    """The trajectory of one CoMaPOI next-POI record (its check-ins' POIs are added to ``world``),
    or the reason why the record is not one (``comapoi pipeline`` keeps it in its rejects file)."""
    try:
        messages = record["messages"]
        user_text = next(m["content"] for m in messages if m.get("role") == "user")
        answer = [m["content"] for m in messages if m.get("role") == "assistant"][-1]
    except (KeyError, TypeError, StopIteration, IndexError, AttributeError):
        return "not a conversation with a user turn and an assistant answer"
    if not isinstance(user_text, str):
        return "the user turn is not text"
    next_poi = _answer_id(answer)
    header = _HEADER.search(user_text)
    checkins = []
    for match in _CHECKIN.finditer(user_text):
        stamp, _day, _user, poi, category, lat, lon = match.groups()
        poi_id = int(poi)
        world.add(poi_id, category, float(lat), float(lon), lat, lon)
        checkins.append(Checkin(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S"), poi_id, category, lat, lon))
    if header is None:
        return "no '<historical trajectory of user_U_subtrajectory_S>' header"
    if not checkins:
        return "no check-in ('At YYYY-MM-DD HH:MM:SS, Weekday, user U visit POI ID P (...).')"
    if next_poi is None:
        return "the answer holds no next POI id"
    return Trajectory(int(header.group(1)), int(header.group(2)), checkins, next_poi)


def _answer_id(answer: Any) -> int | None:
    try:
        value = json.loads(answer) if isinstance(answer, str) else answer
    except ValueError:
        value = None
    if isinstance(value, dict):
        value = next(iter(value.values()), None)
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    found = re.findall(r"\d+", str(answer))
    return int(found[0]) if found else None


def _read_poi_csv(path: Path, world: PoiWorld) -> None:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                world.add(int(row["poi_id"]), row["category"], float(row["lat"]), float(row["lon"]), row["lat"], row["lon"])
            except (KeyError, ValueError):
                continue


# -- text of the records ---------------------------------------------------------------------
_HOURS = ((0, 6, "late night"), (6, 10, "morning"), (10, 14, "midday"), (14, 18, "afternoon"), (18, 22, "evening"), (22, 24, "night"))


def _period(hour: int) -> str:
    for start, end, name in _HOURS:
        if start <= hour < end:
            return name
    return "night"


class _Stats:
    """Counts over check-ins: categories, POIs, periods of the day, weekdays, centre and radius."""

    __slots__ = ("categories", "pois", "periods", "days", "lat", "lon", "n", "names")

    def __init__(self) -> None:
        self.categories: Counter = Counter()
        self.pois: Counter = Counter()
        self.periods: Counter = Counter()
        self.days: Counter = Counter()
        self.lat = self.lon = 0.0
        self.n = 0
        self.names: dict[int, str] = {}

    def add(self, checkins: list[Checkin], world: PoiWorld) -> None:
        for c in checkins:
            self.categories[c.category] += 1
            self.pois[c.poi] += 1
            self.names[c.poi] = c.category
            self.periods[_period(c.time.hour)] += 1
            self.days[c.time.strftime("%A")] += 1
            info = world.info.get(c.poi)
            if info:
                self.lat += info[1]
                self.lon += info[2]
            self.n += 1

    def copy(self) -> "_Stats":
        other = _Stats()
        other.categories = self.categories.copy()
        other.pois = self.pois.copy()
        other.periods = self.periods.copy()
        other.days = self.days.copy()
        other.lat, other.lon, other.n = self.lat, self.lon, self.n
        other.names = dict(self.names)
        return other

    def centre(self) -> tuple[float, float]:
        return (self.lat / self.n, self.lon / self.n) if self.n else (0.0, 0.0)

    def share(self, counter: Counter, k: int) -> str:
        total = sum(counter.values()) or 1
        return ", ".join(f"{name} ({100 * n / total:.0f}%)" for name, n in counter.most_common(k))

    def block(self, world: PoiWorld, title: str) -> str:
        lat, lon = self.centre()
        top_pois = "; ".join(
            f"POI ID {poi} ({self.names.get(poi, '?')}) x{n}" for poi, n in self.pois.most_common(8))
        return (f"{title} ({self.n} check-ins):\n"
                f"- Most visited categories: {self.share(self.categories, 6)}\n"
                f"- Most visited POIs: {top_pois}\n"
                f"- Time of day: {self.share(self.periods, 4)}\n"
                f"- Days of the week: {self.share(self.days, 4)}\n"
                f"- Activity centre: {lat:.4f}, {lon:.4f}\n"
                f"- Distinct POIs: {len(self.pois)}")


_PROFILE_OPENINGS = ("This user is a {kind} whose check-ins centre on {cats}.",
                     "A {kind}: most of this user's check-ins are at {cats}.",
                     "The history shows a {kind} who mostly visits {cats}.")
_KINDS = ("regular commuter", "routine-driven city resident", "frequent explorer", "weekend-active local",
          "evening socialiser", "early riser", "student-like visitor", "office worker")


def _profile(stats: _Stats, rng: random.Random, next_category: str | None) -> str:
    cats = [c.strip() for c, _ in stats.categories.most_common(3)]
    periods = [p for p, _ in stats.periods.most_common(2)]
    days = [d for d, _ in stats.days.most_common(2)]
    text = rng.choice(_PROFILE_OPENINGS).format(kind=rng.choice(_KINDS), cats=", ".join(cats) or "varied places")
    text += (f" Activity peaks in the {' and '.join(periods) or 'day'}, especially on {' and '.join(days) or 'weekdays'}."
             f" The user returns to a small set of {len(stats.pois)} places and stays within a compact area,"
             f" so familiar places near the recent check-ins are the most likely next visits.")
    if next_category:
        text += f" Places such as a {next_category.strip()} fit this routine well."
    if rng.random() < 0.5:
        text += " Occasional visits further away suggest some interest in exploring new places of the same kinds."
    return text


def _mobility(recent: list[Checkin], rng: random.Random, world: PoiWorld) -> str:
    last = recent[-min(len(recent), 6):]
    cats = Counter(c.category.strip() for c in last)
    first, final = last[0], last[-1]
    hours = (final.time - first.time).total_seconds() / 3600
    moves = 0.0
    for a, b in zip(last, last[1:]):
        ia, ib = world.info.get(a.poi), world.info.get(b.poi)
        if ia and ib:
            moves += _km(ia[1], ia[2], ib[1], ib[2])
    trend = ", then ".join(dict.fromkeys(c.category.strip() for c in last))
    return (f"Recently the user moved through {trend} over about {hours:.0f} hours, covering roughly {moves:.1f} km. "
            f"The most recent check-ins favour {', '.join(c for c, _ in cats.most_common(2))}, "
            f"mostly in the {_period(final.time.hour)} of a {final.time:%A}. "
            + rng.choice(("The short-term pattern is local and repetitive.",
                          "The pattern shows a shift between nearby areas.",
                          "The user tends to chain short trips between familiar places.")))


def _km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p = math.pi / 180
    a = 0.5 - math.cos((lat2 - lat1) * p) / 2 + math.cos(lat1 * p) * math.cos(lat2 * p) * (1 - math.cos((lon2 - lon1) * p)) / 2
    return 12742 * math.asin(math.sqrt(max(0.0, min(1.0, a))))


def _fill(ids: list[int], count: int, rng: random.Random, max_id: int) -> list[int]:
    seen = set(ids)
    out = list(ids)
    while len(out) < count:
        poi = rng.randint(0, max_id)
        if poi not in seen:
            seen.add(poi)
            out.append(poi)
    return out[:count]


def _noisy_list(pool: list[int], truth: int, rng: random.Random, count: int, hit_rate: float, max_id: int) -> list[int]:
    """A candidate list as an agent would predict it: the truth somewhere in it, or missing."""
    ids = [p for p in pool if p != truth][: count]
    ids = _fill(ids, count, rng, max_id)
    rng.shuffle(ids)
    if truth in ids:
        ids.remove(truth)
        ids = _fill(ids, count, rng, max_id)
    if rng.random() < hit_rate:
        ids[rng.randrange(count)] = truth
    return ids


def _csv(ids: list[int]) -> str:
    return ", ".join(map(str, ids))


# -- what the roles' prompt builders use (comapoi_cli/default_plugins/comapoi_roles.py) ----------------
def current_text(traj: Trajectory) -> str:
    """The current trajectory as every prompt shows it."""
    u, s = traj.user, traj.sub
    return f"<historical trajectory of user_{u}_subtrajectory_{s}>\n" + " ".join(c.text(u) for c in traj.checkins)


def history_stats(history: _Stats | None, traj: Trajectory, world: PoiWorld) -> _Stats:
    """The statistics a Profiler prompt shows: the user's earlier trajectories, else the current one."""
    if history is not None and history.n:
        return history.copy()
    stats = _Stats()
    stats.add(traj.checkins, world)
    return stats


def recent_stats(traj: Trajectory, world: PoiWorld) -> _Stats:
    """The statistics a Forecaster prompt shows: the last 12 check-ins."""
    recent = _Stats()
    recent.add(traj.checkins[-min(len(traj.checkins), 12):], world)
    return recent


def chat_prompt(user_text: str) -> list[dict[str, str]]:
    """The prompt turns of an agent record (system + user), without the answer."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_text}]


@dataclass
class SynthExample:
    """One training trajectory and what CoMaPOI's simulated agents say about it, for the roles'
    ``synth_records``: every random draw is made here, once, in a fixed order, so a role's records do
    not depend on which other roles are written. A role that needs draws of its own uses :meth:`rng`."""

    trajectory: Trajectory
    world: PoiWorld
    max_poi_id: int
    seed: int
    history: _Stats              # the user's long-term statistics (earlier trajectories, else this one)
    recent: _Stats               # the last 12 check-ins
    profile: str                 # a long-term profile text (the Profiler's first answer)
    mobility: str                # a recent mobility pattern text (the Forecaster's first answer)
    long_term_candidates: list[int]   # 25 ids from the user's places and the area, the true id first
    similar: list[int]           # the retrieved "Similar POI List" (100 ids; the true id in it 70% of the time)
    short_term_candidates: list[int]  # 25 ids refined from ``similar``, the true id first
    seen_long_term: list[int]    # the two candidate lists as upstream models would predict them: the true
    seen_short_term: list[int]   # id anywhere in them, or missing
    final: list[int]             # the final ranking, 10 ids, the true id first

    def rng(self, role_id: str) -> random.Random:
        """A generator of a role's own draws, fixed by the seed, the trajectory and the role id."""
        return random.Random(f"{self.seed}:{self.trajectory.user}:{self.trajectory.sub}:{role_id}")


def chat_record(user_text: str, answer: str) -> dict[str, Any]:
    """An agent training record: the system prompt, ``user_text``, and ``answer``."""
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": user_text},
                         {"role": "assistant", "content": answer}]}


def draw_example(traj: Trajectory, history: _Stats, world: PoiWorld, rng: random.Random, max_id: int,
                 seed: int) -> SynthExample:
    stats = history_stats(history, traj, world)
    recent = recent_stats(traj, world)
    truth = traj.next_poi
    next_category = traj.next_category or (world.info.get(truth) or (None,))[0]

    # candidate pools: the user's places, then places near the last check-in
    last = traj.checkins[-1]
    last_info = world.info.get(last.poi)
    own = [p for p, _ in stats.pois.most_common(40)] + [c.poi for c in reversed(traj.checkins)]
    own = list(dict.fromkeys(own))
    nearby = world.near(last_info[1], last_info[2], rng, SIMILAR, set(own)) if last_info else []

    profile = _profile(stats, rng, next_category)
    mobility = _mobility(traj.checkins, rng, world)

    long_term = _fill([truth] + [p for p in own + nearby if p != truth], CANDIDATES, rng, max_id)
    similar = nearby[:SIMILAR]
    similar = [p for p in similar if p != truth]
    if rng.random() < 0.7:  # retrieval finds the true POI most of the time, at no fixed place
        similar.insert(rng.randrange(len(similar) + 1), truth)
    similar = _fill(similar, SIMILAR, rng, max_id) if len(similar) < SIMILAR else similar[:SIMILAR]
    short_term = _fill([truth] + [p for p in similar + own if p != truth], CANDIDATES, rng, max_id)
    # the final predictor sees the agents' lists as they would predict them: truth anywhere, or missing
    seen1 = _noisy_list(own + nearby, truth, rng, CANDIDATES, 0.55, max_id)
    seen2 = _noisy_list(similar + own, truth, rng, CANDIDATES, 0.6, max_id)
    pool = [p for p in dict.fromkeys(seen1[:12] + seen2[:12] + own) if p != truth]
    final = _fill([truth] + pool, FINAL_TOP_K, rng, max_id)
    return SynthExample(traj, world, max_id, seed, stats, recent, profile, mobility, long_term, similar, short_term,
                        seen1, seen2, final)


def synth_roles(registry: Registry, also: Sequence[str] = ()) -> list[AgentRole]:
    """The roles ``data synth`` writes: every required role that can synthesise records, and the roles
    named in ``also`` (a role that cannot is refused)."""
    for role_id in also:
        if not _can_synth(registry.role(role_id)):
            raise UsageError(f"Role {role_id} cannot synthesise training records (it has no synth_records).")
    return [role for role in registry.roles.values() if _can_synth(role) and (role.required or role.id in also)]


def _can_synth(role: AgentRole) -> bool:
    return type(role).synth_records is not AgentRole.synth_records


def _encode(records: list[dict[str, Any]]) -> bytes:
    return "".join(jsonl_line(r) for r in records).encode("utf-8")


def _plain_record(traj: Trajectory) -> bytes:
    u, s = traj.user, traj.sub
    user_text = f"<historical trajectory of user_{u}_subtrajectory_{s}>\n" + " ".join(c.text(u) for c in traj.checkins)
    return jsonl_line({"messages": [{"role": "system", "content": PLAIN_SYSTEM.format(u=u)},
                                    {"role": "user", "content": user_text},
                                    {"role": "assistant", "content": json.dumps({"next_poi_id": traj.next_poi})}]}).encode("utf-8")


def synth_dataset(
    dataset: str,
    out: str | os.PathLike[str] | None = None,
    *,
    source: str | os.PathLike[str] | None = None,
    trajectories: int | None = None,
    seed: int = 42,
    preset: str | None = None,
    poi_info: str | os.PathLike[str] | None = None,
    min_checkins: int = 12,
    max_checkins: int = 36,
    plain: bool = True,
    reporter: Reporter = SILENT,
    registry: Registry,
    also_roles: Sequence[str] = (),
    real_writer: Callable[..., SynthSummary] | None = None,
) -> SynthSummary:
    """Write each role's training file, ``{out}/{dataset}/{role data file}`` (and, simulated, the plain files).

    The roles are the registry's required roles that can synthesise records (CoMaPOI's three) and
    those named in ``also_roles`` (a plugin role such as ``agent4``); each builds its own records from
    the trajectory's :class:`SynthExample` (``AgentRole.synth_records``).

    Args:
        source: real next-POI trajectories (e.g. ``nyc_train.jsonl``); without it a city is
            simulated from ``preset`` (default: the dataset's own preset).
        trajectories: how many training trajectories to use (real: the first N; simulated: N,
            default 200).
        poi_info: a ``poi_id,category,lat,lon`` table that widens the candidate pool (real mode).
        reporter: hears the progress (unit ``"trajectories"``) of runs of
            :data:`PROGRESS_MIN_TRAJECTORIES` trajectories and more.
        real_writer: writes the records of a preset city's real trajectories instead of this module
            (``comapoi_cli.data.build.synthesise`` passes data build's template teacher, so that
            ``data synth`` and ``data build`` share one record builder); called as
            ``real_writer(summary, source, poi_info, trajectories, reporter, started)``.
    """
    import time

    started = time.perf_counter()
    if trajectories is not None and trajectories <= 0:
        raise UsageError("--trajectories must be at least 1.")
    if not 2 <= min_checkins <= max_checkins:
        raise UsageError("Check-ins per trajectory: need 2 <= --min-checkins <= --max-checkins.")
    folder = Path(out if out is not None else os.environ.get("COMAPOI_DATA_DIR") or "data") / dataset
    city = preset_for(preset or dataset)
    if preset and city is None:
        raise UsageError(f"Unknown city preset '{preset}'; presets: {', '.join(PRESETS)}.")
    summary = SynthSummary(dataset, str(folder), "real" if source else "simulated", str(source) if source else None, seed)
    roles = synth_roles(registry, also_roles)
    if not roles:
        raise UsageError("No registered role can synthesise training records.")

    if source is not None:
        src = Path(source)
        if not src.is_file():
            raise DataError(f"Cannot find the trajectory file {src}.",
                            hint="Pass a CoMaPOI next-POI file such as nyc_train.jsonl, or leave --source out to simulate a city.")
        if city is not None and city.max_poi_id + 1 < SIMILAR:  # the candidate lists draw SIMILAR distinct ids
            raise DataError(f"{dataset} has POI ids up to {city.max_poi_id} only; the agent records need at least "
                            f"{SIMILAR} POIs.")
        if city is not None and real_writer is not None:  # one record builder: data build's template teacher
            return real_writer(summary, src, poi_info, trajectories, reporter, started)
        decimals = city.coord_decimals if city else 8
        max_id = city.max_poi_id if city else None
        world = PoiWorld(max_id if max_id is not None else 0, decimals)
        if poi_info is not None:
            _read_poi_csv(Path(poi_info), world)
        trajs = list(_read_real(src, world, summary))
        if not trajs:
            raise DataError(f"{src} holds no CoMaPOI trajectories (user turn '<historical trajectory of user_U_subtrajectory_S>' "
                            "with check-ins, answer {\"next_poi_id\": N}).")
        if trajectories is not None:
            trajs = trajs[:trajectories]
        if max_id is None:
            max_id = max(max(world.info), max(t.next_poi for t in trajs))
            world.max_id = max_id
        if max_id + 1 < SIMILAR:  # the candidate lists draw SIMILAR distinct ids: fewer would never end
            raise DataError(f"{src} names POI ids up to {max_id} only; the agent records need at least {SIMILAR} POIs.")
        groups: Iterator[tuple[int, list[Trajectory], Trajectory | None]] = ((t.user, [t], None) for t in trajs)
        planned = len(trajs)
    else:
        if city is None:
            raise UsageError(f"No city preset for '{dataset}': pass --preset {'|'.join(PRESETS)} to simulate one, "
                             "or --source FILE with real trajectories.")
        max_id = city.max_poi_id
        world, centres = _simulated_world(city, seed)
        groups = _simulated_users(city, world, centres, seed, trajectories or 200, min_checkins, max_checkins)
        planned = trajectories or 200
    show = planned >= PROGRESS_MIN_TRAJECTORIES
    if show:
        reporter.progress_start(planned, description=f"synth {dataset}", unit="trajectories")

    names = [role.data_file_name() for role in roles]
    plain_names = [f"{dataset}_train.jsonl", f"{dataset}_test.jsonl"] if plain and source is None else []
    counts = dict.fromkeys(names + plain_names, 0)
    histories: dict[int, _Stats] = {}
    users: set[int] = set()
    with contextlib.ExitStack() as files:  # every file is written atomically: all of them, or none on an error
        handles = [files.enter_context(atomic_writer(folder / name, "wb")) for name in names]
        plain_files = [files.enter_context(atomic_writer(folder / name, "wb")) for name in plain_names]
        try:
            for user, train, test in groups:
                users.add(user)
                history = histories.setdefault(user, _Stats()) if source is not None else _Stats()
                for traj in train:
                    rng = random.Random(seed * 7_919 + traj.user * 104_729 + traj.sub)
                    example = draw_example(traj, history, world, rng, max_id, seed)
                    for role, handle, name in zip(roles, handles, names):
                        records = role.synth_records(example)
                        data = _encode(records)
                        handle.write(data)
                        counts[name] += len(records)
                        summary.bytes_written += len(data)
                    history.add(traj.checkins, world)
                    summary.trajectories += 1
                    if show and summary.trajectories % 100 == 0:
                        reporter.progress_update(summary.trajectories)
                    if plain_files:
                        plain_files[0].write(_plain_record(traj))
                        counts[plain_names[0]] += 1
                if plain_files and test is not None:
                    plain_files[1].write(_plain_record(test))
                    counts[plain_names[1]] += 1
                    summary.test_trajectories += 1
        except BaseException:
            if show:
                reporter.progress_stop()
            raise
    if show:
        reporter.progress_update(summary.trajectories)
        reporter.progress_stop()
    if plain_names:
        csv_path = folder / f"{dataset}_poi_info.csv"
        with atomic_writer(csv_path) as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["poi_id", "category", "lat", "lon"])
            for poi in sorted(world.info):
                category, _lat, _lon, lat_text, lon_text = world.info[poi]
                writer.writerow([poi, category, lat_text, lon_text])
        summary.files.append(str(csv_path))
    summary.records = counts
    summary.files = [str(folder / n) for n in names + plain_names] + summary.files
    summary.users = len(users)
    summary.seconds = time.perf_counter() - started
    return summary
