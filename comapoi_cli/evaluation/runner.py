"""``comapoi eval --adapter RUN_DIR``: generate answers for held-out records and score them.

The steps, each a function so that tests and plugins can reuse them:

1. :func:`locate_run` reads the run folder (``run.json``: base model, role, dataset, holdout).
2. :func:`resolve_data` picks the held-out file: ``--data``, ``--dataset/--type`` (prepared by
   the data services), or the holdout the run recorded.
3. :func:`load_eval_records` reads it and finds each record's label with its role's ``target()``.
4. The engine generates (the ``register_engines`` hook, as ``pipeline run``): ``transformers``
   loads the resolved base model (``resolve_base_model``) with the adapter (PEFT, never running
   a model folder's own code unless asked) and decodes greedily in left-padded batches;
   ``openai`` asks an OpenAI-compatible server that serves the adapter (``--url``,
   ``--served-name``), ``--concurrency`` requests in flight
   (:func:`comapoi_cli.models.answering.answer_all`). A prompt longer than the model's
   context, or a server's failure, is a miss with its reason (never truncated).
5. Each output is parsed and scored (``comapoi_cli.evaluation.scoring``); predictions.jsonl,
   metrics.json and metrics.csv are written atomically beside the adapter, and the result is
   appended to run.json's ``evaluations``.

Only the model steps import torch / transformers / peft, inside the functions. Services never
print: what the runner has to say goes to the ``Reporter`` it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.evaluation.outputs import metrics_csv
from comapoi_cli.evaluation.predictions import iter_jsonl
from comapoi_cli.evaluation.scoring import LabelError, Scorer, role_origin, summarize
from comapoi_cli.fileio import now_iso, sha256_file, write_json_atomic, write_jsonl, write_text_atomic
from comapoi_cli.metrics import RecordOutcome
from comapoi_cli.models.generation import prompt_hash, record_messages
from comapoi_cli.models.loading import plan_device, tokenizer_folder
from comapoi_cli.models.resolve import resolve_base_model
from comapoi_cli.reporting import Reporter
from comapoi_cli.roles import MERGED, RoleContext
from comapoi_cli.runs.info import RunInfo, locate_run  # noqa: F401  (importable from here too)
from comapoi_cli.runs.layout import ADAPTER_CONFIG, RUN_JSON  # noqa: F401
from comapoi_cli.runs.record import append_evaluation

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
MAX_AUTO_NEW_TOKENS = 512
ADAPTER = "adapter"  #: the name the evaluated adapter is loaded under

@dataclass
class EvalRequest:
    """What ``comapoi eval`` was asked to do (the CLI's options)."""

    adapter: Path
    data: Path | None = None
    dataset: str | None = None
    type: str | None = None
    data_dir: Path | None = None
    num_samples: int = 0
    model: str | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    quant: str = "auto"
    device: str = "auto"
    output_dir: Path | None = None
    trust_remote_code: bool = False
    #: score held-out records that were in the run's training data (by conversation key), with a warning
    allow_train_overlap: bool = False
    #: the engine that generates (``transformers`` local, ``openai`` a server, or a plugin's)
    engine: str = "transformers"
    url: str | None = None
    api_key: str | None = None
    #: openai: the adapter's served model name (default: the run's type, e.g. agent3)
    served_name: str | None = None
    concurrency: int | None = None
    request_timeout: float = 600.0
    retries: int = 3


@dataclass
class DataChoice:
    """The held-out file, and (for a merged run's holdout) the one role whose records count."""

    path: Path
    only_role: str | None = None
    note: str | None = None


def resolve_data(request: EvalRequest, run: RunInfo, type_: str | None, dataset: str | None, registry: Registry) -> DataChoice:
    """The held-out file to evaluate on.

    ``--data`` wins; else the run's own holdout (for a merged run asked for one role, only that
    role's records of it: the role's separately split holdout may overlap the merged training
    data); else ``--dataset``/``--type`` (or the run's) prepared by the data services.
    """
    if request.data is not None:
        if not request.data.is_file():
            raise DataError(f"Data file {request.data} does not exist." if not request.data.exists()
                            else f"{request.data} is not a file.")
        return DataChoice(request.data)
    holdout = run.holdout
    same_dataset = request.dataset is None or (run.dataset or "").lower() == request.dataset.lower()
    if holdout is not None and same_dataset and (type_ is None or type_ == run.type or run.type == MERGED):
        if not holdout.is_file():
            raise DataError(f"The run's holdout {holdout} no longer exists.",
                            hint="Pass --data FILE, or --dataset and --type to prepare it again.")
        if run.type == MERGED and type_ not in (None, MERGED):
            return DataChoice(holdout, only_role=type_,
                              note=f"evaluating the {type_} records of the merged run's holdout {holdout.name}")
        return DataChoice(holdout)
    if dataset is not None and type_ is not None:
        return DataChoice(_prepared_holdout(request, run, type_, dataset, registry))
    raise UsageError("The run records no holdout; say what to evaluate on with --data FILE or --dataset NAME --type TYPE.")


def _prepared_holdout(request: EvalRequest, run: RunInfo, type_: str, dataset: str, registry: Registry) -> Path:
    """The ``*_100.jsonl`` holdout of ``dataset``/``type_``, prepared (cleaned, split) if needed.

    The data is prepared as the run's training prepared it: its recorded seed, test size and data
    policies (``--on``, ``--strict``; defaults as ``comapoi train``), so that the holdout is the one
    the adapter never saw, cleaned the same way.
    """
    from comapoi_cli.data import parse_policy_options, prepare_training_data

    kwargs: dict[str, Any] = {"type_": type_, "dataset": dataset}
    if request.data_dir is not None:
        kwargs["data_dir"] = request.data_dir
    elif run.data_dir is not None:
        kwargs["data_dir"] = run.data_dir
    for name in ("seed", "test_size", "strict"):
        value = run.job_value(name)
        if value is not None:
            kwargs[name] = value
    on = run.job_value("on")
    if on:
        kwargs["policies"] = parse_policy_options(on if isinstance(on, list) else [str(on)])
    prepared = prepare_training_data(registry=registry, rejects_tag="train", **kwargs)
    if prepared.holdout_path is None or not Path(prepared.holdout_path).is_file():
        raise DataError(f"Preparing {dataset}/{type_} produced no holdout file.",
                        hint="Pass a held-out file with --data FILE.")
    return Path(prepared.holdout_path)


# -- records ---------------------------------------------------------------------------------------------

@dataclass
class EvalRecord:
    line: int
    id: Any
    role: str
    prompt: list[dict[str, str]]
    label: Any
    prompt_sha256: str
    answer: str | None = None  #: the reference answer (what the holdout check's trajectory key needs)


@dataclass
class LoadedRecords:
    records: list[EvalRecord]
    scorers: dict[str, Scorer]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    total: int = 0


def _messages(record: Any) -> list[dict[str, str]] | None:
    return record_messages(record)


def load_eval_records(path: Path, type_: str | None, dataset: str | None, registry: Registry,
                      num_samples: int = 0, only_role: str | None = None) -> LoadedRecords:
    """Read held-out records, pick each record's role, and compute its label.

    ``type_`` is the run's type: a role id scores every record as that role; ``merged`` (or
    None) takes each record's ``agent`` field, and a record without one is scored as a plain
    next-POI record (CoMaPOI's parser, the answer's first id as label). Records that cannot be
    scored (no prompt, no label for their role) are counted in ``skipped`` by reason.
    ``only_role`` keeps only the records whose ``agent`` field names it (a merged holdout).
    """
    context = RoleContext(dataset=dataset)
    scorers: dict[str, Scorer] = {}

    def scorer_for(role_id: str | None) -> Scorer:
        key = role_id or ""
        if key not in scorers:
            scorers[key] = Scorer(registry.roles[role_id] if role_id else None, context,
                                  origin=role_origin(registry, role_id))
        return scorers[key]

    fixed = only_role or (type_ if type_ and type_ != MERGED else None)
    if fixed is not None:
        registry.role(fixed)
    loaded = LoadedRecords(records=[], scorers={})
    skipped: dict[str, int] = {}
    ids: list[Any] = []
    for number, value, problem in iter_jsonl(path):
        if num_samples and loaded.total >= num_samples:
            break
        if only_role is not None and problem is None and (not isinstance(value, dict) or value.get("agent") != only_role):
            continue
        loaded.total += 1
        if problem is not None:
            _count(skipped, f"unreadable line ({problem.split(' (')[0]})")
            continue
        messages = _messages(value)
        if not messages:
            _count(skipped, "no messages list")
            continue
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        prompt = messages[:last_assistant] if last_assistant is not None else messages
        if not any(m["role"] == "user" for m in prompt):
            _count(skipped, "no user turn before the answer")
            continue
        role_id = fixed
        if role_id is None:
            agent = value.get("agent") if isinstance(value, dict) else None
            role_id = agent if isinstance(agent, str) and agent in registry.roles else None
        scorer = scorer_for(role_id)
        try:
            label = scorer.target({**value, "messages": messages})
        except LabelError as exc:
            _count(skipped, f"{scorer.name}: {exc}")
            continue
        record_id = value.get("id") if isinstance(value, dict) else None
        ids.append(record_id)
        loaded.records.append(EvalRecord(line=number, id=record_id, role=scorer.name, prompt=prompt, label=label,
                                         prompt_sha256=prompt_hash(prompt),
                                         answer=messages[last_assistant]["content"] if last_assistant is not None else None))
    # the records' own ids when every record has a distinct one, else the line numbers
    usable = all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids) and len(set(map(str, ids))) == len(ids)
    for record in loaded.records:
        if not usable:
            record.id = record.line
    loaded.scorers = {s.name: s for s in scorers.values()}
    loaded.skipped = skipped
    return loaded


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


