"""Work-arounds for defects of specific TRL releases, each applied only where the installed TRL has it.

TRL 1.15.0 (the version Unsloth 2026.10.9 requires) cannot train on a CPU:

- ``SFTTrainer.__init__`` always installs a fused LM head (``trl/trainer/sft_trainer.py``, the
  ``add_fused_lm_head(...)`` call after ``super().__init__``), and ``compute_loss`` calls the model
  with ``fused_lm_head=True`` on every path (also with ``compute_loss_func`` or label smoothing);
  no ``SFTConfig`` option turns it off.
- The fused head's forward (``_fused_forward`` in ``trl/trainer/utils.py``) calls
  ``_ChunkedLogProbFunction.apply(...)``, a Triton kernel. ``trl/kernels/chunked_logprob.py``
  imports ``triton`` unconditionally; where Triton is missing (the CPU build of torch),
  ``trl/trainer/utils.py`` catches the ImportError and sets ``_ChunkedLogProbFunction = None``, so
  the first training step fails with ``AttributeError: 'NoneType' object has no attribute 'apply'``.
- Where Triton is installed but there is no GPU (a CUDA torch, or Unsloth's dependencies, on a
  CPU-only machine) the kernel launch fails instead: ``RuntimeError: 0 active drivers ([])``.

TRL 1.16.0 fixed both: its kernel folds the logits in torch ops on devices without Triton
(``trl.kernels.chunked_logprob._use_triton``). ``patch_fused_lm_head_for_cpu`` detects the defect
by that feature (not by version number) and, only then, replaces ``_ChunkedLogProbFunction`` with a
wrapper that hands CUDA/XPU tensors to TRL's kernel unchanged and computes everything else with
plain differentiable torch ops (the full logits, in float32: fine for the CPU-sized models it
serves, and numerically the same quantities as TRL's kernel).
"""

from __future__ import annotations

import sys
from typing import Any

_MARK = "_comapoi_cpu_fallback"


def torch_chunked_logprob(hidden, weight, bias, targets, temperature: float, chunk_size: int,
                          final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
                          outputs: tuple[str, ...] = ("log_probs",)) -> tuple[Any, Any, Any, Any, Any]:
    """What TRL's ``ChunkedLogProbFunction.apply`` returns, in plain torch ops (autograd does the backward).

    Returns ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` for the ``N`` tokens of
    ``hidden`` (``[N, H]``) against ``targets`` (``[N]``); each optional field is None unless named
    in ``outputs``. ``chunk_size`` is accepted for signature compatibility and not used.
    """
    import torch

    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    z = z * logit_scale
    if final_logit_softcapping is not None:
        z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
    z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1) if "entropy" in outputs else None
    with torch.no_grad():  # TRL marks these three non-differentiable
        log_sum_sq_probs = torch.logsumexp(2 * log_p, dim=-1) if "log_sum_sq_probs" in outputs else None
        mean_logits = z.mean(-1) if "mean_logits" in outputs else None
        # argmax takes the first maximum: a tie with an earlier token is not a top-1 hit (as TRL's kernel)
        is_top1 = (z.argmax(-1) == targets) if "is_top1" in outputs else None
    return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1


def _with_cpu_fallback(original: Any) -> type:
    class ChunkedLogProbWithCPUFallback:
        """TRL's kernel on CUDA/XPU (when it is importable); torch ops on every other device."""

        @staticmethod
        def apply(hidden, *args):
            if original is not None and hidden.device.type in ("cuda", "xpu"):
                return original.apply(hidden, *args)
            return torch_chunked_logprob(hidden, *args)

    setattr(ChunkedLogProbWithCPUFallback, _MARK, True)
    return ChunkedLogProbWithCPUFallback


def fused_lm_head_defect() -> str | None:
    """Why the installed TRL's fused LM head cannot run on a CPU, or None when it can (or TRL has none)."""
    try:
        import trl.trainer.utils as utils
    except ImportError:
        return None
    if not hasattr(utils, "_ChunkedLogProbFunction"):
        return None  # a TRL without the fused LM head
    kernel = utils._ChunkedLogProbFunction
    if getattr(kernel, _MARK, False):
        return None  # already patched
    if kernel is None:
        return "its fused LM head needs Triton, which is not installed"
    module = sys.modules.get(getattr(kernel, "__module__", ""), None)
    if module is not None and hasattr(module, "_use_triton"):
        return None  # TRL >= 1.16: the kernel has its own torch path for devices without Triton
    return "its fused LM head launches a Triton kernel on every device, also on the CPU"


def patch_fused_lm_head_for_cpu() -> str | None:
    """Apply the CPU fallback where the installed TRL needs it; return what was fixed (None: nothing to do).

    Call it before ``SFTTrainer`` runs a step (it only replaces a module attribute, looked up at
    each forward, so the order relative to ``SFTTrainer.__init__`` does not matter). Idempotent.
    """
    defect = fused_lm_head_defect()
    if defect is None:
        return None
    import trl
    import trl.trainer.utils as utils

    utils._ChunkedLogProbFunction = _with_cpu_fallback(utils._ChunkedLogProbFunction)
    return f"TRL {getattr(trl, '__version__', '?')}: {defect}; using comapoi's torch fallback off the GPU"
