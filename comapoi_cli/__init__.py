"""comapoi: fine-tune the CoMaPOI agents with LoRA / QLoRA.

Importing this package is cheap: nothing here imports torch, transformers or trl.
"""

__version__ = "0.1.0"

from comapoi_cli.hookspecs import hookimpl  # noqa: E402  (the decorator plugins use)

__all__ = ["__version__", "hookimpl"]
