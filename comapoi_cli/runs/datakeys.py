"""The data a run trained on and held out, by conversation key: written at training, checked by eval.

A record's conversation key is the first 16 hex digits of the SHA-256 of its prompt (the turns
before its last assistant turn, as canonical JSON of ``{"role", "content"}``: the prompt hash
``comapoi eval`` writes as ``prompt_sha256``). Two records with the same key ask the same
question, so a held-out record whose key is among the training keys was seen in training.

``data_keys.json`` in the run folder: ``{"schema", "key", "train_file", "train_sha256",
"holdout_file", "holdout_sha256", "train": [keys], "holdout": [keys]}``. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from comapoi_cli.errors import DataError
from comapoi_cli.fileio import write_json_atomic
from comapoi_cli.models.generation import record_messages
from comapoi_cli.runs.info import RunInfo, read_json_file
from comapoi_cli.runs.layout import DATA_KEYS, RUN_JSON

KEY_KIND = "sha256-16 of the prompt turns (canonical JSON)"
DATA_KEYS_MAX_BYTES = 512 * 1024 * 1024
def prompt_key(prompt: Sequence[dict[str, str]]) -> str:
    """The conversation key of a prompt (``[{"role", "content"}]`` without the answer)."""
    canonical = json.dumps([{"role": m["role"], "content": m["content"]} for m in prompt],
                           ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def record_key(record: Any) -> str | None:
    """The conversation key of a JSONL record (None when it holds no messages)."""
    messages = record_messages(record)
    if not messages:
        return None
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return prompt_key(messages[:last] if last is not None else messages)


def file_keys(path: Path) -> list[str]:
    """The conversation keys of a JSONL file's records, in order (unreadable lines have none)."""
    keys = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                key = record_key(json.loads(line))
            except ValueError:
                continue
            if key is not None:
                keys.append(key)
    return keys


def write_data_keys(run_dir: Path, train_file: Path, train_sha256: str, holdout_file: Path | None,
                    holdout_sha256: str | None, *, train_keys: Sequence[str] | None = None,
                    inherited_keys: Sequence[str] = ()) -> Path:
    """Write ``data_keys.json``. ``train_keys``: the keys trained on when ``train_file`` holds no chat records
    (a preference pair file: the keys of its prompts); ``inherited_keys``: those of the runs the adapter
    started from (``--init-adapter``), which it has seen too."""
    path = run_dir / DATA_KEYS
    own = list(train_keys) if train_keys is not None else file_keys(train_file)
    write_json_atomic(path, {
        "schema": 1, "key": KEY_KIND,
        "train_file": str(train_file), "train_sha256": train_sha256,
        "holdout_file": str(holdout_file) if holdout_file else None, "holdout_sha256": holdout_sha256,
        "train": sorted(set(own) | set(inherited_keys)),
        "holdout": sorted(set(file_keys(holdout_file))) if holdout_file else [],
    })
    return path


def read_train_keys(run_dir: Path) -> set[str] | None:
    """The training keys the run recorded (None when it recorded none: a run made before this file)."""
    data, problem = read_json_file(run_dir / DATA_KEYS, DATA_KEYS_MAX_BYTES)
    if problem:
        raise DataError(f"{run_dir / DATA_KEYS}: {problem}; it says which records the run trained on.")
    if not isinstance(data, dict) or not isinstance(data.get("train"), list):
        return None
    return {k for k in data["train"] if isinstance(k, str)}


@dataclass
class HoldoutCheck:
    """What ``comapoi eval`` learnt about its data: held-out records that were trained on, notes."""

    overlap: list[int] = field(default_factory=list)  #: indices (into the prompts) of trained-on records
    notes: list[str] = field(default_factory=list)
    checked: bool = False  #: the run recorded its training keys


def check_holdout(run: RunInfo, data_path: Path, data_sha256: str, prompts: Sequence[Sequence[dict[str, str]]], *,
                  allow_train_overlap: bool = False, explicit: bool = False) -> HoldoutCheck:
    """Refuse a changed holdout, and held-out records the run trained on (unless allowed).

    ``data_path`` is the file about to be scored and ``prompts`` its records' prompts;
    ``explicit``: the user named the file (``--data``), so only its records are checked, not
    whether it is still the holdout the run recorded.

    Raises:
        DataError: ``data_path`` is the run's recorded holdout but its content changed since
            training; or records of it were in the training data (without ``allow_train_overlap``).
    """
    result = HoldoutCheck()
    recorded, recorded_sha = run.holdout, run.holdout_sha256
    run_json = run.run_json or run.run_dir / RUN_JSON
    if (not explicit and recorded is not None and recorded_sha and _same_file(recorded, data_path)
            and data_sha256 != recorded_sha):
        raise DataError(
            f"The holdout {data_path} changed since the run trained (sha256 {data_sha256[:12]} now, "
            f"{recorded_sha[:12]} recorded in {run_json}), so it is no longer held out from this adapter; "
            f"restore it, re-split with the run's --seed {run.job_value('seed')} and --test-size {run.job_value('test_size')}, "
            "or name a file of records it never saw with --data FILE.")
    train_keys = read_train_keys(run.run_dir)
    if train_keys is None:
        result.notes.append(f"{run.run_dir} records no training keys ({DATA_KEYS}): not checked for records it trained on")
        return result
    result.checked = True
    result.overlap = [i for i, prompt in enumerate(prompts) if prompt_key(prompt) in train_keys]
    if result.overlap and not allow_train_overlap:
        n = len(result.overlap)
        raise DataError(
            f"{n} of the {len(prompts)} records of {data_path} were in this adapter's training data "
            f"(by conversation key, {run.run_dir / DATA_KEYS}), so their scores would not be held out; "
            "evaluate on the run's own holdout, or pass --allow-train-overlap to score them anyway.")
    return result


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False
