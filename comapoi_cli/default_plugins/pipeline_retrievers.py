"""The built-in retriever of ``comapoi pipeline``: ``transitions`` (offline, deterministic, no model).

For a test trajectory whose last check-in is at POI ``p`` it lists, best first and without repeats:

1. the POIs that followed ``p`` in the training trajectories (every consecutive pair of check-ins,
   and each trajectory's last check-in -> its next POI), most frequent first;
2. the user's own POIs (training history and the current trajectory), most visited first, the
   most recently visited first among equals;
3. the POIs nearest to the last check-in in the POI table (haversine distance), nearest first.

Ties are broken by the smaller id, so the same inputs always give the same list. The distances to
every POI are computed at once with numpy (one array operation per trajectory, not a Python call
per POI: the retriever runs once per trajectory of a chain that a server answers at hundreds of
requests a second).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from comapoi_cli.hookspecs import hookimpl
from comapoi_cli.retrievers import SIMILAR, RetrievalIndex, Retriever, extend_unseen


def nearest(points: tuple[Any, Any, Any], lat: float, lon: float, count: int) -> list[int]:
    """The ``count`` POI ids of ``points`` (ids, latitudes, longitudes: numpy arrays) nearest to
    (``lat``, ``lon``) by haversine distance, nearest first, the smaller id first among equals."""
    import numpy as np

    ids, lats, lons = points
    if count <= 0 or not len(ids):
        return []
    p = np.pi / 180
    a = 0.5 - np.cos((lats - lat) * p) / 2 + np.cos(lat * p) * np.cos(lats * p) * (1 - np.cos((lons - lon) * p)) / 2
    km = 12742 * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
    if count < len(ids):
        bound = np.partition(km, count - 1)[count - 1]
        chosen = np.flatnonzero(km <= bound)  # every POI tied with the last one kept, so ids break the tie
    else:
        chosen = np.arange(len(ids))
    order = np.lexsort((ids[chosen], km[chosen]))[:count]
    return [int(poi) for poi in ids[chosen][order]]


class TransitionsRetriever(Retriever):
    name = "transitions"
    description = "POIs that followed the last check-in in training, then the user's own POIs, then the nearest POIs."

    def prepare(self, index: RetrievalIndex) -> None:
        self.index = index
        self.after: dict[int, Counter] = defaultdict(Counter)
        for traj in index.train:
            visits = [c.poi for c in traj.checkins] + ([traj.next_poi] if traj.next_poi is not None else [])
            for a, b in zip(visits, visits[1:]):
                if a != b:
                    self.after[a][b] += 1
        import numpy as np

        rows = sorted((poi, float(info[1]), float(info[2])) for poi, info in index.world.info.items())
        self.points = (np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.float64),
                       np.array([r[2] for r in rows], dtype=np.float64))

    def retrieve(self, item: Any, k: int = SIMILAR) -> list[int]:
        traj = item.trajectory
        out: list[int] = []
        seen: set[int] = set()

        def take(pois: list[int]) -> bool:
            return extend_unseen(out, pois, seen, k)

        last = traj.checkins[-1].poi
        if take([poi for poi, _ in sorted(self.after.get(last, Counter()).items(), key=lambda kv: (-kv[1], kv[0]))]):
            return out
        counts: Counter = Counter()
        recency: dict[int, int] = {}
        if item.history is not None:
            counts.update(item.history.pois)
        for position, checkin in enumerate(traj.checkins):
            counts[checkin.poi] += 1
            recency[checkin.poi] = position
        own = sorted(counts, key=lambda poi: (-counts[poi], -recency.get(poi, -1), poi))
        if take(own):
            return out
        info = self.index.world.info.get(last)
        if info is None:
            return out
        take(nearest(self.points, float(info[1]), float(info[2]), k + len(seen)))
        return out


@hookimpl
def register_retrievers(register):
    register(TransitionsRetriever())
