"""``comapoi train``: fine-tune one agent role (or all merged) with a registered backend."""


import enum

import typer

from comapoi_cli.errors import ComapoiError


def register(app: typer.Typer) -> None:
    from comapoi_cli.plugins import get_registry

    registry = get_registry()
    types = registry.training_types()
    backends = sorted(registry.backends)
    TrainingType = enum.Enum("TrainingType", {t: t for t in types}, type=str)
    BackendName = enum.Enum("BackendName", {b: b for b in backends}, type=str)

    @app.command("train")
    def train(
        type_: TrainingType = typer.Option("merged", "--type", help="What to train: merged (all roles) or one role."),
        backend: BackendName = typer.Option("trl", "--backend", help="Training backend."),
    ) -> None:
        """Fine-tune a LoRA / QLoRA adapter for one CoMaPOI agent role (or all roles merged)."""
        raise ComapoiError("'comapoi train' is not yet available.")
