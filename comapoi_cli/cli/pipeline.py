"""``comapoi pipeline``: run the trained agents as CoMaPOI chains them (``run``) and score the chain (``score``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from comapoi_cli.cli.render import console, err_console, print_json, success, table
from comapoi_cli.errors import UsageError

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Run the three trained agents as CoMaPOI chains them (Profiler -> Forecaster -> Final_Predictor) and score the chain.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

_RUN_EPILOG = (
    "Examples:\n\n"
    "  comapoi pipeline run --dataset nyc --test data/nyc/nyc_test.jsonl --agent1 RUN1 --agent2 RUN2 --agent3 RUN3\n\n"
    "  comapoi pipeline run --dataset nyc --test data/nyc/nyc_test.jsonl --merged RUN --limit 20\n\n"
    "  comapoi pipeline run ... --engine openai --url http://localhost:8000/v1 --compat comapoi\n\n"
    "  comapoi pipeline score output/pipeline/nyc/predictions.jsonl --compat comapoi"
)


def _pairs(values: List[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip() or not rest.strip():
            raise UsageError(f"{flag} takes ID=VALUE, not '{value}'.")
        out[key.strip()] = rest.strip()
    return out


def _reporter(quiet: bool) -> Any:
    """The CLI's Rich reporter (progress shows trajectories/s and the ETA), or a silent one for --json."""
    from comapoi_cli.cli.reporting import ConsoleReporter
    from comapoi_cli.reporting import Reporter

    return Reporter() if quiet else ConsoleReporter(err_console)


