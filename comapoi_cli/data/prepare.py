"""``prepare_training_data``: the original's "check and process" step, done right.

With ``dataset`` + ``type_`` it resolves ``{data_dir}/{dataset}/agentN_train_samples.jsonl``
(or, for ``merged``, every registered role's file), cleans, splits with a seed, and writes the
original's output names. Outputs are reused only while the inputs' content hashes, the options
and the outputs themselves are unchanged: a ``*.prepared.json`` file beside the outputs records
them. With ``data_path`` (an explicit training file) it cleans that file and, by default, does
not split it: the user chose the training data, so nothing is held out of it silently
(``split=True`` holds out ``test_size`` records as with a dataset).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from comapoi_cli import __version__
from comapoi_cli.data.clean import clean_file, default_rejects_path
from comapoi_cli.data.layout import MERGED_CLEAN_STEM, MERGED_FILE, dataset_dir, missing_input, split_names, stem_of
from comapoi_cli.data.merge import check_weight, merge_files, merge_record_path, role_counts, weight_file
from comapoi_cli.data.policies import resolve_policies
from comapoi_cli.data.records import RecordChecker
from comapoi_cli.data.split import current_split, split_by_membership, split_file, split_record_path
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import fs_error, read_json, remove_stale_temps, sha256_file, temp_prefix, write_json_atomic
from comapoi_cli.reporting import SILENT, Reporter
from comapoi_cli.roles import MERGED

#: Bump when the clean/split rules change in a way that changes outputs: old caches are rebuilt.
RULES_VERSION = 2
#: The prepared-data cache (for an input in a read-only folder) lives in ``$COMAPOI_CACHE/prepared``
#: (default ``~/.cache/comapoi``, or ``$XDG_CACHE_HOME/comapoi``), like the tiny models.
CACHE_ENV = "COMAPOI_CACHE"
#: The holdout never takes more than this share of a small file (the demo's 50-trajectory files).
HOLDOUT_CAP_FRACTION = 0.2


@dataclass
class PreparedData:
    train_path: Path
    holdout_path: Path | None
    input_hashes: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)


def _writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".comapoi-probe."):
            return True
    except OSError:
        return False


def _cache_dir_for(path: Path) -> Path:
    import hashlib

    cache = os.environ.get(CACHE_ENV)
    base = (Path(cache).expanduser() if cache else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comapoi") / "prepared"
    return base / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def _reusable(meta_path: Path, expected: dict[str, Any], outputs: list[Path]) -> tuple[dict[str, Any] | None, str]:
    """The recorded preparation when its outputs can be reused, else None; and why not."""
    if not meta_path.is_file():
        return None, "no earlier preparation"
    missing = [p.name for p in outputs if not p.is_file()]
    if missing:
        return None, f"{missing[0]} is missing"
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):
        return None, f"{meta_path.name} cannot be read"
    if meta.get("input_hashes") != expected["input_hashes"]:
        return None, "the input files changed"
    old, new = meta.get("options") or {}, expected["options"]
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        return None, "the options changed (" + "; ".join(f"{k} {_show(old.get(k))} -> {_show(new[k])}"
                                                       for k in changed[:3]) + ")"
    recorded = meta.get("output_hashes") or {}
    for path in outputs:
        if recorded.get(path.name) != sha256_file(path):
            return None, f"{path.name} was changed since (e.g. by data split)"
    return meta, "reused"


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


@dataclass(frozen=True)
class PrepareRequest:
    """What the caller asked for: :func:`prepare_training_data`'s arguments, checked (``request`` step)."""

    type_: str
    registry: Any
    dataset: str | None
    data_dir: Path | str | None
    data_path: Path | str | None
    seed: int
    test_size: int | float
    do_split: bool
    table: dict[str, str]  #: the resolved ``--on CHECK=POLICY`` table
    tokenizer: str | os.PathLike[str] | None
    seq_length: int | None
    max_poi_id: int | None
    force: bool
    workers: int | None
    out_dir: Path | str | None
    weights: dict[str, float]  #: ``weights`` as passed (the ``inputs`` step may take a data merge's instead)
    rejects_tag: str | None
    reporter: Reporter
    trust_remote_code: bool


