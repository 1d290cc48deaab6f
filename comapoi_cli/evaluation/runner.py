"""``comapoi eval --adapter RUN_DIR``: generate answers for held-out records and score them.

The steps, each a function so that tests and plugins can reuse them:

1. :func:`locate_run` reads the run folder (``run.json``: base model, role, dataset, holdout).
2. :func:`resolve_data` picks the held-out file: ``--data``, ``--dataset/--type`` (prepared by
   the data services), or the holdout the run recorded.
3. :func:`load_eval_records` reads it and finds each record's label with its role's ``target()``.
4. ``comapoi_cli.models`` resolves the base model (``resolve_base_model``), loads it with the
   adapter (``load_model``: PEFT, never running a model folder's own code unless asked), renders
   each prompt with the tokenizer's chat template (``render_prompts``) and decodes greedily in
   left-padded batches, longest prompts first (``generate``), reporting progress to the caller's
   ``Reporter``.
5. Each output is parsed and scored (``comapoi_cli.evaluation.scoring``); predictions.jsonl,
   metrics.json and metrics.csv are written atomically beside the adapter, and the result is
   appended to run.json's ``evaluations``.

Only the model steps import torch / transformers / peft, inside the functions. Services never
print: what the runner has to say goes to the ``Reporter`` it is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.evaluation.outputs import metrics_csv
from comapoi_cli.evaluation.predictions import iter_jsonl
from comapoi_cli.evaluation.scoring import LabelError, Scorer, role_origin, summarize
from comapoi_cli.fileio import atomic_writer, now_iso, sha256_file, write_json_atomic, write_text_atomic
from comapoi_cli.metrics import RecordOutcome
from comapoi_cli.models.generation import generate, prompt_hash, record_messages, render_prompts
from comapoi_cli.models.loading import load_model, plan_device, tokenizer_folder
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
    device, quant = plan_device(request.device, request.quant, run.quant)
    say.info(f"loading {base_model} ({device}, quantisation {quant}) with the adapter {run.adapter_dir}")
    model = load_model(base_model, adapters={ADAPTER: run.adapter_dir}, quant=quant, device=device,
                       recorded_dtype=run.dtype, tokenizer=tokenizer_folder(run, base_model),
                       trust_remote_code=request.trust_remote_code)
    token_ids = render_prompts(model.tokenizer, [r.prompt for r in loaded.records])
    max_new_tokens = request.max_new_tokens or auto_max_new_tokens(
        model.tokenizer, data_path, (r.line for r in loaded.records))
    records, token_ids = _drop_over_context(loaded.records, token_ids, max_new_tokens, model.max_context, notes)
    if not records:
        raise DataError(f"Every prompt in {data_path} is longer than the model's context ({model.max_context} tokens).")
    outputs = generate(model, token_ids, batch_size=request.batch_size, max_new_tokens=max_new_tokens,
                       reporter=say, description="generating", unit="records")

    rows: list[dict[str, Any]] = []
    scored: list[tuple[str, RecordOutcome]] = []
    for record, output in zip(records, outputs):
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
        rows.append(row)
    metrics, by_role = summarize(scored)

    out_dir = request.output_dir or run.adapter_dir
    check_run_not_written(run)  # again: a training may have started while this one generated
    predictions_path = out_dir / PREDICTIONS_FILE
    with atomic_writer(predictions_path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
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
        "generation": {"greedy": True, "batch_size": request.batch_size, "max_new_tokens": max_new_tokens,
                       "quant": model.quant, "dtype": model.dtype, "device": model.device},
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


def _drop_over_context(records: list[EvalRecord], token_ids: list[list[int]], max_new_tokens: int,
                       max_context: int | None, notes: list[str]) -> tuple[list[EvalRecord], list[list[int]]]:
    if not max_context:
        return records, token_ids
    keep = [i for i, ids in enumerate(token_ids) if len(ids) + max_new_tokens <= max_context]
    dropped = len(records) - len(keep)
    if dropped:
        notes.append(f"skipped {dropped} record{'s' if dropped != 1 else ''}: prompt + {max_new_tokens} new tokens "
                     f"exceed the model's context of {max_context} tokens (never truncated)")
    return [records[i] for i in keep], [token_ids[i] for i in keep]
