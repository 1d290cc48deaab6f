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


class markup(str):
    """Text written by the CLI itself with Rich markup (``markup("[red]missing[/red]")``): printed as markup.

    Every other string a table or message shows (from data, plugins, paths, hints) is escaped, so that
    brackets in it (``./plugins/comapoi-unsloth[unsloth]``) print as written.
    """


def literal(value: Any) -> str:
    """``value`` as text safe to embed in markup: a ``markup`` string as is, anything else escaped."""
    if value is None:
        return ""
    return value if isinstance(value, markup) else escape(str(value))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], **kwargs: Any) -> Table:
    if isinstance(kwargs.get("caption"), str):
        kwargs["caption"] = literal(kwargs["caption"])
    t = Table(title=literal(title) if title else None, title_justify="left", **kwargs)
    for column in columns:
        t.add_column(literal(column), overflow="fold")  # a long path wraps instead of losing its end to "…"
    for row in rows:
        t.add_row(*[literal(v) for v in row])
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


def _cell_width(value: Any) -> int:
    from rich.text import Text

    make = Text.from_markup if isinstance(value, markup) else Text  # what table() prints: markup only when marked
    return max((make(line).cell_len for line in str(value).splitlines()), default=0)


def fit_columns(columns: Sequence[str], rows: Sequence[Sequence[Any]], width: int, *, drop_first: Sequence[str],
                keep_wide: str | None = None) -> tuple[list[str], list[list[Any]]]:
    """Leave out columns, in the order ``drop_first`` names them, until the table fits ``width``.

    A table too wide for the terminal squeezes every column to a few characters; dropping the
    least useful ones keeps the rest readable. ``keep_wide`` (e.g. a path) may wrap: it counts
    as at most 40 cells.
    """
    kept = list(columns)

    def needed() -> int:
        total = 1  # the table's left border
        for name in kept:
            i = columns.index(name)
            cells = max([_cell_width(name), *(_cell_width(row[i]) for row in rows)])
            total += min(cells, 40) if name == keep_wide else cells
            total += 3  # padding and the column's border
        return total

    for name in drop_first:
        if needed() <= width:
            break
        if name in kept:
            kept.remove(name)
    indices = [columns.index(name) for name in kept]
    return kept, [[row[i] for i in indices] for row in rows]