# -- the model (comapoi_cli.models) ----------------------------------------------------------------------


def auto_max_new_tokens(tokenizer: Any, path: Path, lines: Iterable[int]) -> int:
    """1.5 x the longest reference answer (in tokens) among ``lines`` of ``path``, plus 16, at most 512."""
    wanted = set(lines)
    longest = 0
    for number, value, problem in iter_jsonl(path):
        if number not in wanted or problem is not None:
            continue
        messages = _messages(value) or []
        answer = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
        if answer:
            longest = max(longest, len(tokenizer(answer, add_special_tokens=False)["input_ids"]))
    return min(MAX_AUTO_NEW_TOKENS, int(longest * 1.5) + 16)


# -- the whole command ----------------------------------------------------------------------------------

@dataclass
class EvalResult:
    entry: dict[str, Any]
    written: list[Path]
    notes: list[str]


def evaluate_adapter(request: EvalRequest, registry: Registry, reporter: Reporter | None = None) -> EvalResult:
    """Run ``comapoi eval --adapter``: generate, parse, score, write; returns the evaluation entry.

    ``registry``: the plugin registry (its roles parse and label the records). ``reporter``: where
    the loading note and the generation progress go (default: nowhere).
    """
    say = reporter if reporter is not None else Reporter()
    run = locate_run(request.adapter)
    check_run_not_written(run)
    type_ = request.type or run.type
    if type_ is not None and type_ != MERGED:
        registry.role(type_)
    dataset = request.dataset or run.dataset
    base_model = resolve_base_model(request.model, run)  # before the data: a wrong --model is one sentence at once
    choice = resolve_data(request, run, type_, dataset, registry)
    data_path = choice.path
    loaded = load_eval_records(data_path, type_, dataset, registry, num_samples=request.num_samples,
                               only_role=choice.only_role)
    notes = [choice.note] if choice.note else []
    notes += [f"skipped {count} record{'s' if count != 1 else ''}: {reason}" for reason, count in loaded.skipped.items()]
    if not loaded.records:
        raise DataError(f"Nothing to evaluate in {data_path}: none of its {loaded.total} records has a label "
                        f"for {type_ or 'its role'}.",
                        hint="; ".join([*notes, "docs/evaluation.md says what each role is scored against"]))
    from comapoi_cli.runs.datakeys import check_holdout

    data_sha = sha256_file(data_path)
    holdout_check = check_holdout(run, data_path, data_sha, [r.prompt for r in loaded.records],
                                  allow_train_overlap=request.allow_train_overlap, explicit=request.data is not None,
                                  roles=[_role_id(loaded, r) for r in loaded.records],
                                  answers=[r.answer for r in loaded.records])
    notes += holdout_check.notes
    if holdout_check.overlap:
        notes.append(f"{len(holdout_check.overlap)} of the {len(loaded.records)} records scored were in this "
                     "adapter's training data (--allow-train-overlap): their scores are NOT held-out scores")
    session, served = _open_engine(request, run, type_, base_model, registry, say)
    try:
        tokenizer = _tokenizer(session, run, base_model, request) if not request.max_new_tokens else None
        max_new_tokens = request.max_new_tokens or auto_max_new_tokens(
            tokenizer, data_path, (r.line for r in loaded.records))
        records = loaded.records
        answers = _answer(session, served, records, max_new_tokens, request, say)
    finally:
        session.close()
    misses: dict[str, int] = {}
    for answer in answers:
        if answer.problem:
            _count(misses, answer.problem.split(" (attempt")[0])
    if misses and sum(misses.values()) == len(records) and all("exceeds the model's context" in m for m in misses):
        raise DataError(f"Every prompt in {data_path} is longer than the model's context (+ {max_new_tokens} new tokens).")
    notes += [f"{count} record{'s' if count != 1 else ''} got no answer, scored as misses: {reason}"
              for reason, count in misses.items()]
    outputs = [answer.text or "" for answer in answers]

    rows: list[dict[str, Any]] = []
    scored: list[tuple[str, RecordOutcome]] = []
    for record, output, answer in zip(records, outputs, answers):
        scorer = loaded.scorers[record.role]
        parsed = scorer.parse_output(output)
        item = scorer.outcome(record.label, parsed.predictions)
        scored.append((record.role, item))
        row: dict[str, Any] = {"id": record.id, "role": scorer.role.id if scorer.role is not None else None,
                               "dataset": dataset,
                               "prompt_sha256": record.prompt_sha256, "label": record.label, "output": output}
        if scorer.scores_ids:
            row["predicted_poi_ids"] = parsed.predictions
        row["rank"] = item.rank
        if parsed.problem and parsed.predictions is None:
            row["parse_error"] = parsed.problem
        if answer.problem:
            row["problem"] = answer.problem
        if answer.attempts > 1:
            row["retries"] = answer.attempts - 1
        rows.append(row)
    metrics, by_role = summarize(scored)

    out_dir = request.output_dir or run.adapter_dir
    check_run_not_written(run)  # again: a training may have started while this one generated
    predictions_path = out_dir / PREDICTIONS_FILE
    write_jsonl(predictions_path, rows)
    entry: dict[str, Any] = {
        "data": str(data_path.resolve()),
        "data_sha256": data_sha,
        "train_overlap": len(holdout_check.overlap) if holdout_check.checked else None,
        "metrics": metrics,
        "time": now_iso(),
        "role": type_,
        "dataset": dataset,
        "adapter": str(run.adapter_dir.resolve()),
        "base_model": base_model,
        "predictions": str(predictions_path.resolve()),
        "records": loaded.total,
        "skipped": loaded.total - len(records),
        "no_answer": sum(misses.values()),
        "generation": {"greedy": True, "engine": request.engine, "batch_size": request.batch_size,
                       "max_new_tokens": max_new_tokens, **_engine_facts(session, request, served)},
    }
    if by_role:
        entry["by_role"] = by_role
    if request.num_samples:
        entry["num_samples"] = request.num_samples
    write_json_atomic(out_dir / METRICS_JSON, entry)
    write_text_atomic(out_dir / METRICS_CSV, metrics_csv(metrics, by_role))
    written = [predictions_path, out_dir / METRICS_JSON, out_dir / METRICS_CSV]
    if run.run_json is not None and not run.is_checkpoint:
        append_evaluation(run.run_json, entry)
        written.append(run.run_json)
    elif run.is_checkpoint:
        notes.append(f"{run.adapter_dir.name} is a checkpoint: its metrics are beside it, not in the run's run.json")
    else:
        notes.append(f"{run.run_dir} has no run.json: the metrics are in {METRICS_JSON} only")
    return EvalResult(entry=entry, written=written, notes=notes)


