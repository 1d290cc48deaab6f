"""The one reporting protocol of comapoi's services: they say things through a ``Reporter``, never print.

Services (data, training, evaluation, adapters, models, pipeline) take a ``Reporter`` argument and
call it; the command line passes a Rich implementation that lives in ``comapoi_cli.cli`` (services
never import Rich or the CLI). The base class is silent, so library users and non-main ranks get
quiet services by passing ``Reporter()`` (or nothing where a service defaults to it).

Methods
    ``info(text)`` / ``warn(text)``: one sentence; printed literally (no markup is interpreted).
    ``table(title, columns, rows)``: a small table.
    ``labels(title, segments)``: text segments, each marked as carrying loss or not (``--show-labels``).
    ``progress_start(total, done=0, *, description="", unit="")``: a long step begins; ``total`` may be
        ``None`` when unknown; ``unit`` names what is counted ("steps", "bytes", "records", "trajectories").
    ``progress_update(done, **fields)``: how far it got; ``fields`` are optional figures the renderer
        may show (``loss``, ``lr``, ``tokens_per_s``, ``eta_s``, ``rate``); unknown ones are ignored.
    ``log_line(step, total, logs, tokens_per_s, eta_s)``: one logging step of a training run.
    ``progress_stop()``: the long step ended (also after an error).
"""

from __future__ import annotations

from typing import Any, Sequence


class Reporter:
    """Receives what a service has to say; this base class says nothing."""

    def info(self, text: str) -> None: ...

    def warn(self, text: str) -> None: ...

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None: ...

    def labels(self, title: str, segments: Sequence[tuple[str, bool]]) -> None: ...

    def progress_start(self, total: int | None, done: int = 0, *, description: str = "", unit: str = "") -> None: ...

    def progress_update(self, done: int, **fields: Any) -> None: ...

    def log_line(self, step: int, total: int, logs: dict[str, Any], tokens_per_s: float | None,
                 eta_s: float | None) -> None: ...

    def progress_stop(self) -> None: ...


#: A shared silent reporter, for callers that want none.
SILENT = Reporter()
