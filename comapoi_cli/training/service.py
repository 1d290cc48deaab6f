"""The training service behind ``comapoi train``: resolve a job, report it (``--dry-run``), decide the launch, run it.

The command line only parses flags and renders what this module returns; a library user calls the
same functions. Nothing here prints or imports Rich: messages go through a ``Reporter``; problems are
``ComapoiError`` sentences. Importing this module imports no torch; ``dry_run_report`` imports it
only when a flag must be checked against the device (``--bf16``, ``--fp16``, ``--quant 4bit/8bit``,
``--liger``) or a GPU is present, so that the report shows what training would resolve.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from comapoi_cli.backends import Backend, unusable_reason
from comapoi_cli.choices import QUANTISED
from comapoi_cli.errors import ComapoiError
from comapoi_cli.reporting import Reporter
from comapoi_cli.training.job import TrainingJob, TrainingResult
from comapoi_cli.training.options import ModelLocation, build_job, data_problems

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry


@dataclass
class TrainingPlan:
    """A resolved ``comapoi train``: the job, where its model is, the backend, and the launcher arguments."""

    job: TrainingJob
    location: ModelLocation
    backend: Backend
    launch: list[str] | None  #: ``accelerate launch`` arguments when the run starts a launcher, else None


def plan_training(given: Mapping[str, Any], *, registry: Registry, argv: list[str], config_file: str | None = None,
                  env: Mapping[str, str] | None = None) -> TrainingPlan:
    """Resolve the options actually given (``given``: field name -> value) into a plan; ``UsageError`` for bad ones."""
    from comapoi_cli.training.launch import plan_launch

    job, location = build_job(given, config_file=config_file, registry=registry, env=env)
    backend = registry.backend(job.backend)
    launch = plan_launch(job.num_processes, job.accelerate_config, backend, argv)
    return TrainingPlan(job, location, backend, launch)


def _gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (device files)."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def device_report(job: TrainingJob) -> tuple[dict[str, Any], str | None]:
    """The device, precision and quantisation training would use here, and the refusal it would make (or None)."""
    checks = job.bf16 or job.fp16 or job.liger or job.quant in QUANTISED
    if not checks and not _gpu_present():
        return {"type": "cpu", "precision": job.precision(gpu=False, gpu_has_bf16=False),
                "quant": "none" if job.quant == "auto" else job.quant}, None
    from comapoi_cli.backends import missing_packages

    if missing_packages("torch"):
        return {"type": "unknown", "precision": job.precision(gpu=False, gpu_has_bf16=False), "quant": job.quant}, None
    from comapoi_cli.errors import ComapoiError as _Error
    from comapoi_cli.training.devices import plan_training_device

    try:
        plan = plan_training_device(job)
    except _Error as exc:
        return {"type": "refused"}, exc.message + (f" {exc.hint}" if exc.hint else "")
    out = plan.to_dict()
    if job.fit and job.quant == "auto" and plan.type == "cuda":
        out["quant"] = "auto (--fit chooses 16-bit or 4bit at start)"
    return out, None


def dry_run_report(plan: TrainingPlan, registry: Registry) -> dict[str, Any]:
    """What ``comapoi train --dry-run`` prints: the job as training resolves it, and every problem found.

    Keys: ``job`` (every field), ``resolved`` (what training derives: warm-up and logging steps, the
    learning rate, the device / precision / quantisation it would use here), ``run_dir``, ``model``,
    ``problems`` (sentences: a missing model or data, an unusable backend, a precision refusal),
    ``fit`` (the --fit plan, or when it is made) and ``launch`` (the launcher command, when one starts).
    """
    from comapoi_cli.training.fit import FitError, dry_run_plan

    job, location, backend = plan.job, plan.location, plan.backend
    problems = [p for p in (location.problem,) if p] + data_problems(job, registry)
    reason = unusable_reason(backend)
    if reason:
        problems.append(f"backend {job.backend} is not usable here: {reason}")
    device, refusal = device_report(job)
    if refusal:
        problems.append(refusal)
    out: dict[str, Any] = {
        "job": job.to_dict(),
        "resolved": {"warmup_steps": job.effective_warmup_steps, "logging_steps": job.effective_logging_steps,
                     "learning_rate": job.learning_rate, "effective_batch": job.batch_size * job.gradient_accumulation_steps,
                     "device": device, "data_policies": job.policies, "strict": job.strict},
        "run_dir": str(job.run_dir),
        "model": {"kind": location.kind, "ref": location.ref},
        "problems": problems,
    }
    try:
        out["fit"] = dry_run_plan(job, location, backend.memory_profile)
    except FitError as exc:
        problems.append(exc.message)
    if plan.launch is not None:
        out["launch"] = ["accelerate", "launch", *plan.launch]
    return out


def check_trainable(plan: TrainingPlan) -> None:
    """Raise the one-sentence error that stops this plan before any heavy work (model missing, backend unusable)."""
    if plan.location.problem:
        from comapoi_cli.training.errors import ModelNotFoundError

        raise ModelNotFoundError(plan.location.problem, hint=plan.location.hint)
    reason = unusable_reason(plan.backend)
    if reason:
        raise ComapoiError(f"Backend {plan.job.backend} is not usable here: {reason}.",
                           hint=plan.backend.install_hint or None)


def run_launch(plan: TrainingPlan) -> int:
    """Run the plan under accelerate's launcher (``plan.launch`` set); the exit code of its processes."""
    from comapoi_cli.training.launch import run_launcher

    assert plan.launch is not None
    return run_launcher(plan.launch)


