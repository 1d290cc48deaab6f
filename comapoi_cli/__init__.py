"""comapoi: fine-tune the CoMaPOI agents with LoRA / QLoRA.

Importing this package is cheap: nothing here imports torch, transformers or trl.
"""

__version__ = "0.1.0"

from typing import Any

__all__ = ["__version__", "hookimpl"]


def __getattr__(name: str) -> Any:
    """``from comapoi_cli import hookimpl`` (the decorator plugins use), imported on first use: ``comapoi
    --help`` loads no plugin, so it need not import pluggy."""
    if name == "hookimpl":
        from comapoi_cli.hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module 'comapoi_cli' has no attribute {name!r}")
