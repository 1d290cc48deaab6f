"""``comapoi data``: clean, split, merge, stats, synth."""

from __future__ import annotations

import typer

from comapoi_cli.errors import ComapoiError

app = typer.Typer(help="Prepare CoMaPOI training data: clean, split, merge, stats, synth.", no_args_is_help=True)


def _not_yet(name: str) -> None:
    raise ComapoiError(f"'comapoi data {name}' is not yet available.")


@app.command()
def clean() -> None:
    """Clean agent files: keep valid records, write every other line to a rejects file with its reason."""
    _not_yet("clean")


@app.command()
def split() -> None:
    """Split a cleaned file into a training file and a seeded holdout."""
    _not_yet("split")


@app.command()
def merge() -> None:
    """Merge the agent files into one file tagged with each record's role."""
    _not_yet("merge")


@app.command()
def stats() -> None:
    """Per-role statistics: records, lengths, tokens, loss share, duplicates, leaks."""
    _not_yet("stats")


@app.command()
def synth() -> None:
    """Generate CoMaPOI-format data from real trajectories or a simulated city."""
    _not_yet("synth")
