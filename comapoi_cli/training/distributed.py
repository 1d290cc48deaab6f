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
    import torch.distributed as dist

    state()  # the process group
    if is_main_process():
        try:
            yield
        except BaseException:
            dist.broadcast_object_list([False], src=0)  # tell the waiting ranks to stop, not hang
            raise
        dist.broadcast_object_list([True], src=0)
        return
    flag = [None]
    dist.broadcast_object_list(flag, src=0)
    if not flag[0]:
        from comapoi_cli.errors import ComapoiError

        raise ComapoiError(f"Rank {rank()} stopped: the main process (rank 0) failed, and says why above.")
    yield


def state():
    """accelerate's ``PartialState`` for this launch: initialises the process group the launcher set up.

    Without a CUDA GPU it is created with ``cpu=True``, which makes a multi-process launch a
    ``MULTI_CPU`` (gloo) group; without it accelerate would see no GPU and treat every rank as a
    lone process. Created once: the Trainer's ``TrainingArguments(use_cpu=...)`` reuses it.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def local_rank() -> int:
    value = os.environ.get("LOCAL_RANK", "0")
    return int(value) if value.isdigit() else 0


def under_launcher() -> bool:
    """True inside a process started by ``accelerate launch`` / ``torchrun`` (any world size)."""
    return "LOCAL_RANK" in os.environ or world_size() > 1


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def sharding() -> str | None:
    """How the launcher shards the model: ``fsdp``, ``deepspeed-zero3``, ``deepspeed`` (ZeRO-1/2) or None (DDP).

    Read from the variables ``accelerate launch`` sets from its config (``ACCELERATE_USE_FSDP``,
    ``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_DEEPSPEED_ZERO_STAGE``).
    """
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed-zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip() == "3" else "deepspeed"
    return None


def shards_weights() -> bool:
    """True when the launcher shards the model's weights across ranks (FSDP or DeepSpeed ZeRO-3)."""
    return sharding() in ("fsdp", "deepspeed-zero3")


def batch_line(per_device: int, processes: int, accumulation: int) -> str:
    """``Batch: 2 per device x 2 processes x 1 accumulation = 4 records per step``."""
    effective = per_device * processes * accumulation
    return (f"Batch: {per_device} per device x {processes} process{'es' if processes != 1 else ''} x "
            f"{accumulation} accumulation = {effective} records per step")


def single_process_refusal(backend: str, processes: int):
    """The error for a backend that trains in one process (``Backend.multi_process`` False) launched in several."""
    from comapoi_cli.errors import ComapoiError

    return ComapoiError(
        f"The {backend} backend trains on one GPU in one process, but this is a launch of {processes} processes.",
        hint=f"Run comapoi train --backend {backend} as a single process (no accelerate launch / torchrun / "
             "--num-processes), or use --backend trl for multi-GPU training (DDP, FSDP, DeepSpeed).")
