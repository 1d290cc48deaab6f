"""The header of a ``.safetensors`` file: metadata, tensor names, shapes and dtypes (one reader).

Read with ``safetensors.safe_open`` (the library's own parser: it checks the header against the
file's size, so a truncated or corrupt file is refused exactly as a loader would refuse it); no
tensor is read and torch is never imported. Used by ``adapters list`` (an adapter's parameter count)
and by ``train --resume`` (is a checkpoint's adapter whole).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from comapoi_cli.errors import DataError, first_line


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  #: safetensors' name: F32, BF16, F16, I64, U8, ...


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]

    @property
    def parameters(self) -> int:
        """The number of values stored (the product of each tensor's shape, summed)."""
        return sum(math.prod(tensor.shape) for tensor in self.tensors)


class WeightsFileError(DataError):
    """A ``.safetensors`` file that cannot be read; ``reason`` says why after the file's name."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"Cannot read {path}: {path.name} {reason}.")


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """The metadata and the tensors (name, shape, dtype) of a ``.safetensors`` file, in name order.

    A missing, unreadable, truncated or corrupt file is one sentence (:class:`WeightsFileError`).
    """
    from safetensors import SafetensorError, safe_open

    target = Path(path)
    try:
        open(target, "rb").close()  # the OS's own reason (safetensors' errors carry no errno)
        with safe_open(str(target), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = []
            for name in sorted(handle.keys()):
                part = handle.get_slice(name)
                tensors.append(TensorInfo(name, tuple(int(d) for d in part.get_shape()), str(part.get_dtype())))
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise WeightsFileError(target, f"is unreadable ({reason[:1].lower() + reason[1:]})") from None
    except SafetensorError as exc:
        detail = first_line(exc).removeprefix("Error while deserializing header: ")
        raise WeightsFileError(target, f"is truncated or corrupt ({detail})") from None
    return SafetensorsHeader(metadata, tuple(tensors))


__all__ = ["SafetensorsHeader", "TensorInfo", "WeightsFileError", "read_safetensors_header"]
