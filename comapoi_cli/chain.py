"""What a role sees when it runs in ``comapoi pipeline``: the trajectory, the upstream outputs, the context.

Light module (no torch): roles import these types, and plugins load on every command.

- :class:`ChainItem`: one test trajectory as the roles see it. Its ``trajectory`` is the data
  services' ``Trajectory`` (user, subtrajectory, check-ins) with the label hidden
  (``next_poi`` is None); ``history`` is the user's statistics over the training trajectories
  (None when the user has none); ``similar`` is the retriever's list (up to 100 ids).
- ``upstream``: ``{role_id: {field: value}}``, what the roles that ran before gave (their
  ``parse_chain_output`` fields), the current role's earlier steps included.
- :class:`ChainContext`: the dataset, its id range, the POI table (``world``), the final list
  length (``top_k``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from comapoi_cli.errors import UsageError

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry

#: The field of a role's chain output that is a ranked prediction; the last role in the chain that
#: gives one makes the final ranking.
RANKING = "ranking"
#: The field of a role's chain output that is a candidate list (scored as per-stage recall).
CANDIDATES = "candidates"


@dataclass
class ChainItem:
    key: str                      # "user_U_subtrajectory_S" (unique within a test file; else the line number)
    line: int                     # 1-based line in the test file
    trajectory: Any               # comapoi_cli.data.synth.Trajectory, next_poi hidden (None)
    history: Any = None           # comapoi_cli.data.synth._Stats of the user's training trajectories, or None
    similar: list[int] = field(default_factory=list)

    @property
    def user(self) -> int:
        return int(self.trajectory.user)

    @property
    def sub(self) -> int:
        return int(self.trajectory.sub)


@dataclass
class ChainContext:
    dataset: str
    max_poi_id: int
    world: Any                    # comapoi_cli.data.synth.PoiWorld: the POI table (+ POIs seen in trajectories)
    top_k: int = 10
    extra: dict[str, Any] = field(default_factory=dict)  # free room for plugins


def chain_order(registry: Registry, role_ids: list[str]) -> list[Any]:
    """The roles in the order they run: ``chain_position`` ascending; ``chain_after`` right after that role."""
    roles = {rid: registry.role(rid) for rid in role_ids}
    positions: dict[str, float] = {}

    def position(rid: str, seen: tuple[str, ...] = ()) -> float:
        if rid in positions:
            return positions[rid]
        role = roles[rid]
        if role.chain_after:
            if role.chain_after not in roles:
                raise UsageError(f"Role {rid} runs after {role.chain_after}, which is not in the chain.")
            if role.chain_after in seen:
                raise UsageError(f"Roles {', '.join(seen)} each run after the other.")
            value = position(role.chain_after, (*seen, rid)) + 0.5
        elif role.chain_position is not None:
            value = float(role.chain_position)
        else:
            raise UsageError(f"Role {rid} cannot join the chain: it declares no chain_position or chain_after.")
        positions[rid] = value
        return value

    return sorted(roles.values(), key=lambda r: (position(r.id), r.id))
