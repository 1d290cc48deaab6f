"""comapoi's Unsloth backend: trains with Unsloth's FastLanguageModel on one CUDA GPU."""

from __future__ import annotations

from comapoi_cli import hookimpl
from comapoi_cli.backends import Backend, installed_version, missing_packages

SUPPORTED = {"transformers": "5.17.0", "trl": "1.15.0", "datasets": "4.8.5"}
INSTALL = 'pip install -c constraints/unsloth.txt "./plugins/comapoi-unsloth[unsloth]"'


class UnslothBackend(Backend):
    name = "unsloth"
    description = "Unsloth FastLanguageModel (4-bit or 16-bit) with its kernels; one CUDA GPU."
    requires = ("unsloth==2026.10.9", "a CUDA GPU", "transformers 5.17.0, trl 1.15.0, datasets 4.8.5")
    install_hint = INSTALL
    multi_process = False

    def unusable_reason(self) -> str | None:
        if missing_packages("unsloth"):
            return "Unsloth is not installed"
        mismatched = [f"{name} {installed_version(name)} (needs {version})"
                      for name, version in SUPPORTED.items() if installed_version(name) != version]
        if mismatched:
            return "incompatible versions: " + ", ".join(mismatched)
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (Unsloth trains on one CUDA GPU)"
        return None

    def train(self, job):
        from comapoi_cli.errors import ComapoiError

        raise ComapoiError("The Unsloth training path is not yet available.")


@hookimpl
def register_backends(register):
    register(UnslothBackend())
