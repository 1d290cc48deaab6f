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

    Raises:
        DataError: a missing file (with how to create it), or nothing left after cleaning.
        UsageError: an unknown type, or neither ``dataset`` nor ``data_path``.
    """
    if type_ != MERGED:
        registry.role(type_)  # unknown type: UsageError listing the registered ones
    if max_poi_id is not None and max_poi_id < 0:
        raise UsageError(f"--max-poi-id must be 0 or more, got {max_poi_id}.")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be 1 or more, got {workers}.")
    table = resolve_policies(policies, strict=strict)
    do_split = split if split is not None else data_path is None
    weights = dict(weights or {})
    for role_id, weight in weights.items():
        check_weight(role_id, weight)

    # -- inputs and output names ---------------------------------------------------------
    if data_path is not None:
        source = Path(data_path)
        if not source.is_file():
            raise missing_input(source)
        inputs = {type_ if type_ != MERGED else "data": source}
        folder = Path(out_dir) if out_dir is not None else source.parent
        if not _writable_dir(folder):
            folder = _cache_dir_for(source)
            folder.mkdir(parents=True, exist_ok=True)
        stem = stem_of(source)
        split_input = source
    elif dataset:
        folder = Path(out_dir) if out_dir is not None else dataset_dir(dataset, data_dir)
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
    train_name, holdout_name = split_names(stem) if do_split else (f"{stem}_clean.jsonl", None)
    meta_name = f"{stem}.prepared.json"

    input_hashes = {str(p): sha256_file(p) for p in inputs.values()}
    merge_note = None
    merged_by_user = False
    if type_ == MERGED and data_path is None and not weights:
        merge_meta = _current_merge(split_input, inputs, input_hashes)
        if merge_meta is not None:
            merged_by_user = True
            weights = {k: float(v) for k, v in (merge_meta.get("weights") or {}).items() if float(v) != 1.0}
            if weights:
                merge_note = (f"weights of data merge ({', '.join(f'{k}={v:g}' for k, v in weights.items())}) "
                              f"applied to the training side")
    derived: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        derived = dict(read_json(folder / meta_name).get("output_hashes") or {}) if (folder / meta_name).is_file() else {}
    user_split, split_why = current_split(split_input, derived) if do_split else (None, "")
    if user_split is not None and type_ == MERGED and not merged_by_user:
        user_split, split_why = None, f"{split_input.name} is not the data merge of these files"
    options = {"type": type_, "seed": seed, "test_size": test_size if do_split else None, "policies": table,
               "tokenizer": str(tokenizer) if tokenizer else None, "seq_length": seq_length,
               "max_poi_id": max_poi_id, "dataset": dataset, "rules_version": RULES_VERSION,
               "holdout_cap_fraction": HOLDOUT_CAP_FRACTION, "weights": weights or None,
               "split_from": user_split.get("holdout_sha256") if user_split else None}
    # rejects_tag is not an option of the outputs: train reuses what data clean --dataset prepared
    # (and the reverse), and its summary names the rejects files of the run that wrote them

    train_path = folder / train_name
    holdout_path = folder / holdout_name if holdout_name else None
    meta_path = folder / meta_name
    expected = {"input_hashes": input_hashes, "options": options}
    outputs = [train_path] + ([holdout_path] if holdout_path else [])
    if force:
        why = "--force"
    else:
        meta, why = _reusable(meta_path, expected, outputs)
        if meta is not None:
            summary: dict[str, Any] = dict(meta.get("summary") or {})
            summary["reused"] = True
            reporter.info(f"Prepared data unchanged (same input hashes and options): reusing {train_path}"
                          + (f" and {holdout_path}" if holdout_path else "") + ".")
            _report_summary(summary, reporter)
            return PreparedData(train_path, holdout_path, input_hashes, summary)
    reporter.info(f"Preparing {train_path.name}" + (f" and {holdout_path.name}" if holdout_path else "")
                  + f" (cleaning, {'splitting' if do_split else 'no split'}): {why}.")

    # -- clean each input (rejects beside it, with its own line numbers) ------------------
    summary = {"in": 0, "kept": 0, "rejected": {}, "warnings": {}, "reused": False,
                               "rejects_files": [], "files": {}, "notes": [], "over_length": {}, "policies": table,
                               "rebuilt_because": why}
    cleaned: dict[str, Path] = {}
    temporaries: list[Path] = []
    try:
        for key, path in inputs.items():
            role_arg = key if key in registry.roles else None
            remove_stale_temps(folder / f"{stem_of(path)}.clean")
            fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(f"{stem_of(path)}.clean"), suffix=".tmp", dir=folder)
            os.close(fd)
            tmp = Path(tmp_name)
            temporaries.append(tmp)
            rejects = _rejects_path(folder / path.name, rejects_tag)
            result = clean_file(path, tmp, rejects, role=role_arg, dataset=dataset, max_poi_id=max_poi_id,
                                policies=table, tokenizer=tokenizer, seq_length=seq_length, workers=workers,
                                registry=registry, reporter=reporter, require_records=False,
                                trust_remote_code=trust_remote_code)
            cleaned[key] = tmp
            file_summary = result.to_dict()
            for noisy in ("policies", "output", "input"):  # the table is below; the output was temporary
                file_summary.pop(noisy, None)
            summary["files"][str(path)] = file_summary
            summary["rejects_files"].append(str(rejects))
            summary["in"] += result.lines_in
            summary["kept"] += result.kept
            for group in ("rejected", "warnings", "over_length"):
                for name, n in getattr(result, group).items():
                    summary[group][name] = summary[group].get(name, 0) + n
        summary["rejects_file"] = summary["rejects_files"][0] if len(summary["rejects_files"]) == 1 else None
        if summary["kept"] == 0:
            reasons = ", ".join(f"{n} {name}" for name, n in summary["rejected"].items()) or "the input is empty"
            hint = f"See the rejects file(s): {', '.join(summary['rejects_files'])}."
            if "label_leak" in summary["rejected"]:
                hint += " To train on leaking prompts anyway: --on label_leak=warn (the model learns to copy a label it never sees at inference)."
            if "too_long" in summary["rejected"]:
                hint += " Records longer than --seq-length were dropped: raise --seq-length."
            raise DataError(f"No training record survived cleaning ({reasons}).", hint=hint)

        # -- merge (merged type) -------------------------------------------------------------
        if type_ == MERGED and data_path is None:
            if merged_by_user:  # the user's (weighted) data merge output stays as it is
                merged = folder / f"{temp_prefix(MERGED_CLEAN_STEM)}merged.tmp"
                temporaries.append(merged)
            else:
                merged = folder / MERGED_FILE
            merge_summary = merge_files(cleaned, merged, seed=seed, record=False)
            summary["merged"] = merge_summary.to_dict()
            summary["merged"]["inputs"] = {key: str(inputs[key]) for key in cleaned}  # cleaned from these
            to_split = merged
        else:
            to_split = next(iter(cleaned.values()))

        # -- split ---------------------------------------------------------------------------
        weighted_tmp = None
        if weights:
            weighted_tmp = folder / f"{temp_prefix(train_name)}unweighted.tmp"
            temporaries.append(weighted_tmp)
        split_train = weighted_tmp or train_path
        assert holdout_path is not None or not do_split  # a split always has a holdout file
        if do_split and user_split is not None and holdout_path is not None:
            checker = RecordChecker(roles=registry.roles)
            n_train, n_hold = split_by_membership(to_split, split_train, holdout_path, user_split["holdout_path"],
                                                  lambda raw: _line_key(checker, raw))
            summary["split"] = {"from": str(split_record_path(split_input)), "group_by": user_split.get("group_by"),
                                "seed": user_split.get("seed"), "train": n_train, "holdout": n_hold}
            summary["train"], summary["holdout"] = n_train, n_hold
            summary["notes"].append(
                f"using the split made by data split{' --group-by ' + user_split['group_by'] if user_split.get('group_by') else ''} "
                f"(seed {user_split.get('seed')}): its holdout's records are held out")
            if n_hold == 0:
                raise DataError(f"No record of the data split holdout {user_split['holdout_path']} survived cleaning.",
                                hint="Split again, or train on the whole file with --data_path.")
        elif do_split:
            if split_why not in ("", "no split made by data split"):
                summary["notes"].append(f"the earlier data split is not used: {split_why}; a new split is made")
            result = split_file(to_split, split_train, holdout_path, test_size=test_size, seed=seed,
                                registry=registry, cap_fraction=HOLDOUT_CAP_FRACTION, record=False)
            summary["split"] = result.to_dict()
            summary["train"] = result.train
            summary["holdout"] = result.holdout
            summary["notes"].extend(result.notes)
        else:
            os.replace(to_split, split_train)
            summary["train"] = summary["kept"]
            summary["holdout"] = 0
        if weights:
            counts = weight_file(split_train, train_path, weights, seed=seed)
            summary["train_unweighted"] = summary["train"]
            summary["train"] = sum(counts.values())
            summary["weights"] = weights
            summary["train_roles"] = counts
            if merge_note:
                summary["notes"].append(merge_note)
        elif type_ == MERGED:
            summary["train_roles"] = role_counts(train_path)
    except OSError as exc:
        raise fs_error(exc, folder) from None
    finally:
        for tmp in temporaries:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    summary["train_path"] = str(train_path)
    summary["holdout_path"] = str(holdout_path) if holdout_path else None
    write_json_atomic(meta_path, {
        "comapoi_version": __version__,
        **expected,
        "output_hashes": {p.name: sha256_file(p) for p in outputs},
        "summary": summary,
    })
    _report_summary(summary, reporter)
    return PreparedData(train_path, holdout_path, input_hashes, summary)


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