@dataclass
class ResolvedInputs:
    """``resolve_inputs``: the files to clean (role id -> file), where the outputs go, and their names."""

    inputs: dict[str, Path]
    folder: Path
    stem: str
    split_input: Path  #: the file a user's ``data split`` would have split (its ``.split.json`` is beside it)
    train_path: Path
    holdout_path: Path | None
    meta_path: Path
    input_hashes: dict[str, str]

    @property
    def outputs(self) -> list[Path]:
        return [self.train_path] + ([self.holdout_path] if self.holdout_path else [])


@dataclass
class EarlierSteps:
    """``earlier_steps``: what the user's own ``data merge`` / ``data split`` of these files decide."""

    weights: dict[str, float]  #: the training side's weights (passed, or the current data merge's)
    merged_by_user: bool  #: the merged file is a current ``data merge`` of exactly these inputs
    merge_note: str | None
    user_split: dict[str, Any] | None  #: the current ``data split`` of the input, if any
    split_why: str  #: why the earlier split is (not) used


@dataclass
class ReuseCheck:
    """``reuse_check``: the options the outputs depend on, and the outputs reused (``prepared``) or why not."""

    expected: dict[str, Any]  #: ``{"input_hashes": ..., "options": ...}`` as the ``.prepared.json`` records them
    why: str  #: why the outputs are rebuilt (or "reused")
    prepared: PreparedData | None = None  #: the earlier outputs, when they can be reused


@dataclass
class CleanStep:
    """``clean``: every input cleaned into a temporary file beside the outputs, and what cleaning found."""

    cleaned: dict[str, Path]
    lines_in: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    over_length: dict[str, int] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)  #: per input file: its clean summary
    rejects_files: list[str] = field(default_factory=list)


@dataclass
class MergeStep:
    """``merge``: the one file to split (the merged file for ``merged``, else the cleaned input)."""

    to_split: Path
    merged: dict[str, Any] | None = None  #: the merge summary (``merged`` only)


@dataclass
class SplitStep:
    """``split``: the records on each side and how the split was made."""

    train: int
    holdout: int
    train_file: Path  #: where the training side is: the training file, or the file ``weight_step`` weights
    split: dict[str, Any] | None = None  #: how it was split (None: not split)
    notes: list[str] = field(default_factory=list)


@dataclass
class WeightStep:
    """``weight``: the training file's records once weighted (and per role, for ``merged``)."""

    train: int
    train_unweighted: int | None = None
    weights: dict[str, float] | None = None
    train_roles: dict[str, int] | None = None
    notes: list[str] = field(default_factory=list)


