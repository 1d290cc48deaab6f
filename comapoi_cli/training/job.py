"""``TrainingJob``: every option of one training run, resolved; ``TrainingResult``: what a run ended with.

Nothing here imports torch, transformers or trl: the CLI builds and prints a job (``--dry-run``)
in a fraction of a second. ``comapoi_cli.training.options.build_job`` turns flags and config
files into a job; a backend's ``train(job)`` runs it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comapoi_cli.choices import QUANT_CHOICES
from comapoi_cli.errors import UsageError

#: The LoRA target modules of the original: all seven projections of a Llama/Qwen block.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = "tiny"
LOSS_CHOICES = ("assistant", "all")
REPORT_TO_CHOICES = ("none", "tensorboard")
SCHEDULER_CHOICES = ("cosine", "linear", "constant", "constant_with_warmup")
#: ``--method``: supervised fine-tuning, GRPO with the role's rewards, DPO on preference pairs.
METHOD_CHOICES = ("sft", "grpo", "dpo")
#: ``--beta`` when not given: GRPO's KL weight and DPO's temperature.
DEFAULT_BETA = {"grpo": 0.04, "dpo": 0.1}

#: Fields that do not change what is trained: they may differ between a run and its ``--resume``.
RUN_CONTROL_FIELDS = frozenset({
    "resume", "overwrite", "show_labels", "report_to", "config_file", "logging_steps", "output_dir",
    "run_tag", "data_dir", "data_path", "model", "model_path",
    # how the run executes, not what it trains: a resumed run reuses the plan recorded in run.json
    "fit", "memory_budget",
    # where the code comes from and how many processes run it
    "trust_remote_code", "num_processes", "accelerate_config",
})


def _safe_name(text: str) -> str:
    """A folder-name-safe version of ``text`` (letters, digits, ``._-``; the rest becomes ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


#: The option panels of ``comapoi train --help``, in order.
DATA, MODEL, TRAINING, LORA, PRECISION, OUTPUT, SCALE = (
    "Data", "Base model", "Training", "LoRA", "Precision and memory", "Outputs and run control",
    "Scale-out (several GPUs or machines)")
METHOD = "Method: rewards and preferences (--method grpo, dpo)"

#: The default --learning_rate for --model tiny: a randomly initialised model learns nothing visible at 1e-4.
TINY_LEARNING_RATE = 5e-3


def option(default: Any = dataclasses.MISSING, *, help: str, panel: str, flags: tuple[str, ...] = (),
           note: str | None = None, metavar: str | None = None, choices: tuple[str, ...] | str | None = None,
           switch: str = "pair", positive: bool = False, nonnegative: bool = False) -> Any:
    """A ``TrainingJob`` field that is also a ``comapoi train`` option (the one source of both).

    ``flags``: the spellings (default ``--field-name``; ``--field_name`` works too, as every option);
    ``help``: the help text (``{roles}`` is filled in with the registered roles); ``panel``: the help
    panel; ``note``: what the default means, shown after it in ``[default: ...]`` (the default itself
    is never written as text: it is read from the field); ``choices``: allowed values, or
    ``"registry:types"`` / ``"registry:backends"``; ``switch``: for booleans, ``pair`` (``--x/--no-x``)
    or ``on`` (``--x`` only); ``positive`` / ``nonnegative``: the value check ``TrainingJob.check`` makes.
    """
    metadata = {"cli": True, "help": help, "panel": panel, "flags": flags, "note": note, "metavar": metavar,
                "choices": choices, "switch": switch, "positive": positive, "nonnegative": nonnegative}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable option defaults are not allowed")
    return field(default=default, metadata=metadata)


@dataclass
class TrainingJob:
    """Every option of one training run, resolved (defaults as the original ``finetune_sft_new.py``).

    Field names are the original's flag names where it had one (``seq_length``, ``batch_size``,
    ...); config files use the same names (or their kebab-case spelling). Each field made with
    ``option(...)`` is also a ``comapoi train`` flag: its spellings, help, panel and default live
    here only (``comapoi_cli.cli.train`` derives the command from them).
    """

    # -- what to train on ---------------------------------------------------------------------
    type: str = option("merged", panel=DATA, choices="registry:types",
                       help="What to train: merged (every role's data) or one role: {roles}.")
    backend: str = option("trl", panel=MODEL, choices="registry:backends", help="Training backend.")
    dataset: str | None = option("nyc", panel=DATA,
                                 help="Dataset name: reads DATA_DIR/DATASET/agent{{1,2,3}}_train_samples.jsonl.")
    data_dir: str = option("data", panel=DATA, note="$COMAPOI_DATA_DIR first", help="Folder holding the dataset folders.")
    data_path: str | None = option(None, panel=DATA,
                                   help="An explicit training JSONL file instead of --dataset (cleaned, not split).")
    num_samples: int = option(0, panel=DATA, note="all", nonnegative=True,
                              help="Train on the first N records after the split.")
    test_size: int | float = option(100, panel=DATA, metavar="N|FRACTION",
                                    help="Records held out of training: a count, or a fraction below 1.")
    eval_size: int = option(0, panel=DATA, note="none", nonnegative=True,
                            help="Holdout records whose loss is computed at every checkpoint.")
    seed: int = option(42, panel=DATA, help="Seed of the split, LoRA init, data order, dropout.")
    on: tuple[str, ...] = option((), panel=DATA, metavar="CHECK=POLICY", note="each check's default policy",
                                 help="A data check's policy, as `comapoi data clean --on` takes it (repeatable, or a comma list).")
    strict: bool = option(False, panel=DATA, switch="on",
                          help="Refuse the data on any rejected record (as `comapoi data clean --strict`).")

    # -- method ---------------------------------------------------------------------------------
    method: str = option("sft", panel=METHOD, choices=METHOD_CHOICES,
                         help="sft: imitate the records' answers; grpo: sample answers to the records' prompts and "
                              "reward them with the role's rewards (NDCG@10, candidate recall, format); dpo: "
                              "preference pairs (prompt/chosen/rejected JSONL via --data-path).")
    init_adapter: str | None = option(None, panel=METHOD, metavar="RUN",
                                      help="Start from this run's adapter (an SFT run, usually) instead of a new LoRA; "
                                           "run.json records the chain of runs.")
    num_generations: int = option(4, panel=METHOD, positive=True,
                                  help="grpo: completions sampled per prompt (the group whose rewards are compared).")
    temperature: float = option(1.0, panel=METHOD, positive=True, help="grpo: sampling temperature.")
    beta: float | None = option(None, panel=METHOD, nonnegative=True, note="0.04 for grpo, 0.1 for dpo",
                                help="grpo: weight of the KL penalty to the starting model; dpo: the preference temperature.")
    max_completion_length: int = option(64, panel=METHOD, positive=True,
                                        help="grpo: tokens generated per completion.")

    # -- base model -----------------------------------------------------------------------------
    model: str = option(TINY, panel=MODEL,
                        help="tiny (built offline), a name under --model-path, a model folder, or a Hugging Face id.")
    model_path: str | None = option(None, panel=MODEL, note="$COMAPOI_MODEL_PATH",
                                    help="Folder that holds the model folder named by --model (as the original).")
    base_model: str = TINY  #: resolved: ``tiny``, an absolute local folder, or a Hugging Face id
    chat_template: str | None = option(None, panel=MODEL, help="A Jinja chat template file replacing the tokenizer's.")
    trust_remote_code: bool = option(False, panel=MODEL, switch="on",
                                     help="Run the Python code a model folder or hub repository ships (only for models you trust).")

    # -- sequences and loss ---------------------------------------------------------------------
    seq_length: int = option(2048, panel=TRAINING, positive=True,
                             help="Maximum tokens per record; longer records are cut (and counted) before training.")
    loss: str = option("assistant", panel=TRAINING, choices=LOSS_CHOICES,
                       help="assistant: loss on the answers only; all: on every token (the original).")
    packing: bool = option(False, panel=TRAINING, help="Pack several records into each sequence.")
    group_by_length: bool = option(False, panel=TRAINING,
                                   help="Batch records of similar length together: less padding per batch.")

    # -- optimisation (the original's fixed values are options here) -------------------------------
    max_steps: int = option(200, panel=TRAINING, positive=True, help="Optimizer steps.")
    batch_size: int = option(4, panel=TRAINING, positive=True, help="Batch size per device.")
    gradient_accumulation_steps: int = option(1, panel=TRAINING, positive=True, help="Micro-batches per optimizer step.")
    learning_rate: float = option(1e-4, panel=TRAINING, note=f"{TINY_LEARNING_RATE} for --model tiny", positive=True,
                                  help="Peak learning rate (AdamW).")
    warmup_steps: int = option(50, panel=TRAINING, note="at most max_steps/4", nonnegative=True,
                               help="Linear warm-up steps.")
    lr_scheduler: str = option("cosine", panel=TRAINING, choices=SCHEDULER_CHOICES,
                               help="Learning-rate schedule after the warm-up.")
    weight_decay: float = option(0.01, panel=TRAINING, nonnegative=True, help="AdamW weight decay.")
    max_grad_norm: float = option(1.0, panel=TRAINING, nonnegative=True, help="Gradient clipping norm.")
    optim: str = option("adamw_torch", panel=TRAINING,
                        help="Optimizer name as transformers spells it (e.g. paged_adamw_8bit).")
    neftune_alpha: float = option(5.0, panel=TRAINING, note="as the original; 0 turns it off", nonnegative=True,
                                  help="NEFTune embedding noise.")

    # -- precision and memory -------------------------------------------------------------------
    fp16: bool | None = option(None, panel=PRECISION, note="auto",
                               help="float16 mixed precision (CUDA). Auto: bf16 on a GPU that has it, else fp16; "
                                    "fp32 on the CPU.")
    bf16: bool | None = option(None, panel=PRECISION, note="auto",
                               help="bfloat16 mixed precision (recent GPUs, CPUs with bf16 instructions).")
    gradient_checkpointing: bool | None = option(
        None, panel=PRECISION, note="auto: --fit chooses on a GPU; off on the CPU",
        help="Recompute activations in the backward pass: much less memory, about 1.5x the time per step.")
    quant: str = option("auto", panel=PRECISION, choices=QUANT_CHOICES, note="--fit chooses on a GPU; none on the CPU",
                        help="Load the base model quantised with bitsandbytes: 4bit (NF4), 8bit or none.")
    fit: bool = option(True, panel=PRECISION,
                       help="Plan the run for the memory budget: micro-batch and accumulation (same effective batch), "
                            "checkpointing and, with --quant auto, 16-bit or 4-bit weights.")
    memory_budget: float = option(0.0, panel=PRECISION, metavar="GIB", nonnegative=True,
                                  note="the GPU's free memory; none on the CPU",
                                  help="GiB the run may use; --fit plans within 90% of it. With --dry-run: "
                                       "plan for a GPU of that size.")
    liger: bool = option(False, panel=PRECISION,
                         help="Liger's fused kernels (RMSNorm, SwiGLU, RoPE) on the trl backend; needs CUDA and liger-kernel.")

    # -- LoRA -------------------------------------------------------------------------------------
    lora_r: int = option(8, panel=LORA, positive=True, help="LoRA rank.")
    lora_alpha: int = option(16, panel=LORA, positive=True, help="LoRA alpha.")
    lora_dropout: float = option(0.1, panel=LORA, help="LoRA dropout, in [0, 1).")
    target_modules: tuple[str, ...] = option(DEFAULT_TARGET_MODULES, panel=LORA,
                                             help="Comma list of module names, or all-linear.")

    # -- outputs ----------------------------------------------------------------------------------
    output_dir: str = option("output", panel=OUTPUT, note="$COMAPOI_OUTPUT_DIR first", help="Root of the run folders.")
    run_tag: str = option("", panel=OUTPUT, note="the model's name",
                          help="Folder under the output root: OUTPUT/TAG/sft-DATASET/bs..-gas..-ms..-TYPE-lr../")
    save_freq: int = option(40, panel=OUTPUT, positive=True, help="Save a checkpoint every N steps.")
    logging_steps: int = option(0, panel=OUTPUT, note="auto: 1 up to 20 steps, at most 10", nonnegative=True,
                                help="Log the loss every N steps.")
    report_to: str = option("none", panel=OUTPUT, choices=REPORT_TO_CHOICES, help="Where to log metrics besides run.json.")

    # -- run control ------------------------------------------------------------------------------
    resume: bool = option(False, panel=OUTPUT, switch="on", help="Continue the run from its newest complete checkpoint.")
    overwrite: bool = option(False, panel=OUTPUT, switch="on", help="Replace an existing run folder.")
    show_labels: bool = option(False, panel=OUTPUT, switch="on",
                               help="Print one training sample with the tokens that carry loss highlighted.")
    config_file: str | None = None

    # -- scale-out --------------------------------------------------------------------------------
    num_processes: int | None = option(None, panel=SCALE, positive=True, note="1, or as --accelerate-config says",
                                help="Train data-parallel in N processes (one per GPU; gloo on the CPU) through "
                                     "accelerate launch.")
    accelerate_config: str | None = option(None, panel=SCALE,
                                           help="An accelerate config file (DDP, FSDP, DeepSpeed; see docs/scale-out.md) "
                                                "for the launch.")

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
        """``{output_dir}/{run_tag}/{method}-{dataset}/{save_name}`` (``sft-{dataset}`` as the original)."""
        return Path(self.output_dir) / self.run_tag / f"{self.method}-{self.dataset_label}" / self.save_name

    @property
    def effective_beta(self) -> float:
        """``--beta``, or the method's default (0.04 for grpo, 0.1 for dpo)."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.method, 0.0)

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
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = f"--{f.name.replace('_', '-')}"
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{flag} must be a finite number, got {value}.")
            if value is None:
                continue
            if f.metadata.get("positive") and not value > 0:
                least = "at least 1" if isinstance(value, int) else "positive"
                raise UsageError(f"{flag} must be {least}, got {value}.")
            if f.metadata.get("nonnegative") and value < 0:
                raise UsageError(f"{flag} must not be negative, got {value}.")
        if self.on or self.strict:
            from comapoi_cli.data.policies import resolve_policies

            resolve_policies(self.policies, strict=self.strict)  # an unknown check or policy: one sentence now
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}.")
        if not (self.test_size >= 1 and float(self.test_size).is_integer()) and not 0 <= self.test_size < 1:
            raise UsageError(f"--test-size must be a count (0, 1, 2, ...) or a fraction below 1, got {self.test_size}.")
        if self.fp16 and self.bf16:
            raise UsageError("--fp16 and --bf16 exclude each other; pick one.")
        choices = {"loss": LOSS_CHOICES, "quant": QUANT_CHOICES, "report_to": REPORT_TO_CHOICES,
                   "lr_scheduler": SCHEDULER_CHOICES, "method": METHOD_CHOICES}
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
        if self.method == "grpo":
            if self.packing:
                raise UsageError("--packing is for --method sft: GRPO samples one completion per prompt.")
            if self.num_generations < 2:
                raise UsageError("--num-generations must be at least 2 for --method grpo: GRPO compares the rewards "
                                 "of a group of completions.")
            if (self.batch_size * self.gradient_accumulation_steps) % self.num_generations:
                raise UsageError(f"--batch-size x --gradient-accumulation-steps ({self.batch_size} x "
                                 f"{self.gradient_accumulation_steps}) must be a multiple of --num-generations "
                                 f"{self.num_generations} for --method grpo (each prompt's group fills whole batches).")
        if self.method == "dpo":
            if not self.data_path:
                raise UsageError("--method dpo trains on preference pairs: give a JSONL of prompt/chosen/rejected "
                                 "records with --data-path.")
            if self.packing:
                raise UsageError("--packing is for --method sft: DPO compares a chosen and a rejected answer per prompt.")

    @property
    def policies(self) -> dict[str, str]:
        """``--on CHECK=POLICY`` (repeatable, or comma lists) as the mapping ``prepare_training_data(policies=...)``
        takes, parsed as ``comapoi data clean --on`` parses it."""
        from comapoi_cli.data.policies import parse_policy_options

        return parse_policy_options(self.on)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["on"] = list(self.on)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingJob":
        """The job recorded in a run.json (unknown keys, e.g. from a newer comapoi, are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("target_modules", "on"):
            if name in values:
                values[name] = tuple(values[name])
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
