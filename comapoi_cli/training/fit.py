"""``--fit``: how a run executes within the memory it may use.

Given the base model's shape, the LoRA settings and a memory budget (the GPU's free memory, or
``--memory-budget``), ``plan_fit`` picks the micro-batch, the gradient accumulation that keeps the
effective batch (``--batch-size`` x ``--gradient-accumulation-steps``) unchanged, gradient
checkpointing on or off, and, for ``--quant auto`` on a GPU, 16-bit or 4-bit weights. What is
trained does not change: the same records per optimizer step, the same loss. Nothing here imports
torch: ``comapoi train --dry-run --memory-budget 80`` plans for a GPU this machine does not have.

The memory model (bytes; L layers, hidden h, MLP width i, key/value width kv, H attention heads,
T = micro-batch x ``--seq-length`` tokens, the worst case of a batch padded to the longest record)::

    peak = weights + LoRA state + activations + LM head + reserve

- weights: the matmul weights at their storage width (16-bit: 2 B; 8-bit: 1 B; NF4 with double
  quantisation: 0.516 B); embeddings and LM head 16-bit, or 32-bit on the TRL path when quantised
  (``prepare_model_for_kbit_training`` casts them up); everything 32-bit when training in fp32.
- LoRA state: every LoRA parameter in fp32 with its gradient and AdamW's two moments (16 B).
- activations, with c = a*h + b*i + k*kv + n*H bytes saved per token and layer:
  no checkpointing ``(L + 1) * T * c`` (every layer's saved tensors, plus the backward's working
  set of one layer); checkpointing ``L * T * 2h + 2 * T * c`` (each layer's 16-bit input, plus
  one layer recomputed and its backward); Unsloth's checkpointing offloads the layer inputs to
  the host, leaving ``2 * T * c``. On the TRL path with 4/8-bit weights c grows by 6 B per MLP
  element and the checkpointed inputs are fp32 (``prepare_model_for_kbit_training``). A batch with
  padding adds the attention's additive mask to every layer: 2 B (fp32: 4 B) x ``--seq-length``
  per token and layer (``bench/measure_activations.py --padding``; always counted).
- LM head: TRL's and Unsloth's chunked loss keep the final hidden state (T * h * 6 B), never the
  152k-wide logits.
- reserve: 0.5 GiB (cuBLAS workspaces, the allocator's rounding).

Where the coefficients come from (``ACTIVATION_COEFFICIENTS``, ``MEMORY_PROFILES``):

- TRL path: measured exactly on the CPU by counting the bytes autograd saves
  (``torch.autograd.graph.saved_tensors_hooks``) in a PEFT LoRA Qwen2 model (all seven
  projections, SDPA attention) under bf16 autocast, and in fp32, over six shapes; the linear
  form fits every shape within 0.3%. ``bench/measure_activations.py`` repeats the measurement and
  ``tests/test_fit.py`` re-measures a seventh shape against it.
- Unsloth: its fused kernels save less. Scale 0.56 of the TRL coefficients, calibrated on the
  H100 rows of ``../shared/gpu/README.md`` (Qwen2.5-7B shape, batch 4 x 2048, 4-bit and bf16,
  checkpointing on and off: the 4-bit pair and the bf16 pair give the same per-layer figure, about
  135 KB per token and layer against 241 KB on the TRL path with dropout 0; with fixed-length
  batches, as measured there, the estimate reproduces the four rows within 2.3%).

A plan must fit in ``HEADROOM`` (90%) of the budget. Among the plans that fit it takes the
fastest by this rule: checkpointing costs a recomputed forward pass (6N instead of 4N FLOPs per
token: 1.5x; the shared README measured 1.46x for Unsloth), and a micro-batch under
``FULL_SPEED_TOKENS`` tokens is counted as proportionally slower. On a GPU this rule and the
coefficients are still to be checked against ``bench/bench_gpu_train.py``'s measured peaks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from comapoi_cli.choices import QUANTISED
from comapoi_cli.errors import UsageError

GIB = 2**30
#: A plan must fit in this share of the budget (fragmentation, estimate error).
HEADROOM = 0.90
#: cuBLAS workspaces, the allocator's rounding, small buffers.
RESERVE_BYTES = 0.5 * GIB
#: A micro-batch of fewer tokens than this is counted as proportionally slower.
FULL_SPEED_TOKENS = 2048
#: Gradient checkpointing recomputes the forward pass: 6N instead of 4N FLOPs per token.
CHECKPOINTING_SLOWDOWN = 1.5

#: Bytes saved for backward per token and decoder layer: a*hidden + b*intermediate + k*kv_width + n*heads.
#: Measured on the CPU with saved_tensors_hooks (bench/measure_activations.py), PEFT LoRA on the
#: seven projections, SDPA attention; "16-bit" under bf16 autocast, "fp32" without.
ACTIVATION_COEFFICIENTS: dict[tuple[str, bool], tuple[float, float, float, float]] = {
    # (compute width, LoRA dropout > 0): (a, b, k, n)
    ("16-bit", True): (48.15, 12.03, 3.85, 8.5),
    ("16-bit", False): (24.15, 8.03, 3.85, 8.5),
    ("fp32", True): (64.29, 20.06, 7.71, 12.7),
    ("fp32", False): (24.29, 16.06, 7.71, 12.7),
}

#: The TRL path with 4/8-bit weights: ``prepare_model_for_kbit_training`` casts the norms to fp32, so more
#: is saved per MLP element (measured as above with bitsandbytes NF4 on the CPU: +6.0 B per intermediate
#: element, the same for every shape and dropout), and each layer's checkpointed input is fp32.
QUANTISED_EXTRA_PER_INTERMEDIATE = 6.0

#: Bytes per matmul weight at each storage width (NF4: 4 bits + double-quantised absmax, 1/64 B + 4/16384 B).
WEIGHT_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0 + 4 / 4096, "16-bit": 2.0, "fp32": 4.0}


@dataclass(frozen=True)
class MemoryProfile:
    """How one training backend uses memory, relative to the measured TRL/PEFT path."""

    name: str
    activation_scale: float = 1.0  #: x ACTIVATION_COEFFICIENTS
    offloads_checkpoints: bool = False  #: checkpointed layer inputs live on the host
    upcasts_when_quantised: bool = True  #: embeddings and LM head in fp32 next to 4/8-bit weights
    #: ``--quant auto`` on a GPU: the first of these that fits (the fastest first).
    quant_preference: tuple[str, ...] = ("none", "4bit")
    source: str = ""


MEMORY_PROFILES: dict[str, MemoryProfile] = {
    "trl": MemoryProfile(
        "trl", source="TRL/PEFT saved-tensor bytes measured on the CPU (bench/measure_activations.py); "
        "16-bit before 4-bit: the shared README measured HF bf16 at 2.1x HF 4-bit (6,321 vs 2,964 tokens/s, H100, 7B)"),
    "unsloth": MemoryProfile(
        "unsloth", activation_scale=0.56, offloads_checkpoints=True, upcasts_when_quantised=False,
        quant_preference=("4bit", "none"),
        source="calibrated on the shared README's H100 Unsloth rows (7B, batch 4 x 2048); 4-bit before 16-bit: "
        "the same speed there (10,503 vs 10,683 tokens/s) in half the memory"),
}


def memory_profile(name: str) -> MemoryProfile:
    """A backend's profile; a backend without one of its own is planned as the TRL path."""
    return MEMORY_PROFILES.get(name, MEMORY_PROFILES["trl"])


