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

A text role (``answer_kind = "text"``) has no ranking: its records report ``exact_match`` (the
percent whose parsed answer equals the target, stripped), ``unparsable`` and ``n`` only. When
text and ranked records are scored together (a merged run with a text role), the overall
metrics hold both: the ranking metrics over the ranked records, ``exact_match`` over the text
ones, ``unparsable`` and ``n`` over all.
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
    "exact_match",
    "n",
)
RANKING_KEYS = tuple(k for k in METRIC_KEYS if k.startswith(("acc@", "ndcg@")) or k == "mrr")
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
    text: bool = False  # a text answer: scored by exact match (rank 1), not ranked


def outcome(label: Any, predictions: Sequence[Any] | None, candidate_list: bool = False,
            text: bool = False) -> RecordOutcome:
    """Score one record. ``predictions`` None (or empty) means the output could not be parsed."""
    parsed = bool(predictions)
    rank = rank_of(label, predictions) if parsed else None
    if text and rank is not None and rank > 1:  # exact match: the first answer is the answer
        rank = None
    return RecordOutcome(rank=rank, parsed=parsed, candidate_list=candidate_list, in_list=rank is not None, text=text)


def compute_metrics(outcomes: Iterable[RecordOutcome]) -> dict[str, Any]:
    """Average the per-record scores into CoMaPOI's metrics (percent, rounded to 4 decimals).

    Returns the keys of ``METRIC_KEYS`` that apply: the ranking metrics when some record is
    ranked (or there are none), ``candidate_recall`` when some record is a candidate list,
    ``exact_match`` when some record is a text answer; ``unparsable`` and ``n`` always. With no
    records every metric is 0.0 and ``n`` is 0.
    """
    items = list(outcomes)
    n = len(items)
    ranked = [item for item in items if not item.text]
    texts = [item for item in items if item.text]
    sums = dict.fromkeys(PERCENT_KEYS, 0.0)
    candidates = 0
    for item in ranked:
        for k in ACC_KS:
            sums[f"acc@{k}"] += acc_at(item.rank, k)
        for k in NDCG_KS:
            sums[f"ndcg@{k}"] += ndcg_at(item.rank, k)
        sums["mrr"] += reciprocal_rank(item.rank)
        if item.candidate_list:
            candidates += 1
            sums["candidate_recall"] += 1.0 if item.in_list else 0.0
    for item in texts:
        sums["exact_match"] += 1.0 if item.rank == 1 else 0.0
    for item in items:
        sums["unparsable"] += 0.0 if item.parsed else 1.0
    metrics: dict[str, Any] = {}
    for key in PERCENT_KEYS:
        if key in RANKING_KEYS:
            if ranked or not texts:
                metrics[key] = _percent(sums[key], len(ranked))
        elif key == "candidate_recall":
            if candidates:
                metrics[key] = _percent(sums[key], candidates)
        elif key == "exact_match":
            if texts:
                metrics[key] = _percent(sums[key], len(texts))
        else:
            metrics[key] = _percent(sums[key], n)
    metrics["n"] = n
    return metrics


def _percent(total: float, count: int) -> float:
    return round(100.0 * total / count, DECIMALS) if count else 0.0
