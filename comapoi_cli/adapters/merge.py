"""``comapoi adapters merge``: fold a LoRA adapter into a 16-bit copy of its base model.

:func:`merge_adapter` loads the base model the run recorded (or ``model``) in 16-bit (or 32-bit)
weights, never quantised, applies the adapter with PEFT (the loaders of ``comapoi eval``: the
tiny-base rebuild, ``--model`` and a base stored quantised, which is dequantised first), computes
the logits of a few inputs, merges (``merge_and_unload``), saves the merged model with the run's
tokenizer and chat template into a temporary sibling of the output folder, reloads it from there
with plain transformers and compares its logits with the ones before merging; only when they match
is the folder renamed into place. A QLoRA adapter (trained on a 4-bit base) is merged into the
original 16-bit weights: merging into 4-bit weights would round the small LoRA update away and a
4-bit model is no plain model folder to serve.

Only the functions that need them import torch / transformers / peft.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from comapoi_cli.adapters.export import strip_remote_code
from comapoi_cli.adapters.listing import require_run_folder
from comapoi_cli.choices import DTYPE_CHOICES, HALF_DTYPES, QUANTISED
from comapoi_cli.errors import ComapoiError, UsageError
from comapoi_cli.fileio import atomic_folder, read_json, sha256_file, write_json_atomic

DTYPES = ("auto", *DTYPE_CHOICES)
MERGE_INFO = "comapoi_merge.json"
#: Logit tolerance floor per dtype: ``atol + rtol * max|logit|`` (16-bit weights round W + BA once more).
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (1e-2, 6e-2), "float16": (1e-3, 2e-2)}
#: In 16 bits the tolerance is also at least this many times the dtype's own error on the input, measured:
#: the merged model's logits in 16 bits minus the same model's logits computed in float32. The reference
#: (base + adapter in 16 bits) carries one such error, the merged model another, and rounding W + BA to
#: 16 bits a third of about the same size; a merge that lost or mis-scaled the adapter differs by the
#: adapter's whole effect, which is larger.
NOISE_FACTOR = 3.0
CHECK_TOKENS = 128  #: tokens per check input (the end of a training conversation)

Log = Callable[[str], None]


@dataclass
class LogitCheck:
    """One check input: merged vs base+adapter logits."""

    source: str  #: where the input came from (a data file and line, or "fixed text")
    tokens: int
    max_abs_diff: float
    tolerance: float
    argmax_agreement: float  #: share of positions whose most likely next token is the same
    #: max |logits in the dtype - logits in float32| of the merged model on this input (None: float32,
    #: or not measurable); the tolerance is at least NOISE_FACTOR times it
    dtype_error: float | None
    ok: bool


@dataclass
class MergeResult:
    output: Path
    run_dir: Path
    base_model: str
    dtype: str
    device: str
    trained_quant: str | None
    checks: list[LogitCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"], data["run_dir"] = str(self.output), str(self.run_dir)
        return data


def _config_dtype(base_model: str, trust_remote_code: bool = False) -> str | None:
    """The dtype the base model's weights are stored in, as its config.json says."""
    config: Any = None
    path = Path(base_model)
    if path.is_dir():
        with contextlib.suppress(OSError, ValueError):
            config = read_json(path / "config.json")
    else:
        with contextlib.suppress(Exception):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code).to_dict()
    if not isinstance(config, dict):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    value = str(value).replace("torch.", "") if value else None
    return value if value in DTYPE_CHOICES else None


def choose_dtype(requested: str, base_model: str, device: str, recorded: str | None,
                 trust_remote_code: bool = False) -> tuple[str, str | None]:
    """``--dtype`` resolved, and a note when auto chose something other than the stored dtype.

    auto: the dtype the base weights are stored in (config.json); float16 on the CPU becomes
    float32 (CPU float16 kernels are slow or missing); unknown: the run's 16-bit training dtype,
    else float32.
    """
    if requested not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not '{requested}'.")
    if requested != "auto":
        return requested, None
    stored = _config_dtype(base_model, trust_remote_code)
    if stored == "float16" and not device.startswith("cuda"):
        return "float32", ("the base is stored in float16, merged and saved in float32 on the CPU (twice the size); "
                           "pass --dtype float16 to keep 16-bit")
    if stored:
        return stored, None
    if recorded in HALF_DTYPES:
        return recorded, None
    return "float32", None


def _check_output(output: Path, overwrite: bool, protected: list[Path]) -> None:
    resolved = output.resolve()
    for folder in protected:
        folder = folder.resolve()
        if resolved == folder or folder.is_relative_to(resolved) or resolved.is_relative_to(folder):
            raise UsageError(f"--output-dir {output} overlaps {folder}; choose a folder outside the run and the base model.")
    if output.exists():
        if not output.is_dir():
            raise UsageError(f"--output-dir {output} is a file.")
        if any(output.iterdir()) and not overwrite:
            raise UsageError(f"--output-dir {output} already exists and is not empty.",
                             hint="Pass --overwrite to replace it, or choose another folder.")


