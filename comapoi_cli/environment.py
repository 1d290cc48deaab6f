"""What this machine offers for training: package versions, CUDA, GPUs, usable backends."""

from __future__ import annotations

import platform
import sys
from typing import Any

from comapoi_cli.backends import installed_version

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth", "liger-kernel")


def environment_report(probe_cuda: bool = True) -> dict[str, Any]:
    """Versions, CUDA and GPUs, and which backends are usable (and why not).

    ``probe_cuda`` imports torch to ask for CUDA (about a second); without it CUDA is not reported.
    """
    from comapoi_cli.plugins import get_registry

    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: installed_version(name) for name in PACKAGES},
        "cuda": None,
        "gpus": [],
    }
    if probe_cuda and report["packages"]["torch"]:
        try:
            import torch
        except Exception as exc:  # a broken torch install is a fact to report
            report["cuda"] = {"available": False, "error": f"torch failed to import: {exc}"}
        else:
            available = torch.cuda.is_available()
            report["cuda"] = {"available": available, "version": torch.version.cuda, "torch_build": torch.__version__}
            if available:
                for index in range(torch.cuda.device_count()):
                    props = torch.cuda.get_device_properties(index)
                    report["gpus"].append({
                        "index": index,
                        "name": props.name,
                        "memory_gib": round(props.total_memory / 2**30, 1),
                        "capability": f"{props.major}.{props.minor}",
                        "bf16": bool(torch.cuda.is_bf16_supported()),
                    })
    registry = get_registry()
    report["backends"] = [b.describe() for b in registry.backends.values()]
    report["plugin_errors"] = [p.to_dict() for p in registry.plugins if p.error]
    return report
