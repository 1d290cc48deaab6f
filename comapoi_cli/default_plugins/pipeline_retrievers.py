"""The built-in retriever of ``comapoi pipeline``: ``transitions`` (offline, deterministic, no model).

For a test trajectory whose last check-in is at POI ``p`` it lists, best first and without repeats:

1. the POIs that followed ``p`` in the training trajectories (every consecutive pair of check-ins,
   and each trajectory's last check-in -> its next POI), most frequent first;
2. the user's own POIs (training history and the current trajectory), most visited first, the
   most recently visited first among equals;
3. the POIs nearest to the last check-in in the POI table (haversine distance), nearest first.

Ties are broken by the smaller id, so the same inputs always give the same list.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from comapoi_cli.hookspecs import hookimpl
from comapoi_cli.retrievers import SIMILAR, RetrievalIndex, Retriever, extend_unseen


def _km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p = math.pi / 180
    a = 0.5 - math.cos((lat2 - lat1) * p) / 2 + math.cos(lat1 * p) * math.cos(lat2 * p) * (1 - math.cos((lon2 - lon1) * p)) / 2
    return 12742 * math.asin(math.sqrt(max(0.0, min(1.0, a))))


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
        self.points = sorted((poi, info[1], info[2]) for poi, info in index.world.info.items())

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
        lat, lon = info[1], info[2]
        near = sorted(self.points, key=lambda p: (_km(lat, lon, p[1], p[2]), p[0]))
        take([p[0] for p in near[: k + len(seen)]])
        return out


@hookimpl
def register_retrievers(register):
    register(TransitionsRetriever())
