"""``comapoi train``: fine-tune one agent role (or all merged) with a registered backend.

Every flag of the original ``finetune_sft_new.py`` works in its original spelling
(``--batch_size``) and in kebab-case (``--batch-size``). Flags default to None here so that only
the flags actually given override the config file (``--config``); the real defaults live in
``comapoi_cli.training.job.TrainingJob``. Nothing heavy is imported before the job is resolved:
``--dry-run`` and ``--help`` stay fast.
"""

# No "from __future__ import annotations": Typer must see the dynamic Enum types, not strings.
import enum
import shlex
import sys
from typing import Any, Optional

import typer

from comapoi_cli.cli.render import err_console, print_json, success, warn
from comapoi_cli.errors import ComapoiError
from comapoi_cli.training.job import LOSS_CHOICES, QUANT_CHOICES, REPORT_TO_CHOICES, SCHEDULER_CHOICES

DATA, MODEL, TRAINING, LORA, PRECISION, OUTPUT, SCALE = ("Data", "Base model", "Training", "LoRA",
                                                         "Precision and memory", "Outputs and run control",
                                                         "Scale-out (several GPUs or machines)")


def _opt(*names: str, panel: str, help: str, default: Any = None, show: str | None = None, **kwargs: Any) -> Any:
    return typer.Option(default, *names, help=help, rich_help_panel=panel,
                        show_default=show if show is not None else False, **kwargs)


def _choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    return enum.Enum(name, {v: v for v in values}, type=str)


