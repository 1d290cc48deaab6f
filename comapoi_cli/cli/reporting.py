"""``ConsoleReporter``: the Rich implementation of ``comapoi_cli.reporting.Reporter`` that the commands pass to services.

It writes to standard error: sentences (printed literally, never as markup), tables, ``--show-labels``,
and a progress bar on a terminal, or one plain line per logging step when the output is a file or a
pipe. A training run's progress shows step/total, loss, learning rate, tokens/s and ETA; any other
progress (``description`` and ``unit`` given to ``progress_start``) shows its description, done/total
in its unit (bytes as MB), its rate and ETA. The rate and the ETA are Rich's own (``Task.speed`` and
``Task.time_remaining``, the columns ``TimeRemainingColumn``, ``TransferSpeedColumn``), on a terminal and
in the plain lines alike; a training run's tokens/s, and the ETA of its plain log lines, are the
trainer callback's. Only the main process gets a console reporter (see ``distributed``).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from rich.markup import escape

from comapoi_cli.reporting import Reporter
from comapoi_cli.training.report import format_duration

__all__ = ["ConsoleReporter"]

#: Off a terminal, a long step other than training prints one plain progress line at most this often.
PLAIN_EVERY_S = 10.0
#: The rate and the ETA are Rich's estimate over the updates of this many last seconds (Rich's default, 30 s,
#: leaves no estimate when one training step or one chain batch takes longer).
SPEED_WINDOW_S = 300.0


class ConsoleReporter(Reporter):
    """Rich output on standard error."""

    def __init__(self, console: Any = None):
        if console is None:
            from comapoi_cli.cli.render import err_console

            console = err_console
        self.console = console
        self._progress: Any = None
        self._task: Any = None
        self._training = False
        self._unit = ""
        self._description = ""
        self._last_line = 0.0

    def info(self, text: str) -> None:
        self.console.print(text, soft_wrap=True, highlight=False, markup=False)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]Warning:[/yellow] {escape(text)}", soft_wrap=True, highlight=False)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        from comapoi_cli.cli.render import table

        self.console.print(table(title, columns, rows))  # table() prints every cell literally

    def labels(self, title: str, segments: Sequence[tuple[str, bool]]) -> None:
        from rich.text import Text

        text = Text()
        for chunk, loss in segments:
            text.append(chunk, style="bold black on green" if loss else "dim")
        self.console.print(f"[bold]{escape(title)}[/bold]  ([black on green]highlighted[/black on green] tokens carry loss)")
        self.console.print(text, soft_wrap=True)

    def progress_start(self, total: int | None, done: int = 0, *, description: str = "", unit: str = "") -> None:
        self._total = total
        self._training = not description or description == "training"
        self._unit = unit
        self._description = description
        if self._training and not self.console.is_terminal:
            return  # a training run off a terminal logs through log_line
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        eta = [TextColumn("ETA"), TimeRemainingColumn()]
        if self._training:
            columns = [TextColumn("[bold]training[/bold]"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                       TextColumn("{task.fields[tps]} tok/s"), *eta]
        elif unit == "bytes":
            columns = [TextColumn(f"[bold]{escape(description)}[/bold]"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TextColumn("{task.fields[flow]}"), *eta]
        else:
            columns = [TextColumn(f"[bold]{escape(description)}[/bold]"), BarColumn(), MofNCompleteColumn(),
                       TextColumn(escape(unit)), _rate_column(unit), TextColumn("{task.fields[flow]}"), *eta]
        # off a terminal the Progress only keeps the count: Rich's rate and ETA feed the plain lines
        self._progress = Progress(*columns, console=self.console, transient=False, disable=not self.console.is_terminal,
                                  speed_estimate_period=SPEED_WINDOW_S)
        self._progress.start()
        self._task = self._progress.add_task(description or "train", total=total, completed=done,
                                             loss="-", lr="-", tps="-", flow="")

    def progress_update(self, done: int, *, loss: float | None = None, lr: float | None = None,
                        tokens_per_s: float | None = None, **fields: Any) -> None:
        """Rate and ETA are Rich's (its ``Task.speed`` over the last ``SPEED_WINDOW_S`` seconds of updates,
        and ``Task.time_remaining``): a service's own ``rate`` / ``eta_s`` fields are not needed."""
        if self._progress is None:
            return
        self._progress.update(
            self._task, completed=done, flow=_flow(fields).strip(),
            loss="-" if loss is None else f"{loss:.4f}", lr="-" if lr is None else f"{lr:.2e}",
            tps="-" if tokens_per_s is None else f"{tokens_per_s:,.0f}",
        )
        if not self._progress.disable:
            return
        now = time.monotonic()  # not a terminal: a plain line, at most every PLAIN_EVERY_S seconds
        if now - self._last_line >= PLAIN_EVERY_S or (self._total is not None and done >= self._total):
            self._last_line = now
            task = next(t for t in self._progress.tasks if t.id == self._task)
            total = "?" if self._total is None else str(self._total)
            self.console.print(f"{self._description or 'progress'}: {done}/{total} {self._unit}  "
                               f"{_rate_text(task.finished_speed or task.speed, self._unit)}{_flow(fields)}  "
                               f"ETA {format_duration(task.time_remaining)}", highlight=False, markup=False, soft_wrap=True)

    def log_line(self, step: int, total: int, logs: dict[str, Any], tokens_per_s: float | None, eta_s: float | None) -> None:
        parts = [f"step {step}/{total}"]
        for key, label, fmt in (("loss", "loss", "{:.4f}"), ("eval_loss", "eval loss", "{:.4f}"),
                                ("learning_rate", "lr", "{:.2e}"), ("grad_norm", "grad norm", "{:.3f}"),
                                ("mean_token_accuracy", "token acc", "{:.3f}")):
            if isinstance(logs.get(key), (int, float)):
                parts.append(f"{label} {fmt.format(logs[key])}")
        for key, value in logs.items():  # --method grpo: the reward and its parts; dpo: preference accuracy and margin
            if isinstance(value, (int, float)) and (key == "reward" or (key.startswith("rewards/") and not key.endswith("/std")
                                                                       and not key.startswith("rewards/chosen")
                                                                       and not key.startswith("rewards/rejected"))):
                parts.append(f"{key.removeprefix('rewards/').removesuffix('/mean')} {value:.3f}")
        if tokens_per_s:
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        if eta_s is not None and step < total:
            parts.append(f"ETA {format_duration(eta_s)}")
        line = "  ".join(parts)
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def progress_stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _rate_text(speed: float | None, unit: str) -> str:
    return "-" if not speed else f"{speed:,.{2 if speed < 10 else 1}f}{f' {unit}/s' if unit else '/s'}"


def _rate_column(unit: str) -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Rich's speed of the task (``Task.speed``) in the task's unit: ``12.5 trajectories/s``."""

        def render(self, task: Any) -> Text:
            return Text(_rate_text(task.finished_speed or task.speed, unit), style="progress.data.speed")

    return RateColumn()


def _flow(fields: dict[str, Any]) -> str:
    """A generation's flow for the progress line: answers/s and requests in flight (when given)."""
    parts = []
    answers = fields.get("answers_per_s")
    if isinstance(answers, (int, float)) and answers > 0:
        parts.append(f"{answers:,.{2 if answers < 10 else 1}f} answers/s")
    in_flight = fields.get("in_flight")
    if isinstance(in_flight, int) and in_flight > 0:
        parts.append(f"{in_flight} in flight")
    return ("  " + "  ".join(parts)) if parts else ""
