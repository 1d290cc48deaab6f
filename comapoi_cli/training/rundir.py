"""The run folder: never overwritten silently, checkpoints found and judged, run.json kept.

Layout (as the original): ``{output_dir}/{run_tag}/sft-{dataset}/bs{bs}-gas{gas}-ms{max_steps}-{type}-lr{lr}/``
holding ``checkpoint-{k*save_freq}/`` (plus ``checkpoint-{max_steps}``), the final adapter
(``adapter_config.json``, ``adapter_model.safetensors``, tokenizer files) and ``run.json``.

A checkpoint is complete once ``trainer_state.json`` is in it: the Trainer writes that file
last, so a checkpoint cut short by ``kill -9`` is recognised and skipped by ``--resume``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comapoi_cli.errors import UsageError
from comapoi_cli.fileio import read_json, write_json_atomic
from comapoi_cli.training.errors import RunExistsError
from comapoi_cli.training.job import TrainingJob

RUN_JSON = "run.json"
RUN_SCHEMA = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: What a run writes before its first checkpoint: a folder holding only these can be replaced.
LEFTOVERS = frozenset({RUN_JSON, "README.md", "runs"})


def checkpoints(run_dir: Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the run's checkpoints, oldest first."""
    found = []
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            match = _CHECKPOINT.match(child.name)
            if match and child.is_dir() and (not complete_only or is_complete_checkpoint(child)):
                found.append((int(match.group(1)), child))
    return sorted(found)


def is_complete_checkpoint(folder: Path) -> bool:
    return (folder / "trainer_state.json").is_file() and (folder / "adapter_model.safetensors").is_file()


def read_run_json(run_dir: Path) -> dict[str, Any] | None:
    """The run's run.json, or None when absent or unreadable."""
    try:
        data = read_json(run_dir / RUN_JSON)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_run_json(run_dir: Path, data: dict[str, Any]) -> None:
    """Write run.json atomically, keeping keys other tools added (e.g. ``evaluations``)."""
    write_json_atomic(run_dir / RUN_JSON, {**(read_run_json(run_dir) or {}), **data})


def has_final_adapter(run_dir: Path) -> bool:
    return all((run_dir / name).is_file() for name in ADAPTER_FILES)


@dataclass
class RunStart:
    """How a run begins: fresh, or from a checkpoint (``resume_from``), with the previous run.json."""

    run_dir: Path
    resume_from: Path | None
    previous: dict[str, Any] | None
    notes: list[str]
    #: the highest folder this start created (run_dir or one of its parents), None if it created none:
    #: a run that fails before writing anything removes what it created, and no more
    created: Path | None = None


def _first_missing(folder: Path) -> Path | None:
    """The highest missing folder on the way to ``folder`` (what ``mkdir(parents=True)`` creates first)."""
    missing = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _describe(previous: dict[str, Any] | None, run_dir: Path) -> str:
    if not previous:
        steps = checkpoints(run_dir)
        return f"checkpoints up to step {steps[-1][0]}" if steps else "files"
    progress = previous.get("progress") or {}
    return f"a {previous.get('status', 'unknown')} run, step {progress.get('global_step', 0)} of {progress.get('max_steps', '?')}"


def prepare_run_dir(job: TrainingJob) -> RunStart:
    """Apply ``--resume`` / ``--overwrite`` to the run folder (main process only); create it."""
    run_dir = job.run_dir
    notes: list[str] = []
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} exists and is not a folder.")
    entries = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if entries and entries <= LEFTOVERS:  # a run that failed or stopped before its first checkpoint
        notes.append(f"Replacing the previous attempt in {run_dir}, which saved no checkpoint.")
        shutil.rmtree(run_dir)
        entries = set()
    occupied = bool(entries)
    if not occupied:
        if job.resume:
            notes.append(f"Nothing to resume in {run_dir}: starting at step 0.")
        created = _first_missing(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return RunStart(run_dir, None, None, notes, created)
    previous = read_run_json(run_dir)
    if job.overwrite:
        shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        notes.append(f"Removed the previous run in {run_dir} (--overwrite).")
        return RunStart(run_dir, None, None, notes)
    if not job.resume:
        raise RunExistsError(f"{run_dir} already holds {_describe(previous, run_dir)}.",
                             hint="Continue it with --resume, replace it with --overwrite, or choose another folder with --run-tag NAME.")
    if previous and previous.get("job"):
        differences = job.training_differences(TrainingJob.from_dict(previous["job"]))
        if differences:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (new, old) in sorted(differences.items()))
            raise UsageError(f"--resume needs the options the run started with; these differ: {listed}.",
                             hint="Resume with the original options, or start again with --overwrite.")
    if previous and previous.get("status") == "finished" and has_final_adapter(run_dir):
        raise UsageError(f"{run_dir} already finished (step {(previous.get('progress') or {}).get('global_step')}): nothing to resume.",
                         hint="Start it again with --overwrite, or train longer under a new --max_steps.")
    for step, folder in checkpoints(run_dir, complete_only=False):
        if not is_complete_checkpoint(folder):
            shutil.rmtree(folder, ignore_errors=True)
            notes.append(f"Removed the incomplete checkpoint-{step} (the run was killed while saving it).")
    complete = checkpoints(run_dir)
    if not complete:
        notes.append(f"{run_dir} has no complete checkpoint: starting at step 0.")
        return RunStart(run_dir, None, previous, notes)
    step, folder = complete[-1]
    notes.append(f"Resuming from {folder.name} (step {step}).")
    return RunStart(run_dir, folder, previous, notes)


def remove_interrupt_checkpoints(run_dir: Path, save_freq: int, max_steps: int) -> list[str]:
    """After a finished run: drop the checkpoints saved at Ctrl-C (not at a multiple of --save_freq)."""
    removed = []
    for step, folder in checkpoints(run_dir, complete_only=False):
        if step % save_freq and step != max_steps:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def trainer_log_history(checkpoint: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError):
        return []
