"""comapoi_cli.training.trl_compat: the CPU fallback for TRL 1.15's Triton-only fused LM head.

The default set has TRL >= 1.16, whose kernel runs on the CPU by itself: there the patch must do
nothing, and its torch implementation must agree with TRL's own kernel (values and gradients).
The defect itself (TRL 1.15 without Triton) is reproduced by setting ``_ChunkedLogProbFunction``
to None, exactly what TRL 1.15's ``trl/trainer/utils.py`` does when ``import triton`` fails.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
trl_utils = pytest.importorskip("trl.trainer.utils")

from comapoi_cli.training import trl_compat  # noqa: E402

ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _inputs(seed: int = 0, softcap: float | None = None):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(203, 16, generator=generator, requires_grad=True)
    bias = torch.randn(203, generator=generator)
    targets = torch.randint(0, 203, (37,), generator=generator)
    # temperature, chunk size (smaller than the vocabulary: TRL folds several chunks), softcap, logit scale
    return hidden, weight, bias, targets, 0.7, 64, softcap, 1.3


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_torch_fallback_matches_trl_kernel(softcap):
    kernel = trl_utils._ChunkedLogProbFunction
    if kernel is None or trl_compat.fused_lm_head_defect() is not None:
        pytest.skip("this TRL's kernel does not run on the CPU (the defect the fallback exists for)")
    hidden, weight, bias, targets, *rest = _inputs(softcap=softcap)
    ours = trl_compat.torch_chunked_logprob(hidden, weight, bias, targets, *rest, ALL_OUTPUTS)
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    theirs = kernel.apply(h2, w2, bias, targets, *rest, ALL_OUTPUTS)
    for name, a, b in zip(ALL_OUTPUTS, ours, theirs):
        if name == "is_top1":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-4, msg=name)
    # gradients of what the trainer differentiates: the loss (log-probs) and the entropy
    (ours[0].sum() + 0.3 * ours[1].sum()).backward()
    (theirs[0].sum() + 0.3 * theirs[1].sum()).backward()
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-4, atol=1e-4)


def test_optional_outputs_are_none_unless_asked():
    hidden, weight, bias, targets, *rest = _inputs()
    log_probs, entropy, lsq, mean, top1 = trl_compat.torch_chunked_logprob(hidden, weight, None, targets, *rest)
    assert log_probs.shape == (37,) and (log_probs <= 0).all()
    assert entropy is None and lsq is None and mean is None and top1 is None


def test_patch_is_a_no_op_where_trl_runs_on_the_cpu(monkeypatch):
    if trl_compat.fused_lm_head_defect() is not None:
        pytest.skip("this TRL has the defect")
    before = trl_utils._ChunkedLogProbFunction
    assert trl_compat.patch_fused_lm_head_for_cpu() is None
    assert trl_utils._ChunkedLogProbFunction is before


def test_patch_fixes_a_trl_without_triton(monkeypatch):
    """TRL 1.15 without Triton: ``_ChunkedLogProbFunction`` is None and a step would raise AttributeError."""
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", None)
    assert "Triton" in trl_compat.fused_lm_head_defect()
    fixed = trl_compat.patch_fused_lm_head_for_cpu()
    assert fixed and "torch fallback" in fixed
    assert trl_compat.patch_fused_lm_head_for_cpu() is None  # idempotent
    hidden, weight, bias, targets, *rest = _inputs()
    out = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, *rest, ("log_probs", "entropy"))
    expected = trl_compat.torch_chunked_logprob(hidden, weight, bias, targets, *rest, ("log_probs", "entropy"))
    torch.testing.assert_close(out[0], expected[0])
    out[0].sum().backward()
    assert hidden.grad is not None


def test_patch_wraps_a_triton_only_kernel(monkeypatch):
    """TRL 1.15 with Triton but no GPU: the kernel exists but has no torch path; CPU tensors must not reach it."""

    class TritonOnly:  # stands in for TRL 1.15's ChunkedLogProbFunction (its module has no _use_triton)
        calls = 0

        @staticmethod
        def apply(*args):
            TritonOnly.calls += 1
            raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", TritonOnly)
    assert "Triton kernel" in trl_compat.fused_lm_head_defect()
    assert trl_compat.patch_fused_lm_head_for_cpu()
    hidden, weight, bias, targets, *rest = _inputs()
    log_probs = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, *rest, ("log_probs",))[0]
    assert TritonOnly.calls == 0 and log_probs.shape == (37,)