def _prepare_training_data(
    *,
    type_: str,
    registry,
    dataset: str | None = None,
    data_dir: Path | str | None = None,
    data_path: Path | str | None = None,
    seed: int = 42,
    test_size: int | float = 100,
    split: bool | None = None,
    policies: Mapping[str, str] | None = None,
    strict: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_length: int | None = None,
    max_poi_id: int | None = None,
    force: bool = False,
    workers: int | None = None,
    out_dir: Path | str | None = None,
    weights: Mapping[str, float] | None = None,
    rejects_tag: str | None = None,
    reporter: Reporter = SILENT,
    trust_remote_code: bool = False,
) -> PreparedData:
    """Clean (and split) the training data of ``type_`` (a role id, or ``merged``).

    ``policies`` / ``strict`` are ``data clean``'s (``--on CHECK=POLICY``, ``--strict``).
    ``tokenizer`` + ``seq_length`` apply the ``too_long`` check (default: drop records that do
    not fit). ``force`` rebuilds even when the recorded hashes match.

    ``merged`` with ``weights`` (or, without them, the weights of a current ``data merge``
    of the same role files, read from its ``.merge.json``): records are deduplicated and split
    first, then the training side only is weighted (the holdout keeps one copy of each record).
    A current ``data split`` of the input (its ``.split.json``, e.g. ``--group-by user``) is
    used: its holdout's records form the holdout after cleaning.
    ``rejects_tag``: rejects files are named ``{stem}.{tag}.rejects.jsonl`` (``train`` passes
    ``"train"``, so that it never overwrites what ``data clean`` wrote).
    ``reporter`` hears what was done: reused or rebuilt and why, kept / rejected by reason per
    file, the rejects files, records per role, progress of large cleans.

    The steps, each with its typed result: :func:`check_request` (``PrepareRequest``),
    :func:`resolve_inputs` (``ResolvedInputs``), :func:`earlier_steps` (``EarlierSteps``),
    :func:`reuse_check` (``ReuseCheck``), then :func:`clean_inputs` (``CleanStep``),
    :func:`merge_step` (``MergeStep``), :func:`split_step` (``SplitStep``), :func:`weight_step`
    (``WeightStep``), and :func:`record_prepared` writes the ``.prepared.json``.

    Raises:
        DataError: a missing file (with how to create it), or nothing left after cleaning.
        UsageError: an unknown type, or neither ``dataset`` nor ``data_path``.
    """
    request = check_request(
        type_=type_, registry=registry, dataset=dataset, data_dir=data_dir, data_path=data_path, seed=seed,
        test_size=test_size, split=split, policies=policies, strict=strict, tokenizer=tokenizer,
        seq_length=seq_length, max_poi_id=max_poi_id, force=force, workers=workers, out_dir=out_dir,
        weights=weights, rejects_tag=rejects_tag, reporter=reporter, trust_remote_code=trust_remote_code)
    resolved = resolve_inputs(request)
    earlier = earlier_steps(request, resolved)
    reuse = reuse_check(request, resolved, earlier)
    if reuse.prepared is not None:
        return reuse.prepared
    reporter.info(f"Preparing {resolved.train_path.name}"
                  + (f" and {resolved.holdout_path.name}" if resolved.holdout_path else "")
                  + f" (cleaning, {'splitting' if request.do_split else 'no split'}): {reuse.why}.")
    temporaries: list[Path] = []
    try:
        cleaned = clean_inputs(request, resolved, temporaries)
        merged = merge_step(request, resolved, earlier, cleaned, temporaries)
        split_result = split_step(request, resolved, earlier, merged, cleaned, temporaries)
        weighted = weight_step(request, resolved, earlier, split_result)
    except OSError as exc:
        raise fs_error(exc, resolved.folder) from None
    finally:
        for tmp in temporaries:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    summary = _summary(request, resolved, reuse, cleaned, merged, split_result, weighted)
    record_prepared(resolved, reuse, summary)
    _report_summary(summary, reporter)
    return PreparedData(resolved.train_path, resolved.holdout_path, resolved.input_hashes, summary)


def check_request(*, type_: str, registry: Any, dataset: str | None, data_dir: Path | str | None,
                  data_path: Path | str | None, seed: int, test_size: int | float, split: bool | None,
                  policies: Mapping[str, str] | None, strict: bool, tokenizer: str | os.PathLike[str] | None,
                  seq_length: int | None, max_poi_id: int | None, force: bool, workers: int | None,
                  out_dir: Path | str | None, weights: Mapping[str, float] | None, rejects_tag: str | None,
                  reporter: Reporter, trust_remote_code: bool) -> PrepareRequest:
    """The arguments checked (an unknown type, a negative ``--max-poi-id``, a bad weight: one sentence)."""
    if type_ != MERGED:
        registry.role(type_)  # unknown type: UsageError listing the registered ones
    if max_poi_id is not None and max_poi_id < 0:
        raise UsageError(f"--max-poi-id must be 0 or more, got {max_poi_id}.")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be 1 or more, got {workers}.")
    table = resolve_policies(policies, strict=strict)
    checked = dict(weights or {})
    for role_id, weight in checked.items():
        check_weight(role_id, weight)
    return PrepareRequest(
        type_=type_, registry=registry, dataset=dataset, data_dir=data_dir, data_path=data_path, seed=seed,
        test_size=test_size, do_split=split if split is not None else data_path is None, table=table,
        tokenizer=tokenizer, seq_length=seq_length, max_poi_id=max_poi_id, force=force, workers=workers,
        out_dir=out_dir, weights=checked, rejects_tag=rejects_tag, reporter=reporter,
        trust_remote_code=trust_remote_code)


