"""What this machine can honour: device, precision, quantisation. Imports torch (call it at run time).

Each refusal is a ``DeviceError``: one sentence naming the flag and why, a hint with what works.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from comapoi_cli.errors import first_line
from comapoi_cli.training.errors import DeviceError
from comapoi_cli.training.job import TrainingJob


@dataclass
class DevicePlan:
    """How a job will run here (recorded in run.json as ``device``)."""

    type: str  #: ``cuda`` or ``cpu``
    name: str
    count: int
    precision: str  #: fp32, bf16 or fp16 (mixed precision through autocast)
    quant: str  #: none, 4bit or 8bit (``--quant auto`` resolved)
    dtype: str  #: the dtype the base weights load in (and bitsandbytes' compute dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _cpu_supports(kind: str) -> bool:
    import torch

    probe = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[kind]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except Exception:  # an old torch or a build without oneDNN: assume no fast path
        return False


def bitsandbytes_problem(device: str) -> str | None:
    """None if bitsandbytes can quantise on ``device`` here, else why not (one phrase)."""
    from comapoi_cli.backends import missing_packages

    if missing_packages("bitsandbytes"):
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes.functional as F
        import torch

        F.quantize_4bit(torch.ones(64, 64, device=device, dtype=torch.float32))
    except Exception as exc:  # no kernel for this device, a broken install, ...
        return f"bitsandbytes cannot quantise on the {device.upper() if device == 'cuda' else device} here ({first_line(exc)[:160]})"
    return None


def plan_training_device(job: TrainingJob) -> DevicePlan:
    """Check the job's precision and quantisation against this machine; raise ``DeviceError`` if it cannot."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        device, name, count = "cuda", torch.cuda.get_device_name(0), torch.cuda.device_count()
    else:
        device, name, count = "cpu", _cpu_name(), 1
    precision = job.precision(gpu=cuda, gpu_has_bf16=cuda and torch.cuda.is_bf16_supported())
    if job.bf16:
        ok = torch.cuda.is_bf16_supported() if cuda else _cpu_supports("bf16")
        if not ok:
            where = f"this GPU ({name})" if cuda else "this CPU (no bfloat16 instructions) and there is no CUDA GPU"
            raise DeviceError(f"--bf16 cannot be honoured on {where}.",
                              hint="Drop --bf16 to train in float32" + (", or use --fp16." if cuda else "."))
    if job.fp16 and not cuda and not _cpu_supports("fp16"):
        raise DeviceError("--fp16 needs a CUDA GPU: there is none here and this CPU has no fast float16 arithmetic.",
                          hint="Drop --fp16 to train in float32 on the CPU" + (", or use --bf16, which this CPU supports." if _cpu_supports("bf16") else "."))
    quant = job.quant
    if quant == "auto":  # without --fit (which may choose 16-bit): 4-bit on a GPU, as the original
        quant = "4bit" if cuda and bitsandbytes_problem("cuda") is None else "none"
    elif quant != "none":
        problem = bitsandbytes_problem(device)
        if problem:
            raise DeviceError(f"--quant {quant} is not possible: {problem}.", hint="Use --quant none.")
    if job.liger:
        from comapoi_cli.backends import missing_packages

        if not cuda:
            raise DeviceError("--liger needs a CUDA GPU: Liger's kernels are Triton GPU kernels.", hint="Drop --liger.")
        if missing_packages("liger_kernel"):
            raise DeviceError("--liger needs the liger-kernel package, which is not installed.",
                              hint="pip install liger-kernel, or drop --liger.")
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    return DevicePlan(device, name, count, precision, quant, dtype)


def free_memory_bytes(device: str) -> float | None:
    """Free memory of this process's GPU now (``torch.cuda.mem_get_info``); None on the CPU."""
    if device != "cuda":
        return None
    import torch

    from comapoi_cli.training.distributed import local_rank

    free, _total = torch.cuda.mem_get_info(local_rank())
    return float(free)


def peak_memory(device: str) -> dict[str, float]:
    """Peak memory so far in GiB: CUDA allocated/reserved on a GPU, the process's peak RSS always."""
    out: dict[str, float] = {}
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["host_rss_gib"] = round(rss / (2**30 if sys.platform == "darwin" else 2**20), 3)
    except (ImportError, OSError):
        pass
    if device == "cuda":
        import torch

        out["cuda_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["cuda_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return out
