"""The run folder's layout: one name for each file and folder comapoi puts in it.

Layout (as the original): ``{output_dir}/{run_tag}/sft-{dataset}/bs{bs}-gas{gas}-ms{max_steps}-{type}-lr{lr}/``
holding ``checkpoint-{k*save_freq}/`` (plus ``checkpoint-{max_steps}``), the final adapter
(``adapter_config.json``, ``adapter_model.safetensors``, tokenizer files), ``run.json``,
``data_keys.json`` (the conversation keys of the training and held-out records) and, while a
process writes the folder, ``.comapoi.lock``.

A checkpoint is complete once ``trainer_state.json`` is in it: the Trainer writes that file
last, so a checkpoint cut short by ``kill -9`` is recognised and skipped by ``--resume``.
Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

RUN_JSON = "run.json"
RUN_SCHEMA = 1
#: The largest run.json the readers accept (a real one is a few hundred KB at most).
RUN_JSON_MAX_BYTES = 32 * 1024 * 1024
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The adapter weights PEFT may write (the pickled one only by old PEFT versions; never read here).
ADAPTER_WEIGHTS_PICKLED = "adapter_model.bin"
ADAPTER_WEIGHT_NAMES = (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLED)
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: The conversation keys of the records a run trained on and held out (``comapoi eval`` checks them).
DATA_KEYS = "data_keys.json"
#: The exclusive lock a writing process holds on the run folder (its pid, host and command inside).
LOCK_FILE = ".comapoi.lock"
#: What a run writes before its first checkpoint: a folder holding only these can be replaced.
LEFTOVERS = frozenset({RUN_JSON, "README.md", "runs", DATA_KEYS, LOCK_FILE})


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def is_complete_checkpoint(folder: Path) -> bool:
    return (folder / TRAINER_STATE).is_file() and (folder / ADAPTER_WEIGHTS).is_file()


def checkpoints(run_dir: Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the run's checkpoints, oldest first (symlinked ones are not checkpoints)."""
    found = []
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            match = CHECKPOINT_RE.match(child.name)
            if match and not child.is_symlink() and child.is_dir() and (not complete_only or is_complete_checkpoint(child)):
                found.append((int(match.group(1)), child))
    return sorted(found)


def symlinked_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-N`` entries that are symbolic links (never followed, never removed)."""
    if not run_dir.is_dir():
        return []
    return sorted(child for child in run_dir.iterdir() if CHECKPOINT_RE.match(child.name) and child.is_symlink())


def checkpoint_names(folder: Path) -> list[str]:
    """The names of the ``checkpoint-N`` folders of ``folder`` (not symlinks), oldest first."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            match = CHECKPOINT_RE.match(entry.name)
            if match and entry.is_dir(follow_symlinks=False):
                found.append((int(match.group(1)), entry.name))
    return [name for _, name in sorted(found)]


def has_final_adapter(run_dir: Path) -> bool:
    return all((run_dir / name).is_file() for name in ADAPTER_FILES)
