"""How a run begins in its folder: never overwritten silently, locked, checkpoints found and judged.

``prepare_run_dir(job)`` applies ``--resume`` / ``--overwrite``, creates the folder and takes its
exclusive lock (``runs.lock``): a second writer, or ``--resume`` of a run that is still alive, is
refused with one sentence naming the other process. ``--resume`` skips (and removes) a checkpoint
cut short by ``kill -9``, sets aside a corrupt last checkpoint and resumes from the one before,
and never follows a symlinked ``checkpoint-N``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from comapoi_cli.errors import UsageError
from comapoi_cli.models.weights import WeightsFileError, read_safetensors_header
from comapoi_cli.runs.info import RunInfo, previous_run, read_json_file
from comapoi_cli.runs.layout import (
    ADAPTER_WEIGHTS,
    LEFTOVERS,
    LOCK_FILE,
    TRAINER_STATE,
    checkpoints,
    has_final_adapter,
    is_complete_checkpoint,
    symlinked_checkpoints,
)
from comapoi_cli.runs.lock import Lock, LockedError, describe_holder, lock_run, process_alive


@dataclass
class RunStart:
    """How a run begins: fresh, or from a checkpoint (``resume_from``), with the previous run.json."""

    run_dir: Path
    resume_from: Path | None
    previous: RunInfo | None
    notes: list[str]
    #: the highest folder this start created (run_dir or one of its parents), None if it created none:
    #: a run that fails before writing anything removes what it created, and no more
    created: Path | None = None
    #: the run folder's lock, held by the main process until the run ends
    lock: Lock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _first_missing(folder: Path) -> Path | None:
    """The highest missing folder on the way to ``folder`` (what ``mkdir(parents=True)`` creates first)."""
    missing = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _describe(previous: RunInfo | None, run_dir: Path) -> str:
    if previous is None or not previous.sections():
        steps = checkpoints(run_dir)
        return f"checkpoints up to step {steps[-1][0]}" if steps else "files"
    progress = previous.progress
    return f"a {previous.status or 'unknown'} run, step {progress.get('global_step', 0)} of {progress.get('max_steps', '?')}"


def _clear(run_dir: Path) -> None:
    """Remove everything in the run folder but its lock (which this process holds)."""
    for child in run_dir.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _safetensors_problem(path: Path) -> str | None:
    try:
        read_safetensors_header(path)
    except WeightsFileError as exc:
        return f"{path.name} {exc.reason}"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be resumed from (None when it looks sound)."""
    state, problem = read_json_file(folder / TRAINER_STATE)
    if problem or not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return problem or f"{TRAINER_STATE} holds no training state"
    weights = _safetensors_problem(folder / ADAPTER_WEIGHTS)
    if weights:
        return weights
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        part = folder / name
        if part.exists() and (not part.is_file() or part.stat().st_size == 0):
            return f"{name} is empty"
    return None


def _set_aside(folder: Path) -> Path:
    target = folder.with_name(f"{folder.name}.corrupt")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.corrupt{n}")
    os.replace(folder, target)
    return target


