"""``comapoi eval --adapter RUN_DIR``: generate answers for held-out records and score them.

The steps, each a function so that tests and plugins can reuse them:

1. :func:`locate_run` reads the run folder (``run.json``: base model, role, dataset, holdout).
2. :func:`resolve_data` picks the held-out file: ``--data``, ``--dataset/--type`` (prepared by
   the data services), or the holdout the run recorded.
3. :func:`load_eval_records` reads it and finds each record's label with its role's ``target()``.
4. :func:`load_model` loads the base model with the adapter (PEFT); :func:`generate` renders each
   prompt with the tokenizer's chat template (``add_generation_prompt``) and decodes greedily in
   left-padded batches, longest prompts first.
5. Each output is parsed and scored (``comapoi_cli.evaluation.scoring``); predictions.jsonl,
   metrics.json and metrics.csv are written atomically beside the adapter, and the result is
   appended to run.json's ``evaluations``.

Only the model steps import torch / transformers / peft, inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from comapoi_cli.errors import ComapoiError, DataError, UsageError
from comapoi_cli.evaluation.metrics import RecordOutcome
from comapoi_cli.evaluation.outputs import metrics_csv, now_iso
from comapoi_cli.evaluation.predictions import iter_jsonl
from comapoi_cli.evaluation.scoring import LabelError, Scorer, summarize
from comapoi_cli.fileio import atomic_writer, read_json, sha256_file, write_json_atomic, write_text_atomic
from comapoi_cli.roles import MERGED, RoleContext
from comapoi_cli.runs.info import RunInfo, locate_run  # noqa: F401  (importable from here too)
from comapoi_cli.runs.layout import ADAPTER_CONFIG, RUN_JSON  # noqa: F401
from comapoi_cli.runs.record import append_evaluation

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
MAX_AUTO_NEW_TOKENS = 512

Log = Callable[[str], None]


@dataclass
class EvalRequest:
    """What ``comapoi eval`` was asked to do (the CLI's options)."""

    adapter: Path
    data: Path | None = None
    dataset: str | None = None
    type: str | None = None
    data_dir: Path | None = None
    num_samples: int = 0
    model: str | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    quant: str = "auto"
    device: str = "auto"
    output_dir: Path | None = None
    progress: bool = True
    #: score held-out records that were in the run's training data (by conversation key), with a warning
    allow_train_overlap: bool = False


@dataclass
class DataChoice:
    """The held-out file, and (for a merged run's holdout) the one role whose records count."""

    path: Path
    only_role: str | None = None
    note: str | None = None


def resolve_data(request: EvalRequest, run: RunInfo, type_: str | None, dataset: str | None) -> DataChoice:
    """The held-out file to evaluate on.

    ``--data`` wins; else the run's own holdout (for a merged run asked for one role, only that
    role's records of it: the role's separately split holdout may overlap the merged training
    data); else ``--dataset``/``--type`` (or the run's) prepared by the data services.
    """
    if request.data is not None:
        if not request.data.is_file():
            raise DataError(f"Data file {request.data} does not exist." if not request.data.exists()
                            else f"{request.data} is not a file.")
        return DataChoice(request.data)
    holdout = run.holdout
    same_dataset = request.dataset is None or (run.dataset or "").lower() == request.dataset.lower()
    if holdout is not None and same_dataset and (type_ is None or type_ == run.type or run.type == MERGED):
        if not holdout.is_file():
            raise DataError(f"The run's holdout {holdout} no longer exists.",
                            hint="Pass --data FILE, or --dataset and --type to prepare it again.")
        if run.type == MERGED and type_ not in (None, MERGED):
            return DataChoice(holdout, only_role=type_,
                              note=f"evaluating the {type_} records of the merged run's holdout {holdout.name}")
        return DataChoice(holdout)
    if dataset is not None and type_ is not None:
        return DataChoice(_prepared_holdout(request, run, type_, dataset))
    raise UsageError("The run records no holdout; say what to evaluate on with --data FILE or --dataset NAME --type TYPE.")


def _prepared_holdout(request: EvalRequest, run: RunInfo, type_: str, dataset: str) -> Path:
    """The ``*_100.jsonl`` holdout of ``dataset``/``type_``, prepared (cleaned, split) if needed.

    The split uses the run's recorded seed and test size (defaults as ``comapoi train``), so that
    the holdout is the one the adapter never saw.
    """
    from comapoi_cli.data import prepare_training_data

    kwargs: dict[str, Any] = {"type_": type_, "dataset": dataset}
    if request.data_dir is not None:
        kwargs["data_dir"] = request.data_dir
    elif run.data_dir is not None:
        kwargs["data_dir"] = run.data_dir
    for name in ("seed", "test_size"):
        value = run.job_value(name)
        if value is not None:
            kwargs[name] = value
    prepared = prepare_training_data(**kwargs)
    if prepared.holdout_path is None or not Path(prepared.holdout_path).is_file():
        raise DataError(f"Preparing {dataset}/{type_} produced no holdout file.",
                        hint="Pass a held-out file with --data FILE.")
    return Path(prepared.holdout_path)


# -- records ---------------------------------------------------------------------------------------------

@dataclass
class EvalRecord:
    line: int
    id: Any
    role: str
    prompt: list[dict[str, str]]
    label: Any
    prompt_sha256: str


@dataclass
class LoadedRecords:
    records: list[EvalRecord]
    scorers: dict[str, Scorer]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    total: int = 0


_MESSAGE_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def _messages(record: Any) -> list[dict[str, str]] | None:
    if not isinstance(record, dict):
        return None
    raw = record.get("messages", record.get("conversations"))
    if not isinstance(raw, list):
        return None
    out = []
    for message in raw:
        if not isinstance(message, dict):
            return None
        role = _MESSAGE_ROLES.get(str(message.get("role", message.get("from", ""))).lower())
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            return None
        out.append({"role": role, "content": content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)})
    return out


