"""Training: one resolved ``TrainingJob`` in, one run folder out.

Importing this package is cheap (no torch, transformers or trl): ``job`` and ``options`` hold the
job and how it is resolved from flags and config files; the heavy modules (``trl_trainer``,
``tiny``, ``chat``, ``callbacks``) import their dependencies inside functions. See
docs/training.md for the user's view and ``trl_trainer.TRLTrainingPath`` for how a backend
plugin reuses the TRL path.
"""

from comapoi_cli.training.job import TrainingJob, TrainingResult

__all__ = ["TrainingJob", "TrainingResult"]