def resolve_inputs(request: PrepareRequest) -> ResolvedInputs:
    """The input files (an explicit ``data_path``, the role's file, or every role's file for ``merged``),
    the output folder (beside the inputs, ``out_dir``, or the cache for a read-only folder) and names."""
    type_, registry, dataset, data_dir = request.type_, request.registry, request.dataset, request.data_dir
    if request.data_path is not None:
        source = Path(request.data_path)
        if not source.is_file():
            raise missing_input(source)
        inputs = {type_ if type_ != MERGED else "data": source}
        folder = Path(request.out_dir) if request.out_dir is not None else source.parent
        if not _writable_dir(folder):
            folder = _cache_dir_for(source)
            folder.mkdir(parents=True, exist_ok=True)
        stem = stem_of(source)
        split_input = source
    elif dataset:
        folder = Path(request.out_dir) if request.out_dir is not None else dataset_dir(dataset, data_dir)
        source_folder = dataset_dir(dataset, data_dir)
        if type_ == MERGED:
            inputs = {}
            for role_id, role in registry.roles.items():
                path = source_folder / role.data_file_name()
                if path.is_file():
                    inputs[role_id] = path
            if not inputs:
                expected = ", ".join(r.data_file_name() for r in registry.roles.values())
                raise DataError(f"Cannot find any agent training file ({expected}) in {source_folder}.",
                                hint=f"Create them with: comapoi data synth --dataset {dataset} --output-dir {source_folder.parent}")
            stem = MERGED_CLEAN_STEM
            split_input = source_folder / MERGED_FILE
        else:
            role = registry.role(type_)
            path = source_folder / role.data_file_name()
            if not path.is_file():
                raise missing_input(path, dataset=dataset, role=type_)
            inputs = {type_: path}
            stem = stem_of(path)
            split_input = path
        if not _writable_dir(folder):
            raise DataError(f"Cannot write the prepared files into {folder}.",
                            hint="Make the folder writable, or pass an explicit output folder.")
    else:
        raise UsageError("Say which data to prepare: --dataset NAME (with --data-dir) or --data_path FILE.")
    train_name, holdout_name = split_names(stem) if request.do_split else (f"{stem}_clean.jsonl", None)
    return ResolvedInputs(inputs=inputs, folder=folder, stem=stem, split_input=split_input,
                          train_path=folder / train_name, holdout_path=folder / holdout_name if holdout_name else None,
                          meta_path=folder / f"{stem}.prepared.json",
                          input_hashes={str(p): sha256_file(p) for p in inputs.values()})


def earlier_steps(request: PrepareRequest, resolved: ResolvedInputs) -> EarlierSteps:
    """A current ``data merge`` of exactly these files (its weights apply to the training side) and a
    current ``data split`` of the input (its holdout is held out), as their record files say."""
    weights = request.weights
    merge_note = None
    merged_by_user = False
    if request.type_ == MERGED and request.data_path is None and not weights:
        merge_meta = _current_merge(resolved.split_input, resolved.inputs, resolved.input_hashes)
        if merge_meta is not None:
            merged_by_user = True
            weights = {k: float(v) for k, v in (merge_meta.get("weights") or {}).items() if float(v) != 1.0}
            if weights:
                merge_note = (f"weights of data merge ({', '.join(f'{k}={v:g}' for k, v in weights.items())}) "
                              f"applied to the training side")
    derived: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        derived = dict(read_json(resolved.meta_path).get("output_hashes") or {}) if resolved.meta_path.is_file() else {}
    user_split, split_why = current_split(resolved.split_input, derived) if request.do_split else (None, "")
    if user_split is not None and request.type_ == MERGED and not merged_by_user:
        user_split, split_why = None, f"{resolved.split_input.name} is not the data merge of these files"
    return EarlierSteps(weights=weights, merged_by_user=merged_by_user, merge_note=merge_note,
                        user_split=user_split, split_why=split_why)


