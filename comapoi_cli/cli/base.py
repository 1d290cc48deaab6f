"""The Typer app and the Click command classes every comapoi command uses (Typer's public ``cls=``).

Two things differ from Typer's defaults, both through the documented extension points of Click's
command classes (nothing in Typer is patched):

- a flag (``--json``, ``--help``, ``--packing/--no-packing``) takes no value, so help shows no type
  after it, where Typer would show ``<bool>``: ``get_params`` gives a flag an empty ``metavar``, and
  an option's text or path value reads ``TEXT`` / ``PATH`` as in Click (beside the number parsers'
  ``INTEGER`` / ``NUMBER``), not ``<str>`` / ``<path>``;
- a positional argument in a usage line reads ``FILE`` (required) or ``[FILE]``, as Click writes it,
  not Typer's ``{file}`` (which reads like a template placeholder): ``collect_usage_pieces``.

A command group is ``App(help=...)`` and its commands ``@app.command()``, exactly as with
``typer.Typer``; a plugin's ``register_commands(app)`` gets the root ``App``, so its commands read
the same. ``tests/test_cli_help.py`` fails on a command whose help still shows ``<bool>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, get_args, get_origin

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.models import CommandFunctionType

__all__ = ["App", "Command", "Group"]


#: What help shows as the value of a text or path parameter, as Click writes it (Typer 0.29 would show
#: the annotation: ``<str>``, ``<path>``, ``<list[Path]>``).
_VALUE_NAMES: dict[Any, str] = {str: "TEXT", Path: "PATH"}


def _value_name(param: Any) -> str | None:
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if get_origin(annotation) in (list, List):
        annotation = (get_args(annotation) or (None,))[0]
    return _VALUE_NAMES.get(annotation)


def _flags_without_type(params: list[Any]) -> list[Any]:
    for param in params:
        if param.metavar is not None:
            continue
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""  # Click's public Parameter.metavar: what help shows as the value
        elif isinstance(param, TyperOption) and _value_name(param):
            param.metavar = _value_name(param)
    return params


def _argument_usage(param: TyperArgument) -> str:
    name = param.metavar or (param.name or "").upper()
    name = name if param.required else f"[{name}]"
    return name + ("..." if param.nargs != 1 else "")


class Command(TyperCommand):
    """A command whose flags show no value type and whose usage line names arguments as Click does."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            pieces.extend([_argument_usage(param)] if isinstance(param, TyperArgument) else param.get_usage_pieces(ctx))
        return pieces


class Group(TyperGroup):
    """A command group whose flags (``--help``, ``--version``, ...) show no value type."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class App(typer.Typer):
    """``typer.Typer`` whose group is a ``Group`` and whose commands are ``Command`` (unless ``cls`` says otherwise)."""

    def __init__(self, *, cls: Any = None, **kwargs: Any) -> None:
        super().__init__(cls=cls or Group, **kwargs)

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None,
                **kwargs: Any) -> Callable[[CommandFunctionType], CommandFunctionType]:
        return super().command(name, cls=cls or Command, **kwargs)