def _check_inputs(tokenizer: Any, run: Any, count: int) -> list[tuple[str, list[int]]]:
    """``count`` token sequences: the ends of the run's first holdout (else training) conversations."""
    from comapoi_cli.evaluation.predictions import iter_jsonl
    from comapoi_cli.models.generation import record_messages as _messages

    inputs: list[tuple[str, list[int]]] = []
    train = run.train_file
    for path in (run.holdout, train[0] if train else None):
        if path is None or not Path(path).is_file() or len(inputs) >= count:
            continue
        for number, value, problem in iter_jsonl(Path(path)):
            if len(inputs) >= count:
                break
            messages = _messages(value) if problem is None else None
            if not messages:
                continue
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception:
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                inputs.append((f"{Path(path).name}:{number}", list(ids[-CHECK_TOKENS:])))
    fixed = ["User 12 visited POI 345 at 10:00 and POI 678 at 12:30. Which POI will the user visit next?",
             "The next POI is", "Candidate POIs: 1, 22, 333, 4444."]
    while len(inputs) < count and fixed:
        text = fixed.pop(0)
        inputs.append(("fixed text", list(tokenizer(text, add_special_tokens=False)["input_ids"])[:CHECK_TOKENS]))
    return inputs


def _logits(model: Any, inputs: list[tuple[str, list[int]]]) -> list[Any]:
    import torch

    out = []
    with torch.inference_mode():
        for _, ids in inputs:
            tensor = torch.tensor([ids], device=model.device)
            out.append(model(input_ids=tensor).logits[0].float().cpu())
    return out


def _dtype_errors(model: Any, inputs: list[tuple[str, list[int]]], logits: list[Any], dtype_name: str,
                  notes: list[str]) -> list[float | None]:
    """Per input, max |logits in ``dtype_name`` - logits of the same weights computed in float32|.

    The weights are upcast exactly (16-bit values are float32 values), so the difference is the
    error the dtype's arithmetic makes on this very input. When float32 does not fit (twice the
    16-bit memory), the fixed tolerance alone applies, with a note.
    """
    if dtype_name == "float32" or not inputs:
        return [None] * len(inputs)
    try:
        model.float()
        exact = _logits(model, inputs)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        notes.append(f"the {dtype_name} rounding error could not be measured in float32 ({type(exc).__name__}): "
                     "the logit check used the fixed tolerance only")
        return [None] * len(inputs)
    return [float((a - b).abs().max()) for a, b in zip(logits, exact)]


def compare_logits(inputs: list[tuple[str, list[int]]], reference: list[Any], after: list[Any],
                   errors: list[float | None], dtype_name: str) -> list[LogitCheck]:
    """One :class:`LogitCheck` per input: ``after`` (merged) against ``reference`` (base + adapter).

    Tolerance: ``atol + rtol * max|reference|`` (``TOLERANCE``), and in 16 bits at least
    ``NOISE_FACTOR`` times the dtype's measured error on that input (``errors``).
    """
    atol, rtol = TOLERANCE[dtype_name]
    checks = []
    for (source, ids), ref, new, error in zip(inputs, reference, after, errors):
        diff = float((ref - new).abs().max())
        tolerance = atol + rtol * float(ref.abs().max())
        if error is not None:
            tolerance = max(tolerance, NOISE_FACTOR * error)
        agreement = float((ref.argmax(-1) == new.argmax(-1)).float().mean())
        checks.append(LogitCheck(source=source, tokens=len(ids), max_abs_diff=diff, tolerance=tolerance,
                                 argmax_agreement=agreement, dtype_error=error, ok=diff <= tolerance))
    return checks


def merge_adapter(run_dir: str | os.PathLike[str], output: str | os.PathLike[str], *, model: str | None = None,
                  dtype: str = "auto", device: str = "auto", overwrite: bool = False, check_inputs: int = 3,
                  log: Log | None = None, trust_remote_code: bool = False) -> MergeResult:
    """Merge the adapter of ``run_dir`` (a run folder or one of its checkpoint-N folders) into its base model.

    Writes ``output`` (config.json, model.safetensors, generation_config.json, the tokenizer
    files with the chat template, and ``comapoi_merge.json``) only when the merged model's logits
    match the base model's with the adapter on ``check_inputs`` inputs (0 skips the check).
    The merged folder never holds code files (``*.py``) or ``auto_map`` entries, even with
    ``trust_remote_code`` (which only lets the base model's own code load). The output is locked
    while it is written, and a run still being trained is refused.
    """
    from comapoi_cli.runs.lock import check_not_locked, hold_lock, output_lock_path

    folder = require_run_folder(run_dir)
    check_not_locked(folder.parent if folder.name.startswith("checkpoint-") else folder)
    target = Path(output).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(output_lock_path(target), f"The merge output {target}"):
        return _merge(folder, target, model=model, dtype=dtype, device=device, overwrite=overwrite,
                      check_inputs=check_inputs, log=log, trust_remote_code=trust_remote_code)


