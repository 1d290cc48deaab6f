"""``comapoi eval``: score adapters with CoMaPOI's metrics.

``comapoi eval --adapter RUN_DIR`` generates on held-out records and scores the answers;
``comapoi eval score FILE`` scores a predictions file made elsewhere (e.g. by vLLM).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from comapoi_cli.choices import QUANT_CHOICES
from comapoi_cli.cli.base import App
from comapoi_cli.cli.fields import number_option, trust_remote_code_option
from comapoi_cli.cli.render import console, err_console, print_json, success, table, warn
from comapoi_cli.errors import UsageError

app = App(
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

_GENERATION_EPILOG = (
    "Examples:\n\n"
    "  comapoi eval --adapter output/run/sft-nyc/bs4-gas1-ms200-agent3-lr0.0001\n\n"
    "  comapoi eval --adapter RUN_DIR --dataset nyc --type agent3 --num-samples 50\n\n"
    "  comapoi eval score predictions.jsonl --dataset nyc"
)


@app.callback(invoke_without_command=True, epilog=_GENERATION_EPILOG)
def eval_adapter(
    ctx: typer.Context,
    adapter: Optional[Path] = typer.Option(
        None, "--adapter", help="Run folder of a trained adapter (or one of its checkpoint-N folders).",
        show_default=False, rich_help_panel="What to evaluate"),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Held-out JSONL file. Default: the holdout the run recorded (*_100.jsonl).",
        show_default=False, rich_help_panel="What to evaluate"),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="Dataset name (nyc, tky, ca, any): its POI id range; with --type and no --data, "
        "evaluate on its holdout. Default: the run's.", show_default=False, rich_help_panel="What to evaluate"),
    type_: Optional[str] = typer.Option(
        None, "--type", help="merged or a role id (see 'comapoi plugins list'): how records are scored and, without --data, "
        "which holdout. Default: the run's.",
        show_default=False, rich_help_panel="What to evaluate"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", envvar="COMAPOI_DATA_DIR", help="Where --dataset's files live (default: the run's, else ./data).",
        show_default=False, rich_help_panel="What to evaluate"),
    num_samples: int = number_option(0, "--num-samples", whole=True, minimum=0, help="Evaluate only the first N records (0 = all).", rich_help_panel="What to evaluate"),
    model: Optional[str] = typer.Option(
        None, "--model", help="Base model folder (or 'tiny', 'smollm2-135m'). Default: the base model recorded in run.json.",
        show_default=False, rich_help_panel="Generation"),
    batch_size: int = number_option(8, "--batch-size", whole=True, minimum=1, help="Prompts per generation batch.",
                                   rich_help_panel="Generation"),
    engine: str = typer.Option("transformers", "--engine", help="transformers (local) or openai (an OpenAI-compatible "
                               "server such as vLLM serving the adapter), or a plugin's engine.", rich_help_panel="Engine"),
    url: Optional[str] = typer.Option(None, "--url", help="openai engine: the server, e.g. http://localhost:8000/v1.",
                                      show_default=False, rich_help_panel="Engine"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="openai engine: the key, if "
                                          "the server wants one (never written anywhere).", show_default=False,
                                          rich_help_panel="Engine"),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="openai engine: the adapter's served model "
                                              "name (vllm serve --lora-modules NAME=DIR). Default: the run's type.",
                                              show_default=False, rich_help_panel="Engine"),
    concurrency: Optional[int] = number_option(None, "--concurrency", whole=True, minimum=1, help="openai engine: "
                                               "requests in flight at once. Default: 64.", show_default=False,
                                               rich_help_panel="Engine"),
    request_timeout: float = number_option(600.0, "--request-timeout", above=0, help="openai engine: seconds for one "
                                           "whole answer (a timeout is a miss with its reason).", rich_help_panel="Engine"),
    retries: int = number_option(3, "--retries", whole=True, minimum=0, help="openai engine: attempts after the first on "
                                 "connection errors, 429 and 5xx.", rich_help_panel="Engine"),
    max_new_tokens: Optional[int] = number_option(None, "--max-new-tokens", whole=True, minimum=1, help="Tokens to generate per answer. Default: 1.5 x the longest "
        "reference answer + 16 (at most 512).", show_default=False, rich_help_panel="Generation"),
    quant: str = typer.Option(
        "auto", "--quant", help="auto (the run's quantisation on a GPU, none on the CPU), 4bit, 8bit or none.",
        rich_help_panel="Generation"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Generation"),
    output_dir: Optional[Path] = typer.Option(
        None, "--output-dir", help="Where predictions.jsonl, metrics.json and metrics.csv go (default: the adapter folder).",
        show_default=False, rich_help_panel="Output"),
    trust_remote_code: bool = trust_remote_code_option(rich_help_panel="Generation"),
    as_json: bool = typer.Option(False, "--json", help="Print the evaluation entry as JSON.", rich_help_panel="Output"),
    allow_train_overlap: bool = typer.Option(
        False, "--allow-train-overlap", help="Score records that were in the adapter's training data anyway "
        "(refused by default; counted in the result).", rich_help_panel="What to evaluate"),
) -> None:
    """Score an adapter on held-out records with CoMaPOI's metrics (Acc@k, NDCG@k, MRR).

    Loads the run's base model (or --model) with the adapter, generates greedily in batches with
    the tokenizer's chat template (or asks a server that serves the adapter: --engine openai --url), parses each answer with the role's parser and scores it against
    the record's target. Writes predictions.jsonl, metrics.json and metrics.csv beside the adapter
    and appends the result to the run's run.json ("evaluations").

    To score predictions made elsewhere (e.g. by vLLM serving the adapters): comapoi eval score FILE
    """
    if ctx.invoked_subcommand is not None:
        given = [flag for flag, value in (("--adapter", adapter), ("--data", data), ("--dataset", dataset),
                                          ("--type", type_), ("--model", model), ("--max-new-tokens", max_new_tokens),
                                          ("--output-dir", output_dir)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to 'comapoi eval', "
                             f"not to 'comapoi eval {ctx.invoked_subcommand}'.",
                             hint=f"Put the options after the sub-command: comapoi eval {ctx.invoked_subcommand} --help")
        return
    if adapter is None:
        raise UsageError("Missing option --adapter RUN_DIR (the folder of a trained adapter).",
                         hint="To score a predictions file instead: comapoi eval score FILE")
    if quant not in QUANT_CHOICES:
        raise UsageError(f"--quant must be auto, 4bit, 8bit or none, not '{quant}'.")

    from comapoi_cli.cli.reporting import ConsoleReporter
    from comapoi_cli.evaluation.runner import EvalRequest, evaluate_adapter
    from comapoi_cli.plugins import get_registry
    from comapoi_cli.reporting import Reporter

    request = EvalRequest(
        adapter=adapter, data=data, dataset=dataset, type=type_, data_dir=data_dir, num_samples=num_samples,
        model=model, batch_size=batch_size, max_new_tokens=max_new_tokens, quant=quant, device=device,
        output_dir=output_dir, allow_train_overlap=allow_train_overlap, trust_remote_code=trust_remote_code,
        engine=engine, url=url, api_key=api_key, served_name=served_name, concurrency=concurrency,
        request_timeout=request_timeout, retries=retries,
    )
    result = _interruptible(lambda: evaluate_adapter(request, get_registry(), Reporter() if as_json else ConsoleReporter()))
    if as_json:
        print_json({**result.entry, "notes": result.notes, "written": [str(p) for p in result.written]})
        return
    _print_metrics(result.entry["metrics"], result.entry.get("by_role") or {},
                   title=f"{result.entry.get('role') or 'eval'} on {result.entry['data']} ({result.entry['metrics']['n']} records)")
    for note in result.notes:
        warn(note)
    for path in result.written:
        success(f"wrote {path}")


def _interruptible(work: Any) -> Any:
    """Run ``work()`` with SIGTERM (a batch scheduler's stop) handled like Ctrl-C: a clean stop, nothing half written.

    eval writes its files atomically once every answer is scored, so an interrupted eval leaves the
    previous predictions, metrics and run.json as they were; the same command starts it again.
    """
    from comapoi_cli.data.blocks import sigterm_as_interrupt
    from comapoi_cli.errors import ComapoiError

    try:
        with sigterm_as_interrupt():
            return work()
    except KeyboardInterrupt:
        raise ComapoiError("Interrupted; nothing is half written (predictions, metrics and run.json are written "
                           "atomically once every answer is scored).",
                           hint="Run the same command again to evaluate from the start.", exit_code=130) from None


@app.command("score")
def score(
    file: Path = typer.Argument(..., help="Predictions file (JSON Lines): label plus output or predicted_poi_ids per line.",
                                show_default=False, metavar="FILE"),
    type_: Optional[str] = typer.Option(
        None, "--type", help="Score every line as this role (its parser and target kind). Default: each line's "
        "'role', else POI ids with CoMaPOI's parser.", show_default=False),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="Dataset whose POI id range applies (nyc, tky, ca). Default: each line's 'dataset', "
        "else no upper bound.", show_default=False),
    reparse: bool = typer.Option(False, "--reparse", help="Parse 'output' even where 'predicted_poi_ids' is given."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Score the valid lines and list the invalid ones, "
                                      "instead of failing."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the metrics to FILE (.json or .csv).",
                                          show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Score a predictions file made elsewhere (e.g. by vLLM serving the adapters), without a model.

    Each line holds "label" (the true POI id) and either "output" (the raw model text, parsed
    leniently) or "predicted_poi_ids" (a ready ranked list); "id", "role" and "dataset" are
    optional. Invalid lines are reported one by one.
    """
    from comapoi_cli.evaluation.outputs import write_metrics
    from comapoi_cli.evaluation.predictions import MAX_SHOWN_PROBLEMS, PredictionsFileError, score_predictions
    from comapoi_cli.fileio import now_iso, sha256_file

    try:
        from comapoi_cli.plugins import get_registry

        report = score_predictions(file, role=type_, dataset=dataset, reparse=reparse, skip_invalid=skip_invalid,
                                   registry=get_registry())
    except PredictionsFileError as exc:
        _print_problems(exc.problems, MAX_SHOWN_PROBLEMS)
        raise
    entry: dict[str, Any] = {
        "predictions": str(file),
        "predictions_sha256": sha256_file(file),
        "metrics": report.metrics,
        "time": now_iso(),
    }
    if report.by_role:
        entry["by_role"] = report.by_role
    if report.skipped:
        entry["skipped_lines"] = len(report.skipped)
    if output is not None:
        write_metrics(output, entry)
    if as_json:
        print_json({**report.to_dict(), "time": entry["time"], "predictions_sha256": entry["predictions_sha256"]})
        return
    if report.skipped:
        _print_problems(report.skipped, MAX_SHOWN_PROBLEMS, heading=f"skipped {len(report.skipped)} invalid line"
                        f"{'s' if len(report.skipped) != 1 else ''}:")
    _print_metrics(report.metrics, report.by_role, title=f"{file.name} ({', '.join(report.roles)})")
    if output is not None:
        success(f"wrote {output}")


def _print_problems(problems: list[Any], limit: int, heading: str | None = None) -> None:
    if heading:
        warn(heading)
    for problem in problems[:limit]:
        err_console.print(f"  {problem}", soft_wrap=True, markup=False)
    if len(problems) > limit:
        err_console.print(f"  ... and {len(problems) - limit} more", soft_wrap=True, markup=False)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _print_metrics(metrics: dict[str, Any], by_role: dict[str, dict[str, Any]], title: str) -> None:
    from comapoi_cli.metrics import METRIC_KEYS

    keys = [k for k in METRIC_KEYS if k in metrics or any(k in m for m in by_role.values())]
    scopes = [("all", metrics), *sorted(by_role.items())]
    labels = {k: (k if k == "n" else f"{k} %") for k in keys}
    from rich.markup import escape

    console.print(f"[bold]{escape(title)}[/bold]", soft_wrap=True, highlight=False)
    console.print(table(None, ["metric", *(s for s, _ in scopes)],
                        [(labels[k], *(_fmt(m.get(k)) for _, m in scopes)) for k in keys]))