def prompt_hash(messages: Sequence[dict[str, str]]) -> str:
    """SHA-256 of the prompt turns as canonical JSON (``[{"role", "content"}]``, sorted keys, no spaces)."""
    canonical = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages],
                           ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_eval_records(path: Path, type_: str | None, dataset: str | None, registry: Any,
                      num_samples: int = 0, only_role: str | None = None) -> LoadedRecords:
    """Read held-out records, pick each record's role, and compute its label.

    ``type_`` is the run's type: a role id scores every record as that role; ``merged`` (or
    None) takes each record's ``agent`` field, and a record without one is scored as a plain
    next-POI record (CoMaPOI's parser, the answer's first id as label). Records that cannot be
    scored (no prompt, no label for their role) are counted in ``skipped`` by reason.
    ``only_role`` keeps only the records whose ``agent`` field names it (a merged holdout).
    """
    context = RoleContext(dataset=dataset)
    scorers: dict[str, Scorer] = {}

    def scorer_for(role_id: str | None) -> Scorer:
        key = role_id or ""
        if key not in scorers:
            scorers[key] = Scorer(registry.roles[role_id] if role_id else None, context)
        return scorers[key]

    fixed = only_role or (type_ if type_ and type_ != MERGED else None)
    if fixed is not None:
        registry.role(fixed)
    loaded = LoadedRecords(records=[], scorers={})
    skipped: dict[str, int] = {}
    ids: list[Any] = []
    for number, value, problem in iter_jsonl(path):
        if num_samples and loaded.total >= num_samples:
            break
        if only_role is not None and problem is None and (not isinstance(value, dict) or value.get("agent") != only_role):
            continue
        loaded.total += 1
        if problem is not None:
            _count(skipped, f"unreadable line ({problem.split(' (')[0]})")
            continue
        messages = _messages(value)
        if not messages:
            _count(skipped, "no messages list")
            continue
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        prompt = messages[:last_assistant] if last_assistant is not None else messages
        if not any(m["role"] == "user" for m in prompt):
            _count(skipped, "no user turn before the answer")
            continue
        role_id = fixed
        if role_id is None:
            agent = value.get("agent") if isinstance(value, dict) else None
            role_id = agent if isinstance(agent, str) and agent in registry.roles else None
        scorer = scorer_for(role_id)
        try:
            label = scorer.target({**value, "messages": messages})
        except LabelError as exc:
            _count(skipped, f"{scorer.name}: {exc}")
            continue
        record_id = value.get("id") if isinstance(value, dict) else None
        ids.append(record_id)
        loaded.records.append(EvalRecord(line=number, id=record_id, role=scorer.name, prompt=prompt, label=label,
                                         prompt_sha256=prompt_hash(prompt)))
    # the records' own ids when every record has a distinct one, else the line numbers
    usable = all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids) and len(set(map(str, ids))) == len(ids)
    for record in loaded.records:
        if not usable:
            record.id = record.line
    loaded.scorers = {s.name: s for s in scorers.values()}
    loaded.skipped = skipped
    return loaded


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


