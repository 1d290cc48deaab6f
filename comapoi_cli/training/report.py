"""What a training run tells its user while it runs: plain ``Reporter`` (silent) and ``ConsoleReporter``.

The training path never prints directly; it calls a reporter. ``ConsoleReporter`` writes to
standard error with Rich: sentences, tables, ``--show-labels``, and a progress bar (step/total,
loss, learning rate, tokens/s, ETA) on a terminal, or one plain line per logging step when the
output is a file or a pipe. Only the main process gets a console reporter (see ``distributed``).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from comapoi_cli.reporting import Reporter

__all__ = ["ConsoleReporter", "Reporter", "Stopwatch"]


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ConsoleReporter(Reporter):
    """Rich output on standard error."""

    def __init__(self, console: Any = None):
        if console is None:
            from comapoi_cli.cli.render import err_console

            console = err_console
        self.console = console
        self._progress: Any = None
        self._task: Any = None
        self._last_line = 0.0

    def info(self, text: str) -> None:
        self.console.print(text, soft_wrap=True, highlight=False, markup=False)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]Warning:[/yellow] {_escape(text)}", soft_wrap=True, highlight=False)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        from comapoi_cli.cli.render import table

        self.console.print(table(title, columns, rows))

    def labels(self, title: str, segments: Sequence[tuple[str, bool]]) -> None:
        from rich.text import Text

        text = Text()
        for chunk, loss in segments:
            text.append(chunk, style="bold black on green" if loss else "dim")
        self.console.print(f"[bold]{_escape(title)}[/bold]  ([black on green]highlighted[/black on green] tokens carry loss)")
        self.console.print(text, soft_wrap=True)

    def progress_start(self, total: int | None, done: int = 0, *, description: str = "", unit: str = "") -> None:
        self._total = total
        if not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("[bold]training[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA {task.fields[eta]}"),
            console=self.console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=done, loss="-", lr="-", tps="-", eta="-")

    def progress_update(self, done: int, *, loss: float | None = None, lr: float | None = None,
                        tokens_per_s: float | None = None, eta_s: float | None = None, **fields: Any) -> None:
        step = done
        if self._progress is None:
            return
        self._progress.update(
            self._task, completed=step,
            loss="-" if loss is None else f"{loss:.4f}", lr="-" if lr is None else f"{lr:.2e}",
            tps="-" if tokens_per_s is None else f"{tokens_per_s:,.0f}", eta=_fmt_duration(eta_s),
        )

    def log_line(self, step: int, total: int, logs: dict[str, Any], tokens_per_s: float | None, eta_s: float | None) -> None:
        parts = [f"step {step}/{total}"]
        for key, label, fmt in (("loss", "loss", "{:.4f}"), ("eval_loss", "eval loss", "{:.4f}"),
                                ("learning_rate", "lr", "{:.2e}"), ("grad_norm", "grad norm", "{:.3f}"),
                                ("mean_token_accuracy", "token acc", "{:.3f}")):
            if isinstance(logs.get(key), (int, float)):
                parts.append(f"{label} {fmt.format(logs[key])}")
        if tokens_per_s:
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        if eta_s is not None and step < total:
            parts.append(f"ETA {_fmt_duration(eta_s)}")
        line = "  ".join(parts)
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def progress_stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class Stopwatch:
    """Seconds since creation, and since the last ``lap``."""

    def __init__(self) -> None:
        self.start = self._lap = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start
