"""comapoi's Unsloth backend: trains with Unsloth's FastLanguageModel on one CUDA GPU.

``comapoi train --backend unsloth`` (or ``--unsloth``). This module only registers the backend and
decides whether it is usable here; it imports nothing heavy (it loads on every ``comapoi``
command). The training path is ``comapoi_unsloth.training``: the TRL path of comapoi with the
model loading and LoRA application swapped for Unsloth's.

Where Unsloth is installed but no CUDA GPU is visible, Unsloth's own CPU fallback trains (slowly):
usable for tests, reported as such by ``comapoi env``; ``UNSLOTH_DISABLE_CPU_FALLBACK=1`` turns
that off, and then the backend says it needs a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from comapoi_cli import hookimpl
from comapoi_cli.backends import Backend, installed_version, missing_packages

#: The dependency set this backend supports (Unsloth 2026.10.9 caps transformers and trl here).
SUPPORTED = {"unsloth": "2026.10.9", "transformers": "5.17.0", "trl": "1.15.0", "datasets": "4.8.5"}
#: Run from the comapoi checkout; ``{torch}`` is the installed torch, pinned so pip never replaces it.
INSTALL = 'pip install -c constraints/unsloth.txt "./plugins/comapoi-unsloth[unsloth]" "torch=={torch}"'


def install_line() -> str:
    """The install line with this environment's torch version filled in (metadata only, no import), with
    absolute paths when comapoi runs from its checkout (so it works from any folder)."""
    try:
        from comapoi_cli.environment import unsloth_install_line
    except ImportError:  # an older comapoi
        torch = installed_version("torch")
        return INSTALL.format(torch=torch.split("+")[0] if torch else "<your torch version>")
    return unsloth_install_line()


def _cpu_fallback_available() -> bool:
    """Whether the installed Unsloth has its CPU fallback (checked on disk, without importing Unsloth)."""
    spec = importlib.util.find_spec("unsloth")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return any((Path(folder) / "_cpu_init.py").is_file() for folder in locations)


def _torchvision_problem(torch_cuda: str | None) -> str | None:
    """A torchvision that cannot load next to this torch makes ``import unsloth`` fail; say so."""
    version = installed_version("torchvision")
    if version is None or torch_cuda is not None or "+cpu" in version:
        return None
    return (f"torchvision {version} is a CUDA build and this torch is a CPU build, so Unsloth cannot import "
            "(PyPI has no CPU torchvision): uninstall it (pip uninstall torchvision), or use a CUDA torch")


class UnslothBackend(Backend):
    name = "unsloth"
    description = "Unsloth FastLanguageModel (4-bit or 16-bit) with its kernels; one CUDA GPU."
    requires = ("unsloth==2026.10.9", "a CUDA GPU (or Unsloth's slow CPU fallback)",
                "transformers 5.17.0, trl 1.15.0, datasets 4.8.5 (constraints/unsloth.txt)")
    multi_process = False
    memory_profile = "unsloth"  #: the same as UnslothTrainingPath.memory_profile (--fit's calibration)
    #: --method values it trains: SFT only for now (its patched trainers are not checked with GRPO / DPO here)
    methods = ("sft",)

    @property
    def install_hint(self) -> str:  # type: ignore[override]
        """The install line; on a machine without an NVIDIA GPU, first that Unsloth needs one."""
        try:
            from comapoi_cli.environment import unsloth_hint
        except ImportError:  # an older comapoi
            return install_line()
        return unsloth_hint("Unsloth")

    def unusable_reason(self) -> str | None:
        if missing_packages("unsloth"):
            return "Unsloth is not installed"
        mismatched = [f"{name} {installed_version(name)} (needs {version})"
                      for name, version in SUPPORTED.items() if installed_version(name) != version]
        if mismatched:
            return "incompatible versions: " + ", ".join(mismatched)
        import torch

        problem = _torchvision_problem(torch.version.cuda)
        if problem:
            return problem
        if not torch.cuda.is_available():
            if os.environ.get("UNSLOTH_DISABLE_CPU_FALLBACK", "").strip() in {"1", "true", "True"}:
                return "no CUDA GPU is visible and UNSLOTH_DISABLE_CPU_FALLBACK is set (Unsloth trains on one CUDA GPU)"
            if not _cpu_fallback_available():
                return "no CUDA GPU is visible (Unsloth trains on one CUDA GPU)"
        return None

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if info["usable"]:
            import torch

            if not torch.cuda.is_available():
                info["note"] = "no CUDA GPU: Unsloth's CPU fallback trains, much more slowly (fine for tests)"
        return info

    def train(self, job, reporter=None):
        from comapoi_unsloth.training import train_with_unsloth

        return train_with_unsloth(job, reporter)


@hookimpl
def register_backends(register):
    register(UnslothBackend())
