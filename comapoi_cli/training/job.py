"""``TrainingJob``: every option of one training run, resolved; ``TrainingResult``: what a run ended with.

Nothing here imports torch, transformers or trl: the CLI builds and prints a job (``--dry-run``)
in a fraction of a second. ``comapoi_cli.training.options.build_job`` turns flags and config
files into a job; a backend's ``train(job)`` runs it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comapoi_cli.errors import UsageError

#: The LoRA target modules of the original: all seven projections of a Llama/Qwen block.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = "tiny"
LOSS_CHOICES = ("assistant", "all")
QUANT_CHOICES = ("auto", "4bit", "8bit", "none")
REPORT_TO_CHOICES = ("none", "tensorboard")
SCHEDULER_CHOICES = ("cosine", "linear", "constant", "constant_with_warmup")

#: Fields that do not change what is trained: they may differ between a run and its ``--resume``.
RUN_CONTROL_FIELDS = frozenset({
    "resume", "overwrite", "show_labels", "report_to", "config_file", "logging_steps", "output_dir",
    "run_tag", "data_dir", "data_path", "model", "model_path",
    # how the run executes, not what it trains: a resumed run reuses the plan recorded in run.json
    "fit", "memory_budget",
})


def _safe_name(text: str) -> str:
    """A folder-name-safe version of ``text`` (letters, digits, ``._-``; the rest becomes ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


@dataclass
class TrainingJob:
    """Every option of one training run, resolved (defaults as the original ``finetune_sft_new.py``).

    Field names are the original's flag names where it had one (``seq_length``, ``batch_size``,
    ...); config files use the same names (or their kebab-case spelling).
    """

    # -- what to train on ---------------------------------------------------------------------
    type: str = "merged"  #: ``merged`` (every role's data) or one role id (``agent1``..)
    backend: str = "trl"
    dataset: str | None = "nyc"  #: dataset name; None with ``data_path`` (the folder then uses the file stem)
    data_dir: str = "data"  #: holds ``{dataset}/agent{1,2,3}_train_samples.jsonl``
    data_path: str | None = None  #: an explicit training file instead of ``data_dir``/``dataset``
    num_samples: int = 0  #: train on the first N records after the split (0 = all)
    test_size: int | float = 100  #: holdout held back from training: a count (>= 1) or a fraction (< 1)
    eval_size: int = 0  #: holdout records whose loss is computed at every checkpoint (0 = none)
    seed: int = 42

    # -- base model -----------------------------------------------------------------------------
    model: str = TINY  #: as given: ``tiny``, a name under ``model_path``, a folder, or a Hugging Face id
    model_path: str | None = None  #: the original's parent folder of ``model``
    base_model: str = TINY  #: resolved: ``tiny``, an absolute local folder, or a Hugging Face id
    chat_template: str | None = None  #: a Jinja file that replaces the tokenizer's chat template

    # -- sequences and loss ---------------------------------------------------------------------
    seq_length: int = 2048
    loss: str = "assistant"  #: ``assistant`` (answers only) or ``all`` (the original: prompts too)
    packing: bool = False
    group_by_length: bool = False  #: batches of records of similar length (less padding); not with packing

    # -- optimisation (the original's fixed values are options here) -------------------------------
    max_steps: int = 200
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 50  #: capped at a quarter of max_steps when used
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    neftune_alpha: float = 5.0  #: NEFTune noise (the original: 5); 0 turns it off

    # -- precision and memory -------------------------------------------------------------------
    fp16: bool | None = None  #: None = auto: bf16 on a GPU that has it (else fp16), fp32 on the CPU
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None  #: None = auto: ``--fit`` chooses on a GPU; off on the CPU
    quant: str = "auto"  #: ``auto``: ``--fit`` chooses 16-bit or 4bit on a GPU; none on the CPU
    fit: bool = True  #: plan micro-batch, checkpointing and ``--quant auto`` from the memory budget
    memory_budget: float = 0.0  #: GiB the run may use; 0 = the GPU's free memory (no plan on the CPU)
    liger: bool = False  #: Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE) on the TRL path; CUDA only

    # -- LoRA -------------------------------------------------------------------------------------
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES

    # -- outputs ----------------------------------------------------------------------------------
    output_dir: str = "output"
    run_tag: str = ""  #: default: the base model's name (``tiny``, ``qwen2.5-7b-instruct``)
    save_freq: int = 40
    logging_steps: int = 0  #: 0 = auto: every step up to 20 steps, then max_steps/20, at most 10
    report_to: str = "none"

    # -- run control ------------------------------------------------------------------------------
    resume: bool = False
    overwrite: bool = False
    show_labels: bool = False
    config_file: str | None = None

    # ------------------------------------------------------------------------------------------------
    @property
    def dataset_label(self) -> str:
        """The dataset part of the run folder (``sft-{dataset_label}``)."""
        if self.dataset:
            return _safe_name(self.dataset)
        if self.data_path:
            return _safe_name(Path(self.data_path).stem)
        return "data"

    @property
    def save_name(self) -> str:
        """``bs{bs}-gas{gas}-ms{max_steps}-{type}-lr{lr}``, spelled as the original spells it."""
        return (f"bs{self.batch_size}-gas{self.gradient_accumulation_steps}-ms{self.max_steps}"
                f"-{self.type}-lr{self.learning_rate}")

    @property
    def run_dir(self) -> Path:
        """``{output_dir}/{run_tag}/sft-{dataset}/{save_name}``."""
        return Path(self.output_dir) / self.run_tag / f"sft-{self.dataset_label}" / self.save_name

    @property
    def is_tiny(self) -> bool:
        return self.base_model == TINY

    def precision(self, gpu: bool, gpu_has_bf16: bool) -> str:
        """``bf16``, ``fp16`` or ``fp32`` for these flags: with neither ``--bf16`` nor ``--fp16`` given (auto),
        16-bit on a GPU (bf16 where it has it), fp32 on the CPU; otherwise as the flags say."""
        if self.bf16 is None and self.fp16 is None and gpu:
            return "bf16" if gpu_has_bf16 else "fp16"
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def effective_warmup_steps(self) -> int:
        return min(self.warmup_steps, self.max_steps // 4)

    @property
    def effective_logging_steps(self) -> int:
        if self.logging_steps > 0:
            return self.logging_steps
        return 1 if self.max_steps <= 20 else max(1, min(10, self.max_steps // 20))

    def check(self) -> None:
        """Raise ``UsageError`` for a value no run can use (one sentence naming the flag)."""
        positive = ("seq_length", "max_steps", "batch_size", "gradient_accumulation_steps", "save_freq", "lora_r", "lora_alpha")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        for name in ("num_samples", "eval_size", "warmup_steps", "logging_steps"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}.")
        if self.memory_budget < 0:
            raise UsageError(f"--memory-budget must not be negative, got {self.memory_budget}.")
        if not self.learning_rate > 0:
            raise UsageError(f"--learning-rate must be positive, got {self.learning_rate}.")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.neftune_alpha < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UsageError("--neftune-alpha, --weight-decay and --max-grad-norm must not be negative.")
        if not (self.test_size >= 1 and float(self.test_size).is_integer()) and not 0 <= self.test_size < 1:
            raise UsageError(f"--test-size must be a count (0, 1, 2, ...) or a fraction below 1, got {self.test_size}.")
        if self.fp16 and self.bf16:
            raise UsageError("--fp16 and --bf16 exclude each other; pick one.")
        choices = {"loss": LOSS_CHOICES, "quant": QUANT_CHOICES, "report_to": REPORT_TO_CHOICES,
                   "lr_scheduler": SCHEDULER_CHOICES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}.")
        if not self.target_modules:
            raise UsageError("--target-modules must name at least one module (or all-linear).")
        if self.group_by_length and self.packing:
            raise UsageError("--group-by-length and --packing exclude each other: packed sequences have no padding to save.")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other: continue the run, or start it again.")
        if not self.run_tag:
            raise UsageError("--run-tag must not be empty.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingJob":
        """The job recorded in a run.json (unknown keys, e.g. from a newer comapoi, are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)

    def training_differences(self, other: "TrainingJob") -> dict[str, tuple[Any, Any]]:
        """The fields that change what is trained and differ between ``self`` and ``other``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs.get(k)) for k in mine if k not in RUN_CONTROL_FIELDS and mine[k] != theirs.get(k)}


@dataclass
class TrainingResult:
    """What ``Backend.train(job)`` returns."""

    run_dir: Path
    status: str  #: ``finished`` or ``interrupted``
    global_step: int
    max_steps: int
    final_loss: float | None = None
    adapter_dir: Path | None = None  #: the final adapter (the run folder itself) once finished
    checkpoint: Path | None = None  #: the newest checkpoint (what ``--resume`` continues from)
    run_json: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == "finished"