def reuse_check(request: PrepareRequest, resolved: ResolvedInputs, earlier: EarlierSteps) -> ReuseCheck:
    """The earlier outputs, when the ``.prepared.json`` beside them records the same input hashes and
    options and they are unchanged since; else why they are rebuilt (``force``: always)."""
    options = {"type": request.type_, "seed": request.seed, "test_size": request.test_size if request.do_split else None,
               "policies": request.table, "tokenizer": str(request.tokenizer) if request.tokenizer else None,
               "seq_length": request.seq_length, "max_poi_id": request.max_poi_id, "dataset": request.dataset,
               "rules_version": RULES_VERSION, "holdout_cap_fraction": HOLDOUT_CAP_FRACTION,
               "weights": earlier.weights or None,
               "split_from": earlier.user_split.get("holdout_sha256") if earlier.user_split else None}
    # rejects_tag is not an option of the outputs: train reuses what data clean --dataset prepared
    # (and the reverse), and its summary names the rejects files of the run that wrote them
    expected = {"input_hashes": resolved.input_hashes, "options": options}
    if request.force:
        return ReuseCheck(expected, "--force")
    meta, why = _reusable(resolved.meta_path, expected, resolved.outputs)
    if meta is None:
        return ReuseCheck(expected, why)
    summary: dict[str, Any] = dict(meta.get("summary") or {})
    summary["reused"] = True
    reporter, train_path, holdout_path = request.reporter, resolved.train_path, resolved.holdout_path
    reporter.info(f"Prepared data unchanged (same input hashes and options): reusing {train_path}"
                  + (f" and {holdout_path}" if holdout_path else "") + ".")
    _report_summary(summary, reporter)
    return ReuseCheck(expected, why, PreparedData(train_path, holdout_path, resolved.input_hashes, summary))


def _scratch(folder: Path, name: str, temporaries: list[Path]) -> Path:
    """A new temporary file beside the outputs (removed when preparation ends, whatever happens)."""
    remove_stale_temps(folder / name)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(name), suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    temporaries.append(tmp)
    return tmp


def clean_inputs(request: PrepareRequest, resolved: ResolvedInputs, temporaries: list[Path]) -> CleanStep:
    """Clean each input into a temporary file (rejects beside it, with its own line numbers).

    Raises:
        DataError: no record survived cleaning (the reasons, the rejects files, what would keep them).
    """
    step = CleanStep(cleaned={})
    folder = resolved.folder
    for key, path in resolved.inputs.items():
        role_arg = key if key in request.registry.roles else None
        tmp = _scratch(folder, f"{stem_of(path)}.clean", temporaries)
        rejects = _rejects_path(folder / path.name, request.rejects_tag)
        result = clean_file(path, tmp, rejects, role=role_arg, dataset=request.dataset, max_poi_id=request.max_poi_id,
                            policies=request.table, tokenizer=request.tokenizer, seq_length=request.seq_length,
                            workers=request.workers, registry=request.registry, reporter=request.reporter,
                            require_records=False, trust_remote_code=request.trust_remote_code)
        step.cleaned[key] = tmp
        file_summary = result.to_dict()
        for noisy in ("policies", "output", "input"):  # the table is in the summary; the output was temporary
            file_summary.pop(noisy, None)
        step.files[str(path)] = file_summary
        step.rejects_files.append(str(rejects))
        step.lines_in += result.lines_in
        step.kept += result.kept
        for group in ("rejected", "warnings", "over_length"):
            counts = getattr(step, group)
            for name, n in getattr(result, group).items():
                counts[name] = counts.get(name, 0) + n
    if step.kept == 0:
        reasons = ", ".join(f"{n} {name}" for name, n in step.rejected.items()) or "the input is empty"
        hint = f"See the rejects file(s): {', '.join(step.rejects_files)}."
        if "label_leak" in step.rejected:
            hint += " To train on leaking prompts anyway: --on label_leak=warn (the model learns to copy a label it never sees at inference)."
        if "too_long" in step.rejected:
            hint += " Records longer than --seq-length were dropped: raise --seq-length."
        raise DataError(f"No training record survived cleaning ({reasons}).", hint=hint)
    return step