def check_run_not_written(run: RunInfo) -> None:
    """Refuse a run folder whose lock a live process holds (``train --resume`` writing it), naming that process."""
    from comapoi_cli.runs.lock import check_not_locked

    check_not_locked(run.run_dir)


def _role_id(loaded: LoadedRecords, record: EvalRecord) -> str | None:
    """The role id a record is scored as (None: a plain next-POI record)."""
    role = loaded.scorers[record.role].role
    return role.id if role is not None else None


def _open_engine(request: EvalRequest, run: RunInfo, type_: str | None, base_model: str, registry: Registry,
                 say: Reporter) -> tuple[Any, str]:
    """The engine session that answers, and the adapter's name there (``adapter`` locally, the served name on a server)."""
    from comapoi_cli.engines import EngineSpec
    from comapoi_cli.models.http import redact_url

    engine = registry.engine(request.engine)
    if request.engine == "transformers":
        served = ADAPTER
    else:
        served = request.served_name or (type_ if type_ else ADAPTER)
    device, quant = plan_device(request.device, request.quant, run.quant) if request.engine == "transformers" \
        else (request.device, request.quant)
    if request.engine == "transformers":
        say.info(f"loading {base_model} ({device}, quantisation {quant}) with the adapter {run.adapter_dir}")
    else:
        say.info(f"{request.engine} engine: {redact_url(request.url) or '(no --url)'} serving {served}")
    spec = EngineSpec(base_model=base_model, adapters={served: run.adapter_dir}, role_adapters={type_ or ADAPTER: served},
                      tokenizer=str(tokenizer_folder(run, base_model)), device=device, quant=quant, run_quant=run.quant,
                      batch_size=request.batch_size, trust_remote_code=request.trust_remote_code, url=request.url,
                      api_key=request.api_key, timeout_s=request.request_timeout, retries=request.retries,
                      concurrency=request.concurrency or 64, extra={"run_dtype": run.dtype})
    return engine.open(spec, say), served


