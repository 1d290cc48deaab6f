"""Loading a base model with its adapters: dtype, quantisation, device, remote code.

:func:`load_model` loads ONE base model and attaches every named adapter to it once (PEFT
``load_adapter``); :meth:`LoadedModel.use_adapter` switches between them (``set_adapter``) or
turns them off, per call, without copying any weights. So three agents trained on one base cost
one base model of memory plus three small adapters.

Every load passes ``trust_remote_code`` (default False: a model folder's own Python files are
never run and transformers never asks) and ``local_files_only=True`` (nothing is downloaded:
:func:`comapoi_cli.models.resolve.resolve_base_model` has already checked that a Hugging Face id
is cached).

Only the functions import torch / transformers / peft.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from comapoi_cli.choices import DTYPE_CHOICES, HALF_DTYPES, QUANT_CHOICES, QUANTISED
from comapoi_cli.errors import ComapoiError, DataError, UsageError, first_line
from comapoi_cli.fileio import read_json_object

QUANTS = QUANT_CHOICES
DTYPES = DTYPE_CHOICES


def quiet_libraries(*, datasets: bool = True) -> None:
    """Keep the console for comapoi's own output: no library progress bars, warnings or info logs.

    ``COMAPOI_DEBUG=1`` keeps them. ``datasets``: quiet the ``datasets`` library too (training
    uses it; evaluation does not, and skips its import).
    """
    if os.environ.get("COMAPOI_DEBUG"):
        return
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # e.g. "Failed to load CPU gemm_4bit_forward"
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if datasets:
        import datasets as datasets_lib

        datasets_lib.utils.logging.set_verbosity_error()
        datasets_lib.disable_progress_bars()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|trl|peft|accelerate|torch|bitsandbytes)\b")
    warnings.filterwarnings("ignore", message=r".*(MatMul8bitLt|use_reentrant|is_gradient_checkpointing).*")


def resolve_device(device: str) -> str:
    """``--device`` resolved: auto is cuda when a GPU is available, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asks for a GPU, but CUDA is not available here.",
                         hint="Use --device cpu (slow for large models), or run on a machine with a GPU.")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not '{device}'.")
    return device


def plan_device(device: str, quant: str, recorded_quant: str | None = None) -> tuple[str, str]:
    """``--device`` and ``--quant`` resolved for inference.

    ``quant`` auto: on a GPU the quantisation the adapter was trained with (``recorded_quant``;
    4bit when unknown), none on the CPU. 4bit/8bit need a CUDA GPU (bitsandbytes).
    """
    if quant not in QUANTS:
        raise UsageError(f"--quant must be auto, 4bit, 8bit or none, not '{quant}'.")
    device = resolve_device(device)
    on_gpu = device.startswith("cuda")
    if quant == "auto":
        recorded = (recorded_quant or "").lower()
        quant = ("4bit" if recorded in ("", "auto", "4bit") else recorded if recorded in ("8bit", "none") else "none") \
            if on_gpu else "none"
    if quant in QUANTISED and not on_gpu:
        raise UsageError(f"--quant {quant} needs a CUDA GPU (bitsandbytes); on the CPU use --quant none.")
    return device, quant


def default_dtype(device: str, recorded: str | None = None) -> str:
    """The dtype to load in: on a GPU the recorded 16-bit dtype, else bfloat16 where supported, else float16; float32 on the CPU."""
    if not device.startswith("cuda"):
        return "float32"
    if recorded in HALF_DTYPES:
        return recorded
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


