"""The root ``comapoi`` application: wires the command groups and turns errors into sentences."""

from __future__ import annotations

import os
import sys

import typer

from comapoi_cli import __version__
from comapoi_cli.cli import adapters, data, env, plugins, train
from comapoi_cli.cli import eval as eval_cli
from comapoi_cli.cli.render import error
from comapoi_cli.errors import ComapoiError

app = typer.Typer(
    name="comapoi",
    help="Fine-tune the CoMaPOI agents (Profiler, Forecaster, Final_Predictor) with LoRA / QLoRA.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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


app.add_typer(data.app, name="data")
train.register(app)
app.add_typer(eval_cli.app, name="eval")
app.add_typer(adapters.app, name="adapters")
app.add_typer(plugins.app, name="plugins")
env.register(app)
app.add_typer(__import__("comapoi_cli.cli.pipeline", fromlist=["app"]).app, name="pipeline")  # comapoi pipeline


def _add_plugin_commands() -> None:
    from comapoi_cli.plugins import register_plugin_commands

    register_plugin_commands(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app; any error ends as one sentence and a non-zero exit.

    Typer's standalone mode already turns usage errors into a message and exit code 2; what
    reaches us here is a ``ComapoiError`` from a service (one sentence, its own exit code) or an
    unexpected exception (one sentence; ``COMAPOI_DEBUG=1`` shows the traceback).
    """
    _add_plugin_commands()
    try:
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
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        error(f"Unexpected {type(exc).__name__}: {first_line}",
              "Run again with COMAPOI_DEBUG=1 for the full traceback, and report it.")
        sys.exit(1)
