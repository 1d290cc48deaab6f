"""``comapoi adapters``: list the adapters that training runs produced."""

from __future__ import annotations

import typer

from comapoi_cli.errors import ComapoiError

app = typer.Typer(help="Inspect trained adapters.", no_args_is_help=True)


@app.command("list")
def list_adapters() -> None:
    """List training runs under one or more output roots."""
    raise ComapoiError("'comapoi adapters list' is not yet available.")