def merge_step(request: PrepareRequest, resolved: ResolvedInputs, earlier: EarlierSteps, cleaned: CleanStep,
               temporaries: list[Path]) -> MergeStep:
    """``merged`` (of a dataset): the cleaned role files merged, deduplicated; else the one cleaned file."""
    if request.type_ != MERGED or request.data_path is not None:
        return MergeStep(to_split=next(iter(cleaned.cleaned.values())))
    folder = resolved.folder
    if earlier.merged_by_user:  # the user's (weighted) data merge output stays as it is
        merged = folder / f"{temp_prefix(MERGED_CLEAN_STEM)}merged.tmp"
        temporaries.append(merged)
    else:
        merged = folder / MERGED_FILE
    merge_summary = merge_files(cleaned.cleaned, merged, seed=request.seed, record=False).to_dict()
    merge_summary["inputs"] = {key: str(resolved.inputs[key]) for key in cleaned.cleaned}  # cleaned from these
    return MergeStep(to_split=merged, merged=merge_summary)


def split_step(request: PrepareRequest, resolved: ResolvedInputs, earlier: EarlierSteps, merged: MergeStep,
               cleaned: CleanStep, temporaries: list[Path]) -> SplitStep:
    """The holdout: the user's ``data split`` (its holdout's records), a new seeded split, or none.

    With weights the training side is written to a temporary file, which ``weight_step`` weights."""
    holdout_path, user_split = resolved.holdout_path, earlier.user_split
    split_train = _unweighted_path(resolved, earlier, temporaries)
    assert holdout_path is not None or not request.do_split  # a split always has a holdout file
    if request.do_split and user_split is not None and holdout_path is not None:
        checker = RecordChecker(roles=request.registry.roles)
        n_train, n_hold = split_by_membership(merged.to_split, split_train, holdout_path, user_split["holdout_path"],
                                              lambda raw: _line_key(checker, raw))
        step = SplitStep(n_train, n_hold, split_train, {"from": str(split_record_path(resolved.split_input)),
                                           "group_by": user_split.get("group_by"), "seed": user_split.get("seed"),
                                           "train": n_train, "holdout": n_hold})
        step.notes.append(
            f"using the split made by data split{' --group-by ' + user_split['group_by'] if user_split.get('group_by') else ''} "
            f"(seed {user_split.get('seed')}): its holdout's records are held out")
        if n_hold == 0:
            raise DataError(f"No record of the data split holdout {user_split['holdout_path']} survived cleaning.",
                            hint="Split again, or train on the whole file with --data_path.")
        return step
    if request.do_split:
        notes = []
        if earlier.split_why not in ("", "no split made by data split"):
            notes.append(f"the earlier data split is not used: {earlier.split_why}; a new split is made")
        result = split_file(merged.to_split, split_train, holdout_path, test_size=request.test_size, seed=request.seed,
                            registry=request.registry, cap_fraction=HOLDOUT_CAP_FRACTION, record=False)
        return SplitStep(result.train, result.holdout, split_train, result.to_dict(), [*notes, *result.notes])
    os.replace(merged.to_split, split_train)
    return SplitStep(cleaned.kept, 0, split_train)


