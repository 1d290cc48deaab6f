"""The root ``comapoi`` application: wires the command groups and turns errors into sentences.

Built-in commands load lazily (Click's "lazy loading subcommands" pattern): ``COMMANDS`` names each
one with the module that defines it and its one-line help, so ``comapoi --help`` lists them without
importing any, and ``comapoi data clean`` imports only ``comapoi_cli.cli.data``. Adding a command is
one entry there: ``"name": ("module:attribute", "one-line help")``, where the attribute is a
``typer.Typer`` (a group of sub-commands, or an app holding the one command ``name``) or a function of
the plugin registry that returns one. Plugin commands (the ``register_commands`` hook) cannot replace a built-in command.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import typer
from typer.core import TyperCommand

from comapoi_cli import __version__
from comapoi_cli.cli.base import App, Group
from comapoi_cli.cli.fields import normalise_token
from comapoi_cli.cli.render import error
from comapoi_cli.errors import ComapoiError, first_line

#: The built-in commands: name -> ("module:attribute", one-line help shown by ``comapoi --help``).
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("comapoi_cli.cli.data:app", "Prepare CoMaPOI training data: prepare, clean, split, merge, stats, synth."),
    "train": ("comapoi_cli.cli.train:command", "Fine-tune a LoRA / QLoRA adapter for one CoMaPOI agent role (or all roles merged)."),
    "eval": ("comapoi_cli.cli.eval:app", "Score an adapter on held-out data, or score a predictions file."),
    "adapters": ("comapoi_cli.cli.adapters:app", "Inspect, merge and export trained adapters for serving."),
    "plugins": ("comapoi_cli.cli.plugins:app", "Inspect plugins: backends, agent roles, engines, retrievers, and plugins that failed to load."),
    "env": ("comapoi_cli.cli.env:app", "Show package versions, CUDA and GPUs, and which training backends are usable here."),
    "pipeline": ("comapoi_cli.cli.pipeline:command", "Run the three trained agents as CoMaPOI chains them, and score the chain."),
}


def load_command(name: str) -> Any:
    """Import the module of built-in command ``name`` and return its Click command."""
    from comapoi_cli.plugins import get_registry

    target, _ = COMMANDS[name]
    module_name, attribute = target.split(":")
    obj: Any = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(obj, typer.Typer):
        obj = obj(get_registry())
    single = [c.name for c in obj.registered_commands] == [name] and not obj.registered_groups
    command = typer.main.get_command(obj) if single else typer.main.get_group(obj)  # a one-command group stays a group
    command.name = name
    return command


#: What of the plugins' commands ``comapoi --help`` shows (name -> help, short_help, hidden, deprecated,
#: rich_help_panel), as recorded the last time the plugins loaded: set by ``main`` when it lists commands
#: from that record instead of loading the plugins (``entrypoints.cached_plugin_commands``).
_listed_plugin_commands: dict[str, dict[str, Any]] = {}
_SHOWN = ("help", "short_help", "hidden", "deprecated", "rich_help_panel")


class LazyGroup(Group):
    """A Typer group whose built-in commands are imported only when they run (or their own help is asked)."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        plugin_commands = [n for n in super().list_commands(ctx) if n not in COMMANDS]
        return [*COMMANDS, *plugin_commands, *(n for n in _listed_plugin_commands if n not in plugin_commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in COMMANDS:
            if self._listing:  # `comapoi --help`: the one-line help is enough
                return TyperCommand(cmd_name, help=COMMANDS[cmd_name][1])
            return load_command(cmd_name)
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in _listed_plugin_commands:  # listed from the record: what help shows of it
            return TyperCommand(cmd_name, **_listed_plugin_commands[cmd_name])
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False
        if _plugin_commands_added:  # the plugins were loaded to list their commands: record them for next time
            from comapoi_cli.entrypoints import record_plugin_commands

            shown = {}
            for name in super().list_commands(ctx):
                command = None if name in COMMANDS else super().get_command(ctx, name)
                if command is not None:
                    values = {key: getattr(command, key, None) for key in _SHOWN}  # Typer's unset ones are placeholders
                    shown[name] = {k: v for k, v in values.items() if v is None or isinstance(v, (str, bool))}
            record_plugin_commands(shown)


app = App(
    name="comapoi",
    cls=LazyGroup,
    help="Fine-tune the CoMaPOI agents (Profiler, Forecaster, Final_Predictor) with LoRA / QLoRA.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "token_normalize_func": normalise_token},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"comapoi {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Fine-tune the CoMaPOI agents (Profiler, Forecaster, Final_Predictor) with LoRA / QLoRA."""


_plugin_commands_added = False


def add_plugin_commands() -> None:
    """Run every plugin's ``register_commands`` on the root app, once per process (``comapoi plugins list``
    calls it too, to report a plugin whose commands fail)."""
    global _plugin_commands_added
    if _plugin_commands_added:
        return
    _plugin_commands_added = True
    from comapoi_cli.plugins import get_registry, register_plugin_commands

    register_plugin_commands(app, get_registry(), reserved=set(COMMANDS))


def _may_run_a_plugin_command(argv: list[str]) -> bool:
    """Whether this command line may need a plugin's command: not when it names a built-in command
    (which builds the registry itself if it needs it), nor when no installed plugin adds a command, nor
    when it names no command at all (``comapoi``, ``comapoi --help``) and the commands the plugins
    added were recorded the last time they loaded: that listing is shown, and no plugin is loaded."""
    global _listed_plugin_commands
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    if first is not None and normalise_token(first) in COMMANDS:
        return False
    from comapoi_cli.entrypoints import cached_plugin_commands, plugins_may_add_commands

    if first is None:
        listing = cached_plugin_commands()
        if listing is not None:
            _listed_plugin_commands = listing
            return False
    return plugins_may_add_commands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app; any error ends as one sentence and a non-zero exit.

    Typer's standalone mode already turns usage errors into a message and exit code 2; what
    reaches us here is a ``ComapoiError`` from a service (one sentence, its own exit code) or an
    unexpected exception (one sentence; ``COMAPOI_DEBUG=1`` shows the traceback).
    """
    try:
        if _may_run_a_plugin_command(sys.argv[1:] if argv is None else argv):
            add_plugin_commands()  # inside the try: Ctrl-C while a plugin imports is "Interrupted.", not a traceback
        app(args=argv, prog_name="comapoi")
    except ComapoiError as exc:
        error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        error("Interrupted.")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # last resort: one sentence, never a traceback (unless asked for)
        if os.environ.get("COMAPOI_DEBUG"):
            raise
        error(f"Unexpected {type(exc).__name__}: {first_line(exc, default='no message')}",
              "Run again with COMAPOI_DEBUG=1 for the full traceback, and report it.")
        sys.exit(1)
