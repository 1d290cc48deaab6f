"""``comapoi adapters``: inspect, merge and hand over the adapters that training runs produced.

One command per function below; the work is in the services ``comapoi_cli/adapters/listing.py`` (list,
show), ``comapoi_cli/adapters/merge.py`` (merge) and ``comapoi_cli/adapters/export.py`` (export).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from comapoi_cli.cli.base import App
from comapoi_cli.cli.fields import number_option, old_spelling, one_of, trust_remote_code_option
from comapoi_cli.cli.render import console, err_console, fit_columns, markup, print_json, success, table, warn

app = App(help="Inspect, merge and export trained adapters for serving.", no_args_is_help=True)


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
    roots: Optional[List[Path]] = typer.Argument(None, help="Output roots to scan.",
                                                show_default="$COMAPOI_OUTPUT_DIR or ./output"),
    sort: str = typer.Option("date", "--sort", help="date (newest first), run, loss, steps, size, acc1, acc5 or mrr."),
    reverse: bool = typer.Option(False, "--reverse", help="Reverse the order."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Only runs on this dataset."),
    type_: Optional[str] = typer.Option(None, "--type", help="Only runs of this type (merged, agent1, ...)."),
    role: Optional[str] = typer.Option(None, "--role", help="Only runs of this agent role (agent1, agent2, agent3; "
                                       "the same as --type for one role)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List training runs: run, dataset, type, backend, base model, LoRA, steps, loss, size, date, latest evaluation."""
    from comapoi_cli.adapters import default_roots, filter_runs, scan_runs, sort_runs

    runs, warnings = scan_runs(roots or default_roots())
    runs = filter_runs(runs, dataset=dataset, type_=type_, role=role)
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
        status = markup(f"[{style}]{escape(str(r.status))}[/{style}]") if style else r.status
        lora = "" if r.lora_r is None else f"{r.lora_r}/{r.lora_alpha}"
        rows.append((r.path, r.dataset, r.type, r.backend, r.base_model, lora, steps, _number(r.final_loss, 4),
                     _size(r.size_bytes), (r.date or "")[:16].replace("T", " "), status,
                     _number(r.metric("acc@1"), 2), _number(r.metric("acc@5"), 2), _number(r.metric("mrr"), 2)))
    columns = ["run", "dataset", "type", "backend", "base model", "LoRA r/α", "steps", "final loss",
               "size", "date", "status", "acc@1", "acc@5", "mrr"]
    columns, rows = fit_columns(columns, rows, console.width, drop_first=_LIST_DROP_ORDER, keep_wide="run")
    console.print(table(f"Training runs ({len(runs)})", columns, rows))


#: Columns ``adapters list`` leaves out first on a narrow terminal (``--json`` always has them all).
_LIST_DROP_ORDER = ("base model", "size", "backend", "acc@5", "LoRA r/α", "date", "mrr", "dataset", "acc@1")


# -- show --------------------------------------------------------------------------------------------

_BLOCKS = " ▁▂▃▄▅▆▇█"