# -- the model -------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    quant: str
    max_context: int | None


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asks for a GPU, but CUDA is not available here.",
                         hint="Use --device cpu (slow for large models), or run on a machine with a GPU.")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not '{device}'.")
    return device


def resolve_base_model(model: str | None, run: RunInfo) -> str:
    """The base model folder (or Hugging Face id): ``--model``, else what the run recorded.

    A run on ``--model tiny`` whose cached model folder is gone gets it rebuilt: the tiny model
    is a deterministic function of the training file, which run.json records with its hash.
    """
    name = model or run.base_model
    if not name:
        raise UsageError(f"{run.run_dir} records no base model; pass it with --model DIR.")
    if name == "tiny" or (model is None and run.base_model_kind == "tiny" and not Path(name).is_dir()):
        return _tiny_base(run)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DataError(f"Base model folder {path} holds no config.json.")
        return str(path)
    if name.startswith(("/", ".", "~")) or (os.sep in name and not _looks_like_hub_id(name)):
        raise DataError(f"Base model {name} does not exist.",
                        hint="Pass the base model folder with --model DIR (the adapter was trained on it).")
    return name  # a Hugging Face id: transformers resolves it (from its cache when offline)


def _tiny_base(run: RunInfo) -> str:
    recorded = run.base_model
    if recorded and recorded != "tiny" and Path(recorded).is_dir():
        return recorded
    train = run.train_file
    if run.base_model_kind != "tiny" or train is None:
        raise UsageError("--model tiny is built from a run's training data, and this run was not trained on it.",
                         hint="Pass the base model folder with --model DIR.")
    path, digest = train
    if not path.is_file() or (digest and sha256_file(path) != digest):
        raise DataError(f"The tiny base model of this run is gone from the cache and cannot be rebuilt: its "
                        f"training file {path} is {'missing' if not path.is_file() else 'changed'}.",
                        hint="Pass the tiny model folder with --model DIR.")
    from comapoi_cli.training.tiny import ensure_tiny_model

    return str(ensure_tiny_model([path]))


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith(("/", "."))


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, deprecation notes, optional-kernel notices) off the
    terminal; ``COMAPOI_DEBUG=1`` keeps it."""
    if os.environ.get("COMAPOI_DEBUG"):
        return
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)\b")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def plan_device(device: str, quant: str, run: RunInfo) -> tuple[str, str]:
    """``--device`` and ``--quant`` resolved: auto quantisation is the run's on a GPU, none on the CPU."""
    device = _resolve_device(device)
    on_gpu = device.startswith("cuda")
    if quant == "auto":
        recorded = (run.quant or "").lower()
        quant = ("4bit" if recorded in ("", "auto", "4bit") else recorded if recorded in ("8bit", "none") else "none") \
            if on_gpu else "none"
    if quant in ("4bit", "8bit") and not on_gpu:
        raise UsageError(f"--quant {quant} needs a CUDA GPU (bitsandbytes); on the CPU use --quant none.")
    return device, quant


