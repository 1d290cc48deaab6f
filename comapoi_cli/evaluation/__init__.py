"""Evaluation: CoMaPOI's metrics, predictions files, and scoring adapters on held-out records.

Importing this package is cheap (no torch): ``metrics``, ``scoring``, ``predictions`` and
``outputs`` are pure Python; ``runner`` imports torch, transformers and peft inside the
functions that load and run a model. docs/evaluation.md has the user's view.
"""

from comapoi_cli.evaluation.predictions import PredictionsFileError, ScoreReport, score_predictions
from comapoi_cli.evaluation.scoring import Scorer
from comapoi_cli.metrics import METRIC_KEYS, compute_metrics, outcome, rank_of

__all__ = ["METRIC_KEYS", "PredictionsFileError", "ScoreReport", "Scorer", "compute_metrics", "outcome", "rank_of",
           "score_predictions"]
