"""The training errors a user can act on: each is one sentence (plus a hint) and a non-zero exit."""

from __future__ import annotations

from comapoi_cli.errors import ComapoiError, DataError, TrainingError, UsageError


class ModelNotFoundError(ComapoiError):
    """The base model (``--model`` / ``--model_path``) is not a local model folder or a usable Hugging Face id."""


class TrainingDataError(DataError):
    """The training data is missing or leaves nothing to train on."""


class DeviceError(UsageError):
    """An option this machine cannot honour: --fp16/--bf16 without support, --quant without bitsandbytes support."""


class RunExistsError(UsageError):
    """The run folder already holds a run, and neither --resume nor --overwrite was given."""


class OutOfMemoryError(TrainingError):
    """CUDA (or the host) ran out of memory during training."""


class NoLossTokensError(TrainingError):
    """No token of the prepared data carries loss (before step 1)."""


class NonFiniteError(TrainingError):
    """The loss, the gradient norm or the LoRA weights became NaN or infinite: the run stopped there."""


__all__ = [
    "ComapoiError", "DataError", "TrainingError", "UsageError", "ModelNotFoundError", "TrainingDataError",
    "DeviceError", "RunExistsError", "OutOfMemoryError", "NoLossTokensError", "NonFiniteError",
]
