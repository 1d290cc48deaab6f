"""`comapoi train`'s options come from the `TrainingJob` fields: one source for spelling, help, panel, default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from comapoi_cli.training.devices import DevicePlan
from comapoi_cli.training.job import TrainingJob

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def train_params() -> dict[str, object]:
    from comapoi_cli.cli.app import load_command

    command = load_command("train")
    assert isinstance(command, typer.core.TyperCommand)
    return {p.name: p for p in command.params}


def option_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainingJob) if f.metadata.get("cli")]


def test_every_option_field_is_a_train_option_with_its_help_panel_and_default():
    from comapoi_cli.cli.fields import shown_default

    params = train_params()
    assert len(option_fields()) > 40
    for f in option_fields():
        param = params[f.name]
        assert f"--{f.name.replace('_', '-')}" in param.opts, f.name
        assert param.rich_help_panel == f.metadata["panel"], f.name
        assert param.default is None, f.name  # only the flags given override the config file
        assert param.show_default == shown_default(f), f.name
    # the default shown is the field's own value, not a copy written as text
    assert params["max_steps"].show_default == "200"
    assert params["learning_rate"].show_default.startswith("0.0001; 0.005 for --model tiny")
    assert params["lora_dropout"].show_default == "0.1"


def test_the_command_options_are_the_fields_plus_four():
    names = set(train_params()) - {f.name for f in option_fields()}
    assert names == {"unsloth", "config", "dry_run", "as_json"}


def test_every_field_is_documented_for_plugin_authors():
    text = DOCS.read_text(encoding="utf-8")
    for f in dataclasses.fields(TrainingJob):
        assert f"| `{f.name}` |" in text, f"docs/plugins.md lacks TrainingJob.{f.name}"
    for f in dataclasses.fields(DevicePlan):
        assert f"| `{f.name}` |" in text, f"docs/plugins.md lacks DevicePlan.{f.name}"