def _unweighted_path(resolved: ResolvedInputs, earlier: EarlierSteps, temporaries: list[Path]) -> Path:
    """Where the split writes the training side: the training file, or (to be weighted) a temporary one."""
    if not earlier.weights:
        return resolved.train_path
    unweighted = resolved.folder / f"{temp_prefix(resolved.train_path.name)}unweighted.tmp"
    temporaries.append(unweighted)
    return unweighted


def weight_step(request: PrepareRequest, resolved: ResolvedInputs, earlier: EarlierSteps, split: SplitStep) -> WeightStep:
    """The training side with each role's records repeated by its weight (the holdout keeps one copy);
    for ``merged``, the training records per role."""
    if earlier.weights:
        counts = weight_file(split.train_file, resolved.train_path, earlier.weights, seed=request.seed)
        return WeightStep(sum(counts.values()), train_unweighted=split.train, weights=earlier.weights, train_roles=counts,
                          notes=[earlier.merge_note] if earlier.merge_note else [])
    if request.type_ == MERGED:
        return WeightStep(split.train, train_roles=role_counts(resolved.train_path))
    return WeightStep(split.train)


def _summary(request: PrepareRequest, resolved: ResolvedInputs, reuse: ReuseCheck, cleaned: CleanStep,
             merged: MergeStep, split: SplitStep, weighted: WeightStep) -> dict[str, Any]:
    """The steps' results as the summary ``.prepared.json`` records and ``PreparedData.summary`` holds
    (``describe_prepared`` says it in sentences)."""
    summary: dict[str, Any] = {
        "in": cleaned.lines_in, "kept": cleaned.kept, "rejected": cleaned.rejected, "warnings": cleaned.warnings,
        "reused": False, "rejects_files": cleaned.rejects_files, "files": cleaned.files, "notes": [],
        "over_length": cleaned.over_length, "policies": request.table, "rebuilt_because": reuse.why,
        "rejects_file": cleaned.rejects_files[0] if len(cleaned.rejects_files) == 1 else None,
    }
    if merged.merged is not None:
        summary["merged"] = merged.merged
    if split.split is not None:
        summary["split"] = split.split
    summary["train"], summary["holdout"] = split.train, split.holdout
    summary["notes"].extend(split.notes)
    if weighted.train_unweighted is not None:
        summary["train_unweighted"] = weighted.train_unweighted
    summary["train"] = weighted.train
    if weighted.weights is not None:
        summary["weights"] = weighted.weights
    if weighted.train_roles is not None:
        summary["train_roles"] = weighted.train_roles
    summary["notes"].extend(weighted.notes)
    summary["train_path"] = str(resolved.train_path)
    summary["holdout_path"] = str(resolved.holdout_path) if resolved.holdout_path else None
    return summary


def record_prepared(resolved: ResolvedInputs, reuse: ReuseCheck, summary: dict[str, Any]) -> None:
    """The ``.prepared.json`` beside the outputs: what they were made from, their hashes, the summary."""
    write_json_atomic(resolved.meta_path, {
        "comapoi_version": __version__,
        **reuse.expected,
        "output_hashes": {p.name: sha256_file(p) for p in resolved.outputs},
        "summary": summary,
    })


def _rejects_path(target: Path, tag: str | None) -> Path:
    plain = default_rejects_path(target)
    if not tag:
        return plain
    return plain.with_name(plain.name[: -len(".rejects.jsonl")] + f".{tag}.rejects.jsonl")


def _line_key(checker: RecordChecker, raw: bytes):
    """The conversation key of a raw line (as the duplicate check computes it), or None."""
    from comapoi_cli.data.records import Reject, conversation_key

    try:
        record, _changed = checker.read_record(raw, {}, [])
    except Reject:
        return None
    return conversation_key(record["messages"])


