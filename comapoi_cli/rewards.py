"""Rewards for ``comapoi train --method grpo``: what a role declares, and the scorers built on the metrics.

A role declares the rewards of one training record with ``AgentRole.rewards(record, context)``: a
``RewardSpec`` (the step, the true next POI, the reward parts), or None when the record is not
trained with rewards (a text step: a profile, a pattern). Each part scores one completion (its
text) in [0, 1] and has a weight; GRPO's reward is the weighted sum, and each part is logged on its
own (``rewards/<name>/mean`` per step in run.json and TensorBoard).

The ranking scorers score a completion exactly as ``comapoi eval`` would score it: the role's
``parse_prediction`` reads the ranked list, ``comapoi_cli.metrics`` ranks the label in it.

Light: imports no torch, transformers or trl.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from comapoi_cli.metrics import ndcg_at, rank_of


@dataclass(frozen=True)
class RewardPart:
    """One named reward: ``score(completion_text)`` in [0, 1], weighted by ``weight`` in the sum."""

    name: str
    weight: float
    score: Callable[[str], float]


@dataclass(frozen=True)
class RewardSpec:
    """The rewards of one training record: its step, the label they judge against, and the parts."""

    step: str
    label: Any
    parts: tuple[RewardPart, ...]

    def scores(self, text: str) -> dict[str, float]:
        """Every part's score of ``text``, by name."""
        return {part.name: float(part.score(text)) for part in self.parts}

    def total(self, text: str) -> float:
        """The weighted sum GRPO optimises."""
        return sum(part.weight * float(part.score(text)) for part in self.parts)


def ndcg_score(predictions: list[Any] | None, label: Any, k: int = 10) -> float:
    """NDCG@k of ``label`` in the parsed list (0 when absent, unparsed, or below rank k), as eval scores it."""
    return ndcg_at(rank_of(label, predictions), k)


def recall_score(predictions: list[Any] | None, label: Any, size: int) -> float:
    """1 when ``label`` is among the first ``size`` parsed ids, else 0 (a candidate list's recall)."""
    return 1.0 if predictions and label in predictions[:size] else 0.0


def format_score(raw_ids: list[int] | None, *, form_ok: bool, length: int, max_id: int | None) -> float:
    """How well an answer keeps the requested form: the mean of four checks, 0 when no id list is read.

    ``raw_ids``: the answer's ids as written (duplicates and out-of-range ids kept), None when the
    answer is no id list; ``form_ok``: it is written in the requested form (e.g. valid JSON);
    then every id lies in 0..max_id, no id repeats, and there are exactly ``length`` ids.
    """
    if not raw_ids:
        return 0.0
    in_range = all(i >= 0 and (max_id is None or i <= max_id) for i in raw_ids)
    unique = len(set(raw_ids)) == len(raw_ids)
    checks = (form_ok, in_range, unique, len(raw_ids) == length)
    return sum(1.0 for ok in checks if ok) / len(checks)


def reward_function_name(part_name: str) -> str:
    """A Python-identifier spelling of a part name (TRL names its logged metrics after the function)."""
    return re.sub(r"[^A-Za-z0-9_@]+", "_", part_name)


__all__ = ["RewardPart", "RewardSpec", "format_score", "ndcg_score", "recall_score", "reward_function_name"]