def prepare_run_dir(job: Any, on_stale: Callable[[str], None] | None = None) -> RunStart:
    """Apply ``--resume`` / ``--overwrite`` to the run folder (main process only); create and lock it.

    Raises:
        LockedError: another process writes the folder (another training, a ``--resume`` of a live run).
        RunExistsError / UsageError: the folder holds a run and neither flag says what to do with it.
    """
    from comapoi_cli.training.errors import RunExistsError

    run_dir = job.run_dir
    notes: list[str] = []
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} exists and is not a folder.")
    created = _first_missing(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_run(run_dir, on_stale=on_stale)
    except LockedError:
        if created is not None:
            _remove_empty(run_dir, created)
        raise
    try:
        start = _prepare_locked(job, run_dir, notes, created, RunExistsError)
    except BaseException:
        lock.release()
        if created is not None:
            _remove_empty(run_dir, created)
        raise
    start.lock = lock
    return start


def _prepare_locked(job: Any, run_dir: Path, notes: list[str], created: Path | None, run_exists: type) -> RunStart:
    from comapoi_cli.training.job import TrainingJob

    entries = {p.name for p in run_dir.iterdir()} - {LOCK_FILE}
    if entries and entries <= LEFTOVERS:  # a run that failed or stopped before its first checkpoint
        previous = previous_run(run_dir)
        _refuse_alive(previous, run_dir)
        notes.append(f"Replacing the previous attempt in {run_dir}, which saved no checkpoint.")
        _clear(run_dir)
        entries = set()
        created = created or run_dir
    if not entries:
        if job.resume:
            notes.append(f"Nothing to resume in {run_dir}: starting at step 0.")
        return RunStart(run_dir, None, None, notes, created)
    previous = previous_run(run_dir)
    _refuse_alive(previous, run_dir)
    if job.overwrite:
        _clear(run_dir)
        notes.append(f"Removed the previous run in {run_dir} (--overwrite).")
        return RunStart(run_dir, None, None, notes)
    if not job.resume:
        raise run_exists(f"{run_dir} already holds {_describe(previous, run_dir)}.",
                         hint="Continue it with --resume, replace it with --overwrite, or choose another folder with --run-tag NAME.")
    if previous is not None and previous.job:
        differences = job.training_differences(TrainingJob.from_dict(previous.job))
        if differences:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (new, old) in sorted(differences.items()))
            raise UsageError(f"--resume needs the options the run started with; these differ: {listed}.",
                             hint="Resume with the original options, or start again with --overwrite.")
    if previous is not None and previous.status == "finished" and has_final_adapter(run_dir):
        raise UsageError(f"{run_dir} already finished (step {previous.global_step}): nothing to resume.",
                         hint="Start it again with --overwrite, or train longer under a new --max_steps.")
    for link in symlinked_checkpoints(run_dir):
        notes.append(f"{link.name} is a symbolic link: not followed, not removed and not resumed from.")
    for step, folder in checkpoints(run_dir, complete_only=False):
        if not is_complete_checkpoint(folder):
            shutil.rmtree(folder, ignore_errors=True)
            notes.append(f"Removed the incomplete checkpoint-{step} (the run was killed while saving it).")
    complete = checkpoints(run_dir)
    while complete:
        step, folder = complete[-1]
        problem = checkpoint_problem(folder)
        if problem is None:
            break
        aside = _set_aside(folder)
        complete.pop()
        notes.append(f"checkpoint-{step} is corrupt ({problem}): moved aside to {aside.name}"
                     + (f"; falling back to checkpoint-{complete[-1][0]}." if complete else "."))
    if not complete:
        notes.append(f"{run_dir} has no complete checkpoint: starting at step 0.")
        return RunStart(run_dir, None, previous, notes)
    step, folder = complete[-1]
    notes.append(f"Resuming from {folder.name} (step {step}).")
    return RunStart(run_dir, folder, previous, notes)


def _refuse_alive(previous: RunInfo | None, run_dir: Path) -> None:
    """A run.json saying "running" for a live process of this host that is not us (no lock: an older comapoi)."""
    if previous is None or previous.status != "running" or previous.pid == os.getpid():
        return
    if process_alive(previous.pid, previous.host):
        holder = {"pid": previous.pid, "host": previous.host, "command": previous.command}
        raise LockedError(f"The run folder {run_dir} is being written by {describe_holder(holder)}; "
                          "wait until it ends or stop it.")


def _remove_empty(run_dir: Path, created: Path) -> None:
    """Remove the run folder and its parents up to ``created`` while they hold nothing (or only a lock)."""
    folder = run_dir
    while True:
        with contextlib.suppress(OSError):
            names = {p.name for p in folder.iterdir()} if folder.is_dir() else None
            if names is None or names - {LOCK_FILE}:
                return
            if LOCK_FILE in names:
                return  # another process's lock: leave it
            folder.rmdir()
        if folder == created or folder == folder.parent:
            return
        folder = folder.parent


def remove_interrupt_checkpoints(run_dir: Path, save_freq: int, max_steps: int) -> list[str]:
    """After a finished run: drop the checkpoints saved at Ctrl-C (not at a multiple of --save_freq)."""
    removed = []
    for step, folder in checkpoints(run_dir, complete_only=False):
        if step % save_freq and step != max_steps:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def trainer_log_history(checkpoint: Path) -> list[dict[str, Any]]:
    state, _ = read_json_file(checkpoint / TRAINER_STATE)
    return state.get("log_history", []) if isinstance(state, dict) else []
