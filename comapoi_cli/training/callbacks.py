"""Trainer callbacks shared by every backend built on the TRL path: progress, Ctrl-C, run.json.

Imports transformers: import this module only once training starts.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

from transformers import TrainerCallback

from comapoi_cli.training.report import Reporter


class ProgressCallback(TrainerCallback):
    """Feeds the reporter: the bar on every step, a line on every log, a note on every checkpoint."""

    def __init__(self, reporter: Reporter, max_steps: int):
        self.reporter = reporter
        self.max_steps = max_steps
        self.loss: float | None = None
        self.lr: float | None = None
        self.start_step = 0  #: the step this process started at (> 0 when resuming)
        self.start_tokens = 0
        self._t0: float | None = None

    def train_seconds(self) -> float:
        """Seconds since training (not set-up) began in this process."""
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def rates(self, state: Any) -> tuple[float | None, float | None]:
        """(tokens/s, ETA seconds) of this process's part of the run (not counting earlier segments)."""
        elapsed = self.train_seconds()
        done = state.global_step - self.start_step
        if done <= 0 or elapsed <= 0:
            return None, None
        tokens = (state.num_input_tokens_seen or 0) - self.start_tokens
        return (tokens / elapsed if tokens else None), elapsed / done * (self.max_steps - state.global_step)

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.monotonic()
        self.start_step = state.global_step
        self.start_tokens = state.num_input_tokens_seen or 0
        self.reporter.progress_start(self.max_steps, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        tps, eta = self.rates(state)
        self.reporter.progress_update(state.global_step, loss=self.loss, lr=self.lr, tokens_per_s=tps, eta_s=eta)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.loss = logs["loss"]
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                # seconds since training began in this process, when this step was logged: per-step
                # times for bench/bench_gpu_train.py (the loss item() before the log synchronises CUDA)
                state.log_history[-1].setdefault("train_seconds", round(self.train_seconds(), 4))
        if "learning_rate" in logs:
            self.lr = logs["learning_rate"]
        if "loss" in logs or "eval_loss" in logs:
            tps, eta = self.rates(state)
            self.reporter.log_line(state.global_step, self.max_steps, logs, tps, eta)

    def on_save(self, args, state, control, **kwargs):
        self.reporter.info(f"saved checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self.reporter.progress_stop()


class InterruptCallback(TrainerCallback):
    """First Ctrl-C (or SIGTERM): finish the current step, save a checkpoint, stop. Second: abort now.

    Under a multi-process launcher the ranks agree at the end of every step (a one-element
    all-reduce): if any rank got a signal, every rank saves the same checkpoint and stops at the
    same step, whether the terminal's Ctrl-C reached all of them, or a scheduler's SIGTERM one. The
    launcher (torchrun) passes the terminal's SIGINT on to every rank once more; that repeat is
    ignored for a few seconds (it is not a second Ctrl-C).
    """

    #: Under a launcher, a second signal this soon after the first is the launcher passing the first on.
    echo_seconds = 5.0

    def __init__(self, reporter: Reporter):
        from comapoi_cli.training.distributed import under_launcher

        self.reporter = reporter
        self._launched = under_launcher()
        self._first = 0.0
        self.requested: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if self._launched and time.monotonic() - self._first < self.echo_seconds:
                return  # the launcher (torchrun) forwards the terminal's Ctrl-C: the same request, not a second
            self.uninstall()
            raise KeyboardInterrupt
        self._first = time.monotonic()
        self.requested = signal.Signals(signum).name
        self.reporter.warn(f"{self.requested}: stopping after this step and saving a checkpoint "
                           "(press Ctrl-C again to abort without saving).")

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.requested is not None, args.device) and not self.requested:
            self.requested = "a signal to another process"
            self._first = time.monotonic()
            self.reporter.warn("Another process of this run got a stop signal: stopping after this step and saving a checkpoint.")
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


def any_rank(flag: bool, device: Any) -> bool:
    """True if ``flag`` is true on any process of the torch.distributed group (just ``flag`` without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    import torch

    vote = torch.tensor([1 if flag else 0], device=device if dist.get_backend() != "gloo" else "cpu")
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


class RecordCallback(TrainerCallback):
    """Keeps run.json current: after every checkpoint and, at most every ``interval`` seconds, after logs."""

    def __init__(self, write: Callable[[Any], None], interval: float = 15.0):
        self.write = write
        self.interval = interval
        self._last = 0.0

    def on_log(self, args, state, control, **kwargs):
        if time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            self.write(state)

    def on_save(self, args, state, control, **kwargs):
        self._last = time.monotonic()
        self.write(state)


class FiniteGuardCallback(TrainerCallback):
    """Stops the run at the first step whose loss, gradient norm or trainable weights are NaN or infinite.

    After every optimizer step the trainable (LoRA) weights are checked in one reduction; every
    logged loss and gradient norm too. The step that went bad is neither saved nor continued from:
    ``tripped`` holds ``(step, what)`` and the training path turns it into one sentence, keeping
    the last good checkpoint.
    """

    def __init__(self) -> None:
        self.tripped: tuple[int, str] | None = None
        self._params: list[Any] | None = None

    def _trip(self, control: Any, step: int, what: str) -> None:
        if self.tripped is None:
            self.tripped = (step, what)
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.tripped is not None:
            self._trip(control, state.global_step, self.tripped[1])
            return
        if model is None:
            return
        if self._params is None:
            # (a ZeRO-3 placeholder holds no elements on this rank: nothing to check there)
            self._params = [p for p in model.parameters() if p.requires_grad and p.numel() > 0]
        if not self._params:
            return
        import torch

        with torch.no_grad():
            finite = bool(torch.isfinite(torch.stack([p.detach().float().abs().amax() for p in self._params])).all())
        if not finite:
            self._trip(control, state.global_step, "LoRA weights")

    def on_log(self, args, state, control, logs=None, **kwargs):
        import math

        for key, what in (("loss", "loss"), ("grad_norm", "gradient norm")):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._trip(control, state.global_step, what)
                return
