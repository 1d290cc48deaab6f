"""The Unsloth training path: comapoi's TRL path with Unsloth's model loading and LoRA.

``UnslothTrainingPath`` overrides only what Unsloth changes (see
``comapoi_cli.training.trl_trainer``): the base model and tokenizer come from
``FastLanguageModel.from_pretrained`` (4-bit, 8-bit or 16-bit per ``--quant``), LoRA from
``FastLanguageModel.get_peft_model`` with Unsloth's gradient checkpointing when the run's plan
(``--fit``, or ``--gradient_checkpointing``) has it on (none otherwise). Data preparation, tokenisation and masks,
the SFTConfig, progress, Ctrl-C, checkpoints, ``--resume``, the final adapter and run.json are the
TRL path's, so the output layout and ``adapters list`` entry are the same; the adapter is a plain
PEFT LoRA adapter of the base model.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from comapoi_cli.errors import ComapoiError, first_line
from comapoi_cli.training.trl_trainer import TRLTrainingPath  # light: imports no torch/transformers/trl


def import_unsloth() -> Any:
    """Import Unsloth before transformers, TRL and PEFT are used (it patches them); its banner goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        import unsloth
    return unsloth


def check_single_process() -> None:
    from comapoi_cli.training.distributed import single_process_refusal, world_size

    if world_size() > 1:
        raise single_process_refusal("unsloth", world_size())


def train_with_unsloth(job: Any, reporter: Any = None) -> Any:
    """The ``unsloth`` backend's ``train``: refuse multi-process launches, import Unsloth first, run the path."""
    check_single_process()
    if getattr(job, "liger", False):
        raise ComapoiError("--liger is for the trl backend: Unsloth patches the model with its own fused kernels.",
                           hint="Drop --liger with --backend unsloth.")
    import_unsloth()
    return UnslothTrainingPath(job, reporter).run()


class UnslothTrainingPath(TRLTrainingPath):
    backend_name = "unsloth"
    memory_profile = "unsloth"  #: --fit: Unsloth's own calibration (comapoi_cli.training.fit.MEMORY_PROFILES)
    extra_version_packages = ("unsloth", "unsloth-zoo")

    def checkpointing(self) -> Any:
        """Unsloth's gradient checkpointing (offloads activations to the host) with the flag; none without."""
        return "unsloth" if self.execution.gradient_checkpointing else False

    def load_model_and_tokenizer(self, model_dir: str, plan: Any) -> tuple[Any, Any]:
        import torch
        from unsloth import FastLanguageModel

        if plan.type == "cuda" and plan.precision == "fp32":
            # Unsloth's kernels train in 16-bit on a GPU: take bf16 where the GPU has it, else fp16
            bf16 = torch.cuda.is_bf16_supported()
            plan.precision, plan.dtype = ("bf16", "bfloat16") if bf16 else ("fp16", "float16")
            self.reporter.info(f"Unsloth trains in 16-bit on a GPU: using {plan.precision} "
                               f"(pass --bf16 or --fp16 to choose).")
        job = self.job
        with contextlib.redirect_stdout(sys.stderr):
            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=model_dir, max_seq_length=job.seq_length, dtype=plan.torch_dtype(),
                load_in_4bit=plan.quant == "4bit", load_in_8bit=plan.quant == "8bit",
                use_gradient_checkpointing=self.checkpointing(), random_state=job.seed)
        return model, tokenizer

    def apply_lora(self, model: Any, plan: Any) -> Any:
        from unsloth import FastLanguageModel

        job = self.job
        targets: Any = "all-linear" if job.target_modules == ("all-linear",) else list(job.target_modules)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return FastLanguageModel.get_peft_model(
                    model, r=job.lora_r, lora_alpha=job.lora_alpha, lora_dropout=job.lora_dropout, bias="none",
                    target_modules=targets, random_state=job.seed, max_seq_length=job.seq_length,
                    use_gradient_checkpointing=self.checkpointing())
        except (ValueError, TypeError) as exc:  # e.g. a module this architecture does not have
            raise ComapoiError(f"Unsloth cannot apply LoRA: {first_line(exc)}",
                               hint="Check --target-modules against the model's module names.") from None

    def sft_config_kwargs(self, plan: Any, run_dir: Any, has_eval: bool) -> dict[str, Any]:
        kwargs = super().sft_config_kwargs(plan, run_dir, has_eval)
        # get_peft_model already set up (Unsloth's) checkpointing; the Trainer must not add its own
        kwargs.update(gradient_checkpointing=False, gradient_checkpointing_kwargs=None)
        return kwargs

    def make_trainer(self, *args: Any, **kwargs: Any) -> Any:
        with contextlib.redirect_stdout(sys.stderr):  # Unsloth's trainer patches print banners
            return super().make_trainer(*args, **kwargs)