def launch_summary(plan: TrainingPlan) -> str:
    """One line: how many processes and the launcher's flags."""
    import shlex

    assert plan.launch is not None
    flags = plan.launch[:plan.launch.index("-m")] if "-m" in plan.launch else plan.launch
    return (f"comapoi train in {plan.job.num_processes or 'the configured'} processes: accelerate launch "
            f"{shlex.join(flags)} -m comapoi_cli train ...")


def start_summary(plan: TrainingPlan) -> str:
    job = plan.job
    return f"comapoi train {job.type} on {job.dataset_label} with {job.backend} -> {job.run_dir}"


def run_training(plan: TrainingPlan, reporter: Reporter) -> TrainingResult:
    """Train in this process with the plan's backend, reporting through ``reporter``."""
    train = plan.backend.train
    try:
        takes_reporter = "reporter" in inspect.signature(train).parameters
    except (TypeError, ValueError):
        takes_reporter = False
    return train(plan.job, reporter=reporter) if takes_reporter else train(plan.job)


def result_dict(result: TrainingResult) -> dict[str, Any]:
    """``comapoi train --json``'s output."""
    return {"status": result.status, "run_dir": str(result.run_dir), "global_step": result.global_step,
            "max_steps": result.max_steps, "final_loss": result.final_loss,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
            "progress": result.summary}


def finished_message(result: TrainingResult, job: TrainingJob) -> str:
    loss_text = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    first = result.summary.get("first_loss")
    if first is not None and result.final_loss is not None:
        loss_text = f", loss {first:.4f} -> {result.final_loss:.4f}"
    return (f"Adapter saved in {result.run_dir} ({result.global_step} steps{loss_text}). "
            f"List runs with: comapoi adapters list {job.output_dir}")


def stopped_message(result: TrainingResult, argv: list[str]) -> str:
    from comapoi_cli.training.launch import resume_command

    where = f"; checkpoint {result.checkpoint.name} saved" if result.checkpoint else "; no checkpoint was saved"
    return (f"Stopped at step {result.global_step} of {result.max_steps}{where}. "
            f"Continue with: {resume_command(argv)}")


__all__ = ["TrainingPlan", "check_trainable", "device_report", "dry_run_report", "finished_message", "launch_summary",
           "plan_training", "result_dict", "run_launch", "run_training", "start_summary", "stopped_message"]
