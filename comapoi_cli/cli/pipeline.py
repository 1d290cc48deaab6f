"""``comapoi pipeline``: run the trained agents as CoMaPOI chains them (``run``) and score the chain (``score``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from comapoi_cli.choices import QUANT_CHOICES
from comapoi_cli.cli.base import App
from comapoi_cli.cli.fields import number_option, with_signature
from comapoi_cli.cli.render import console, err_console, print_json, success, table
from comapoi_cli.errors import UsageError
from comapoi_cli.plugins import Registry

HELP = "Run the three trained agents as CoMaPOI chains them (Profiler -> Forecaster -> Final_Predictor) and score the chain."

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


def command(registry: Registry) -> typer.Typer:
    """The ``pipeline`` group. ``run`` gets one ``--ROLE RUN`` option per registered role that can join the
    chain (``chain_position`` or ``chain_after``): CoMaPOI's ``--agent1/--agent2/--agent3``, a plugin's too."""
    import inspect

    chain_roles = [r for r in registry.roles.values() if r.chain_position is not None or r.chain_after is not None]
    params = [p for name, p in inspect.signature(run).parameters.items() if name not in ("role_runs", "registry")]
    role_params = {f"role_{i}": role for i, role in enumerate(chain_roles)}
    at = next(i for i, p in enumerate(params) if p.name == "merged")
    params[at:at] = [inspect.Parameter(
        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[Path],
        default=typer.Option(None, f"--{role.id}", metavar="RUN", show_default=False, rich_help_panel="Agents",
                             help=f"Run folder of the {role.display_name or role.id}"
                                  + ("." if role.required else " (optional: joins the chain when named)."))
    ) for name, role in role_params.items()]

    def run_command(**values: Any) -> None:
        role_runs = {role.id: values.pop(name) for name, role in role_params.items()}
        run(**values, role_runs={k: v for k, v in role_runs.items() if v is not None}, registry=registry)

    run_command.__doc__ = run.__doc__
    app = App(no_args_is_help=True, rich_markup_mode="rich", help=HELP,
                      context_settings={"help_option_names": ["-h", "--help"]})
    app.command("run", epilog=_RUN_EPILOG)(with_signature(run_command, params))
    app.command("score")(score)
    return app


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
    merged: Optional[Path] = typer.Option(None, "--merged", help="One run (e.g. --type merged) for every required agent not named.",
                                          show_default=False, rich_help_panel="Agents"),
    role: Optional[List[str]] = typer.Option(None, "--role", metavar="ROLE=RUN", help="ROLE=RUN: the same as --ROLE RUN, e.g. "
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
    batch_size: int = number_option(8, "--batch-size", whole=True, minimum=1, help="transformers engine: trajectories per generation "
                                   "batch (each chain step runs on the whole batch).", rich_help_panel="Engine"),
    concurrency: Optional[int] = number_option(None, "--concurrency", whole=True, minimum=1, help="openai engine: requests in flight at "
                                              "once; each trajectory moves on as soon as its answer arrives. Default: 64.",
                                              show_default=False, rich_help_panel="Engine"),
    request_timeout: float = number_option(600.0, "--request-timeout", above=0, help="openai engine: seconds for one "
                                          "whole answer (a timeout is a miss with its reason).", rich_help_panel="Engine"),
    retries: int = number_option(3, "--retries", whole=True, minimum=0, help="openai engine: attempts after the first on connection "
                                "errors, 429 and 5xx (with backoff; Retry-After honoured).", rich_help_panel="Engine"),
    scheduler: str = typer.Option("auto", "--scheduler", hidden=True, help="auto, concurrent or lockstep (benchmarks)."),
    max_new_tokens: int = number_option(256, "--max-new-tokens", whole=True, minimum=1, help="Tokens per agent answer (CoMaPOI: 256).",
                                       rich_help_panel="Engine"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code.",
                                           rich_help_panel="Engine"),
    retriever: str = typer.Option("transitions", "--retriever", help="Where the similar POIs come from.",
                                  rich_help_panel="Engine"),
    out: Optional[Path] = typer.Option(None, "--output-dir", "--out", help="Output folder. Default: output/pipeline/{ds}.",
                                       show_default=False, rich_help_panel="Output"),
    limit: int = number_option(0, "--limit", whole=True, minimum=0, help="Run only the first N test trajectories (0 = all).",
                              rich_help_panel="Output"),
    resume: bool = typer.Option(False, "--resume", help="Continue a run that stopped, from its last whole line.",
                                rich_help_panel="Output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over, replacing the folder's predictions.",
                                   rich_help_panel="Output"),
    top_k: int = number_option(10, "--top-k", whole=True, minimum=1, help="The final list length scored as 'final top-k'.",
                              rich_help_panel="Output"),
    compat: str = typer.Option("none", "--compat", help="comapoi: also report what CoMaPOI's own evaluation would print.",
                               rich_help_panel="Output"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.", rich_help_panel="Output"),
    allow_train_overlap: bool = typer.Option(False, "--allow-train-overlap",
                                             help="Score test trajectories that are in --train or in an agent's training "
                                             "data anyway (refused by default); the scores say so.",
                                             rich_help_panel="Inputs"),
    role_runs: Optional[dict[str, Path]] = None,
    registry: Optional[Registry] = None,
) -> None:
    """Run the chain on test trajectories: Profiler -> Forecaster (with retrieved POIs) -> Final_Predictor.

    Each role builds its prompts with the same builders as 'comapoi data synth' (no label in them).

    predictions.jsonl gets one line per trajectory, in test-file order, written as they finish; --resume continues a killed run.

    Ends with CoMaPOI's metrics, per-stage candidate recall and two no-model baselines (docs/pipeline.md).
    """
    from comapoi_cli.pipeline.runner import PipelineRequest, run_pipeline

    assert registry is not None  # command() passes it
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other.")
    if quant not in QUANT_CHOICES:
        raise UsageError(f"--quant must be auto, 4bit, 8bit or none, not '{quant}'.")
    named = dict(role_runs or {})
    for role_id, folder in _pairs(role, "--role").items():
        if role_id in named and named[role_id] != Path(folder):
            raise UsageError(f"The run of {role_id} was given twice (--{role_id} and --role {role_id}=...); give it once.")
        registry.role(role_id)  # an unknown role: one sentence, exit 2
        named[role_id] = Path(folder)
    required = [r.id for r in registry.roles.values() if r.required]
    runs: dict[str, Path] = {}
    for role_id in registry.roles:  # registry order: CoMaPOI's roles, then plugin roles
        chosen = named.get(role_id) or (merged if role_id in required else None)
        if chosen is not None:
            runs[role_id] = chosen
    missing = [r for r in required if r not in runs]
    if missing:
        raise UsageError(f"Name a run for every agent: missing --{' --'.join(missing)} "
                         f"(or --merged RUN for {', '.join(required)}).")
    request = PipelineRequest(
        dataset=dataset.lower(), test=test, runs=runs, poi_info=poi_info, train=train, out=out, engine=engine,
        retriever=retriever, url=url, api_key=api_key, served_names=_pairs(served_name, "--served-name"), model=model,
        device=device, quant=quant, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, resume=resume,
        overwrite=overwrite, top_k=top_k, compat=compat.lower(), trust_remote_code=trust_remote_code,
        allow_train_overlap=allow_train_overlap, concurrency=concurrency, request_timeout=request_timeout, retries=retries,
        scheduler=scheduler.lower())
    try:
        result = run_pipeline(request, registry, _reporter(as_json))
    except KeyboardInterrupt:
        from comapoi_cli.errors import ComapoiError

        raise ComapoiError("Interrupted (Ctrl-C or SIGTERM); every finished line is saved in the output folder.",
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
    print_scores(result.scores, title=f"chain on {result.scores['n']} trajectories",
                 rejected=_rejected(result.predictions))
    success(f"wrote {result.predictions}")
    success(f"wrote {result.record}")


def score(
    file: Path = typer.Argument(..., help="A predictions.jsonl of 'comapoi pipeline run'.", show_default=False,
                                metavar="FILE"),
    top_k: int = number_option(10, "--top-k", whole=True, minimum=1, help="The final list length scored as 'final top-k'."),
    compat: str = typer.Option("none", "--compat", help="comapoi: also report what CoMaPOI's own evaluation would print."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
) -> None:
    """Re-score a chain's predictions file (the same numbers as the run printed), without a model."""
    from comapoi_cli.pipeline.runner import score_file
    from comapoi_cli.plugins import get_registry

    scores = score_file(file, top_k=top_k, compat=compat.lower(), registry=get_registry())
    if as_json:
        print_json(scores)
        return
    print_scores(scores, title=f"{file.name} ({scores['n']} trajectories)", rejected=_rejected(file))