def load_model(base_model: str, run: RunInfo, *, quant: str = "auto", device: str = "auto",
               dtype: str | None = None, dequantize: bool = False) -> LoadedModel:
    """Load the base model, apply the adapter with PEFT, and ready the tokenizer for batched generation.

    ``dtype`` (bfloat16, float16, float32) overrides the default (the run's 16-bit dtype on a GPU,
    float32 on the CPU). ``dequantize``: a base model stored quantised (its config.json holds a
    ``quantization_config``, e.g. a bitsandbytes 4-bit checkpoint) is loaded as stored and
    dequantised to ``dtype`` before the adapter is applied (``comapoi adapters merge``).
    """
    _quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - a dependency
        raise ComapoiError("peft is not installed; it is needed to load an adapter (pip install peft).") from None

    dtype_name = dtype
    device, quant = plan_device(device, quant, run)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        recorded_dtype = run.dtype if run.dtype in ("bfloat16", "float16") else None
        dtype = getattr(torch, recorded_dtype) if recorded_dtype else (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        dtype = torch.float32
    if dtype_name is not None:
        dtype = getattr(torch, dtype_name)
    kwargs: dict[str, Any] = {"dtype": dtype}
    stored_quantised = dequantize and base_is_quantised(base_model)
    if stored_quantised:
        kwargs["device_map"] = {"": device if ":" in device or device == "cpu" else f"{device}:0"}
    if quant in ("4bit", "8bit"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
            if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device if ":" in device else f"{device}:0"}
    tokenizer_dir = tokenizer_folder(run, base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir) if isinstance(tokenizer_dir, Path) else tokenizer_dir)
    except Exception as exc:
        raise DataError(f"Cannot load the tokenizer from {tokenizer_dir}: {_first_line(exc)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    except OSError as exc:
        raise DataError(f"Cannot load the base model {base_model}: {_first_line(exc)}",
                        hint="Pass the base model folder the adapter was trained on with --model DIR.") from None
    if stored_quantised:
        try:
            model = model.dequantize()
        except Exception as exc:
            raise DataError(f"Cannot dequantise the base model {base_model}: {_first_line(exc)}",
                            hint="Pass its original 16-bit weights with --model DIR.") from None
        model = model.to(dtype)
    try:
        model = PeftModel.from_pretrained(model, str(run.adapter_dir))
    except Exception as exc:
        raise DataError(f"Cannot apply the adapter {run.adapter_dir} to {base_model}: {_first_line(exc)}",
                        hint="Is this the base model the adapter was trained on? Pass it with --model DIR.") from None
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if tokenizer.chat_template is None:
        raise DataError(f"The tokenizer in {tokenizer_dir} has no chat template; comapoi needs one to build prompts.")
    max_context = getattr(model.config, "max_position_embeddings", None)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=str(dtype).replace("torch.", ""),
                       quant=quant, max_context=max_context if isinstance(max_context, int) else None)


def tokenizer_folder(run: RunInfo, base_model: str) -> Path | str:
    """Where the adapter's tokenizer (and chat template) is: saved with the adapter, else the run's, else the base's."""
    return run.adapter_dir if _has_tokenizer(run.adapter_dir) else \
        run.run_dir if _has_tokenizer(run.run_dir) else Path(base_model)