# -- the model's shape ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a Llama/Qwen-style decoder (read from its config.json)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelShape":
        """From a config.json mapping (``text_config`` of a multimodal config is used when present)."""
        config = config.get("text_config") or config
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(hidden=hidden, intermediate=int(config["intermediate_size"]),
                        layers=int(config["num_hidden_layers"]), heads=heads,
                        kv_heads=int(config.get("num_key_value_heads") or heads),
                        head_dim=int(config.get("head_dim") or hidden // heads),
                        vocab=int(config["vocab_size"]), tied_embeddings=bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the model's config has no usable {exc}") from None
        return shape

    @classmethod
    def from_model_folder(cls, folder: str | Path) -> "ModelShape":
        path = Path(folder) / "config.json"
        return cls.from_config(json.loads(path.read_text(encoding="utf-8")))

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each of the seven projections of one layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_width), "k_proj": (h, self.kv_width), "v_proj": (h, self.kv_width),
                "o_proj": (self.q_width, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_matmul_params(self) -> int:
        return sum(a * b for a, b in self.projection_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def matmul_params(self) -> int:
        """Every weight a token's forward pass multiplies with, LM head included (for MFU)."""
        return self.layers * self.layer_matmul_params + self.embedding_params

    def lora_params(self, rank: int, targets: Iterable[str]) -> int:
        names = set(targets)
        shapes = self.projection_shapes()
        chosen = shapes.values() if names & {"all-linear", "all_linear"} else [shapes[n] for n in names if n in shapes]
        return self.layers * sum(rank * (a + b) for a, b in chosen)

    def activation_bytes_per_token_layer(self, compute: str, dropout: bool) -> float:
        a, b, k, n = ACTIVATION_COEFFICIENTS[("fp32" if compute == "fp32" else "16-bit", dropout)]
        return a * self.hidden + b * self.intermediate + k * self.kv_width + n * self.heads


# -- the estimate -----------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Peak memory of one configuration, in bytes, by part."""

    weights: float
    lora_state: float
    activations: float
    lm_head: float
    reserve: float

    @property
    def total(self) -> float:
        return self.weights + self.lora_state + self.activations + self.lm_head + self.reserve

    def to_dict(self) -> dict[str, float]:
        parts = {k: round(v / GIB, 4) for k, v in asdict(self).items()}
        return {**parts, "total": round(self.total / GIB, 4)}


def estimate_memory(shape: ModelShape, *, profile: MemoryProfile, precision: str, quant: str, micro_batch: int,
                    seq_length: int, gradient_checkpointing: bool, lora_r: int, target_modules: Iterable[str],
                    lora_dropout: float, device: str = "cuda", padded: bool = True) -> MemoryEstimate:
    """Peak memory of training ``shape`` with these settings (see the module doc); no reserve on the CPU.

    ``padded``: batches with padding (records of different lengths; what ``comapoi train`` plans for).
    False for fixed-length batches without an attention mask, as in the shared README's measurements.
    """
    compute = "fp32" if precision == "fp32" else "16-bit"
    float_bytes = WEIGHT_BYTES[compute]
    layer_weights = shape.layers * shape.layer_matmul_params
    head_params = shape.embedding_params * (1 if shape.tied_embeddings else 2)
    if quant in QUANTISED:
        side = 4.0 if profile.upcasts_when_quantised else float_bytes
        weights = layer_weights * WEIGHT_BYTES[quant] + head_params * side
    else:
        weights = (layer_weights + head_params) * float_bytes
    lora_state = 16.0 * shape.lora_params(lora_r, target_modules)
    tokens = micro_batch * seq_length
    per_token = shape.activation_bytes_per_token_layer(compute, lora_dropout > 0)
    compute_width = 4 if compute == "fp32" else 2
    if padded:  # each layer's attention keeps an additive mask of the compute width, T x T per record
        per_token += compute_width * seq_length
    checkpoint_width = compute_width  # each layer's checkpointed input
    if quant in QUANTISED and profile.upcasts_when_quantised and compute != "fp32":
        per_token += QUANTISED_EXTRA_PER_INTERMEDIATE * shape.intermediate
        checkpoint_width = 4
    per_layer = tokens * per_token * profile.activation_scale
    if not gradient_checkpointing:
        activations = (shape.layers + 1) * per_layer
    else:
        inputs = 0.0 if profile.offloads_checkpoints else shape.layers * tokens * shape.hidden * checkpoint_width
        activations = inputs + 2 * per_layer
    lm_head = tokens * shape.hidden * 6
    return MemoryEstimate(weights, lora_state, activations, lm_head, RESERVE_BYTES if device == "cuda" else 0.0)


# -- the plan --------------------------------------------------------------------------------------
@dataclass
class FitPlan:
    """How the run executes (recorded in run.json as ``fit``)."""

    micro_batch: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    quant: str
    source: str  #: ``fit`` (chosen here), ``as given`` (no fit), ``resumed`` (the run's recorded plan)
    budget_gib: float | None = None
    budget_source: str | None = None  #: ``free GPU memory``, ``--memory-budget``
    estimate: dict[str, float] | None = None
    reason: str = ""
    candidates: list[dict[str, Any]] = field(default_factory=list)
    profile: str | None = None  #: the memory profile the estimate used (``MEMORY_PROFILES``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def as_given(cls, job: Any, quant: str, reason: str) -> "FitPlan":
        return cls(job.batch_size, job.gradient_accumulation_steps, bool(job.gradient_checkpointing), quant,
                   "as given", reason=reason)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FitPlan":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def summary(self) -> str:
        """One line for the console."""
        checkpointing = "on" if self.gradient_checkpointing else "off"
        line = (f"{self.micro_batch} per micro-batch x {self.gradient_accumulation_steps} accumulation, "
                f"gradient checkpointing {checkpointing}, weights {weights_label(self.quant)}")
        if self.estimate and self.budget_gib:
            line += f"; estimated peak {self.estimate['total']:.3g} of {self.budget_gib:.3g} GiB ({self.budget_source})"
        return line


def weights_label(quant: str) -> str:
    return "unquantised" if quant == "none" else quant


class FitError(UsageError):
    """No way of running the job fits in the memory budget."""


def quant_choices(job_quant: str, profile: MemoryProfile, device: str, quantisation_works: bool) -> list[str]:
    """The weight formats ``plan_fit`` tries: ``--quant auto`` on a GPU: the profile's preference (4-bit only
    where bitsandbytes works); on the CPU: none; an explicit ``--quant``: just that."""
    if job_quant != "auto":
        return [job_quant]
    if device != "cuda":
        return ["none"]
    return [q for q in profile.quant_preference if q == "none" or quantisation_works]


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def speed_score(micro_batch: int, seq_length: int, gradient_checkpointing: bool) -> float:
    """Relative speed of a candidate (higher is faster): the rule in the module doc."""
    efficiency = min(1.0, micro_batch * seq_length / FULL_SPEED_TOKENS)
    return efficiency / (CHECKPOINTING_SLOWDOWN if gradient_checkpointing else 1.0)


def plan_fit(shape: ModelShape, *, budget_bytes: float, budget_source: str, profile: MemoryProfile, precision: str,
             quants: Iterable[str], batch_size: int, gradient_accumulation_steps: int, seq_length: int,
             gradient_checkpointing: bool | None, lora_r: int, target_modules: Iterable[str],
             lora_dropout: float, device: str = "cuda") -> FitPlan:
    """The fastest execution of the job that fits in ``HEADROOM`` of ``budget_bytes``.

    ``quants``: the weight formats to try, in order (``quant_choices`` gives them for ``--quant auto``).
    ``gradient_checkpointing``: None lets the plan choose; True/False (the user's flag) is kept.
    Raises ``FitError`` when nothing fits.
    """
    targets = tuple(target_modules)
    effective = batch_size * gradient_accumulation_steps
    usable = HEADROOM * budget_bytes
    quants = list(quants)
    checkpointing = [False, True] if gradient_checkpointing is None else [bool(gradient_checkpointing)]
    candidates: list[dict[str, Any]] = []
    smallest: float | None = None  #: the least memory any candidate needs (for the error)
    for q in quants:
        fitting: list[tuple[float, int, bool, MemoryEstimate]] = []
        for gc in checkpointing:
            for micro in divisors_descending(effective):
                estimate = estimate_memory(shape, profile=profile, precision=precision, quant=q, micro_batch=micro,
                                           seq_length=seq_length, gradient_checkpointing=gc, lora_r=lora_r,
                                           target_modules=targets, lora_dropout=lora_dropout, device=device)
                fits = estimate.total <= usable
                candidates.append({"quant": q, "micro_batch": micro, "gradient_checkpointing": gc,
                                   "estimate_gib": round(estimate.total / GIB, 2), "fits": fits})
                if fits:
                    fitting.append((speed_score(micro, seq_length, gc), micro, gc, estimate))
                    break  # the largest micro-batch that fits, for this checkpointing choice
                smallest = estimate.total if smallest is None else min(smallest, estimate.total)
        if fitting:
            score, micro, gc, estimate = max(fitting, key=lambda c: (c[0], c[1], not c[2]))
            why = []
            if q != quants[0]:
                why.append(f"{weights_label(quants[0])} weights do not fit")
            if len(checkpointing) == 2:
                without = [c for c in fitting if not c[2]]
                if gc and not without:
                    why.append("nothing fits without gradient checkpointing")
                elif gc:
                    why.append(f"without checkpointing only {without[0][1]} record(s) per micro-batch fit, "
                               "slower than recomputing the forward pass")
                else:
                    why.append("no checkpointing: it would recompute the forward pass (about 1.5x the time)")
            if micro < effective:
                why.append(f"{effective} records per step do not fit at once")
            why.append(f"the fastest plan within {HEADROOM:.0%} of the budget")
            return FitPlan(micro, effective // micro, gc, q, "fit", round(budget_bytes / GIB, 4), budget_source,
                           estimate.to_dict(), "; ".join(why), candidates, profile.name)
    need = smallest / GIB if smallest is not None else float("nan")
    tried = " or ".join(weights_label(q) for q in quants)
    with_gc = "with" if True in checkpointing else "without"
    raise FitError(
        f"The run does not fit in {budget_bytes / GIB:.3g} GiB ({budget_source}): even 1 record of {seq_length} tokens "
        f"per micro-batch {with_gc} gradient checkpointing and {tried} weights needs about {need:.3g} GiB.",
        hint="Use a shorter --seq-length, --quant 4bit, a smaller --lora-r, more GPU memory (--memory-budget), "
             "or --no-fit to try anyway.")


def plan_job(job: Any, shape: ModelShape, *, budget_bytes: float, budget_source: str, profile: MemoryProfile,
             precision: str, quants: Iterable[str], device: str) -> FitPlan:
    """``plan_fit`` for a ``TrainingJob``: its batch, accumulation, sequence length and LoRA settings.

    Checkpointing left to comapoi (``--gradient_checkpointing`` not given) is chosen by the plan on a
    GPU and stays off on the CPU.
    """
    checkpointing = job.gradient_checkpointing
    if checkpointing is None and device != "cuda":
        checkpointing = False
    return plan_fit(shape, budget_bytes=budget_bytes, budget_source=budget_source, profile=profile, precision=precision,
                    quants=quants, batch_size=job.batch_size, gradient_accumulation_steps=job.gradient_accumulation_steps,
                    seq_length=job.seq_length, gradient_checkpointing=checkpointing, lora_r=job.lora_r,
                    target_modules=job.target_modules, lora_dropout=job.lora_dropout, device=device)


def dry_run_plan(job: Any, location: Any, profile_name: str) -> dict[str, Any]:
    """What ``comapoi train --dry-run`` shows under ``fit``: with ``--memory-budget`` and a local model
    folder, the plan for a CUDA GPU of that size with bf16 (precision as ``TrainingJob.precision`` chooses
    there; bitsandbytes assumed to work); otherwise when the plan will be made. Raises ``FitError``."""
    if not job.fit:
        return {"planned": False, "reason": "--no-fit: the batch and checkpointing are used as given"}
    if job.memory_budget <= 0:
        return {"planned": False, "reason": "made at start from the GPU's free memory (none on the CPU); "
                                            "give --memory-budget GIB to see the plan for a GPU of that size"}
    if location.kind == "tiny":
        from comapoi_cli.models.tiny import TINY_RECIPE

        shape = ModelShape.from_config(TINY_RECIPE)
    elif location.kind == "local":
        try:
            shape = ModelShape.from_model_folder(location.ref)
        except (OSError, ValueError) as exc:
            return {"planned": False, "reason": f"the model's shape is unknown ({exc})"}
    else:
        return {"planned": False, "reason": "the model's config.json is not in a local folder; the plan is made at start"}
    precision = job.precision(gpu=True, gpu_has_bf16=True)
    profile = memory_profile(profile_name)
    plan = plan_job(job, shape, budget_bytes=job.memory_budget * GIB, budget_source="--memory-budget", profile=profile,
                    precision=precision, quants=quant_choices(job.quant, profile, "cuda", True), device="cuda")
    return {"planned": True, "assumes": f"a CUDA GPU, {precision}", **plan.to_dict()}


__all__ = ["ACTIVATION_COEFFICIENTS", "FitError", "FitPlan", "GIB", "HEADROOM", "MEMORY_PROFILES", "MemoryEstimate",
           "MemoryProfile", "ModelShape", "dry_run_plan", "estimate_memory", "memory_profile", "plan_fit", "plan_job", "quant_choices", "speed_score"]
