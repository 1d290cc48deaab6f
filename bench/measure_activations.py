"""Measure the activation memory of the TRL/PEFT training path, the basis of ``--fit``'s memory model.

Counts the bytes autograd saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``,
each storage once, parameters excluded) in a randomly initialised Qwen2 decoder with PEFT LoRA on
the seven projections and SDPA attention, exactly as ``comapoi train`` builds it: 16-bit weights
under bf16 autocast (what the Trainer does with bf16 on a GPU), or fp32; optionally bitsandbytes
NF4 weights with ``prepare_model_for_kbit_training``. The per-token, per-layer figure is the
difference between a 2-layer and a 1-layer model, and between 512 and 256 tokens, so weights and
other fixed costs cancel.

It fits ``bytes = a*hidden + b*intermediate + k*kv_width + n*heads`` over six shapes by least
squares and prints the coefficients next to ``comapoi_cli.training.fit.ACTIVATION_COEFFICIENTS``
with the largest relative error of the fit. Runs on the CPU in about a minute:

    .venv/bin/python bench/measure_activations.py            # 16-bit and fp32, LoRA dropout 0.1 and 0
    .venv/bin/python bench/measure_activations.py --quant 4bit   # the extra of the 4-bit TRL path
    .venv/bin/python bench/measure_activations.py --padding      # the extra of a padded batch (its mask)

What it cannot see: kernels that differ between the CPU and CUDA (SDPA's CUDA kernels save the
same output and log-sum-exp as the CPU's flash kernel; a GPU check is ``bench/bench_gpu_train.py``,
which records the plan's estimate next to the measured peak).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: (hidden, intermediate, heads, kv_heads): head_dim 64 except the last two.
SHAPES = [(256, 1344, 4, 2), (512, 1344, 8, 2), (256, 2688, 4, 2), (512, 2688, 8, 4), (384, 1024, 6, 2), (512, 3584, 4, 4)]


def build_model(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int, dropout: float,
                precision: str = "bf16", quant: str = "none"):
    """A PEFT LoRA Qwen2 model as ``comapoi train`` builds it (random weights, seed 0)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    config = Qwen2Config(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False)
    if quant == "4bit":
        with tempfile.TemporaryDirectory() as folder:
            Qwen2ForCausalLM(config).to(dtype).save_pretrained(folder)
            model = Qwen2ForCausalLM.from_pretrained(
                folder, dtype=dtype, attn_implementation="sdpa", device_map={"": "cpu"},
                quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        config._attn_implementation = "sdpa"
        model = Qwen2ForCausalLM(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS))
    model.train()
    return model


def saved_bytes(model, tokens: int, autocast: bool, padded: bool = False) -> int:
    """Bytes autograd keeps for the backward of one forward pass of the decoder stack (no LM head).

    ``padded``: a batch of two sequences whose last token is padding (an attention mask is passed).
    """
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    rows = 2 if padded else 1
    ids = torch.randint(0, 256, (rows, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, tokens, dtype=torch.long)
    if padded:
        mask[:, -1] = 0
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.get_base_model().model(input_ids=ids, attention_mask=mask if padded else None)
    return sum(seen.values())


def padding_mask_bytes(precision: str, tokens: int) -> float:
    """Extra bytes saved per token and layer when the batch has padding (an attention mask), at ``tokens``."""
    autocast = precision == "bf16"
    two, one = (build_model(256, 1344, 4, 2, layers, 0.1, precision) for layers in (2, 1))
    extra = {padded: saved_bytes(two, tokens, autocast, padded) - saved_bytes(one, tokens, autocast, padded)
             for padded in (False, True)}
    return (extra[True] - 2 * extra[False]) / (2 * tokens)


def bytes_per_token_layer(hidden: int, intermediate: int, heads: int, kv_heads: int, dropout: float,
                          precision: str = "bf16", quant: str = "none") -> float:
    """Saved bytes per token and decoder layer (differences over layers and tokens: fixed costs cancel)."""
    autocast = precision == "bf16"
    two, one = (build_model(hidden, intermediate, heads, kv_heads, layers, dropout, precision, quant) for layers in (2, 1))
    at = {t: saved_bytes(two, t, autocast) - saved_bytes(one, t, autocast) for t in (256, 512)}
    return (at[512] - at[256]) / 256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", choices=("none", "4bit"), default="none")
    parser.add_argument("--padding", action="store_true",
                        help="measure the extra of a padded batch (the attention mask) at 256, 512 and 1024 tokens")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import numpy as np
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from comapoi_cli.training.fit import ACTIVATION_COEFFICIENTS, QUANTISED_EXTRA_PER_INTERMEDIATE

    if args.padding:
        for precision in ("bf16", "fp32"):
            for tokens in (256, 512, 1024):
                extra = padding_mask_bytes(precision, tokens)
                print(f"{precision}, {tokens} tokens: a padded batch saves {extra:,.0f} more bytes per token and layer "
                      f"({extra / tokens:.2f} x tokens)")
        return 0

    settings = [("bf16", 0.1), ("bf16", 0.0)] if args.quant == "4bit" else [("bf16", 0.1), ("bf16", 0.0), ("fp32", 0.1), ("fp32", 0.0)]
    for precision, dropout in settings:
        rows, measured = [], []
        for hidden, intermediate, heads, kv in SHAPES:
            rows.append([hidden, intermediate, kv * (hidden // heads), heads])
            measured.append(bytes_per_token_layer(hidden, intermediate, heads, kv, dropout, precision, args.quant))
        x, y = np.array(rows, float), np.array(measured)
        width = "fp32" if precision == "fp32" else "16-bit"
        model = np.array(ACTIVATION_COEFFICIENTS[(width, dropout > 0)])
        if args.quant == "4bit":
            model = model + np.array([0, QUANTISED_EXTRA_PER_INTERMEDIATE, 0, 0])
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        fit_error = float(np.max(np.abs(x @ coef - y) / y))
        model_error = float(np.max(np.abs(x @ model - y) / y))
        print(f"{precision} quant={args.quant} dropout={dropout}: measured a,b,k,n = {np.round(coef, 2).tolist()} "
              f"(fit max error {fit_error:.2%}); comapoi's model {model.round(2).tolist()} (max error {model_error:.2%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