def base_is_quantised(base_model: str) -> bool:
    """The base model folder stores quantised weights (config.json holds a ``quantization_config``)."""
    try:
        config = read_json(Path(base_model) / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("quantization_config"), dict)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file() or (folder / "vocab.json").is_file())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def render_prompts(tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each prompt through the tokenizer's chat template, with the generation prompt."""
    out = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def auto_max_new_tokens(tokenizer: Any, path: Path, lines: Iterable[int]) -> int:
    """1.5 x the longest reference answer (in tokens) among ``lines`` of ``path``, plus 16, at most 512."""
    wanted = set(lines)
    longest = 0
    for number, value, problem in iter_jsonl(path):
        if number not in wanted or problem is not None:
            continue
        messages = _messages(value) or []
        answer = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
        if answer:
            longest = max(longest, len(tokenizer(answer, add_special_tokens=False)["input_ids"]))
    return min(MAX_AUTO_NEW_TOKENS, int(longest * 1.5) + 16)


def generate(loaded: LoadedModel, token_ids: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
             on_batch: Callable[[int], None] | None = None, log: Log | None = None) -> list[str]:
    """Greedy decoding in left-padded batches (longest prompts first); returns the decoded answers in input order.

    On CUDA out of memory the batch is halved and retried; at batch size 1 it becomes one message.
    """
    import torch
    from transformers import GenerationConfig

    tokenizer, model = loaded.tokenizer, loaded.model
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    outputs: list[str] = [""] * len(token_ids)
    start = 0
    size = batch_size
    while start < len(order):
        chunk = order[start:start + size]
        batch = tokenizer.pad({"input_ids": [list(token_ids[i]) for i in chunk]}, padding=True, return_tensors="pt")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        try:
            with torch.inference_mode():
                generated = model.generate(**batch, generation_config=config)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if size == 1:
                raise ComapoiError(
                    "CUDA ran out of memory generating one answer.",
                    hint="Lower --max-new-tokens, evaluate with --quant 4bit, or use a GPU with more memory.") from None
            size = max(1, size // 2)
            if log:
                log(f"CUDA out of memory: batch size lowered to {size}")
            continue
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for index, text in zip(chunk, texts):
            outputs[index] = text.strip()
        start += len(chunk)
        if on_batch:
            on_batch(len(chunk))
    return outputs


# -- the whole command ----------------------------------------------------------------------------------

@dataclass
class EvalResult:
    entry: dict[str, Any]
    written: list[Path]
    notes: list[str]


def evaluate_adapter(request: EvalRequest, log: Log | None = None, registry: Any = None) -> EvalResult:
    """Run ``comapoi eval --adapter``: generate, parse, score, write; returns the evaluation entry."""
    if registry is None:
        from comapoi_cli.plugins import get_registry

        registry = get_registry()
    run = locate_run(request.adapter)
    type_ = request.type or run.type
    if type_ is not None and type_ != MERGED:
        registry.role(type_)
    dataset = request.dataset or run.dataset
    choice = resolve_data(request, run, type_, dataset)
    data_path = choice.path
    loaded = load_eval_records(data_path, type_, dataset, registry, num_samples=request.num_samples,
                               only_role=choice.only_role)
    notes = [choice.note] if choice.note else []
    notes += [f"skipped {count} record{'s' if count != 1 else ''}: {reason}" for reason, count in loaded.skipped.items()]
    if not loaded.records:
        raise DataError(f"Nothing to evaluate in {data_path}: none of its {loaded.total} records has a label "
                        f"for {type_ or 'its role'}.",
                        hint="; ".join([*notes, "docs/evaluation.md says what each role is scored against"]))
    from comapoi_cli.runs.datakeys import check_holdout

    data_sha = sha256_file(data_path)
    holdout_check = check_holdout(run, data_path, data_sha, [r.prompt for r in loaded.records],
                                  allow_train_overlap=request.allow_train_overlap, explicit=request.data is not None)
    notes += holdout_check.notes
    if holdout_check.overlap:
        notes.append(f"WARNING: {len(holdout_check.overlap)} of the {len(loaded.records)} records scored were in this "
                     "adapter's training data (--allow-train-overlap): their scores are not held-out scores")
    base_model = resolve_base_model(request.model, run)
    device, quant = plan_device(request.device, request.quant, run)
    if log:
        log(f"loading {base_model} ({device}, quantisation {quant}) with the adapter {run.adapter_dir}")
    model = load_model(base_model, run, quant=quant, device=device)
    token_ids = render_prompts(model.tokenizer, [r.prompt for r in loaded.records])
    max_new_tokens = request.max_new_tokens or auto_max_new_tokens(
        model.tokenizer, data_path, (r.line for r in loaded.records))
    records, token_ids = _drop_over_context(loaded.records, token_ids, max_new_tokens, model.max_context, notes)
    if not records:
        raise DataError(f"Every prompt in {data_path} is longer than the model's context ({model.max_context} tokens).")
    outputs = _generate_with_progress(model, token_ids, request, max_new_tokens, log)

    rows: list[dict[str, Any]] = []
    scored: list[tuple[str, RecordOutcome]] = []
    for record, output in zip(records, outputs):
        scorer = loaded.scorers[record.role]
        parsed = scorer.parse_output(output)
        item = scorer.outcome(record.label, parsed.predictions)
        scored.append((record.role, item))
        row: dict[str, Any] = {"id": record.id, "role": scorer.role.id if scorer.role is not None else None,
                               "dataset": dataset,
                               "prompt_sha256": record.prompt_sha256, "label": record.label, "output": output}
        if scorer.scores_ids:
            row["predicted_poi_ids"] = parsed.predictions
        row["rank"] = item.rank
        if parsed.problem and parsed.predictions is None:
            row["parse_error"] = parsed.problem
        rows.append(row)
    metrics, by_role = summarize(scored)

    out_dir = request.output_dir or run.adapter_dir
    predictions_path = out_dir / PREDICTIONS_FILE
    with atomic_writer(predictions_path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    entry: dict[str, Any] = {
        "data": str(data_path.resolve()),
        "data_sha256": data_sha,
        "train_overlap": len(holdout_check.overlap) if holdout_check.checked else None,
        "metrics": metrics,
        "time": now_iso(),
        "role": type_,
        "dataset": dataset,
        "adapter": str(run.adapter_dir.resolve()),
        "base_model": base_model,
        "predictions": str(predictions_path.resolve()),
        "records": loaded.total,
        "skipped": loaded.total - len(records),
        "generation": {"greedy": True, "batch_size": request.batch_size, "max_new_tokens": max_new_tokens,
                       "quant": model.quant, "dtype": model.dtype, "device": model.device},
    }
    if by_role:
        entry["by_role"] = by_role
    if request.num_samples:
        entry["num_samples"] = request.num_samples
    write_json_atomic(out_dir / METRICS_JSON, entry)
    write_text_atomic(out_dir / METRICS_CSV, metrics_csv(metrics, by_role))
    written = [predictions_path, out_dir / METRICS_JSON, out_dir / METRICS_CSV]
    if run.run_json is not None and not run.is_checkpoint:
        append_evaluation(run.run_json, entry)
        written.append(run.run_json)
    elif run.is_checkpoint:
        notes.append(f"{run.adapter_dir.name} is a checkpoint: its metrics are beside it, not in the run's run.json")
    else:
        notes.append(f"{run.run_dir} has no run.json: the metrics are in {METRICS_JSON} only")
    return EvalResult(entry=entry, written=written, notes=notes)


def _drop_over_context(records: list[EvalRecord], token_ids: list[list[int]], max_new_tokens: int,
                       max_context: int | None, notes: list[str]) -> tuple[list[EvalRecord], list[list[int]]]:
    if not max_context:
        return records, token_ids
    keep = [i for i, ids in enumerate(token_ids) if len(ids) + max_new_tokens <= max_context]
    dropped = len(records) - len(keep)
    if dropped:
        notes.append(f"skipped {dropped} record{'s' if dropped != 1 else ''}: prompt + {max_new_tokens} new tokens "
                     f"exceed the model's context of {max_context} tokens (never truncated)")
    return [records[i] for i in keep], [token_ids[i] for i in keep]


def _generate_with_progress(model: LoadedModel, token_ids: list[list[int]], request: EvalRequest,
                            max_new_tokens: int, log: Log | None) -> list[str]:
    if not request.progress:
        return generate(model, token_ids, batch_size=request.batch_size, max_new_tokens=max_new_tokens, log=log)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), TextColumn("records"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True, highlight=False), transient=False) as progress:
        task = progress.add_task("generate", total=len(token_ids))
        return generate(model, token_ids, batch_size=request.batch_size, max_new_tokens=max_new_tokens,
                        on_batch=lambda n: progress.advance(task, n), log=log)