def _loss_chart(points: list[tuple[Any, float]], width: int = 60, height: int = 6) -> list[str]:
    """A small bar chart of the loss (one column per step, or per bucket of steps), as lines of text."""
    if not points:
        return []
    first, last = str(points[0][0]), str(points[-1][0])
    if len(points) > width:  # average the steps of each bucket
        buckets: list[tuple[Any, float]] = []
        for i in range(width):
            chunk = points[i * len(points) // width:(i + 1) * len(points) // width]
            buckets.append((chunk[-1][0], sum(v for _, v in chunk) / len(chunk)))
        points = buckets
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    eighths = [max(1, round((v - lo) / span * (height * 8 - 1)) + 1) for v in values]
    label_width = max(len(f"{hi:.4f}"), len(f"{lo:.4f}"))
    lines = []
    for row in range(height - 1, -1, -1):
        cells = "".join("█" if e >= (row + 1) * 8 else _BLOCKS[e - row * 8] if e > row * 8 else " " for e in eighths)
        label = f"{hi:.4f}" if row == height - 1 else f"{lo:.4f}" if row == 0 else ""
        lines.append(f"{label:>{label_width}} ┤{cells}")
    axis = f"step {first}".ljust(max(len(points) - len(last) - 5, len(first) + 6)) + f"step {last}"
    lines.append(" " * label_width + " └" + "─" * len(points))
    lines.append(" " * (label_width + 2) + axis)
    return lines


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _mapping(info: dict[str, Any], key: str) -> dict[str, Any]:
    value = info.get(key)
    return value if isinstance(value, dict) else {}


def _render_show(info: dict[str, Any]) -> None:
    summary = info.get("summary") or {}
    job = _mapping(info, "job")
    base = info.get("base_model") or {}
    lora = info.get("lora") or {}
    device = _mapping(info, "device")
    progress = _mapping(info, "progress")
    data = _mapping(info, "data")
    template = _mapping(info, "chat_template")
    adapter = _mapping(info, "adapter")
    versions = _mapping(info, "versions")

    rows: list[tuple[str, Any]] = []

    def add(key: str, value: Any) -> None:
        text = _fmt(value)
        if text:
            rows.append((key, text))

    add("status", summary.get("status"))
    add("checkpoint of", info.get("checkpoint_of"))
    add("role (type)", summary.get("type"))
    add("dataset", summary.get("dataset"))
    add("backend", summary.get("backend"))
    base_text = " ".join(str(x) for x in (base.get("name"), f"({base.get('kind')})" if base.get("kind") else None) if x)
    if base.get("path") and base.get("path") != base.get("name"):
        base_text += f"\n{base['path']}"
    if base.get("exists") is False:
        base_text = markup(escape(base_text) + "\n[red]missing[/red]")
    if base_text:
        rows.append(("base model", base_text))
    add("architecture", " ".join(str(x) for x in (base.get("architecture"), f"{base['parameters']:,} parameters"
                                                  if isinstance(base.get("parameters"), int) else None) if x))
    add("device", " ".join(str(x) for x in (device.get("name"), device.get("precision")) if x))
    if device.get("quant") and device.get("quant") != "none":
        add("quantisation", f"{device['quant']} (QLoRA: merge uses the 16-bit base weights)")
    add("LoRA", ", ".join(f"{k}={lora[k]}" for k in ("r", "alpha", "dropout") if lora.get(k) is not None))
    extras = [k for k in ("use_rslora", "use_dora") if lora.get(k)]
    add("LoRA options", ", ".join([*extras, *(f"modules_to_save={lora['modules_to_save']}" for _ in [0]
                                               if lora.get("modules_to_save"))]))
    add("target modules", lora.get("target_modules"))
    if lora.get("trainable_parameters") is not None:
        trainable = f"{lora['trainable_parameters']:,}"
        if lora.get("total_parameters"):
            trainable += f" of {lora['total_parameters']:,} ({lora.get('trainable_percent', 0):.3f}%)"
        add("trainable parameters", trainable)
    if summary.get("steps") is not None:
        add("steps", f"{summary['steps']}/{summary.get('max_steps')}" if summary.get("max_steps") else summary["steps"])
    if progress.get("first_loss") is not None or progress.get("final_loss") is not None:
        add("loss", f"{_fmt(progress.get('first_loss'))} -> {_fmt(progress.get('final_loss'))}")
    add("holdout loss", progress.get("final_eval_loss"))
    add("tokens trained", progress.get("tokens_trained"))
    if progress.get("train_seconds") is not None:
        add("time", f"{progress['train_seconds']:.1f} s training, {progress.get('wall_seconds', 0):.1f} s in all"
                    + (f", {progress['tokens_per_second']:,.0f} tok/s" if progress.get("tokens_per_second") else ""))
    if isinstance(job.get("learning_rate"), (int, float)):
        add("learning rate", f"{job['learning_rate']:g}")
    dist = _mapping(info, "distributed")
    if dist.get("world_size", 1) > 1:
        add("processes", f"{dist['world_size']} ({dist.get('mode') or 'DDP'}), effective batch {dist.get('effective_batch')}")
    for key, label in (("batch_size", "batch size"),
                       ("gradient_accumulation_steps", "gradient accumulation"), ("seq_length", "sequence length"),
                       ("seed", "seed")):
        add(label, job.get(key))
    if isinstance(info.get("fit"), dict) and info["fit"].get("source") in ("fit", "resumed"):
        from comapoi_cli.training.fit import FitPlan

        add("memory plan (--fit)", FitPlan.from_dict(info["fit"]).summary())
    if data.get("train_file"):
        add("training data", f"{data['train_file']}\nsha256 {data.get('train_sha256') or '?'}")
    add("holdout", data.get("holdout_file"))
    for path, digest in (data.get("input_hashes") or {}).items():
        add("input", f"{path}\nsha256 {digest}")
    if template:
        add("chat template", " ".join(str(x) for x in (template.get("source"), f"sha256 {template.get('sha256')}"
                                                       if template.get("sha256") else None) if x))
    if adapter.get("sha256"):
        add("adapter weights", f"{_size(adapter.get('size_bytes'))}, sha256 {adapter['sha256']}")
    elif summary.get("size_bytes") is not None:
        add("adapter weights", _size(summary.get("size_bytes")))
    add("files", info.get("adapter_files"))
    add("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v and k in
                              ("comapoi", "torch", "transformers", "trl", "peft", "bitsandbytes")))
    add("created", info.get("created"))
    add("finished", info.get("finished"))
    add("error", info.get("error"))

    console.print(f"[bold]{escape(info['path'])}[/bold]", soft_wrap=True)
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value if key == "base model" else escape(value))
    console.print(grid)

    history = info.get("loss_history") or []
    points = [(e.get("step"), float(e["loss"])) for e in history if isinstance(e.get("loss"), (int, float))]
    if points:
        console.print(f"\n[bold]Training loss[/bold] ({len(points)} logged step{'s' if len(points) != 1 else ''})")
        for line in _loss_chart(points):
            console.print(f"[cyan]{escape(line)}[/cyan]", soft_wrap=True)
    evaluations = info.get("evaluations") or []
    if evaluations:
        keys = ["acc@1", "acc@5", "acc@10", "ndcg@5", "ndcg@10", "mrr", "unparsable", "n"]
        rows_eval = []
        for entry in evaluations:
            metrics = entry.get("metrics") or {}
            rows_eval.append([(entry.get("time") or "")[:16].replace("T", " "), Path(str(entry.get("data") or "")).name,
                              *(_fmt(metrics.get(k), 2) for k in keys)])
        console.print()
        console.print(table(f"Evaluations ({len(evaluations)})", ["time", "data", *keys], rows_eval))
    checkpoints = info.get("checkpoints") or []
    if checkpoints:
        console.print()
        console.print(table(f"Checkpoints ({len(checkpoints)})", ["checkpoint", "step", "loss", "adapter", "resumable", "size"],
                            [(c["name"], c["step"], _fmt(c.get("loss")), "yes" if c["adapter"] else "no",
                              "yes" if c["resumable"] else "no", _size(c.get("size_bytes"))) for c in checkpoints]))