@dataclass
class LoadedModel:
    """One base model with its adapters (a PEFT model when there are any), and its tokenizer."""

    model: Any
    tokenizer: Any
    device: str
    dtype: str
    quant: str
    max_context: int | None = None
    adapter_names: list[str] = field(default_factory=list)
    active_adapter: str | None = None

    def use_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter that the next forward pass uses; None runs the bare base model."""
        if name == self.active_adapter:
            return
        if name is not None and name not in self.adapter_names:
            known = ", ".join(self.adapter_names) or "none"
            raise UsageError(f"No adapter named '{name}' is loaded (loaded: {known}).")
        if not self.adapter_names:
            return
        peft_model = self.model
        if name is None:
            peft_model.base_model.disable_adapter_layers()
        else:
            if self.active_adapter is None:
                peft_model.base_model.enable_adapter_layers()
            peft_model.set_adapter(name)
        self.active_adapter = name


def base_is_quantised(base_model: str) -> bool:
    """The base model folder stores quantised weights (config.json holds a ``quantization_config``)."""
    config = read_json_object(Path(base_model) / "config.json")
    return config is not None and isinstance(config.get("quantization_config"), dict)


def has_tokenizer(folder: str | os.PathLike[str]) -> bool:
    """``folder`` holds a tokenizer (tokenizer_config.json and a vocabulary file)."""
    folder = Path(folder)
    return (folder / "tokenizer_config.json").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file() or (folder / "vocab.json").is_file())


def tokenizer_folder(run: Any, base_model: str) -> Path | str:
    """Where a run's tokenizer (and chat template) is: saved with its adapter, else in the run folder, else the base's.

    ``run`` is a ``comapoi_cli.runs.info.RunInfo`` (``adapter_dir``, ``run_dir``)."""
    return run.adapter_dir if has_tokenizer(run.adapter_dir) else \
        run.run_dir if has_tokenizer(run.run_dir) else base_model


def _remote_code_problem(exc: BaseException, what: str, trust_remote_code: bool) -> DataError | None:
    text = str(exc)
    if trust_remote_code or "trust_remote_code" not in text:
        return None
    return DataError(f"{what} wants to run its own Python code, which comapoi does not run unless asked.",
                     hint="If you trust that code, pass --trust-remote-code.")


def load_tokenizer(source: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a folder or cached id, never running its code unless ``trust_remote_code``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        problem = _remote_code_problem(exc, f"The tokenizer in {source}", trust_remote_code)
        raise problem or DataError(f"Cannot load the tokenizer from {source}: {first_line(exc)}") from None


def load_model(base_model: str, *, adapters: Mapping[str, str | os.PathLike[str]] | None = None, quant: str = "auto",
               device: str = "auto", dtype: str | None = None, trust_remote_code: bool = False,
               tokenizer: str | os.PathLike[str] | None = None, dequantize: bool = False,
               recorded_quant: str | None = None, recorded_dtype: str | None = None) -> LoadedModel:
    """Load ``base_model`` once, attach each adapter of ``adapters`` (name -> folder) once, ready for batched generation.

    ``quant``/``device``: as :func:`plan_device` (``recorded_quant``: what the adapters were trained
    with). ``dtype`` (bfloat16, float16, float32): default :func:`default_dtype`. ``tokenizer``:
    where the tokenizer and chat template are (default: the first adapter folder that holds one,
    else the base model). ``dequantize``: a base stored quantised is loaded as stored and
    dequantised to ``dtype`` before the adapters are applied (``comapoi adapters merge``).
    The first adapter is active; switch with :meth:`LoadedModel.use_adapter`.
    """
    quiet_libraries(datasets=False)
    import torch
    from transformers import AutoModelForCausalLM

    adapters = {str(k): Path(v) for k, v in (adapters or {}).items()}
    if adapters:
        try:
            from peft import PeftModel
        except ImportError:  # pragma: no cover - a dependency
            raise ComapoiError("peft is not installed; it is needed to load an adapter (pip install peft).") from None
    device, quant = plan_device(device, quant, recorded_quant)
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'.")
    dtype_name = dtype or default_dtype(device, recorded_dtype)
    torch_dtype = getattr(torch, dtype_name)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "local_files_only": True}
    stored_quantised = dequantize and base_is_quantised(base_model)
    if stored_quantised:
        kwargs["device_map"] = {"": device if ":" in device or device == "cpu" else f"{device}:0"}
    if quant in QUANTISED:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch_dtype)
            if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device if ":" in device else f"{device}:0"}
    if tokenizer is None:
        tokenizer = next((p for p in adapters.values() if has_tokenizer(p)), None) or base_model
    tok = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    except Exception as exc:
        problem = _remote_code_problem(exc, f"The model {base_model}", trust_remote_code)
        if problem is not None:
            raise problem from None
        if isinstance(exc, (OSError, ValueError)):
            raise DataError(f"Cannot load the base model {base_model}: {first_line(exc)}",
                            hint="Pass the base model folder the adapter was trained on with --model DIR.") from None
        raise
    if stored_quantised:
        try:
            model = model.dequantize()
        except Exception as exc:
            raise DataError(f"Cannot dequantise the base model {base_model}: {first_line(exc)}",
                            hint="Pass its original 16-bit weights with --model DIR.") from None
        model = model.to(torch_dtype)
    names = list(adapters)
    for index, (name, folder) in enumerate(adapters.items()):
        try:
            if index == 0:
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
            else:
                model.load_adapter(str(folder), adapter_name=name)
        except Exception as exc:
            raise DataError(f"Cannot apply the adapter {folder} to {base_model}: {first_line(exc)}",
                            hint="Is this the base model the adapter was trained on? Pass it with --model DIR.") from None
    if names:
        model.set_adapter(names[0])
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if tok.chat_template is None:
        raise DataError(f"The tokenizer in {tokenizer} has no chat template; comapoi needs one to build prompts.")
    max_context = getattr(model.config, "max_position_embeddings", None)
    return LoadedModel(model=model, tokenizer=tok, device=device, dtype=dtype_name, quant=quant,
                       max_context=max_context if isinstance(max_context, int) else None,
                       adapter_names=names, active_adapter=names[0] if names else None)