def _merge(folder: Path, output: Path, *, model: str | None, dtype: str, device: str, overwrite: bool,
           check_inputs: int, log: Log | None, trust_remote_code: bool) -> MergeResult:
    from comapoi_cli.models.loading import base_is_quantised, load_model, plan_device, tokenizer_folder
    from comapoi_cli.models.resolve import resolve_base_model
    from comapoi_cli.runs.info import locate_run

    run = locate_run(folder)
    base = resolve_base_model(model, run)
    protected = [run.run_dir] + ([Path(base)] if Path(base).is_dir() else [])
    _check_output(output, overwrite, protected)
    device, _ = plan_device(device, "none", run.quant)
    dtype_name, dtype_note = choose_dtype(dtype, base, device, run.dtype, trust_remote_code)
    notes = [dtype_note] if dtype_note else []
    trained_quant = run.quant
    if trained_quant in QUANTISED:
        notes.append(f"the adapter was trained on a {trained_quant} quantised base (QLoRA); it is merged into the "
                     f"base's {dtype_name} weights, never into {trained_quant} ones: rounding W + BA back to "
                     f"{trained_quant} would lose most of the small LoRA update, and a quantised model is no plain "
                     "model folder to serve")
    if base_is_quantised(base):
        notes.append(f"the base model {base} is stored quantised: it is dequantised to {dtype_name} before "
                     "merging, so the merged model is only as precise as those weights (pass the original "
                     "16-bit base with --model DIR if you have it)")

    output.parent.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"loading {base} ({device}, {dtype_name}) with the adapter {run.adapter_dir}")
    loaded = load_model(base, adapters={"adapter": run.adapter_dir}, quant="none", device=device, dtype=dtype_name,
                        dequantize=True, tokenizer=tokenizer_folder(run, base), trust_remote_code=trust_remote_code)
    inputs = _check_inputs(loaded.tokenizer, run, check_inputs) if check_inputs > 0 else []
    reference = _logits(loaded.model, inputs)
    if log:
        log("merging the adapter into the base weights")
    merged = loaded.model.merge_and_unload()
    del loaded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_folder(output) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer_dir = tokenizer_folder(run, base)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
        tokenizer.save_pretrained(str(tmp))
        stripped = strip_remote_code(tmp)  # a merged folder is handed over: it never carries code
        if stripped:
            notes.append(f"not copied into the merged model: {', '.join(stripped)} (code files and auto_map entries are never handed over)")
        del merged
        gc.collect()
        checks: list[LogitCheck] = []
        if inputs:
            if log:
                log(f"checking the saved model's logits on {len(inputs)} inputs")
            import torch

            reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=getattr(torch, dtype_name),
                                                            trust_remote_code=False).to(device).eval()
            after = _logits(reloaded, inputs)
            errors = _dtype_errors(reloaded, inputs, after, dtype_name, notes)
            del reloaded
            checks = compare_logits(inputs, reference, after, errors, dtype_name)
            bad = [c for c in checks if not c.ok]
            if bad:
                worst = max(bad, key=lambda c: c.max_abs_diff / c.tolerance)
                raise ComapoiError(
                    f"The merged model's logits differ from the base model with the adapter by {worst.max_abs_diff:.3g} "
                    f"(tolerance {worst.tolerance:.3g}, input {worst.source}), so {output} was not written.",
                    hint="Try --dtype float32; report it if it persists.")
        if (tmp / "config.json").is_file() and isinstance(read_json(tmp / "config.json").get("quantization_config"), dict):
            raise ComapoiError("The merged model still carries a quantization_config, so it was not written.")
        adapter_weights = run.adapter_weights
        result = MergeResult(output=output, run_dir=run.run_dir, base_model=base, dtype=dtype_name, device=device,
                             trained_quant=trained_quant, checks=checks, notes=notes)
        write_json_atomic(tmp / MERGE_INFO, {
            "adapter": str(run.adapter_dir.resolve()),
            "adapter_sha256": sha256_file(adapter_weights) if adapter_weights.is_file() else None,
            "run_type": run.type, "dataset": run.dataset, "base_model": base, "dtype": dtype_name,
            "trained_quant": trained_quant, "checks": [asdict(c) for c in checks], "notes": notes,
        })
        if any(p.name.endswith((".bin", ".pt", ".pth", ".pkl")) for p in tmp.iterdir()):
            raise ComapoiError("The merged model was saved with pickled weights, so it was not written.")
        result.files = sorted(p.name for p in tmp.iterdir())
    return result