@app.command("show")
def show(
    run_dir: Path = typer.Argument(..., help="A run folder (or one of its checkpoint-N folders).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON (run.json's sections, adapter_config.json, "
                                 "loss history, checkpoints, metrics)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write the loss curve to this PNG file (needs matplotlib: "
                                        "pip install 'comapoi\\[plot]').", show_default=False),
) -> None:
    """Show one run: base model, role, backend, LoRA settings, target modules, trainable parameters, data hashes,
    the loss curve, evaluations and checkpoints."""
    from comapoi_cli.adapters import describe_run, write_loss_plot

    info = describe_run(run_dir)
    if plot is not None:
        summary = info.get("summary") or {}
        write_loss_plot(info.get("loss_history") or [], plot, title=str(summary.get("run") or run_dir),
                        eval_history=info.get("eval_history") or [])
    for message in info.get("warnings") or []:
        warn(message)
    if as_json:
        if plot is not None:
            info["plot"] = str(plot)
        print_json(info)
        return
    _render_show(info)
    if plot is not None:
        success(f"Loss curve written to {plot}")


# -- merge -------------------------------------------------------------------------------------------

@app.command("merge")
def merge(
    run_dir: Path = typer.Argument(..., help="A run folder (or one of its checkpoint-N folders).", show_default=False),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Folder for the merged model (must not exist or "
                                              "be empty). Required.", show_default=False),
    output_old: Optional[Path] = old_spelling("--output", "-o"),
    model: Optional[str] = typer.Option(None, "--model", help="Base model folder or hub id.",
                                        show_default="the one run.json records; a tiny base is rebuilt if gone"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's stored dtype; float16 becomes float32 on the CPU), "
                              "bfloat16, float16 or float32. Never 4-bit."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    check_inputs: int = number_option(3, "--check-inputs", whole=True, minimum=0, help="Inputs on which the saved model's logits must match "
                                     "the base model with the adapter (0 = no check)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output-dir folder."),
    trust_remote_code: bool = trust_remote_code_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Merge the adapter into a 16-bit copy of its base model and save a standalone model folder
    (weights in safetensors, tokenizer, chat template) that plain transformers or vLLM load."""
    from comapoi_cli.adapters.merge import merge_adapter

    output = one_of(output_dir, output_old, "--output-dir", required=True)

    def log(message: str) -> None:
        err_console.print(f"[dim]{escape(message)}[/dim]", soft_wrap=True)

    result = merge_adapter(run_dir, output, model=model, dtype=dtype, device=device, overwrite=overwrite,
                           check_inputs=check_inputs, log=None if as_json else log,
                           trust_remote_code=trust_remote_code)
    if as_json:
        print_json(result.to_dict())
        return
    for note in result.notes:
        console.print(f"[yellow]Note:[/yellow] {escape(note)}", soft_wrap=True)
    if result.checks:
        worst = max(c.max_abs_diff for c in result.checks)
        agreement = min(c.argmax_agreement for c in result.checks)
        console.print(f"Logit check on {len(result.checks)} inputs: max |merged - base+adapter| = {worst:.3g} "
                      f"(tolerance {min(c.tolerance for c in result.checks):.3g}), next-token agreement "
                      f"{agreement:.1%}.", soft_wrap=True)
    success(f"Merged model ({result.dtype}) saved in {result.output}: {', '.join(result.files)}")
    console.print(f"Serve it: vllm serve {escape(str(result.output))}", soft_wrap=True)


# -- export ------------------------------------------------------------------------------------------

@app.command("export")
def export(
    run_dirs: List[Path] = typer.Argument(..., help="Run folders (or checkpoint-N folders) to export.", show_default=False),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Folder to copy the adapters into (one "
                                              "sub-folder per serving name). Required.", show_default=False),
    to_old: Optional[Path] = old_spelling("--to"),
    names: Optional[str] = typer.Option(None, "--names", help="Comma list of serving names, one per run in order.",
                                        show_default="each run's role, e.g. agent1,agent2,agent3"),
    model: Optional[str] = typer.Option(None, "--model", help="Base model for the printed command (e.g. its path on the "
                                        "serving machine).", show_default="the recorded one"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing OUTPUT_DIR/NAME folders."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Copy adapters (safetensors only) under serving names, check they share one base model, and print
    the vLLM command line that serves them as LoRA modules."""
    from comapoi_cli.adapters.export import export_adapters

    to = one_of(output_dir, to_old, "--output-dir", required=True)

    name_list = names.split(",") if names else None
    result = export_adapters(run_dirs, to, name_list, overwrite=overwrite, base_model=model)
    if as_json:
        print_json(result.to_dict())
        return
    exported = table(f"Exported to {result.to}", ["name", "role", "dataset", "rank", "from", "files"],
                     [(a.name, a.role, a.dataset, a.rank, a.source, len(a.files)) for a in result.adapters])
    console.print(exported)
    for note in result.notes:
        console.print(f"[yellow]Note:[/yellow] {escape(note)}", soft_wrap=True)
    success(f"{len(result.adapters)} adapter{'s' if len(result.adapters) != 1 else ''} exported; serve "
            f"{'them' if len(result.adapters) != 1 else 'it'} with:")
    print(result.command_line, flush=True)