def _current_merge(merged: Path, inputs: Mapping[str, Path], input_hashes: Mapping[str, str]) -> dict[str, Any] | None:
    """The record of a ``data merge`` that wrote ``merged`` from exactly these files as they are now."""
    record_path = merge_record_path(merged)
    if not record_path.is_file() or not merged.is_file():
        return None
    try:
        meta = read_json(record_path)
        if meta.get("output_sha256") != sha256_file(merged):
            return None
        recorded = meta.get("inputs") or {}
        if set(recorded) != set(inputs):
            return None
        for role_id, path in inputs.items():
            if recorded[role_id].get("sha256") != input_hashes[str(path)]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return meta


def describe_prepared(summary: Mapping[str, Any]) -> list[str]:
    """What preparation did, as sentences: kept and rejected by reason, the rejects files, the
    split, the records per role of the training file, notes."""
    lines: list[str] = []
    rejected = summary.get("rejected") or {}
    lost = sum(rejected.values())
    reasons = ", ".join(f"{n} {name}" for name, n in rejected.items())
    lines.append(f"Cleaning{' (recorded)' if summary.get('reused') else ''}: {summary.get('in', 0)} lines in, "
                 f"{summary.get('kept', 0)} kept, {lost} rejected" + (f" ({reasons})" if reasons else "") + ".")
    for name, n in (summary.get("warnings") or {}).items():
        lines.append(f"{n} kept record(s) fail '{name}' (kept by its policy).")
    over = summary.get("over_length") or {}
    if over:
        lines.append(f"Over --seq-length: {over.get('answer_lost', 0)} record(s) would lose the whole answer and "
                     f"{over.get('answer_cut', 0)} the end of it; raise --seq-length to keep them.")
    if summary.get("rejects_files"):
        lines.append(("Rejects: " if lost else "Rejects (none this time): ") + ", ".join(summary["rejects_files"]) + ".")
    roles = summary.get("train_roles")
    if roles:
        lines.append("Training records per role: " + ", ".join(f"{k} {v}" for k, v in roles.items())
                     + (f" (weights {', '.join(f'{k}={v:g}' for k, v in summary['weights'].items())}, "
                        f"{summary.get('train_unweighted')} before weighting)" if summary.get("weights") else "") + ".")
    for note in summary.get("notes") or []:
        lines.append(note[:1].upper() + note[1:] + ".")
    return lines


def _report_summary(summary: Mapping[str, Any], reporter: Reporter) -> None:
    for line in describe_prepared(summary):
        reporter.info(line)


#: How long a second writer of the same prepared-data folder waits for the first before it is refused.
PREPARE_LOCK_WAIT = 120.0


@functools.wraps(_prepare_training_data)  # the same signature and docs (callers inspect its parameters)
def prepare_training_data(**kwargs: Any) -> PreparedData:
    """:func:`_prepare_training_data` (same arguments) under an exclusive lock on its output folder.

    Two processes preparing into one folder (two trainings with different ``--seed``) never write
    the same files at once: the second waits up to ``PREPARE_LOCK_WAIT`` seconds for the first,
    then is refused with one sentence naming it (``comapoi_cli.runs.lock``).
    """
    from comapoi_cli.runs.lock import hold_lock

    data_path, out_dir, dataset = kwargs.get("data_path"), kwargs.get("out_dir"), kwargs.get("dataset")
    folder: Path | None = None
    if out_dir is not None:
        folder = Path(out_dir)
    elif data_path is not None:
        folder = Path(data_path).parent
        if folder.is_dir() and not _writable_dir(folder):
            folder = _cache_dir_for(Path(data_path))
    elif dataset:
        folder = dataset_dir(dataset, kwargs.get("data_dir"))
    if folder is None or not folder.is_dir() or not _writable_dir(folder):
        return _prepare_training_data(**kwargs)  # nothing to write there: its own error says why
    with hold_lock(folder / ".comapoi-prepare.lock", f"The prepared data in {folder}", wait=PREPARE_LOCK_WAIT):
        return _prepare_training_data(**kwargs)