def _tokenizer(session: Any, run: RunInfo, base_model: str, request: EvalRequest) -> Any:
    """The tokenizer that counts the reference answers' tokens (the engine's own when it has one)."""
    loaded = getattr(session, "loaded", None)
    if loaded is not None and getattr(loaded, "tokenizer", None) is not None:
        return loaded.tokenizer
    from comapoi_cli.models.loading import load_tokenizer

    return load_tokenizer(tokenizer_folder(run, base_model), trust_remote_code=request.trust_remote_code)


def _answer(session: Any, served: str, records: list[EvalRecord], max_new_tokens: int, request: EvalRequest,
            say: Reporter) -> list[Any]:
    from comapoi_cli.models.answering import answer_all

    say.progress_start(len(records), description="generating", unit="records")
    try:
        return answer_all(session, served, [r.prompt for r in records], max_new_tokens, batch_size=request.batch_size,
                          concurrency=request.concurrency or 64,
                          on_done=lambda done, in_flight: say.progress_update(done, in_flight=in_flight))
    finally:
        say.progress_stop()


def _engine_facts(session: Any, request: EvalRequest, served: str) -> dict[str, Any]:
    from comapoi_cli.models.http import redact_url

    loaded = getattr(session, "loaded", None)
    if loaded is not None:
        return {"quant": loaded.quant, "dtype": loaded.dtype, "device": loaded.device}
    return {"url": redact_url(request.url), "served_name": served, "description": session.description}