@app.command("run", epilog=_RUN_EPILOG)
def run(
    dataset: str = typer.Option(..., "--dataset", help="nyc, tky or ca (the POI id range).", show_default=False,
                                rich_help_panel="Inputs"),
    test: Path = typer.Option(..., "--test", help="Test trajectories in CoMaPOI's plain format ({ds}_test.jsonl).",
                              show_default=False, rich_help_panel="Inputs"),
    poi_info: Optional[Path] = typer.Option(None, "--poi-info", help="POI table (poi_id,category,lat,lon). "
                                            "Default: {ds}_poi_info.csv beside --test.", show_default=False,
                                            rich_help_panel="Inputs"),
    train: Optional[Path] = typer.Option(None, "--train", help="Training trajectories (the users' history, retrieval). "
                                         "Default: {ds}_train.jsonl beside --test.", show_default=False,
                                         rich_help_panel="Inputs"),
    agent1: Optional[Path] = typer.Option(None, "--agent1", help="Run folder of the Profiler.", show_default=False,
                                          rich_help_panel="Agents"),
    agent2: Optional[Path] = typer.Option(None, "--agent2", help="Run folder of the Forecaster.", show_default=False,
                                          rich_help_panel="Agents"),
    agent3: Optional[Path] = typer.Option(None, "--agent3", help="Run folder of the Final_Predictor.", show_default=False,
                                          rich_help_panel="Agents"),
    merged: Optional[Path] = typer.Option(None, "--merged", help="One run (e.g. --type merged) for every agent not named.",
                                          show_default=False, rich_help_panel="Agents"),
    role: Optional[List[str]] = typer.Option(None, "--role", metavar="ROLE=RUN", help="ROLE=RUN: a plugin role that joins the chain, e.g. "
                                             "agent4=RUN4 (the role declares its place).", show_default=False,
                                             rich_help_panel="Agents"),
    engine: str = typer.Option("transformers", "--engine", help="transformers (local) or openai (an OpenAI-compatible "
                               "server), or a plugin's engine.", rich_help_panel="Engine"),
    url: Optional[str] = typer.Option(None, "--url", help="openai engine: the server, e.g. http://localhost:8000/v1.",
                                      show_default=False, rich_help_panel="Engine"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="openai engine: the key, if the "
                                          "server wants one.", show_default=False, rich_help_panel="Engine"),
    served_name: Optional[List[str]] = typer.Option(None, "--served-name", metavar="ROLE=NAME", help="ROLE=NAME: the served model name of a "
                                                    "role's adapter (default: the role id).", show_default=False,
                                                    rich_help_panel="Engine"),
    model: Optional[str] = typer.Option(None, "--model", help="Base model folder. Default: the runs' (they must share it).",
                                        show_default=False, rich_help_panel="Engine"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Engine"),
    quant: str = typer.Option("auto", "--quant", help="auto, 4bit, 8bit or none.", rich_help_panel="Engine"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="transformers engine: trajectories per generation "
                                   "batch (each chain step runs on the whole batch).", rich_help_panel="Engine"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="openai engine: requests in flight at "
                                              "once; each trajectory moves on as soon as its answer arrives. Default: 64.",
                                              show_default=False, rich_help_panel="Engine"),
    request_timeout: float = typer.Option(600.0, "--request-timeout", min=0.001, help="openai engine: seconds for one "
                                          "whole answer (a timeout is a miss with its reason).", rich_help_panel="Engine"),
    retries: int = typer.Option(3, "--retries", min=0, help="openai engine: attempts after the first on connection "
                                "errors, 429 and 5xx (with backoff; Retry-After honoured).", rich_help_panel="Engine"),
    scheduler: str = typer.Option("auto", "--scheduler", hidden=True, help="auto, concurrent or lockstep (benchmarks)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Tokens per agent answer (CoMaPOI: 256).",
                                       rich_help_panel="Engine"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code.",
                                           rich_help_panel="Engine"),
    retriever: str = typer.Option("transitions", "--retriever", help="Where the similar POIs come from.",
                                  rich_help_panel="Engine"),
    out: Optional[Path] = typer.Option(None, "--output-dir", "--out", help="Output folder. Default: output/pipeline/{ds}.",
                                       show_default=False, rich_help_panel="Output"),
    limit: int = typer.Option(0, "--limit", min=0, help="Run only the first N test trajectories (0 = all).",
                              rich_help_panel="Output"),
    resume: bool = typer.Option(False, "--resume", help="Continue a run that stopped, from its last whole line.",
                                rich_help_panel="Output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over, replacing the folder's predictions.",
                                   rich_help_panel="Output"),
    top_k: int = typer.Option(10, "--top-k", min=1, help="The final list length scored as 'final top-k'.",
                              rich_help_panel="Output"),
    compat: str = typer.Option("none", "--compat", help="comapoi: also report what CoMaPOI's own evaluation would print.",
                               rich_help_panel="Output"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.", rich_help_panel="Output"),
) -> None:
    """Run the chain on test trajectories: Profiler -> Forecaster (with retrieved POIs) -> Final_Predictor.

    Each role builds its prompts with the same builders as 'comapoi data synth' (no label in them).

    predictions.jsonl gets one line per trajectory, in test-file order, written as they finish; --resume continues a killed run.

    Ends with CoMaPOI's metrics, per-stage candidate recall and two no-model baselines (docs/pipeline.md).
    """
    from comapoi_cli.pipeline.runner import PipelineRequest, run_pipeline
    from comapoi_cli.plugins import get_registry

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other.")
    if quant not in ("auto", "4bit", "8bit", "none"):
        raise UsageError(f"--quant must be auto, 4bit, 8bit or none, not '{quant}'.")
    runs: dict[str, Path] = {}
    for role_id, given in (("agent1", agent1), ("agent2", agent2), ("agent3", agent3)):
        chosen = given or merged
        if chosen is not None:
            runs[role_id] = chosen
    missing = [r for r in ("agent1", "agent2", "agent3") if r not in runs]
    if missing:
        raise UsageError(f"Name a run for every agent: missing --{' --'.join(missing)} (or --merged RUN for all three).")
    for role_id, folder in _pairs(role, "--role").items():
        runs[role_id] = Path(folder)
    request = PipelineRequest(
        dataset=dataset.lower(), test=test, runs=runs, poi_info=poi_info, train=train, out=out, engine=engine,
        retriever=retriever, url=url, api_key=api_key, served_names=_pairs(served_name, "--served-name"), model=model,
        device=device, quant=quant, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, resume=resume,
        overwrite=overwrite, top_k=top_k, compat=compat.lower(), trust_remote_code=trust_remote_code,
        concurrency=concurrency, request_timeout=request_timeout, retries=retries, scheduler=scheduler.lower())
    try:
        result = run_pipeline(request, get_registry(), _reporter(as_json))
    except KeyboardInterrupt:
        from comapoi_cli.errors import ComapoiError

        raise ComapoiError("Interrupted; every finished line is saved in the output folder.",
                           hint="Continue with the same command and --resume.", exit_code=130) from None
    if as_json:
        print_json({"out": str(result.out), "predictions": str(result.predictions), "rejects": str(result.rejects),
                    "record": str(result.record), "engine": result.engine, "done_before": result.done_before,
                    "processed": result.processed, "seconds": round(result.seconds, 3), "notes": result.notes,
                    "scores": result.scores})
        return
    if result.processed:
        rate = result.processed / result.seconds if result.seconds else 0.0
        console.print(f"{result.processed} trajectories in {result.seconds:.1f} s ({rate:.2f}/s)"
                      + (f", {result.done_before} done before" if result.done_before else ""), highlight=False)
    print_scores(result.scores, title=f"chain on {result.scores['n']} trajectories")
    success(f"wrote {result.predictions}")
    success(f"wrote {result.record}")


@app.command("score")
def score(
    file: Path = typer.Argument(..., help="A predictions.jsonl of 'comapoi pipeline run'.", show_default=False),
    top_k: int = typer.Option(10, "--top-k", min=1, help="The final list length scored as 'final top-k'."),
    compat: str = typer.Option("none", "--compat", help="comapoi: also report what CoMaPOI's own evaluation would print."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
) -> None:
    """Re-score a chain's predictions file (the same numbers as the run printed), without a model."""
    from comapoi_cli.pipeline.runner import score_file

    scores = score_file(file, top_k=top_k, compat=compat.lower())
    if as_json:
        print_json(scores)
        return
    print_scores(scores, title=f"{file.name} ({scores['n']} trajectories)")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def print_scores(scores: dict[str, Any], title: str) -> None:
    from rich.markup import escape

    from comapoi_cli.evaluation.metrics import ACC_KS, NDCG_KS

    keys = [*(f"acc@{k}" for k in ACC_KS), *(f"ndcg@{k}" for k in NDCG_KS), "mrr"]
    columns = [("chain", scores["chain"]), ("most frequent", scores["baselines"]["frequent"]),
               ("retriever top-k", scores["baselines"]["retriever"])]
    if "compat" in scores:
        columns.insert(1, ("CoMaPOI's eval would print", scores["compat"]))
    console.print(f"[bold]{escape(title)}[/bold]", soft_wrap=True, highlight=False)
    console.print(table(None, ["metric %", *(name for name, _ in columns)],
                        [(key, *(_fmt(m.get(key)) for _, m in columns)) for key in keys]))
    console.print(table("label found in (candidate recall %)", ["stage", "recall %"],
                        [(name, _fmt(value)) for name, value in scores["stages"].items()]))
    if scores.get("lines_with_problems"):
        console.print(f"{scores['lines_with_problems']} trajectories had an agent answer missing (see 'problems' in the file).",
                      highlight=False)
