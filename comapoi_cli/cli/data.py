"""``comapoi data``: clean, split, merge, stats, synth, build.

Commands parse arguments, call the services in ``comapoi_cli.data`` and render the result
(Rich tables, or ``--json``). Nothing heavy is imported at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from comapoi_cli.cli.base import App
from comapoi_cli.cli.fields import number_option, old_spelling, one_of, trust_remote_code_option
from comapoi_cli.cli.render import console, markup, print_json, success, table, warn
from comapoi_cli.errors import DataError, UsageError

app = App(help="Prepare CoMaPOI training data: prepare, clean, split, merge, stats, synth, build.", no_args_is_help=True)

_DATA_DIR_HELP = "Folder holding {dataset}/ (default: $COMAPOI_DATA_DIR or ./data)."
_JSON_HELP = "Print the summary as JSON (for scripts)."


def _registry():
    from comapoi_cli.plugins import get_registry

    return get_registry()


def _reporter():
    """The console reporter the data services report progress through (on a terminal)."""
    from comapoi_cli.cli.reporting import ConsoleReporter

    return ConsoleReporter()


def _bar(count: int, largest: int, width: int = 28) -> str:
    if largest <= 0:
        return ""
    cells = count * width / largest
    full = int(cells)
    return "█" * full + ("▌" if cells - full >= 0.5 else "")


# -- clean -------------------------------------------------------------------------------------
def _clean_table(summary: dict[str, Any], title: str) -> None:
    from comapoi_cli.data.policies import CHECKS

    descriptions = {c.name: c.description for c in CHECKS}
    rows: list[tuple[Any, ...]] = [(markup("[green]kept[/green]"), summary["kept"], "written to the output")]
    for reason, n in summary["rejected"].items():
        rows.append((markup(f"[red]{escape(str(reason))}[/red]"), n, descriptions.get(reason, "")))
    console.print(table(title, ["", "lines", ""], rows))
    total = summary["kept"] + sum(summary["rejected"].values())
    console.print(f"in {summary['in']} = kept {summary['kept']} + rejected {total - summary['kept']}")
    for reason, n in summary.get("warnings", {}).items():
        lines = summary.get("warning_lines", {}).get(reason)
        where = f" (lines {', '.join(map(str, lines))}{', ...' if n > len(lines) else ''})" if lines else ""
        warn(f"{n} kept record(s) fail '{reason}'{where}.")
    over = summary.get("over_length") or {}
    if over:
        console.print(f"Over --seq-length: {over.get('answer_lost', 0)} would lose the whole answer if truncated, "
                      f"{over.get('answer_cut', 0)} the end of it.")
    converted = summary.get("converted") or {}
    if converted:
        console.print("Converted: " + ", ".join(f"{name} {n}" for name, n in converted.items()), markup=False)


@app.command()
def clean(
    input: Optional[Path] = typer.Argument(None, help="JSONL file to clean. Leave out with --dataset to prepare the dataset's files."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Cleaned file (default: INPUT's name + _clean.jsonl)."),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help="Rejects file (default: OUTPUT's name + .rejects.jsonl)."),
    type_: Optional[str] = typer.Option(None, "--type", help="Role of the records (agent1, agent2, agent3, ...); with --dataset also 'merged' (the default)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name (nyc, tky, ca, any): its POI id range, and without INPUT its files."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
    max_poi_id: Optional[int] = number_option(None, "--max-poi-id", whole=True, minimum=1, help="Largest valid POI id (default: the dataset preset's)."),
    on: Optional[List[str]] = typer.Option(None, "--on", help="Policy of a check: CHECK=drop|warn|keep|fail (repeatable, or comma list; 'all=fail')."),
    strict: bool = typer.Option(False, "--strict", help="Every check that would drop a record fails instead."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Local Hugging Face tokenizer folder: count tokens with its chat template."),
    seq_length: Optional[int] = number_option(None, "--seq-length", whole=True, minimum=1, help="With --tokenizer: records longer than this are 'too_long'."),
    split: bool = typer.Option(True, "--split/--no-split", help="With --dataset: also write the seeded training/holdout split (the original's _all/_100 files)."),
    test_size: str = typer.Option("100", "--test-size", help="With --dataset: holdout size, a count or a fraction (0.1, 10%)."),
    seed: int = number_option(42, "--seed", whole=True, help="With --dataset: split seed."),
    force: bool = typer.Option(False, "--force", help="With --dataset: rebuild even if the recorded input hashes match."),
    workers: Optional[int] = number_option(None, "--workers", whole=True, minimum=1, help="Processes for large files (default: the usable cores)."),
    list_checks: bool = typer.Option(False, "--list-checks", help="List the checks and their default policies, and exit."),
    trust_remote_code: bool = trust_remote_code_option(),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
) -> None:
    """Clean agent files: keep valid records, write every other line to a rejects file with its reason.

    Every input line ends in the output or in the rejects file (line number, reason, original text).
    With --dataset and no INPUT it does the original's check-and-process step: clean the agent
    file(s), merge them for --type merged, and split them into the original's _all / _100 files.
    """
    from comapoi_cli.data import parse_policy_options

    if list_checks:
        from comapoi_cli.data.policies import CHECKS

        if as_json:
            print_json([{"check": c.name, "default": c.default, "can_keep": c.keepable, "original_rule": c.original,
                         "description": c.description} for c in CHECKS])
            return
        console.print(table("Checks (set with --on CHECK=POLICY)", ["check", "default", "can keep", "what it catches"],
                            [(c.name, c.default, "yes" if c.keepable else "no",
                              markup(escape(c.description) + (" [dim](original rule)[/dim]" if c.original else "")))
                             for c in CHECKS]))
        return
    policies = parse_policy_options(on)
    if input is None:
        if not dataset:
            raise UsageError("Give a file to clean, or --dataset NAME to prepare a dataset's agent files.")
        from comapoi_cli.data import parse_test_size, prepare_training_data

        prepared = prepare_training_data(type_=type_ or "merged", dataset=dataset, data_dir=data_dir, seed=seed,
                                         test_size=parse_test_size(test_size), split=split, policies=policies,
                                         strict=strict, tokenizer=tokenizer, seq_length=seq_length,
                                         max_poi_id=max_poi_id, force=force, workers=workers, registry=_registry(),
                                         trust_remote_code=trust_remote_code)
        summary = prepared.summary
        if as_json:
            print_json({"train_path": str(prepared.train_path),
                        "holdout_path": str(prepared.holdout_path) if prepared.holdout_path else None,
                        "input_hashes": prepared.input_hashes, **summary})
            return
        if summary.get("reused"):
            success(f"Inputs unchanged since the last run (same hashes): reusing {prepared.train_path}.")
        else:
            _clean_table(summary, f"clean {dataset} {type_ or 'merged'}")
            for rejects_file in summary.get("rejects_files", []):
                console.print(f"Rejects: {rejects_file}", markup=False, soft_wrap=True)
        for note in summary.get("notes", []):
            warn(note)
        success(f"Training file: {prepared.train_path} ({summary.get('train')} records)")
        if prepared.holdout_path:
            success(f"Holdout: {prepared.holdout_path} ({summary.get('holdout')} records)")
        return

    from comapoi_cli.data import clean_file
    from comapoi_cli.data.clean import NothingKeptError
    from comapoi_cli.data.stats import role_of_file

    target = output or input.with_name(f"{input.name[:-6] if input.name.endswith('.jsonl') else input.stem}_clean.jsonl")
    if target.resolve() == input.resolve():
        raise UsageError("The output would overwrite the input; pass another --output.")
    role_note = None
    if type_ is None:  # as data stats does: a canonical file name says its role
        type_ = role_of_file(input, _registry())
        if type_ is not None:
            role_note = f"checked as {type_} records (from the file name {input.name}; --type to choose another)"
    try:
        result = clean_file(input, target, rejects, role=type_ if type_ and type_ != "merged" else None, dataset=dataset,
                            max_poi_id=max_poi_id, policies=policies, strict=strict, tokenizer=tokenizer,
                            seq_length=seq_length, workers=workers, registry=_registry(), reporter=_reporter(),
                            require_records=True, trust_remote_code=trust_remote_code)
    except NothingKeptError as exc:  # the report still comes first: it says why nothing was kept
        if as_json:
            print_json({**exc.summary.to_dict(), "in": exc.summary.lines_in, "role": type_})
        else:
            _clean_table({**exc.summary.to_dict(), "in": exc.summary.lines_in}, f"clean {input.name}")
        raise
    data = result.to_dict()
    data["in"] = data["lines_in"]
    data["role"] = type_
    if as_json:
        print_json(data)
    else:
        if role_note:
            console.print(role_note, markup=False, soft_wrap=True)
        _clean_table(data, f"clean {input.name}")
        console.print(f"Output: {result.output}\nRejects: {result.rejects}", markup=False, soft_wrap=True)
        speed = f" ({data['mb_per_s']} MB/s)" if data.get("mb_per_s") else ""
        console.print(f"[dim]{result.bytes_in / 1e6:.1f} MB in {result.seconds:.2f} s{speed}, {result.workers} process(es)[/dim]")
    if result.lines_in == 0:
        raise DataError(f"{input} is empty: there is nothing to clean.")
    if result.kept == 0:
        raise DataError(f"No record of {input} survived cleaning.", hint=f"See why in {result.rejects}.")


# -- split -------------------------------------------------------------------------------------
@app.command()
def split(
    input: Optional[Path] = typer.Argument(None, help="JSONL file to split (leave out with --dataset)."),
    train_out: Optional[Path] = typer.Option(None, "--train-out", help="Training file (default: {stem}_all.jsonl beside INPUT)."),
    holdout_out: Optional[Path] = typer.Option(None, "--holdout-out", help="Holdout file (default: {stem}_100.jsonl beside INPUT)."),
    test_size: str = typer.Option("100", "--test-size", help="Holdout size: a count (default 100, as the original) or a fraction (0.1, 10%)."),
    seed: int = number_option(42, "--seed", whole=True, help="Seed: the same input and seed give byte-identical outputs."),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="'user': all records of one user land on the same side."),
    shuffle: bool = typer.Option(False, "--shuffle", help="Shuffle the outputs (seeded); default keeps the input order."),
    type_: Optional[str] = typer.Option(None, "--type", help="Role of the records (for --group-by); with --dataset the file to split (default merged)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Split {data_dir}/{dataset}/ agentN_train_samples.jsonl (or total_agent_train_samples.jsonl)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
) -> None:
    """Split a file into a training file and a seeded holdout (the original's _all / _100 names)."""
    from comapoi_cli.data import parse_test_size, split_file
    from comapoi_cli.data.layout import MERGED_FILE, dataset_dir

    if input is None:
        if not dataset:
            raise UsageError("Give a file to split, or --dataset NAME.")
        folder = dataset_dir(dataset, data_dir)
        if not type_ or type_ == "merged":
            input = folder / MERGED_FILE
        else:
            input = folder / _registry().role(type_).data_file_name()
        if not input.is_file():
            raise DataError(f"Cannot find {input}.", hint=f"Create it with: comapoi data synth --dataset {dataset}"
                            + (" and comapoi data merge --dataset " + dataset if input.name == MERGED_FILE else ""))
    result = split_file(input, train_out, holdout_out, test_size=parse_test_size(test_size), seed=seed,
                        group_by=group_by, shuffle=shuffle, role=type_ if type_ and type_ != "merged" else None,
                        registry=_registry())
    if as_json:
        print_json(result.to_dict())
        return
    rows = [("training", result.train, result.train_path), ("holdout", result.holdout, result.holdout_path)]
    console.print(table(f"split {input.name} (seed {seed})", ["side", "records", "file"], rows))
    if result.group_by:
        console.print(f"Grouped by {result.group_by}: {result.groups} users, {result.holdout_groups} in the holdout.",
                      markup=False)
    for note in result.notes:
        warn(note)


# -- merge -------------------------------------------------------------------------------------
@app.command()
def merge(
    inputs: Optional[List[str]] = typer.Argument(None, help="ROLE=FILE pairs (default: every registered role's file of --dataset)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Merged file (default: {data_dir}/{dataset}/total_agent_train_samples.jsonl)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Merge the agent files of this dataset."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
    shuffle: bool = typer.Option(False, "--shuffle", help="Shuffle the merged records (seeded)."),
    seed: int = number_option(42, "--seed", whole=True, help="Seed of the shuffle and of fractional weights."),
    weight: Optional[List[str]] = typer.Option(None, "--weight", help="ROLE=W: up- (2) or down-sample (0.5) a role (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
) -> None:
    """Merge the agent files into one file, each record tagged with its role (an 'agent' field)."""
    from comapoi_cli.data import merge_files, parse_weights
    from comapoi_cli.data.layout import MERGED_FILE, dataset_dir, no_agent_files

    registry = _registry()
    files: dict[str, Path] = {}
    if inputs:
        from comapoi_cli.data.merge import parse_role_files

        files = parse_role_files(inputs, registry)
    elif dataset:
        folder = dataset_dir(dataset, data_dir)
        for role_id, role in registry.roles.items():
            path = folder / role.data_file_name()
            if path.is_file():
                files[role_id] = path
        if not files:
            raise no_agent_files(dataset, folder)
    else:
        raise UsageError("Give ROLE=FILE pairs, or --dataset NAME.")
    if output is None:
        if not dataset:
            raise UsageError("Say where to write the merged file: --output FILE (or --dataset NAME).")
        output = dataset_dir(dataset, data_dir) / MERGED_FILE
    result = merge_files(files, output, shuffle=shuffle, seed=seed, weights=parse_weights(weight))
    if as_json:
        print_json(result.to_dict())
        return
    rows = [(role_id, result.records_in[role_id], result.weights[role_id], result.records_out[role_id], result.inputs[role_id])
            for role_id in result.inputs]
    console.print(table(f"merge -> {output.name}", ["role", "records in", "weight", "records out", "file"], rows))
    success(f"{result.total} records written to {output}" + (" (shuffled)" if shuffle else ""))
    if result.retagged:
        warn(f"{result.retagged} record(s) had an 'agent' field naming another role; it was replaced.")


# -- stats -------------------------------------------------------------------------------------
@app.command()
def stats(
    files: Optional[List[Path]] = typer.Argument(None, help="JSONL files (default: every agent file of --dataset)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Describe {data_dir}/{dataset}/agentN_train_samples.jsonl; also sets the POI id range."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
    type_: Optional[str] = typer.Option(None, "--type", help="Role of the records of FILES (default: from the file name, else each record's 'agent')."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Local Hugging Face tokenizer folder: real token counts with its chat template."),
    seq_length: Optional[int] = number_option(None, "--seq-length", whole=True, minimum=1, help="Count records longer than this many tokens."),
    chars_per_token: float = number_option(1.8, "--chars-per-token", above=0, help="Estimate without --tokenizer (measured on the synth data; docs/data.md)."),
    max_poi_id: Optional[int] = number_option(None, "--max-poi-id", whole=True, minimum=1, help="Largest valid POI id (default: the dataset preset's)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the length distribution per role to this PNG (matplotlib)."),
    workers: Optional[int] = number_option(None, "--workers", whole=True, minimum=1, help="Processes for large files (default: the usable cores; 1 with --tokenizer, whose own threads use every core)."),
    trust_remote_code: bool = trust_remote_code_option(),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
) -> None:
    """Per-role statistics: records, lengths, tokens, loss share, duplicates, leaks, wrong targets."""
    from comapoi_cli.data.stats import compute_stats, dataset_files, plot_lengths

    registry = _registry()
    if files:
        selection: Any = [str(f) for f in files]
    elif dataset:
        selection = dataset_files(dataset, data_dir, registry)
    else:
        raise UsageError("Give files to describe, or --dataset NAME.")
    report = compute_stats(selection, role=type_ if type_ and type_ != "merged" else None, dataset=dataset,
                           max_poi_id=max_poi_id, tokenizer=tokenizer, seq_length=seq_length,
                           chars_per_token=chars_per_token, workers=workers, registry=registry, reporter=_reporter(),
                           trust_remote_code=trust_remote_code)
    if plot is not None:
        plot_lengths(report, plot)
    if as_json:
        data = report.to_dict()
        if plot is not None:
            data["plot"] = str(plot)
        print_json(data)
        return
    est = "" if report.tokenizer else " (est.)"
    names = list(report.roles)
    q = ("p50", "p90", "p99", "max")
    metrics: list[tuple[str, Any]] = [
        ("records", lambda s: s.records),
        ("chars p50/p90/p99/max", lambda s: "/".join(str(s.chars[k]) for k in q)),
        (f"tokens{est} p50/p90/p99/max", lambda s: "/".join(str(s.tokens[k]) for k in q)),
    ]
    if seq_length:
        metrics.append((f"over {seq_length} tokens", lambda s: f"{s.over_seq_length}" + (
            f" ({s.answer_lost} lose the whole answer)" if s.answer_lost else "")))
    metrics += [
        ("loss share (assistant-only)", lambda s: f"{100 * s.loss_share:.1f}%"),
        ("duplicates", lambda s: _flag(s.duplicates)),
        ("label leaks", lambda s: _flag(s.label_leaks)),
        ("wrong targets", lambda s: _flag(s.wrong_targets)),
        ("wrong answers", lambda s: _flag(s.wrong_answers)),
        ("distinct target POIs", lambda s: s.distinct_targets or "-"),
    ]
    rows = [[label] + [fn(report.roles[n]) for n in names] for label, fn in metrics]
    source = f"tokenizer {report.tokenizer} ({report.template})" if report.tokenizer else \
        f"tokens estimated at {report.chars_per_token} chars/token (pass --tokenizer for real counts)"
    console.print(table("Data statistics per role", [""] + names, rows, caption=source))
    for name, s in report.roles.items():
        hist = s.histogram
        if not hist.get("counts"):
            continue
        largest = max(hist["counts"])
        console.print(f"[bold]{escape(str(name))}[/bold] tokens{escape(str(est))} per record")
        edges = hist["edges"]
        for i, count in enumerate(hist["counts"]):
            marker = " [red]> seq-length[/red]" if seq_length and edges[i] >= seq_length else ""
            console.print(f"  {edges[i]:>6}-{edges[i + 1]:<6} {_bar(count, largest):<29} {count}{marker}")
    if report.unusable:
        warn("Unusable lines (the clean step rejects them): " + ", ".join(f"{n} {r}" for r, n in report.unusable.items()))
    if report.tokenizer and report.tokens_per_second:
        console.print(f"[dim]{sum(s.total_tokens for s in report.roles.values())} tokens in {report.seconds:.2f} s "
                      f"({report.tokens_per_second:,.0f} tokens/s, {report.workers} process(es))[/dim]")
    if plot is not None:
        success(f"Plot written to {plot}")


def _flag(n: int) -> str:
    return markup(f"[red]{n}[/red]") if n else "0"


# -- synth -------------------------------------------------------------------------------------
@app.command()
def synth(
    dataset: str = typer.Option("nyc", "--dataset", help="Dataset name: its folder, and its city preset (nyc, tky, ca) when simulating."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Folder that receives {dataset}/ (default: $COMAPOI_DATA_DIR or ./data)."),
    out_old: Optional[Path] = old_spelling("--out", "--data-dir"),
    source: Optional[Path] = typer.Option(None, "--source", help="Real next-POI trajectories (e.g. nyc_train.jsonl); without it a city is simulated."),
    poi_info: Optional[Path] = typer.Option(None, "--poi-info", help="With --source: a poi_id,category,lat,lon table that widens the candidate pool."),
    trajectories: Optional[int] = number_option(None, "--trajectories", "-n", whole=True, minimum=1, help="Training trajectories (simulated default 200; real: the first N)."),
    seed: int = number_option(42, "--seed", whole=True, help="Same seed and options = identical files."),
    preset: Optional[str] = typer.Option(None, "--preset", help="City to simulate for a dataset name without a preset (nyc, tky, ca)."),
    min_checkins: int = number_option(12, "--min-checkins", whole=True, minimum=1, help="Simulated: shortest trajectory."),
    max_checkins: int = number_option(36, "--max-checkins", whole=True, minimum=1, help="Simulated: longest trajectory."),
    plain: bool = typer.Option(True, "--plain/--no-plain", help="Simulated: also write {dataset}_train/_test.jsonl and {dataset}_poi_info.csv."),
    role: Optional[List[str]] = typer.Option(None, "--role", metavar="ROLE", help="Also write the data of this optional role (a plugin's, e.g. agent4); repeat or give a comma list.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
) -> None:
    """Generate CoMaPOI-format agent files from real trajectories or a simulated city (deterministic)."""
    from comapoi_cli.data.build import synthesise
    from comapoi_cli.plugins import get_registry

    out = one_of(output_dir, out_old, "--output-dir")
    also = [r.strip() for item in role or [] for r in item.split(",") if r.strip()]
    result = synthesise(dataset, out, source=source, trajectories=trajectories, seed=seed, preset=preset,
                           poi_info=poi_info, min_checkins=min_checkins, max_checkins=max_checkins, plain=plain,
                           reporter=_reporter(), registry=get_registry(), also_roles=also)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(table(f"synth {dataset}: {result.mode}, seed {seed}", ["file", "records"],
                        [(Path(f).name, n) for f, n in result.records.items()]))
    success(f"{result.trajectories} trajectories of {result.users} users -> {result.folder} "
            f"({result.bytes_written / 1e6:.1f} MB of agent records in {result.seconds:.2f} s)")
    if result.skipped_lines:
        warn(f"{result.skipped_lines} line(s) of {source} are not CoMaPOI trajectories and were skipped.")


# -- build -------------------------------------------------------------------------------------
_BUILD_EPILOG = (
    "Examples:\n\n"
    "  comapoi data build --dataset nyc --train data/nyc/nyc_train.jsonl --teacher template\n\n"
    "  comapoi data build --dataset nyc --train data/nyc/nyc_train.jsonl --teacher transformers --model DIR --limit 50\n\n"
    "  comapoi data build --dataset nyc --train data/nyc/nyc_train.jsonl --teacher openai --url http://localhost:8000/v1 "
    "--served-name teacher=Llama-3.1-8B-Instruct --pairs"
)


@app.command(epilog=_BUILD_EPILOG)
def build(
    dataset: str = typer.Option(..., "--dataset", help="nyc, tky or ca (the POI id range).", show_default=False),
    train: Path = typer.Option(..., "--train", help="Training trajectories in CoMaPOI's plain format ({ds}_train.jsonl).",
                               show_default=False),
    teacher: str = typer.Option("template", "--teacher", help="The engine that writes the answers: template (no model, "
                                "data synth's), transformers (--model DIR), openai (--url), or a plugin's."),
    model: Optional[str] = typer.Option(None, "--model", help="transformers teacher: the model folder.", show_default=False),
    url: Optional[str] = typer.Option(None, "--url", help="openai teacher: the server, e.g. http://localhost:8000/v1.",
                                      show_default=False),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="openai teacher: the key, if the "
                                          "server wants one.", show_default=False),
    served_name: Optional[List[str]] = typer.Option(None, "--served-name", metavar="teacher=NAME",
                                                    help="The teacher's served model name (openai; default 'teacher').",
                                                    show_default=False),
    poi_info: Optional[Path] = typer.Option(None, "--poi-info", help="POI table (poi_id,category,lat,lon). Default: "
                                            "{ds}_poi_info.csv beside --train, if there.", show_default=False),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Where the agent files go (default: the folder of --train).",
                                              show_default=False),
    label_rank: str = typer.Option("sampled", "--label-rank", help="Where the true id sits in the targets: first "
                                   "(CoMaPOI) or sampled (seeded, from P(r) ~ 1/r over 1..10, recorded in build.json)."),
    retries: int = number_option(2, "--retries", whole=True, minimum=0, help="Ask again this many times after a "
                                 "rejected answer, then write the trajectory to build.rejects.jsonl."),
    pairs: bool = typer.Option(False, "--pairs", help="Also write agent2/agent3 DPO pairs (prompt/chosen/rejected)."),
    limit: int = number_option(0, "--limit", whole=True, minimum=0, help="Only the first N trajectories (0 = all)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped build after its last written trajectory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over, replacing the folder's build."),
    seed: int = number_option(42, "--seed", whole=True, help="Seeds the label ranks, the template answers and the retrieval folds."),
    batch_size: int = number_option(8, "--batch-size", whole=True, minimum=1, help="Trajectories whose asks go to the "
                                    "teacher together (a local teacher's generation batch)."),
    concurrency: int = number_option(64, "--concurrency", whole=True, minimum=1, help="openai teacher: asks in flight "
                                     "at most, over all trajectories (each moves on as soon as its answer arrives)."),
    max_new_tokens: Optional[int] = number_option(None, "--max-new-tokens", whole=True, minimum=1,
                                                  help="Cap every ask's own limit (CoMaPOI: 512 for texts, 256 for lists)."),
    device: str = typer.Option("auto", "--device", help="transformers teacher: auto, cpu, cuda or cuda:N."),
    quant: str = typer.Option("auto", "--quant", help="transformers teacher: auto, 4bit, 8bit or none."),
    retriever: str = typer.Option("transitions", "--retriever", help="Where the 100 similar POIs come from (the chain's hook)."),
    trust_remote_code: bool = trust_remote_code_option(),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
) -> None:
    """Write the agents' training files with a teacher that sees the label (CoMaPOI's inverse pass, fixed).

    Student records hold exactly the inference prompts (no label); rejected answers are retried, then
    kept with their reason in build.rejects.jsonl. 'data synth' is the quick template-only version.
    """
    from comapoi_cli.data.build import BuildRequest, build_dataset

    if quant not in ("auto", "4bit", "8bit", "none"):
        raise UsageError(f"--quant must be auto, 4bit, 8bit or none, not '{quant}'.")
    names: dict[str, str] = {}
    for value in served_name or []:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip() or not rest.strip():
            raise UsageError(f"--served-name takes teacher=NAME, not '{value}'.")
        names[key.strip()] = rest.strip()
    request = BuildRequest(dataset=dataset.lower(), train=train, teacher=teacher, output_dir=output_dir, poi_info=poi_info,
                           model=model, url=url, api_key=api_key, served_names=names, device=device, quant=quant,
                           batch_size=batch_size, concurrency=concurrency, max_new_tokens=max_new_tokens,
                           retriever=retriever, label_rank=label_rank.lower(), retries=retries, pairs=pairs, limit=limit, resume=resume,
                           overwrite=overwrite, seed=seed, trust_remote_code=trust_remote_code)
    if as_json:
        from comapoi_cli.reporting import Reporter

        reporter: Any = Reporter()
    else:
        reporter = _reporter()
    try:
        result = build_dataset(request, _registry(), reporter)
    except KeyboardInterrupt:
        from comapoi_cli.errors import ComapoiError

        raise ComapoiError("Interrupted; every trajectory done so far is saved in build.samples.jsonl.",
                           hint="Continue with the same command and --resume.", exit_code=130) from None
    if as_json:
        print_json(result.to_dict())
        return
    console.print(table(f"build {dataset}: teacher {result.teacher}", ["file", "records"], list(result.files.items())))
    rate = (f" ({result.processed / result.teacher_seconds:.2f} samples/s, teacher pass)"
            if result.processed and result.teacher_seconds else "")
    success(f"{result.built} of {result.trajectories} trajectories built, {result.rejected} rejected"
            f" -> {result.output_dir}{rate}")
    for note in result.notes:
        warn(note)
# -- prepare -----------------------------------------------------------------------------------
#: The paper's users / POIs (CoMaPOI, Table 1), shown beside a prepared preset city.
_PAPER = {"nyc": (988, 5086), "tky": (2206, 7849), "ca": (1818, 13564)}


@app.command()
def prepare(
    raw: Optional[List[Path]] = typer.Argument(None, help="Raw check-in file(s) in the --from format."),
    fmt: Optional[str] = typer.Option(None, "--from", help="Format: tsmc2014, gowalla, getnext, comapoi (or a plugin's); --list-formats shows them."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Name of the result: {output-dir}/{NAME}/{NAME}_train.jsonl ...; a new name becomes a dataset other commands know."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Folder that receives {dataset}/ (default: $COMAPOI_DATA_DIR or ./data)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace prepared files that are already there."),
    min_user_checkins: int = number_option(10, "--min-user-checkins", whole=True, minimum=1, help="Drop users with fewer check-ins (repeated with the POI rule until stable)."),
    min_poi_checkins: int = number_option(10, "--min-poi-checkins", whole=True, minimum=1, help="Drop POIs with fewer check-ins."),
    session_gap_hours: Optional[float] = number_option(None, "--session-gap-hours", minimum=0, help="Cut a user's sessions at gaps over this many hours (default 24; 0: no cut; getnext: its trajectory_id unless given)."),
    split: str = typer.Option("80/10/10", "--split", help="Train/val/test shares of the check-ins, in time order."),
    keep_unseen: bool = typer.Option(False, "--keep-unseen", help="Keep val/test check-ins of users and POIs not seen in training."),
    window: int = number_option(30, "--window", whole=True, minimum=2, help="Check-ins per trajectory at most, the label included (CoMaPOI: 30)."),
    region: Optional[str] = typer.Option(None, "--region", help="Keep check-ins inside a named region: ca (California + Nevada)."),
    bbox: Optional[str] = typer.Option(None, "--bbox", help="Keep check-ins inside LAT_MIN,LAT_MAX,LON_MIN,LON_MAX."),
    utc_offset: Optional[int] = number_option(None, "--utc-offset", whole=True, minimum=-1440, help="Minutes added to UTC for formats without an offset column (gowalla; default 0)."),
    encoding: str = typer.Option("auto", "--encoding", help="auto (UTF-8, else Latin-1 for the whole file), utf-8 (bad lines rejected) or latin-1."),
    coord_decimals: Optional[int] = number_option(None, "--coord-decimals", whole=True, minimum=0, help="Round coordinates to this many decimals (default: as read)."),
    spots: Optional[Path] = typer.Option(None, "--spots", help="gowalla: spots CSV (id + spot_categories or category) for the POI categories."),
    keep_ids: Optional[bool] = typer.Option(None, "--keep-ids/--remap-ids", help="Keep the source's integer ids (default for comapoi) or map them to 0..N-1."),
    list_formats: bool = typer.Option(False, "--list-formats", help="List the registered formats and exit."),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
) -> None:
    """Turn public raw check-ins into CoMaPOI's trajectories: {NAME}_train/_val/_test.jsonl, {NAME}_poi_info.csv, prepare.json."""
    from comapoi_cli.data.checkins import PrepareSettings, checkin_readers, parse_bbox, parse_split, prepare_checkins

    registry = _registry()
    if list_formats:
        readers = checkin_readers(registry)
        if as_json:
            print_json([{"format": name, "description": r.description} for name, r in readers.items()])
            return
        console.print(table("Check-in formats (--from)", ["format", "what"], [(n, r.description) for n, r in readers.items()]))
        return
    if not fmt:
        raise UsageError("Say which format the files are in: --from tsmc2014|gowalla|getnext|comapoi.")
    if not dataset:
        raise UsageError("Name the result: --dataset NAME.")
    if not raw:
        raise UsageError("Give the raw check-in file(s) to prepare.")
    if region and bbox:
        raise UsageError("Give --region or --bbox, not both.")
    settings = PrepareSettings(fmt=fmt, min_user_checkins=min_user_checkins, min_poi_checkins=min_poi_checkins,
                               session_gap_hours=session_gap_hours, split=parse_split(split), keep_unseen=keep_unseen,
                               window=window, region=region.lower() if region else None,
                               bbox=parse_bbox(bbox) if bbox else None, utc_offset=utc_offset, encoding=encoding.lower(),
                               coord_decimals=coord_decimals, spots=spots, keep_ids=keep_ids)
    result = prepare_checkins(raw, dataset, settings, registry=registry, output_dir=output_dir, overwrite=overwrite,
                              reporter=_reporter())
    if as_json:
        print_json(result.to_dict())
        return
    record = result.record
    rows = []
    for step in record["steps"]:
        shown = {k: v for k, v in step.items() if k not in ("step", "rule", "boxes", "rejected_by_reason")}
        rows.append((step["step"], ", ".join(f"{k} {v}" for k, v in shown.items())))
    console.print(table(f"prepare {dataset} from {record['format']}", ["step", "counts"], rows))
    paper = _PAPER.get(dataset.lower())
    split_rows = [(name, s["users"], s["pois"], s["checkins"], s["trajectories"]) for name, s in record["summary"].items()]
    if paper:
        split_rows.append(("paper (test)", paper[0], paper[1], "", paper[0]))
    console.print(table("Result", ["split", "users", "POIs", "check-ins", "trajectories"], split_rows))
    read = record["steps"][0]
    if result.rejected:
        warn(f"{result.rejected} raw line(s) could not be read ("
             + ", ".join(f"{r} {n}" for r, n in read["rejected_by_reason"].items()) + f"): {result.files['rejects']}")
    for note in result.notes:
        warn(note)
    if result.registered:
        console.print(f"New dataset '{dataset}' recorded in {result.registered}: train, eval and pipeline accept --dataset {dataset}.",
                      markup=False, soft_wrap=True)
    success(f"Prepared {result.folder} ({record['id_maps']['users']} users, {record['id_maps']['pois']} POIs)")
