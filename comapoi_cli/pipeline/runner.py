"""``comapoi pipeline run``: the trained agents chained as CoMaPOI chains them, on test trajectories.

Each role of the chain (in the order the roles declare: ``chain_position`` / ``chain_after``)
runs each of its steps: the role builds its prompts (``build_inference_prompt``, the builders
``data synth`` uses for the training records), the engine answers them with the role's adapter,
the role parses the answers (``parse_chain_output``) for the roles downstream. The scheduler
(:mod:`comapoi_cli.pipeline.scheduler`) drives the engine: a server (``openai``) gets each
trajectory's next step as soon as its previous answer arrives, ``--concurrency`` requests in
flight; the local ``transformers`` engine runs each step on fixed slices of ``--batch-size``
trajectories. Lines are appended to ``predictions.jsonl`` in test-file order, in whole lines,
fsync'ed, so a killed run loses at most the lines in flight and ``--resume`` continues it to
the same file (timings aside); a line deleted from the file is run again and put back in its
place.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comapoi_cli.chain import ChainContext, chain_order  # chain_order: re-exported
from comapoi_cli.data.chain_inputs import ChainInputs, load_inputs
from comapoi_cli.data.layout import plain_file_name
from comapoi_cli.engines import EngineSpec
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import (
    append_journal,
    loads,
    now_iso,
    read_journal,
    read_recorded_settings,
    sha256_file,
    write_json_atomic,
    write_jsonl,
)
from comapoi_cli.models.http import redact_url
from comapoi_cli.pipeline import checks
from comapoi_cli.pipeline.scheduler import ChainPlan, frequent_pois, run_concurrent, run_lockstep  # noqa: F401
from comapoi_cli.pipeline.scoring import read_predictions, score_lines
from comapoi_cli.presets import require_preset
from comapoi_cli.reporting import Reporter
from comapoi_cli.retrievers import RetrievalIndex
from comapoi_cli.roles import MERGED
from comapoi_cli.runs.layout import LOCK_FILE

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry

PREDICTIONS = "predictions.jsonl"
REJECTS = "rejects.jsonl"
RECORD = "pipeline.json"
#: requests in flight for a concurrent engine (a server) unless --concurrency says otherwise
DEFAULT_CONCURRENCY = 64
SCHEDULERS = ("auto", "concurrent", "lockstep")
#: settings a resumed run may change: the server's address (a restarted server; the served names are checked)
RESUME_MAY_CHANGE = frozenset({"url"})


@dataclass
class PipelineRequest:
    dataset: str
    test: Path
    runs: dict[str, Path]                       # role id -> run folder (one folder may serve several roles)
    poi_info: Path | None = None                # default: {test folder}/{dataset}_poi_info.csv
    train: Path | None = None                   # default: {test folder}/{dataset}_train.jsonl
    out: Path | None = None                     # default: output/pipeline/{dataset}
    engine: str = "transformers"
    retriever: str = "transitions"
    url: str | None = None
    api_key: str | None = None
    served_names: dict[str, str] = field(default_factory=dict)  # role id -> served model name (openai)
    model: str | None = None
    device: str = "auto"
    quant: str = "auto"
    dtype: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    limit: int = 0
    resume: bool = False
    overwrite: bool = False
    top_k: int = 10
    compat: str = "none"
    trust_remote_code: bool = False
    allow_train_overlap: bool = False          # score test trajectories that were training data (said loudly)
    concurrency: int | None = None              # requests in flight (concurrent engines); default 64
    request_timeout: float = 600.0              # openai: seconds for one whole answer
    retries: int = 3                            # openai: attempts after the first (connection errors, 429, 5xx)
    scheduler: str = "auto"                     # auto, concurrent or lockstep (benchmarks compare them)


@dataclass
class PipelineResult:
    out: Path
    predictions: Path
    rejects: Path
    record: Path
    scores: dict[str, Any]
    done_before: int
    processed: int
    seconds: float
    engine: str
    notes: list[str] = field(default_factory=list)


def _resolve_runs(request: PipelineRequest) -> tuple[dict[str, Any], str, Any]:
    from comapoi_cli.models.resolve import resolve_base_model
    from comapoi_cli.runs.info import locate_run

    runs: dict[str, Any] = {}
    bases: dict[str, str] = {}
    for role_id, folder in request.runs.items():
        run = locate_run(folder)
        if run.type not in (None, MERGED, role_id):
            raise UsageError(f"The run {folder} was trained as {run.type}, not {role_id} (or merged).")
        runs[role_id] = run
        base = resolve_base_model(request.model, run)
        bases[role_id] = str(Path(base).resolve()) if Path(base).exists() else base
    distinct = sorted(set(bases.values()))
    if len(distinct) > 1:
        detail = "; ".join(f"{role} on {base}" for role, base in bases.items())
        raise UsageError(f"The runs do not share their base model ({detail}): the chain loads one base model for every agent.")
    first = next(iter(runs.values()))
    return runs, distinct[0], first


def _adapters(request: PipelineRequest, runs: dict[str, Any]) -> tuple[dict[str, Path], dict[str, str]]:
    """One adapter per distinct run folder (a merged run serving every role is loaded once)."""
    adapters: dict[str, Path] = {}
    role_adapters: dict[str, str] = {}
    by_path: dict[Path, str] = {}
    for role_id, run in runs.items():
        path = Path(run.adapter_dir).resolve()
        if request.engine == "openai" or role_id in request.served_names:
            name = request.served_names.get(role_id, role_id)
            adapters.setdefault(name, path)
        else:  # a merged run is named "merged", not after the first role it serves
            if path not in by_path:
                by_path[path] = MERGED if run.type == MERGED and MERGED not in adapters else role_id
            name = by_path[path]
            adapters[name] = path
        role_adapters[role_id] = name
    return adapters, role_adapters


def _sha(path: Path) -> str:
    return sha256_file(path)


def _settings(request: PipelineRequest, chain: list[Any], adapters: dict[str, Path], base: str, test: Path,
              train: Path, poi: Path) -> dict[str, Any]:
    return {
        "dataset": request.dataset,
        "test": str(test.resolve()), "test_sha256": _sha(test),
        "train": str(train.resolve()), "train_sha256": _sha(train),
        "poi_info": str(poi.resolve()), "poi_info_sha256": _sha(poi),
        "chain": [f"{role.id}.{step}" for role in chain for step in role.chain_steps()],
        "runs": {rid: str(Path(p).resolve()) for rid, p in request.runs.items()},
        "adapters": {name: str(path) for name, path in adapters.items()},
        "adapter_sha256": checks.adapter_digests(adapters),
        "base_model": base,
        "engine": request.engine,
        "url": redact_url(request.url),
        "retriever": request.retriever,
        "batch_size": request.batch_size,
        "max_new_tokens": request.max_new_tokens,
        "top_k": request.top_k,
    }


def run_pipeline(request: PipelineRequest, registry: Registry, reporter: Reporter) -> PipelineResult:
    """Run the chain on the test trajectories and score it (see the module doc).

    SIGTERM stops it like Ctrl-C (``KeyboardInterrupt``): every line written (a whole batch, or a finished trajectory on a server) is kept for ``--resume``;
    the output folder is locked while it runs.
    """
    from comapoi_cli.data.blocks import sigterm_as_interrupt

    with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        return _run_pipeline(request, registry, reporter, stack)


def _check_inputs(request: PipelineRequest, runs: dict[str, Any], out: Path, test: Path, train: Path, poi: Path) -> None:
    """The checks before anything is read or written (docs/pipeline.md, "Checks before scoring")."""
    checks.check_run_datasets(request.dataset, runs)
    checks.check_runs_not_locked(runs)
    checks.check_output_dir(out)
    outputs = [out / PREDICTIONS, out / REJECTS, out / RECORD, out / LOCK_FILE]
    checks.check_outputs_not_inputs(outputs, {"--test": test, "--train": train, "--poi-info": poi})


def _lock_output(out: Path, stack: contextlib.ExitStack, reporter: Reporter) -> None:
    """One writer per output folder, like run folders (``runs.lock``): a second run is refused, naming the first."""
    from comapoi_cli.runs.lock import hold_lock

    stack.enter_context(hold_lock(out / LOCK_FILE, f"The output folder {out}", on_stale=reporter.info))


def _check_overlap(request: PipelineRequest, inputs: ChainInputs, runs: dict[str, Any], train: Path,
                   notes: list[str], reporter: Reporter) -> dict[str, Any] | None:
    """Refuse test trajectories that were training data (``--train`` or an agent's), unless allowed: then say it."""
    found, overlap_notes = checks.train_overlap(inputs.items, inputs.train_keys, runs, train)
    notes.extend(overlap_notes)
    if not found:
        return None
    detail = checks.describe_overlap(found, len(inputs.items))
    if not request.allow_train_overlap:
        raise DataError(f"Test trajectories were training data ({detail}), so their scores would not be held out; "
                        "use training data without the test trajectories, or pass --allow-train-overlap to score them anyway.")
    reporter.warn(f"--allow-train-overlap: {detail}; these scores are NOT held-out scores.")
    return {"allowed": True, "test_trajectories": len(inputs.items),
            "sources": {source: {"count": len(keys), "keys": keys} for source, keys in found.items()},
            "warning": f"{detail}: these scores are not held-out scores (--allow-train-overlap)"}


def _check_resume_adapters(previous: dict[str, Any], settings: dict[str, Any], notes: list[str]) -> None:
    """A ``--resume`` continues with the adapters it started with: a retrained run is refused, naming it."""
    recorded = previous.get("adapter_sha256")
    if not isinstance(recorded, dict):
        notes.append("the run started before adapter digests were recorded: not checked that the adapters are the same")
        previous["adapter_sha256"] = settings["adapter_sha256"]
        return
    changed = [name for name, digest in settings["adapter_sha256"].items() if recorded.get(name) != digest]
    if changed:
        detail = "; ".join(f"{name} ({settings['adapters'].get(name)}): sha256 {settings['adapter_sha256'][name][:12]} now, "
                           f"{str(recorded.get(name))[:12]} when the run started" for name in changed)
        raise UsageError(f"--resume: the adapter weights changed since this run started ({detail}): the predictions "
                         "would mix two adapters; start over with --overwrite, or restore the adapter.")


def _run_pipeline(request: PipelineRequest, registry: Registry, reporter: Reporter, stack: contextlib.ExitStack) -> PipelineResult:
    started = time.monotonic()
    preset = require_preset(request.dataset, "the chain")
    if request.compat not in ("none", "comapoi"):
        raise UsageError(f"--compat must be none or comapoi, not '{request.compat}'.")
    if request.scheduler not in SCHEDULERS:
        raise UsageError(f"--scheduler must be {', '.join(SCHEDULERS)}, not '{request.scheduler}'.")
    if not request.runs:
        raise UsageError("Name the trained runs: --ROLE RUN for each agent (e.g. --agent1 RUN1), or --merged RUN.")
    chain = chain_order(registry, list(request.runs))
    engine = registry.engine(request.engine)
    retriever = registry.retriever(request.retriever)
    test = Path(request.test)
    folder = test.parent
    poi = Path(request.poi_info) if request.poi_info else folder / f"{request.dataset}_poi_info.csv"
    train = Path(request.train) if request.train else folder / plain_file_name(request.dataset, "train")
    runs, base, first_run = _resolve_runs(request)
    adapters, role_adapters = _adapters(request, runs)
    out = Path(request.out) if request.out else Path("output") / "pipeline" / request.dataset
    _check_inputs(request, runs, out, test, train, poi)
    inputs: ChainInputs = load_inputs(request.dataset, preset.max_poi_id, preset.coord_decimals, test, poi, train,
                                      max_user=preset.users - 1)
    notes: list[str] = []
    overlap = _check_overlap(request, inputs, runs, train, notes, reporter)
    checks.make_output_dir(out)
    _lock_output(out, stack, reporter)
    predictions, rejects, record_path = out / PREDICTIONS, out / REJECTS, out / RECORD
    settings = _settings(request, chain, adapters, base, test, train, poi)

    done_rows: list[dict[str, Any]] = []
    if predictions.exists() and predictions.stat().st_size and not request.overwrite:
        if not request.resume:
            raise UsageError(f"{predictions} already holds predictions; continue them with --resume, or start over with --overwrite.")
        previous = read_recorded_settings(record_path)
        _check_resume_adapters(previous, settings, notes)
        changed = [key for key in settings if key not in RESUME_MAY_CHANGE and previous.get(key) != settings[key]]
        if changed:
            raise UsageError(f"--resume: {out} was started with other settings ({', '.join(changed)}); "
                             "use the same ones, another --out, or --overwrite.")
        done_rows = read_journal(predictions)
    elif predictions.exists():
        predictions.unlink()
    write_jsonl(rejects, (rejected.to_dict() for rejected in inputs.rejected))
    if inputs.rejected:
        notes.append(f"{len(inputs.rejected)} test line{'s' if len(inputs.rejected) != 1 else ''} rejected, with reasons, in {rejects}")
    if inputs.train_skipped:
        notes.append(f"{inputs.train_skipped} training line{'s' if inputs.train_skipped != 1 else ''} are not trajectories (skipped)")
    if inputs.poi_bad_rows:
        shown = "; ".join(f"line {r.line}: {r.reason}" for r in inputs.poi_rejected[:3])
        notes.append(f"{inputs.poi_bad_rows} row{'s' if inputs.poi_bad_rows != 1 else ''} of {poi} are not POIs (skipped: "
                     f"{shown}{'; ...' if inputs.poi_bad_rows > 3 else ''}; all in {RECORD})")
    for note in notes:
        reporter.info(note)
    record: dict[str, Any] = {"settings": settings, "started": now_iso()}
    if inputs.poi_rejected:
        record["poi_rejected"] = [r.to_dict() for r in inputs.poi_rejected]
    if overlap:
        record["train_overlap"] = overlap
    write_json_atomic(record_path, record)

    items = inputs.items[: request.limit] if request.limit else inputs.items
    if not items:
        raise DataError(f"No test trajectory to run in {test} ({len(inputs.rejected)} rejected, see {rejects}).")
    done = {row.get("key") for row in done_rows}
    context = ChainContext(dataset=request.dataset, max_poi_id=preset.max_poi_id, world=inputs.world, top_k=request.top_k)
    retriever.prepare(RetrievalIndex(world=inputs.world, train=inputs.train, histories=inputs.histories,
                                     max_poi_id=preset.max_poi_id))
    todo_batches = []
    for start in range(0, len(items), request.batch_size):
        batch = [item for item in items[start:start + request.batch_size] if item.key not in done]
        if batch:
            todo_batches.append((start // request.batch_size, batch))
    already = sum(1 for item in items if item.key in done)
    todo = [item for item in items if item.key not in done]
    processed = 0
    engine_description = ""
    if todo_batches:
        spec = EngineSpec(base_model=base, adapters=adapters, role_adapters=role_adapters,
                          tokenizer=_tokenizer_dir(first_run, base), device=request.device, quant=request.quant,
                          dtype=request.dtype, run_quant=first_run.quant, batch_size=request.batch_size,
                          trust_remote_code=request.trust_remote_code, url=request.url, api_key=request.api_key,
                          timeout_s=request.request_timeout, retries=request.retries,
                          concurrency=request.concurrency or DEFAULT_CONCURRENCY,
                          extra={"run_dtype": first_run.dtype})
        session = engine.open(spec, reporter)
        engine_description = session.description
        concurrent = _concurrent(request, session)
        how = (f"{request.concurrency or DEFAULT_CONCURRENCY} requests in flight" if concurrent
               else f"batches of {request.batch_size}")
        reporter.info(f"chain {' -> '.join(settings['chain'])} on {len(items)} trajectories "
                      f"({already} done before), {how}{' with ' + engine_description if engine_description else ''}")
        reporter.progress_start(len(items), already, description="chain", unit="trajectories")
        plan = ChainPlan(chain=chain, role_adapters=role_adapters, context=context, labels=inputs.labels,
                         retriever=retriever, max_new_tokens=request.max_new_tokens)
        loop_started = time.monotonic()
        counted = [0]

        def emit(lines: list[dict[str, Any]]) -> None:
            append_journal(predictions, lines)
            counted[0] += len(lines)

        def progress(done_now: int, answers: int, in_flight: int) -> None:
            elapsed = time.monotonic() - loop_started
            rate = counted[0] / elapsed if elapsed > 0 and counted[0] else None
            remaining = len(items) - already - counted[0]
            reporter.progress_update(already + counted[0], rate=rate, eta_s=(remaining / rate) if rate else None,
                                     in_flight=in_flight, answers_per_s=(answers / elapsed) if elapsed > 0 else None)

        try:
            if concurrent:
                run_concurrent(todo, plan, session, concurrency=request.concurrency or DEFAULT_CONCURRENCY,
                               emit=emit, progress=progress)
            else:
                run_lockstep(todo_batches, plan, session, emit=emit, progress=progress)
        finally:
            processed = counted[0]
            reporter.progress_stop()
            session.close()
    _in_test_order(predictions, [item.key for item in inputs.items])
    rows = read_predictions(predictions)
    scores = score_lines(rows, top_k=request.top_k, compat=request.compat,
                         retrieval_roles=[r.id for r in chain if r.uses_retrieved])
    if overlap:
        scores["train_overlap"] = overlap
    seconds = time.monotonic() - started
    record.update({"finished": now_iso(), "engine": engine_description or None,
                   "trajectories": len(rows), "rejected": len(inputs.rejected), "scores": scores,
                   "seconds_this_run": round(seconds, 3), "processed_this_run": processed})
    write_json_atomic(record_path, record)
    return PipelineResult(out=out, predictions=predictions, rejects=rejects, record=record_path, scores=scores,
                          done_before=already, processed=processed, seconds=seconds, engine=engine_description, notes=notes)


def _concurrent(request: PipelineRequest, session: Any) -> bool:
    if request.scheduler == "concurrent" and not session.concurrent:
        raise UsageError(f"The {request.engine} engine answers batches only: --scheduler concurrent needs a server engine.")
    return bool(session.concurrent) and request.scheduler != "lockstep"


def _in_test_order(path: Path, keys: list[str]) -> None:
    """Put the lines of ``path`` back in test-file order (a line deleted and run again on --resume lands last)."""
    if not path.exists():
        return
    lines = [line for line in path.read_bytes().splitlines(keepends=True) if line.strip()]
    place = {key: index for index, key in enumerate(keys)}

    def where(line: bytes) -> int:
        try:
            key = loads(line).get("key")
        except (ValueError, AttributeError):
            return len(place)
        return place.get(key, len(place)) if isinstance(key, str) else len(place)

    positions = [where(line) for line in lines]
    if positions == sorted(positions):
        return
    from comapoi_cli.fileio import atomic_writer

    order = sorted(range(len(lines)), key=lambda i: (positions[i], i))
    with atomic_writer(path, "wb") as handle:
        for i in order:
            handle.write(lines[i])


def _tokenizer_dir(run: Any, base: str) -> str:
    from comapoi_cli.models.loading import tokenizer_folder

    return str(tokenizer_folder(run, base))


def score_file(path: Path, *, top_k: int = 10, compat: str = "none", max_poi_id: int | None = None,
               registry: Registry) -> dict[str, Any]:
    """``comapoi pipeline score FILE``: the scores of a predictions file, as the run computed them."""
    if compat not in ("none", "comapoi"):
        raise UsageError(f"--compat must be none or comapoi, not '{compat}'.")
    return score_lines(read_predictions(Path(path)), top_k=top_k, compat=compat, max_poi_id=max_poi_id,
                       retrieval_roles=[r.id for r in registry.roles.values() if r.uses_retrieved])
