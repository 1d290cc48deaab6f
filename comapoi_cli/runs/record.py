"""THE writer of run.json: what a run was, how far it got, what it produced (schema in docs/training.md).

``RunRecord`` holds the sections and writes them atomically (``write_run_json``), keeping keys
that other tools add (``evaluations``, appended by ``comapoi eval`` through
:func:`append_evaluation`). It is written when the run starts, after every checkpoint, every ~15 s
while logging, and when the run ends.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

from comapoi_cli import __version__
from comapoi_cli.errors import ComapoiError
from comapoi_cli.fileio import now_iso, write_json_atomic
from comapoi_cli.runs.info import RunInfo, read_json_file, read_run_json
from comapoi_cli.runs.layout import RUN_JSON, RUN_SCHEMA, checkpoints

VERSION_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "tokenizers")


def versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    from comapoi_cli.backends import installed_version

    out: dict[str, str | None] = {"python": sys.version.split()[0], "comapoi": __version__}
    for name in (*VERSION_PACKAGES, *extra):
        out[name] = installed_version(name)
    return out


def write_run_json(run_dir: Path, data: dict[str, Any]) -> None:
    """Write run.json atomically, keeping keys other tools added (e.g. ``evaluations``)."""
    write_json_atomic(run_dir / RUN_JSON, {**(read_run_json(run_dir) or {}), **data})


def append_evaluation(run_json: str | os.PathLike[str], entry: dict[str, Any]) -> None:
    """Append ``entry`` to the ``evaluations`` list of ``run.json`` (read, extend, atomic rewrite)."""
    path = Path(run_json)
    run, problem = read_json_file(path)
    if problem:
        raise ComapoiError(f"{path}: {problem}; the result is in metrics.json beside it.")
    if run is None:
        raise ComapoiError(f"{path} disappeared while evaluating; metrics.json beside it holds the result.")
    if not isinstance(run, dict):
        raise ComapoiError(f"{path} does not hold a JSON object; the result is in metrics.json beside it.")
    evaluations = run.get("evaluations")
    if not isinstance(evaluations, list):
        evaluations = []
    evaluations.append(entry)
    run["evaluations"] = evaluations
    write_json_atomic(path, run)


#: Logged keys that ``loss_history`` keeps beside the loss (GRPO's rewards and KL, DPO's reward margins).
REWARD_LOG_PREFIXES = ("reward", "rewards/", "kl", "completions/mean_length")


def loss_history(log_history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The Trainer's log history split into training and evaluation entries (numbers only)."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for entry in log_history:
        if "loss" in entry:
            keys = ("step", "epoch", "loss", "learning_rate", "grad_norm", "mean_token_accuracy", "entropy",
                    "num_input_tokens_seen", "train_seconds")
            row: dict[str, Any] = {k: entry[k] for k in keys if k in entry}
            # --method grpo / dpo: the reward and its parts (rewards/<part>/mean), the KL, DPO's preference margins
            row.update({k: v for k, v in entry.items() if k.startswith(REWARD_LOG_PREFIXES) and isinstance(v, (int, float))})
            train.append(row)
        elif "eval_loss" in entry:
            evals.append({k: entry[k] for k in ("step", "epoch", "eval_loss", "eval_mean_token_accuracy") if k in entry})
    return train, evals


def _reward_progress(train: list[dict[str, Any]]) -> dict[str, Any]:
    """``first_reward`` / ``final_reward`` (GRPO) and ``final_reward_margin`` (DPO), when logged."""
    out: dict[str, Any] = {}
    rewards = [row["reward"] for row in train if isinstance(row.get("reward"), (int, float))]
    if rewards:
        out.update(first_reward=rewards[0], final_reward=rewards[-1])
    margins = [row["rewards/margins"] for row in train if isinstance(row.get("rewards/margins"), (int, float))]
    if margins:
        out["final_reward_margin"] = margins[-1]
    return out


class RunRecord:
    """The run.json of one run, section by section."""

    def __init__(self, run_dir: Path, previous: RunInfo | None = None):
        self.run_dir = run_dir
        self.data: dict[str, Any] = {
            "schema": RUN_SCHEMA,
            "comapoi_version": __version__,
            "status": "running",
            "error": None,
            "run_dir": str(run_dir.resolve()),
            "created": (previous.created if previous is not None else None) or now_iso(),
            "updated": now_iso(),
            "finished": None,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": ["comapoi", *sys.argv[1:]],
            "platform": platform.platform(),
        }
        self.segments: list[dict[str, Any]] = list(previous.segments) if previous is not None else []
        self.segment: dict[str, Any] = {"started": now_iso(), "ended": None, "from_step": 0, "to_step": 0,
                                        "status": "running", "wall_seconds": 0.0, "train_seconds": 0.0,
                                        "tokens": 0, "pid": os.getpid()}
        self.segments.append(self.segment)

    @property
    def progress(self) -> dict[str, Any]:
        """The ``progress`` section as last computed (empty before the first ``update_progress``)."""
        value = self.data.get("progress")
        return value if isinstance(value, dict) else {}

    def set(self, **sections: Any) -> None:
        self.data.update(sections)

    def update_progress(self, state: Any, *, max_steps: int, wall_seconds: float, train_seconds: float,
                        start_tokens: int, peak_memory: dict[str, float]) -> None:
        """Progress, loss history, throughput from the Trainer's state (all segments of a resumed run)."""
        train, evals = loss_history(list(state.log_history))
        tokens = int(state.num_input_tokens_seen or 0)
        self.segment.update(to_step=state.global_step, wall_seconds=round(wall_seconds, 2),
                            train_seconds=round(train_seconds, 2), tokens=tokens - start_tokens,
                            peak_memory=peak_memory)
        total_train = sum(s.get("train_seconds") or 0.0 for s in self.segments)
        total_wall = sum(s.get("wall_seconds") or 0.0 for s in self.segments)
        peaks: dict[str, float] = {}
        for segment in self.segments:
            for key, value in (segment.get("peak_memory") or {}).items():
                peaks[key] = max(peaks.get(key, 0.0), value)
        self.data["progress"] = {
            "global_step": state.global_step,
            "max_steps": max_steps,
            "epoch": round(state.epoch or 0.0, 4),
            "first_loss": train[0]["loss"] if train else None,
            "final_loss": train[-1]["loss"] if train else None,
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            **_reward_progress(train),
            "tokens_trained": tokens,
            "wall_seconds": round(total_wall, 2),
            "train_seconds": round(total_train, 2),
            "tokens_per_second": round(tokens / total_train, 1) if total_train > 0 else None,
            "peak_memory": peaks,
        }
        self.data["loss_history"] = train
        self.data["eval_history"] = evals
        self.data["checkpoints"] = [folder.name for _, folder in checkpoints(self.run_dir)]

    def end_segment(self, status: str, from_step: int | None = None) -> None:
        self.segment["ended"] = now_iso()
        self.segment["status"] = status
        if from_step is not None:
            self.segment["from_step"] = from_step

    def write(self) -> None:
        self.data["updated"] = now_iso()
        self.data["segments"] = self.segments
        write_run_json(self.run_dir, self.data)
