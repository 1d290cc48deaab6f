"""``comapoi adapters``: inspect the adapters that training runs produced.

One command per function below; the work is in ``comapoi_cli/adapters.py`` (the service).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from comapoi_cli.cli.render import console, print_json, table, warn

app = typer.Typer(help="Inspect trained adapters.", no_args_is_help=True)


def _size(value: int | None) -> str:
    if value is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


_STATUS_STYLE = {"finished": "green", "interrupted": "yellow", "running": "cyan", "stopped": "red",
                 "failed": "red", "unreadable": "red"}


@app.command("list")
def list_adapters(
    roots: Optional[List[Path]] = typer.Argument(None, help="Output roots to scan [default: $COMAPOI_OUTPUT_DIR or ./output].",
                                                show_default=False),
    sort: str = typer.Option("date", "--sort", help="date (newest first), run, loss, steps, size, acc1, acc5 or mrr."),
    reverse: bool = typer.Option(False, "--reverse", help="Reverse the order."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Only runs on this dataset."),
    type_: Optional[str] = typer.Option(None, "--type", help="Only runs of this type (merged, agent1, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List training runs: run, dataset, type, backend, base model, LoRA, steps, loss, size, date, latest evaluation."""
    from comapoi_cli.adapters import default_roots, scan_runs, sort_runs

    runs, warnings = scan_runs(roots or default_roots())
    runs = [r for r in runs if (dataset is None or r.dataset == dataset) and (type_ is None or r.type == type_)]
    runs = sort_runs(runs, sort, reverse)
    for message in warnings:
        warn(message)
    if as_json:
        print_json({"runs": [r.to_dict() for r in runs], "warnings": warnings})
        return
    if not runs:
        console.print("No training runs found" + (" (see the warnings above)." if warnings else "."))
        return
    rows = []
    for r in runs:
        steps = "" if r.steps is None else f"{r.steps}/{r.max_steps}" if r.max_steps else str(r.steps)
        style = _STATUS_STYLE.get(r.status)
        status = f"[{style}]{r.status}[/{style}]" if style else r.status
        lora = "" if r.lora_r is None else f"{r.lora_r}/{r.lora_alpha}"
        rows.append((r.path, r.dataset, r.type, r.backend, r.base_model, lora, steps, _number(r.final_loss, 4),
                     _size(r.size_bytes), (r.date or "")[:16].replace("T", " "), status,
                     _number(r.metric("acc@1"), 2), _number(r.metric("acc@5"), 2), _number(r.metric("mrr"), 2)))
    console.print(table(f"Training runs ({len(runs)})",
                        ["run", "dataset", "type", "backend", "base model", "LoRA r/α", "steps", "final loss",
                         "size", "date", "status", "acc@1", "acc@5", "mrr"], rows))
