"""Small timing helpers of the training path (no output: services report through ``comapoi_cli.reporting.Reporter``).

The Rich console implementation the CLI passes is ``comapoi_cli.cli.reporting.ConsoleReporter``.
``Reporter`` is re-exported here for the modules that imported it from this place.
"""

from __future__ import annotations

import time

from comapoi_cli.reporting import Reporter

__all__ = ["Reporter", "Stopwatch", "format_duration"]


def format_duration(seconds: float | None) -> str:
    """``m:ss`` or ``h:mm:ss``; ``-`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


_fmt_duration = format_duration  # the former private name


class Stopwatch:
    """Seconds since creation, and since the last ``lap``."""

    def __init__(self) -> None:
        self.start = self._lap = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start
