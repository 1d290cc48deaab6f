"""Which process am I? The rules for running under ``accelerate launch`` / ``torchrun``.

One rule everywhere in training: only the main process (rank 0) prints, prepares data, writes
run.json, checkpoints' extra files and the final adapter; the others wait at ``main_process_first``
and then read what it wrote. Rank and world size come from the launcher's environment variables,
so asking costs nothing and imports nothing.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


def rank() -> int:
    """Global rank of this process (0 when not launched by a multi-process launcher)."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 0


def world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


def is_main_process() -> bool:
    """True in the one process that prints and writes (rank 0)."""
    return rank() == 0


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on the main process first, then on the others (a no-op with one process).

    Use it around work whose result the other ranks read: data preparation, the tiny model build.
    """
    if world_size() <= 1:
        yield
        return
    from accelerate import PartialState  # initialises the process group the launcher set up

    with PartialState().main_process_first():
        yield
