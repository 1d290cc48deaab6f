"""The built-in training backend: Hugging Face TRL's SFTTrainer with PEFT LoRA / QLoRA."""

from __future__ import annotations

from comapoi_cli.backends import Backend, missing_packages
from comapoi_cli.hookspecs import hookimpl


class TRLBackend(Backend):
    name = "trl"
    description = "TRL SFTTrainer (GRPOTrainer, DPOTrainer) + PEFT LoRA (QLoRA with bitsandbytes); CPU or GPU, one or many processes."
    requires = ("torch", "transformers>=5.17", "trl>=1.15", "peft>=0.21", "bitsandbytes (for --quant 4bit/8bit)")
    install_hint = "pip install -c constraints/default.txt -e ."
    multi_process = True
    methods = ("sft", "grpo", "dpo")

    def unusable_reason(self) -> str | None:
        missing = missing_packages("torch", "transformers", "trl", "peft", "datasets")
        if missing:
            return f"missing Python packages: {', '.join(missing)}"
        return None

    def train(self, job, reporter=None):
        from comapoi_cli.training.trl_trainer import train_with_trl

        return train_with_trl(job, reporter)


@hookimpl
def register_backends(register):
    register(TRLBackend())
