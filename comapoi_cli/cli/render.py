"""Rendering helpers shared by the commands: Rich console, tables, JSON output, errors."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Write ``data`` as JSON to standard output, plainly (no colour, no wrapping), for scripts."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], **kwargs: Any) -> Table:
    t = Table(title=title, title_justify="left", **kwargs)
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    return t


# The messages are plain text: escaped, so that brackets in them (an install line such as
# "./plugins/comapoi-unsloth[unsloth]", a path) print as written instead of as Rich markup.
def error(message: str, hint: str | None = None) -> None:
    err_console.print(f"[bold red]Error:[/bold red] {escape(message)}", soft_wrap=True)
    if hint:
        err_console.print(f"[yellow]Hint:[/yellow] {escape(hint)}", soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]Warning:[/yellow] {escape(message)}", soft_wrap=True)


def success(message: str) -> None:
    console.print(f"[green]✓[/green] {escape(message)}", soft_wrap=True)
