"""Retrievers of ``comapoi pipeline``: the "similar POIs" the Forecaster refines into its candidates.

A retriever is registered through the ``register_retrievers`` hook (built in:
``comapoi_cli/default_plugins/pipeline_retrievers.py``). The chain calls ``prepare(index)`` once
with the training trajectories and the POI table, then ``retrieve(item, k)`` per test trajectory
(label hidden). It must not look at the label; the built-in one is offline and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from comapoi_cli.chain import ChainItem

#: How many similar POIs CoMaPOI retrieves (and ``data synth`` shows agent2).
SIMILAR = 100


def extend_unseen(out: list[int], pois: Iterable[int], seen: set[int], limit: int) -> bool:
    """Append to ``out``, in order, the ``pois`` not in ``seen`` (adding each to ``seen``) until ``out`` holds
    ``limit`` ids; True when it does. How a retriever (and ``data synth``'s nearby POIs) fills a candidate list."""
    for poi in pois:
        if poi not in seen:
            seen.add(poi)
            out.append(poi)
            if len(out) >= limit:
                return True
    return False


@dataclass
class RetrievalIndex:
    """What a retriever may learn from: the training trajectories (with their next POI), the users'
    history statistics, and the POI table."""

    world: Any                                   # comapoi_cli.data.synth.PoiWorld
    train: list[Any] = field(default_factory=list)  # comapoi_cli.data.synth.Trajectory (next_poi known)
    histories: dict[int, Any] = field(default_factory=dict)  # user -> synth._Stats
    max_poi_id: int = 0


class Retriever:
    """Base class of a retriever: set ``name`` and ``description``, implement ``retrieve``."""

    name: str = ""
    description: str = ""

    def prepare(self, index: RetrievalIndex) -> None:
        self.index = index

    def retrieve(self, item: ChainItem, k: int = SIMILAR) -> list[int]:
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "description": self.description}
