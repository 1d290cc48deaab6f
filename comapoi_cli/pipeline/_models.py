"""A thin wrapper over the model loading of ``comapoi_cli.evaluation.runner`` with NAMED adapters:
one base model, every adapter loaded once (PEFT ``load_adapter``), switched with ``use_adapter``.

Stands in for ``comapoi_cli.models.loading.load_model(..., adapters=...)`` until that lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comapoi_cli.errors import DataError


@dataclass
class LoadedChainModel:
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    quant: str
    max_context: int | None
    adapter_names: tuple[str, ...]

    def use_adapter(self, name: str | None) -> None:
        if name is None:
            raise ValueError("the chain always runs with an adapter")
        if name not in self.adapter_names:
            raise KeyError(name)
        self.model.set_adapter(name)


def load_with_adapters(base_model: str, adapters: dict[str, Path], tokenizer_dir: str, run: Any, *,
                       quant: str = "auto", device: str = "auto", dtype: str | None = None,
                       trust_remote_code: bool = False) -> LoadedChainModel:
    from comapoi_cli.evaluation import runner

    runner._quiet_libraries()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, quant = runner.plan_device(device, quant, run)
    on_gpu = device.startswith("cuda")
    if dtype is not None:
        torch_dtype = getattr(torch, dtype)
    elif on_gpu:
        torch_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        torch_dtype = torch.float32
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quant in ("4bit", "8bit"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch_dtype)
            if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device if ":" in device else f"{device}:0"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise DataError(f"Cannot load the tokenizer from {tokenizer_dir}: {runner._first_line(exc)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    except OSError as exc:
        raise DataError(f"Cannot load the base model {base_model}: {runner._first_line(exc)}") from None
    names = list(adapters)
    try:
        model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    except Exception as exc:
        raise DataError(f"Cannot apply the adapters to {base_model}: {runner._first_line(exc)}",
                        hint="Were all the runs trained on this base model?") from None
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if tokenizer.chat_template is None:
        raise DataError(f"The tokenizer in {tokenizer_dir} has no chat template; comapoi needs one to build prompts.")
    max_context = getattr(model.config, "max_position_embeddings", None)
    return LoadedChainModel(model=model, tokenizer=tokenizer, device=device, dtype=str(torch_dtype).replace("torch.", ""),
                            quant=quant, max_context=max_context if isinstance(max_context, int) else None,
                            adapter_names=tuple(names))
