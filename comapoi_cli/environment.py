"""What this machine offers for training: package versions, CUDA, GPUs, usable backends."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comapoi_cli.backends import installed_version

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth", "liger-kernel")


def checkout_root() -> Path | None:
    """The comapoi checkout this package runs from (editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "constraints" / "unsloth.txt").is_file() and (root / "plugins").is_dir() else None


def nvidia_gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible here, checked on the device files (imports no torch)."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def unsloth_install_line() -> str:
    """The line that installs the Unsloth backend plugin, keeping the installed torch, with absolute paths
    (it works from any folder) when comapoi runs from its checkout."""
    root = checkout_root()
    constraints = root / "constraints" / "unsloth.txt" if root else Path("constraints/unsloth.txt")
    plugin = root / "plugins" / "comapoi-unsloth" if root else Path("./plugins/comapoi-unsloth")
    torch = installed_version("torch")
    torch_pin = torch.split("+")[0] if torch else "<your torch version>"
    return f'pip install -c {constraints} "{plugin}[unsloth]" "torch=={torch_pin}"'


def unsloth_hint(what: str = "the plugin") -> str:
    """How to get the Unsloth backend here: first that it needs an NVIDIA GPU when none is visible, then the install line."""
    gpu = "" if nvidia_gpu_visible() else "Unsloth needs an NVIDIA GPU, and none is visible here. "
    return f"{gpu}Install {what} with: {unsloth_install_line()}"


def environment_report(probe_cuda: bool = True, *, registry: Registry) -> dict[str, Any]:
    """Versions, CUDA and GPUs, and which backends of ``registry`` are usable (and why not).

    ``probe_cuda`` imports torch to ask for CUDA (about a second); without it CUDA is not reported.
    """
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
    report["backends"] = [b.describe() for b in registry.backends.values()]
    report["plugin_errors"] = [p.to_dict() for p in registry.plugins if p.error]
    if "unsloth" not in registry.backends:
        report["unsloth_install"] = unsloth_install_line()
    return report