def _rejected(predictions: Path) -> tuple[int, Path] | None:
    from comapoi_cli.pipeline.scoring import rejected_test_lines

    return rejected_test_lines(predictions)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def print_scores(scores: dict[str, Any], title: str, rejected: tuple[int, Path] | None = None) -> None:
    """The metrics table (with unparsable answers), per-stage recall and empty lists, and what was not scored."""
    from rich.markup import escape

    from comapoi_cli.metrics import ACC_KS, NDCG_KS
    from comapoi_cli.pipeline.scoring import grouped_lines

    keys = [*(f"acc@{k}" for k in ACC_KS), *(f"ndcg@{k}" for k in NDCG_KS), "mrr", "unparsable"]
    columns = [("chain", scores["chain"]), ("most frequent", scores["baselines"]["frequent"]),
               ("retriever top-k", scores["baselines"]["retriever"])]
    if "compat" in scores:
        columns.insert(1, ("CoMaPOI's eval would print", scores["compat"]))
    console.print(f"[bold]{escape(title)}[/bold]", soft_wrap=True, highlight=False)
    console.print(table(None, ["metric %", *(name for name, _ in columns)],
                        [(key, *(_fmt(m.get(key)) for _, m in columns)) for key in keys]))
    empty = scores.get("stages_empty") or {}
    n = scores.get("n") or 0
    console.print("[bold]label found in (candidate recall %)[/bold]", soft_wrap=True, highlight=False)
    console.print(table(None, ["stage", "recall %", "empty lists"],
                        [(name, _fmt(value), f"{empty.get(name, 0)} of {n}") for name, value in scores["stages"].items()]))
    summary: list[str] = []
    unparsable = scores["chain"].get("unparsable")
    if unparsable:
        summary.append(f"{unparsable:.1f}% of the final answers could not be parsed (scored as misses)")
    for name, count in empty.items():
        if count:
            summary.append(f"{name}: empty for {count} of {n} trajectories")
    for reason, count in ((scores.get("compat") or {}).get("misses") or {}).items():
        summary.append(f"CoMaPOI's eval: {count} answer{'s' if count != 1 else ''} unreadable ({reason})")
    if scores.get("lines_with_problems"):
        summary.append(f"{scores['lines_with_problems']} trajectories had an agent answer missing (see 'problems' in the file)")
    if rejected is not None and rejected[0]:
        summary.append(f"{rejected[0]} test line{'s' if rejected[0] != 1 else ''} rejected before the run, not scored "
                       f"(reasons in {rejected[1]})")
    for kind, label in (("invalid_lines", "not scored"), ("duplicates", "scored once")):
        lines = scores.get(kind) or []
        if lines:
            shown = grouped_lines([(item["line"], item["reason"]) for item in lines], shown=5)
            summary.append(f"{len(lines)} line{'s' if len(lines) != 1 else ''} of the predictions file {label} ({shown})")
    for line in summary:
        console.print(escape(line), soft_wrap=True, highlight=False)
    overlap = scores.get("train_overlap")
    if isinstance(overlap, dict) and overlap.get("warning"):
        console.print(f"WARNING, NOT HELD OUT: {overlap['warning']}", style="bold", highlight=False, markup=False)
