"""Writing evaluation results: metrics.json, metrics.csv, and the ``evaluations`` list of run.json.

Everything is written atomically (``comapoi_cli.fileio``): a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from comapoi_cli.fileio import write_json_atomic, write_text_atomic
from comapoi_cli.metrics import METRIC_KEYS

CSV_COLUMNS = ("scope", *METRIC_KEYS)


def metrics_csv(metrics: dict[str, Any], by_role: dict[str, dict[str, Any]] | None = None) -> str:
    """One row ``all`` with the overall metrics, then one row per role (merged runs)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for scope, values in (("all", metrics), *sorted((by_role or {}).items())):
        writer.writerow([scope, *("" if values.get(k) is None else values[k] for k in METRIC_KEYS)])
    return buffer.getvalue()


def write_metrics(path: str | os.PathLike[str], entry: dict[str, Any]) -> None:
    """Write ``entry`` (an evaluation entry) as JSON, or its metrics as CSV when ``path`` ends in ``.csv``."""
    target = Path(path)
    if target.suffix.lower() == ".csv":
        write_text_atomic(target, metrics_csv(entry["metrics"], entry.get("by_role")))
    else:
        write_json_atomic(target, entry)


def latest_metrics(run: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a run's latest evaluation (what ``adapters list`` shows), or None."""
    from comapoi_cli.runs.info import RunInfo

    return RunInfo.from_record(run).last_metrics
