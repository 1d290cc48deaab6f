"""The check-in table every reader returns, and the rejects it collects.

A reader turns raw files into one :class:`CheckinTable`: one row per readable check-in, as
columns (pyarrow arrays), with where it came from (file index and 1-based physical line), so
that the steps after it never loop over rows in Python. Rows it cannot read go to
:class:`Reject` records with their line number and reason.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

#: The columns of a check-in table (all the same length).
#: user, poi, category: str; lat, lon: float64; utc: int64 (seconds since 1970, UTC);
#: offset: int32 minutes added to UTC to get local time; file: int32 (index of the input);
#: line: int64 (1-based physical line in that file); session: str or absent (sessions the source cut).
COLUMNS = ("user", "poi", "category", "lat", "lon", "utc", "offset", "file", "line")


@dataclass
class Reject:
    file: str
    line: int
    reason: str
    detail: str
    text: str
    raw: bytes | None = None  # the exact bytes of a line that is not valid in the file's encoding

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "line": self.line, "reason": self.reason, "detail": self.detail,
                               "text": self.text}
        if self.raw is not None:
            out["raw_base64"] = base64.b64encode(self.raw).decode("ascii")
        return out


@dataclass
class CheckinTable:
    """What a reader read: the columns (``COLUMNS``, plus ``session`` if the source cut sessions)."""

    columns: dict[str, Any]
    rejects: list[Reject] = field(default_factory=list)
    lines_read: int = 0           # data lines seen (header lines excluded)
    encodings: dict[str, str] = field(default_factory=dict)  # input path -> encoding used
    notes: list[str] = field(default_factory=list)
    keep_ids: bool = False        # the source ids are already CoMaPOI's 0-based integers

    @property
    def rows(self) -> int:
        return len(self.columns["user"]) if self.columns else 0


@dataclass(frozen=True)
class ReadOptions:
    """What the command line passes to every reader (a reader uses what applies to its format)."""

    encoding: str = "auto"                 # auto | utf-8 | latin-1
    utc_offset: int | None = None          # minutes, for formats whose rows carry no offset
    spots: Path | None = None              # gowalla: the spots file (categories)
    default_category: str = "Unknown"      # a POI without a category


def arrow(values: Any, type_: Any = None) -> Any:
    """A pyarrow array over a numpy array's memory (``pa.array(ndarray)`` would import pandas: 1-2 s)."""
    import numpy as np
    import pyarrow as pa

    data = np.ascontiguousarray(values)
    if data.dtype == np.bool_:
        bits = np.packbits(data, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(data), [None, pa.py_buffer(bits)])
    kind = {np.dtype(np.int64): pa.int64(), np.dtype(np.int32): pa.int32(), np.dtype(np.float64): pa.float64(),
            np.dtype(np.int8): pa.int8()}[data.dtype]
    array = pa.Array.from_buffers(kind, len(data), [None, pa.py_buffer(data)])
    return array.view(type_) if type_ is not None else array


class CheckinReader:
    """A raw check-in format (``comapoi data prepare --from NAME``), registered through the
    ``register_checkin_readers`` hook. Subclasses set ``name`` and ``description`` and implement ``read``."""

    name: str = ""
    description: str = ""

    def read(self, paths: Sequence[Path], options: ReadOptions) -> CheckinTable:  # pragma: no cover - interface
        raise NotImplementedError
