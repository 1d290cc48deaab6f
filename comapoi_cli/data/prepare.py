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
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from comapoi_cli import __version__
from comapoi_cli.data.clean import clean_file, default_rejects_path
from comapoi_cli.data.layout import (MERGED_CLEAN_STEM, MERGED_FILE, dataset_dir, missing_input, split_names,
                                     stem_of)
from comapoi_cli.data.merge import merge_files
from comapoi_cli.data.policies import resolve_policies
from comapoi_cli.data.split import split_file
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import read_json, sha256_file, write_json_atomic
from comapoi_cli.roles import MERGED

#: Bump when the clean/split rules change in a way that changes outputs: old caches are rebuilt.
RULES_VERSION = 1
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

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comapoi" / "prepared"
    return base / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def _reusable(meta_path: Path, expected: dict[str, Any], outputs: list[Path]) -> dict[str, Any] | None:
    if not meta_path.is_file() or not all(p.is_file() for p in outputs):
        return None
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):
        return None
    for key, value in expected.items():
        if meta.get(key) != value:
            return None
    recorded = meta.get("output_hashes") or {}
    for path in outputs:
        if recorded.get(path.name) != sha256_file(path):
            return None
    return meta


def _prepare_training_data(
    *,
    type_: str,
    dataset: str | None = None,
    data_dir: Path | str | None = None,
    data_path: Path | str | None = None,
    seed: int = 42,
    test_size: int | float = 100,
    registry=None,
    split: bool | None = None,
    policies: Mapping[str, str] | None = None,
    strict: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_length: int | None = None,
    max_poi_id: int | None = None,
    force: bool = False,
    workers: int | None = None,
    out_dir: Path | str | None = None,
) -> PreparedData:
    """Clean (and split) the training data of ``type_`` (a role id, or ``merged``).

    ``tokenizer`` + ``seq_length`` apply the ``too_long`` check (default: drop records that do
    not fit). ``force`` rebuilds even when the recorded hashes match.

    Raises:
        DataError: a missing file (with how to create it), or nothing left after cleaning.
        UsageError: an unknown type, or neither ``dataset`` nor ``data_path``.
    """
    if registry is None:
        from comapoi_cli.plugins import get_registry

        registry = get_registry()
    if type_ != MERGED:
        registry.role(type_)  # unknown type: UsageError listing the registered ones
    table = resolve_policies(policies, strict=strict)
    do_split = split if split is not None else data_path is None
    options = {"type": type_, "seed": seed, "test_size": test_size if do_split else None, "policies": table,
               "tokenizer": str(tokenizer) if tokenizer else None, "seq_length": seq_length,
               "max_poi_id": max_poi_id, "dataset": dataset, "rules_version": RULES_VERSION,
               "holdout_cap_fraction": HOLDOUT_CAP_FRACTION}

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
        train_name, holdout_name = split_names(stem) if do_split else (f"{stem}_clean.jsonl", None)
        meta_name = f"{stem}.prepared.json"
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
                                hint=f"Create them with: comapoi data synth --dataset {dataset} --out {source_folder.parent}")
            stem = MERGED_CLEAN_STEM
        else:
            role = registry.role(type_)
            path = source_folder / role.data_file_name()
            if not path.is_file():
                raise missing_input(path, dataset=dataset, role=type_)
            inputs = {type_: path}
            stem = stem_of(path)
        train_name, holdout_name = split_names(stem) if do_split else (f"{stem}_clean.jsonl", None)
        meta_name = f"{stem}.prepared.json"
        if not _writable_dir(folder):
            raise DataError(f"Cannot write the prepared files into {folder}.",
                            hint="Make the folder writable, or pass an explicit output folder.")
    else:
        raise UsageError("Say which data to prepare: --dataset NAME (with --data-dir) or --data_path FILE.")

    train_path = folder / train_name
    holdout_path = folder / holdout_name if holdout_name else None
    meta_path = folder / meta_name
    input_hashes = {str(p): sha256_file(p) for p in inputs.values()}
    expected = {"input_hashes": input_hashes, "options": options}
    outputs = [train_path] + ([holdout_path] if holdout_path else [])
    if not force:
        meta = _reusable(meta_path, expected, outputs)
        if meta is not None:
            summary = dict(meta.get("summary") or {})
            summary["reused"] = True
            return PreparedData(train_path, holdout_path, input_hashes, summary)

    # -- clean each input (rejects beside it, with its own line numbers) ------------------
    summary: dict[str, Any] = {"in": 0, "kept": 0, "rejected": {}, "warnings": {}, "reused": False,
                               "rejects_files": [], "files": {}, "notes": [], "over_length": {}, "policies": table}
    cleaned: dict[str, Path] = {}
    temporaries: list[Path] = []
    try:
        for key, path in inputs.items():
            role_arg = key if key in registry.roles else None
            fd, tmp_name = tempfile.mkstemp(prefix=f".{stem_of(path)}.", suffix=".clean.jsonl", dir=folder)
            os.close(fd)
            tmp = Path(tmp_name)
            temporaries.append(tmp)
            rejects = default_rejects_path(folder / path.name)
            result = clean_file(path, tmp, rejects, role=role_arg, dataset=dataset, max_poi_id=max_poi_id,
                                policies=table, tokenizer=tokenizer, seq_length=seq_length, workers=workers,
                                registry=registry)
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
            raise DataError(f"No training record survived cleaning ({reasons}).", hint=hint)

        # -- merge (merged type) -------------------------------------------------------------
        if type_ == MERGED and data_path is None:
            merged = folder / MERGED_FILE
            merge_summary = merge_files(cleaned, merged, seed=seed)
            summary["merged"] = merge_summary.to_dict()
            summary["merged"]["inputs"] = {key: str(inputs[key]) for key in cleaned}  # cleaned from these
            to_split = merged
        else:
            to_split = next(iter(cleaned.values()))

        # -- split ---------------------------------------------------------------------------
        if do_split:
            result = split_file(to_split, train_path, holdout_path, test_size=test_size, seed=seed,
                                registry=registry, cap_fraction=HOLDOUT_CAP_FRACTION)
            summary["split"] = result.to_dict()
            summary["train"] = result.train
            summary["holdout"] = result.holdout
            summary["notes"].extend(result.notes)
        else:
            os.replace(to_split, train_path)
            summary["train"] = summary["kept"]
            summary["holdout"] = 0
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
    return PreparedData(train_path, holdout_path, input_hashes, summary)


#: How long a second writer of the same prepared-data folder waits for the first before it is refused.
PREPARE_LOCK_WAIT = 120.0


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
