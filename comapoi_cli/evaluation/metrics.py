"""CoMaPOI's ranking metrics, computed exactly as the original evaluation defines them.

Per scored record there is one true id (the label) and a ranked list of predictions
(duplicates already dropped). With ``rank`` the 1-based position of the label in the list
(None when absent):

- Acc@k (hit rate), k = 1, 5, 10, 20: 1 if ``rank <= k`` else 0.
- NDCG@k, k = 5, 10, 20, one relevant item: ``1 / log2(rank + 1)`` if ``rank <= k`` else 0.
- MRR: ``1 / rank`` over the whole list, 0 if absent.

Each is averaged over the scored records and reported in percent. An output that could not be
parsed scores 0 everywhere and counts in ``unparsable`` (percent of records). For candidate-list
roles ``candidate_recall`` is the percent of those records whose whole list holds the label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

ACC_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)
#: The metric keys, in display order. ``candidate_recall`` is present only when applicable.
METRIC_KEYS = (
    *(f"acc@{k}" for k in ACC_KS),
    *(f"ndcg@{k}" for k in NDCG_KS),
    "mrr",
    "unparsable",
    "candidate_recall",
    "n",
)
PERCENT_KEYS = tuple(k for k in METRIC_KEYS if k != "n")
DECIMALS = 4


def rank_of(label: Any, predictions: Sequence[Any] | None) -> int | None:
    """1-based rank of ``label`` among ``predictions`` with duplicates dropped; None if absent."""
    if not predictions:
        return None
    seen: set[Any] = set()
    rank = 0
    for item in predictions:
        if item in seen:
            continue
        seen.add(item)
        rank += 1
        if item == label:
            return rank
    return None


def acc_at(rank: int | None, k: int) -> float:
    return 1.0 if rank is not None and rank <= k else 0.0


def ndcg_at(rank: int | None, k: int) -> float:
    return 1.0 / math.log2(rank + 1) if rank is not None and rank <= k else 0.0


def reciprocal_rank(rank: int | None) -> float:
    return 1.0 / rank if rank is not None else 0.0


@dataclass(frozen=True)
class RecordOutcome:
    """One scored record: where the label landed, and what kind of answer it was."""

    rank: int | None
    parsed: bool
    candidate_list: bool = False
    in_list: bool = False  # the label is anywhere in the (whole) predicted list


def outcome(label: Any, predictions: Sequence[Any] | None, candidate_list: bool = False) -> RecordOutcome:
    """Score one record. ``predictions`` None (or empty) means the output could not be parsed."""
    parsed = bool(predictions)
    rank = rank_of(label, predictions) if parsed else None
    return RecordOutcome(rank=rank, parsed=parsed, candidate_list=candidate_list, in_list=rank is not None)


def compute_metrics(outcomes: Iterable[RecordOutcome]) -> dict[str, Any]:
    """Average the per-record scores into CoMaPOI's metrics (percent, rounded to 4 decimals).

    Returns the keys of ``METRIC_KEYS`` (``candidate_recall`` only when some record is a
    candidate list); with no records every metric is 0.0 and ``n`` is 0.
    """
    items = list(outcomes)
    n = len(items)
    sums = dict.fromkeys(PERCENT_KEYS, 0.0)
    candidates = 0
    for item in items:
        for k in ACC_KS:
            sums[f"acc@{k}"] += acc_at(item.rank, k)
        for k in NDCG_KS:
            sums[f"ndcg@{k}"] += ndcg_at(item.rank, k)
        sums["mrr"] += reciprocal_rank(item.rank)
        sums["unparsable"] += 0.0 if item.parsed else 1.0
        if item.candidate_list:
            candidates += 1
            sums["candidate_recall"] += 1.0 if item.in_list else 0.0
    metrics: dict[str, Any] = {}
    for key in PERCENT_KEYS:
        if key == "candidate_recall":
            if candidates:
                metrics[key] = _percent(sums[key], candidates)
            continue
        metrics[key] = _percent(sums[key], n)
    metrics["n"] = n
    return metrics


def _percent(total: float, count: int) -> float:
    return round(100.0 * total / count, DECIMALS) if count else 0.0