def register(app: typer.Typer) -> None:
    from comapoi_cli.plugins import get_registry

    registry = get_registry()
    types = registry.training_types()
    backends = sorted(registry.backends)
    TrainingType = enum.Enum("TrainingType", {t: t for t in types}, type=str)
    BackendName = enum.Enum("BackendName", {b: b for b in backends}, type=str)
    roles = ", ".join(f"{r.id} ({r.display_name})" for r in registry.roles.values())
    Loss = _choices("Loss", LOSS_CHOICES)
    Quant = _choices("Quant", QUANT_CHOICES)
    ReportTo = _choices("ReportTo", REPORT_TO_CHOICES)
    Scheduler = _choices("Scheduler", SCHEDULER_CHOICES)

    @app.command("train", context_settings={"help_option_names": ["-h", "--help"]})
    def train(
        # -- data
        type_: Optional[TrainingType] = _opt("--type", panel=DATA, show="merged",
                                             help=f"What to train: merged (every role's data) or one role: {roles}."),
        dataset: Optional[str] = _opt("--dataset", panel=DATA, show="nyc",
                                      help="Dataset name: reads DATA_DIR/DATASET/agent{1,2,3}_train_samples.jsonl."),
        data_dir: Optional[str] = _opt("--data-dir", "--data_dir", panel=DATA, show="$COMAPOI_DATA_DIR or ./data",
                                       help="Folder holding the dataset folders."),
        data_path: Optional[str] = _opt("--data_path", "--data-path", panel=DATA,
                                        help="An explicit training JSONL file instead of --dataset (cleaned, not split)."),
        num_samples: Optional[int] = _opt("--num_samples", "--num-samples", panel=DATA, show="0 = all",
                                          help="Train on the first N records after the split."),
        test_size: Optional[str] = _opt("--test-size", "--test_size", panel=DATA, show="100",
                                        help="Records held out of training: a count, or a fraction below 1."),
        eval_size: Optional[int] = _opt("--eval-size", "--eval_size", panel=DATA, show="0 = none",
                                        help="Holdout records whose loss is computed at every checkpoint."),
        seed: Optional[int] = _opt("--seed", panel=DATA, show="42", help="Seed of the split, LoRA init, data order, dropout."),
        # -- model
        model: Optional[str] = _opt("--model", panel=MODEL, show="tiny",
                                    help="tiny (built offline), a name under --model_path, a model folder, or a Hugging Face id."),
        model_path: Optional[str] = _opt("--model_path", "--model-path", panel=MODEL, show="$COMAPOI_MODEL_PATH",
                                         help="Folder that holds the model folder named by --model (as the original)."),
        chat_template: Optional[str] = _opt("--chat-template", "--chat_template", panel=MODEL,
                                            help="A Jinja chat template file replacing the tokenizer's."),
        backend: Optional[BackendName] = _opt("--backend", panel=MODEL, show="trl", help="Training backend."),
        unsloth: Optional[bool] = _opt("--unsloth", panel=MODEL, help="Same as --backend unsloth (the original's flag)."),
        # -- training
        max_steps: Optional[int] = _opt("--max_steps", "--max-steps", panel=TRAINING, show="200", help="Optimizer steps."),
        batch_size: Optional[int] = _opt("--batch_size", "--batch-size", panel=TRAINING, show="4", help="Batch size per device."),
        gradient_accumulation_steps: Optional[int] = _opt("--gradient_accumulation_steps", "--gradient-accumulation-steps",
                                                          panel=TRAINING, show="1", help="Micro-batches per optimizer step."),
        learning_rate: Optional[float] = _opt("--learning_rate", "--learning-rate", panel=TRAINING, show="1e-4; 5e-3 for --model tiny",
                                              help="Peak learning rate (AdamW)."),
        seq_length: Optional[int] = _opt("--seq_length", "--seq-length", panel=TRAINING, show="2048",
                                         help="Maximum tokens per record; longer records are cut (and counted) before training."),
        loss: Optional[Loss] = _opt("--loss", panel=TRAINING, show="assistant",
                                   help="assistant: loss on the answers only; all: on every token (the original)."),
        packing: Optional[bool] = _opt("--packing/--no-packing", panel=TRAINING, show="off",
                                       help="Pack several records into each sequence."),
        group_by_length: Optional[bool] = _opt("--group-by-length/--no-group-by-length", "--group_by_length",
                                               panel=TRAINING, show="off",
                                               help="Batch records of similar length together: less padding per batch."),
        warmup_steps: Optional[int] = _opt("--warmup-steps", "--warmup_steps", panel=TRAINING, show="50, at most max_steps/4",
                                           help="Linear warm-up steps."),
        lr_scheduler: Optional[Scheduler] = _opt("--lr-scheduler", "--lr_scheduler", panel=TRAINING, show="cosine",
                                           help="Learning-rate schedule after the warm-up."),
        weight_decay: Optional[float] = _opt("--weight-decay", "--weight_decay", panel=TRAINING, show="0.01", help="AdamW weight decay."),
        max_grad_norm: Optional[float] = _opt("--max-grad-norm", "--max_grad_norm", panel=TRAINING, show="1.0",
                                              help="Gradient clipping norm."),
        optim: Optional[str] = _opt("--optim", panel=TRAINING, show="adamw_torch",
                                    help="Optimizer name as transformers spells it (e.g. paged_adamw_8bit)."),
        neftune_alpha: Optional[float] = _opt("--neftune-alpha", "--neftune_alpha", panel=TRAINING, show="5, as the original",
                                              help="NEFTune embedding noise; 0 turns it off."),
        # -- LoRA
        lora_r: Optional[int] = _opt("--lora-r", "--lora_r", panel=LORA, show="8", help="LoRA rank."),
        lora_alpha: Optional[int] = _opt("--lora-alpha", "--lora_alpha", panel=LORA, show="16", help="LoRA alpha."),
        lora_dropout: Optional[float] = _opt("--lora-dropout", "--lora_dropout", panel=LORA, show="0.1", help="LoRA dropout."),
        target_modules: Optional[str] = _opt("--target-modules", "--target_modules", panel=LORA,
                                             show="q,k,v,o,gate,up,down _proj",
                                             help="Comma list of module names, or all-linear."),
        # -- precision and memory
        fp16: Optional[bool] = _opt("--fp16/--no-fp16", panel=PRECISION, show="auto",
                                    help="float16 mixed precision (CUDA). Auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU."),
        bf16: Optional[bool] = _opt("--bf16/--no-bf16", panel=PRECISION, show="auto",
                                    help="bfloat16 mixed precision (recent GPUs, CPUs with bf16 instructions)."),
        gradient_checkpointing: Optional[bool] = _opt(
            "--gradient_checkpointing/--no-gradient-checkpointing", "--gradient-checkpointing", panel=PRECISION,
            show="auto: --fit chooses on a GPU; off on the CPU",
            help="Recompute activations in the backward pass: much less memory, about 1.5x the time per step."),
        quant: Optional[Quant] = _opt("--quant", panel=PRECISION, show="auto: --fit chooses on a GPU; none on the CPU",
                                    help="Load the base model quantised with bitsandbytes: 4bit (NF4), 8bit or none."),
        fit: Optional[bool] = _opt("--fit/--no-fit", panel=PRECISION, show="on",
                                   help="Plan the run for the memory budget: micro-batch and accumulation (same effective "
                                        "batch), checkpointing and, with --quant auto, 16-bit or 4-bit weights."),
        memory_budget: Optional[float] = _opt("--memory-budget", "--memory_budget", panel=PRECISION, metavar="GIB",
                                              show="the GPU's free memory; none on the CPU",
                                              help="GiB the run may use; --fit plans within 90% of it. With --dry-run: "
                                                   "plan for a GPU of that size."),
        liger: Optional[bool] = _opt("--liger/--no-liger", panel=PRECISION, show="off",
                                     help="Liger's fused kernels (RMSNorm, SwiGLU, RoPE) on the trl backend; needs CUDA and liger-kernel."),
        # -- outputs and run control
        output_dir: Optional[str] = _opt("--output_dir", "--output-dir", panel=OUTPUT, show="$COMAPOI_OUTPUT_DIR or ./output",
                                         help="Root of the run folders."),
        run_tag: Optional[str] = _opt("--run-tag", "--run_tag", panel=OUTPUT, show="the model's name",
                                      help="Folder under the output root: OUTPUT/TAG/sft-DATASET/bs..-gas..-ms..-TYPE-lr../"),
        save_freq: Optional[int] = _opt("--save_freq", "--save-freq", panel=OUTPUT, show="40", help="Save a checkpoint every N steps."),
        logging_steps: Optional[int] = _opt("--logging-steps", "--logging_steps", panel=OUTPUT, show="auto",
                                            help="Log the loss every N steps (auto: 1 up to 20 steps, at most 10)."),
        report_to: Optional[ReportTo] = _opt("--report-to", "--report_to", panel=OUTPUT, show="none", help="Where to log metrics besides run.json."),
        resume: Optional[bool] = _opt("--resume", panel=OUTPUT,
                                      help="Continue the run from its newest complete checkpoint."),
        overwrite: Optional[bool] = _opt("--overwrite", panel=OUTPUT, help="Replace an existing run folder."),
        show_labels: Optional[bool] = _opt("--show-labels", "--show_labels", panel=OUTPUT,
                                           help="Print one training sample with the tokens that carry loss highlighted."),
        config: Optional[str] = _opt("--config", panel=OUTPUT, help="A YAML or TOML file of these options (flags override it)."),
        dry_run: bool = _opt("--dry-run", "--dry_run", panel=OUTPUT, default=False,
                             help="Print the resolved job as JSON and exit (imports no torch)."),
        as_json: bool = _opt("--json", panel=OUTPUT, default=False,
                             help="Print the result as JSON on standard output when the run ends."),
        # -- scale-out
        num_processes: Optional[int] = _opt("--num-processes", "--num_processes", panel=SCALE, show="1",
                                            help="Train data-parallel in N processes (one per GPU; gloo on the CPU) "
                                                 "through accelerate launch."),
        accelerate_config: Optional[str] = _opt("--accelerate-config", "--accelerate_config", panel=SCALE,
                                                help="An accelerate config file (DDP, FSDP, DeepSpeed; see docs/scale-out.md) "
                                                     "for the launch."),
    ) -> None:
        """Fine-tune a LoRA / QLoRA adapter for one CoMaPOI agent role (or all roles merged).

        Example: comapoi train --dataset nyc --type agent3 --model_path /models --model qwen2.5-7b-instruct --bf16
        """
        from comapoi_cli.training.options import build_job, data_problems

        given = {
            "type": type_, "backend": backend,
            "unsloth": unsloth or None,
            "dataset": dataset, "data_dir": data_dir, "data_path": data_path, "num_samples": num_samples,
            "test_size": test_size, "eval_size": eval_size, "seed": seed, "model": model, "model_path": model_path,
            "chat_template": chat_template, "max_steps": max_steps, "batch_size": batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps, "learning_rate": learning_rate,
            "seq_length": seq_length, "loss": loss, "packing": packing, "group_by_length": group_by_length, "warmup_steps": warmup_steps,
            "lr_scheduler": lr_scheduler, "weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "optim": optim,
            "neftune_alpha": neftune_alpha, "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
            "target_modules": target_modules, "fp16": fp16, "bf16": bf16,
            "gradient_checkpointing": gradient_checkpointing, "quant": quant, "fit": fit, "memory_budget": memory_budget,
            "liger": liger, "output_dir": output_dir,
            "run_tag": run_tag, "save_freq": save_freq, "logging_steps": logging_steps, "report_to": report_to,
            "resume": resume or None, "overwrite": overwrite or None, "show_labels": show_labels or None,
        }
        given = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in given.items() if v is not None}
        job, location = build_job(given, config_file=config,
                                  registry=registry)
        selected = registry.backend(job.backend)
        from comapoi_cli.training.distributed import is_main_process
        from comapoi_cli.training.launch import plan_launch

        launch = plan_launch(num_processes, accelerate_config, selected, sys.argv)
        if dry_run:
            problems = [p for p in (location.problem,) if p] + data_problems(job, registry)
            reason = selected.unusable_reason()
            if reason:
                problems.append(f"backend {job.backend} is not usable here: {reason}")
            out = {"job": job.to_dict(), "run_dir": str(job.run_dir),
                   "model": {"kind": location.kind, "ref": location.ref}, "problems": problems}
            from comapoi_cli.training.fit import FitError, dry_run_plan

            try:
                out["fit"] = dry_run_plan(job, location, selected.memory_profile)
            except FitError as exc:
                problems.append(exc.message)
            if launch is not None:
                out["launch"] = ["accelerate", "launch", *launch]
            print_json(out)
            return
        if location.problem:
            from comapoi_cli.training.errors import ModelNotFoundError

            raise ModelNotFoundError(location.problem, hint=location.hint)
        reason = selected.unusable_reason()
        if reason:
            raise ComapoiError(f"Backend {job.backend} is not usable here: {reason}.", hint=selected.install_hint or None)
        if launch is not None:
            from rich.markup import escape

            err_console.print(f"[bold]comapoi train[/bold] in {num_processes or 'the configured'} processes: accelerate launch "
                              f"{escape(shlex.join(launch[:launch.index('-m')]))} -m comapoi_cli train ...",
                              highlight=False, soft_wrap=True)
            from comapoi_cli.training.launch import run_launcher

            code = run_launcher(launch)
            if code:
                raise typer.Exit(code)
            return
        main = is_main_process()
        if main:
            err_console.print(f"[bold]comapoi train[/bold] {job.type} on {job.dataset_label} with {job.backend} "
                              f"-> {job.run_dir}", highlight=False, soft_wrap=True)
        result = selected.train(job)
        if not main:
            # rank 0 reports, and its exit code is the run's. The other ranks end quietly with 0 even
            # when stopped: torch's launcher ends every rank as soon as one exits non-zero, which
            # could cut rank 0 short while it writes run.json after a Ctrl-C.
            return
        if as_json:
            print_json({"status": result.status, "run_dir": str(result.run_dir), "global_step": result.global_step,
                        "max_steps": result.max_steps, "final_loss": result.final_loss,
                        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                        "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
                        "progress": result.summary})
        if result.status == "finished":
            loss_text = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
            first = result.summary.get("first_loss")
            if first is not None and result.final_loss is not None:
                loss_text = f", loss {first:.4f} -> {result.final_loss:.4f}"
            message = (f"Adapter saved in {result.run_dir} ({result.global_step} steps{loss_text}). "
                       f"List runs with: comapoi adapters list {job.output_dir}")
            if as_json:
                err_console.print(f"[green]✓[/green] {message}", soft_wrap=True, highlight=False)
            else:
                success(message)
            return
        from comapoi_cli.training.launch import resume_command

        where = f"; checkpoint {result.checkpoint.name} saved" if result.checkpoint else "; no checkpoint was saved"
        warn(f"Stopped at step {result.global_step} of {result.max_steps}{where}. "
             f"Continue with: {resume_command(sys.argv[1:])}")
        raise typer.Exit(130)
