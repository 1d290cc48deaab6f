"""Command-line options derived from dataclass fields, and the value types every command shares.

``options_from_fields(cls, ...)`` turns each field made with ``comapoi_cli.training.job.option``
into a Typer option (its spellings, help, panel, default and choices come from the field: the one
source), the way TRL's ``TrlParser`` or axolotl's ``add_options_from_dataclass`` do. The value
parsers (``Words``, ``Number``), given to Typer through its ``parser=`` hook, refuse bad values with one
sentence in the user's words (``unknown --type 'agent9'; choose merged, agent1, agent2, agent3``).
Typer 0.29 has no Click parameter types to use instead (its copy of Click has no ``Choice`` or
``IntRange``), and its own choices and ranges answer in pydantic's words and let ``inf`` through
(docs/architecture.md, "Libraries"); Typer's ``min=`` is still passed, so help shows ``[x>=N]``.
"""

# No "from __future__ import annotations": Typer reads these annotations at run time.
import dataclasses
import inspect
import math
from typing import Any, Callable, List, Optional

import typer


def _usage(message: str, hint: "str | None" = None) -> Exception:
    from comapoi_cli.errors import UsageError

    return UsageError(message, hint=hint)


class Words:
    """A Typer ``parser``: one of fixed words; a bad one is ``unknown --flag 'x'; choose a, b, c``.

    (Typer's own conversion would answer in pydantic's words; an error raised here reaches the user as
    one sentence and exit code 2.)
    """

    def __init__(self, flag: str, choices: "list[str] | tuple[str, ...]",
                 explain: "Callable[[str], tuple[str, str] | None] | None" = None):
        self.flag, self.choices = flag, list(choices)
        #: For a value that is not a choice: (message, hint) that says more than "unknown", or None.
        self.explain = explain

    @property
    def metavar(self) -> str:
        return "[" + "|".join(self.choices) + "]"

    def __call__(self, value: Any) -> Any:
        if value is None:
            return None
        text = str(getattr(value, "value", value))
        if text in self.choices:
            return text
        folded = {c.lower(): c for c in self.choices}
        if text.lower() in folded:
            return folded[text.lower()]
        if self.explain is not None:
            special = self.explain(text)
            if special is not None:
                raise _usage(*special)
        raise _usage(f"unknown {self.flag} '{text}'; choose {', '.join(self.choices)}.")


class Number:
    """A Typer ``parser``: a finite number (``inf``, ``nan`` refused), optionally whole, positive or non-negative."""

    def __init__(self, flag: str, whole: bool = False, minimum: "float | None" = None, above: "float | None" = None):
        self.flag, self.whole, self.minimum, self.above = flag, whole, minimum, above

    @property
    def metavar(self) -> str:
        return "INTEGER" if self.whole else "NUMBER"

    def __call__(self, value: Any) -> Any:
        if value is None:
            return None
        number: "float | int"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        else:
            text = str(value).strip()
            try:
                number = int(text) if self.whole else float(text)
            except ValueError:
                kind = "a whole number" if self.whole else "a number"
                raise _usage(f"{self.flag} takes {kind}, got '{text}'.") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise _usage(f"{self.flag} must be a finite number, got {value}.")
        if self.above is not None and not number > self.above:
            raise _usage(f"{self.flag} must be positive, got {value}.")
        if self.minimum is not None and number < self.minimum:
            least = "must not be negative" if self.minimum == 0 else f"must be at least {self.minimum:g}"
            raise _usage(f"{self.flag} {least}, got {value}.")
        return number


def number_option(default: Any, *flags: str, whole: bool = False, minimum: "float | None" = None,
                  above: "float | None" = None, **kwargs: Any) -> Any:
    """A ``typer.Option`` for a number, checked by ``Number`` (finite; ``minimum`` / ``above`` bounds)."""
    long_flags = [f for f in flags if f.startswith("--")]
    parser = Number(long_flags[0] if long_flags else "the value", whole=whole, minimum=minimum, above=above)
    kwargs.setdefault("metavar", parser.metavar)
    if minimum is not None:
        kwargs.setdefault("min", minimum)  # shown in help as [x>=N]; the parser, not Typer, checks it
    return typer.Option(default, *flags, parser=parser, **kwargs)


def _format_default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def shown_default(f: "dataclasses.Field[Any]") -> "str | bool":
    """``[default: ...]`` for a field: its default (read from the field), then its note."""
    note = f.metadata.get("note")
    default = f.default
    if f.metadata.get("switch") == "on" and default is False:
        return False
    empty = default is None or default == "" or default == () or (default == 0 and note and not isinstance(default, bool))
    if empty:
        return note or False
    return f"{_format_default(default)}; {note}" if note else _format_default(default)


def _annotation_and_parser(f: "dataclasses.Field[Any]", flag: str, choices: "list[str] | None") -> "tuple[Any, Any]":
    kind = str(f.type).replace(" ", "")
    md = f.metadata
    if choices is not None:
        return Optional[str], Words(flag, choices)
    if kind in ("bool", "bool|None"):
        return Optional[bool], None
    if kind.startswith("tuple") and md.get("metavar"):
        return Optional[List[str]], None
    minimum = 0 if md.get("nonnegative") else None
    if kind in ("int", "int|None"):
        return Optional[int], Number(flag, whole=True, minimum=1 if md.get("positive") else minimum)
    if kind == "float":
        return Optional[float], Number(flag, minimum=minimum, above=0 if md.get("positive") else None)
    return Optional[str], None


def options_from_fields(cls: type, *, choices: "dict[str, list[str]] | None" = None,
                        help_values: "dict[str, str] | None" = None,
                        explain: "dict[str, Callable[[str], tuple[str, str] | None]] | None" = None,
                        ) -> "list[inspect.Parameter]":
    """One keyword parameter (a Typer option defaulting to None: only given flags count) per option field of ``cls``.

    ``choices`` fills in the ``registry:...`` choice lists; ``explain`` gives, per such list, what to say
    about a value that is not in it; ``help_values`` fills in the ``{name}`` parts of help texts.
    """
    params = []
    for f in dataclasses.fields(cls):
        md = f.metadata
        if not md.get("cli"):
            continue
        wanted = md.get("choices")
        allowed = None
        if isinstance(wanted, str):
            allowed = list((choices or {}).get(wanted, []))
        elif wanted:
            allowed = list(wanted)
        flags = list(md.get("flags") or (f"--{f.name.replace('_', '-')}",))
        annotation, parser = _annotation_and_parser(f, flags[0], allowed)
        if isinstance(parser, Words) and isinstance(wanted, str):
            parser.explain = (explain or {}).get(wanted)
        if annotation is Optional[bool] and md.get("switch") == "pair":
            flags = [f"{flags[0]}/--no-{flags[0][2:]}", *flags[1:]]
        kwargs: "dict[str, Any]" = {"help": md["help"].format(**(help_values or {})), "rich_help_panel": md["panel"],
                                    "show_default": shown_default(f)}
        if md.get("metavar"):
            kwargs["metavar"] = md["metavar"]
        elif parser is not None:
            kwargs["metavar"] = parser.metavar
        if parser is not None:
            kwargs["parser"] = parser
        if isinstance(parser, Number) and parser.minimum is not None:
            kwargs["min"] = parser.minimum  # shown in help as [x>=N]; the parser, not Typer, checks it
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(None, *flags, **kwargs)))
    return params


def with_signature(function: Callable[..., Any], params: "list[inspect.Parameter]") -> Callable[..., Any]:
    """Give ``function(**values)`` the signature Typer reads its options from."""
    function.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    function.__annotations__ = {p.name: p.annotation for p in params}
    return function


def old_spelling(*names: str) -> Any:
    """A hidden option for the former spellings of an output option (they keep working, help shows the new one)."""
    return typer.Option(None, *names, hidden=True, show_default=False)


def one_of(new: Any, old: Any, flag: str, *, required: bool = False) -> Any:
    """The value of an option given under its new spelling or a hidden old one (not both)."""
    if new is not None and old is not None and new != old:
        raise _usage(f"{flag} was given twice (under an old spelling too); give it once.")
    value = new if new is not None else old
    if value is None and required:
        raise _usage(f"Missing option {flag}.")
    return value


TRUST_REMOTE_CODE_HELP = ("Run the Python code a model or tokenizer folder (or hub repository) ships with it; "
                          "only for models you trust.")


def trust_remote_code_option(**kwargs: Any) -> Any:
    """``--trust-remote-code`` (``--trust_remote_code``), off by default, for every command that loads a model or tokenizer."""
    return typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP, **kwargs)


def normalise_token(token: str) -> str:
    """Click's ``token_normalize_func``: ``--max_steps`` and ``--max-steps`` are one option on every command."""
    return token.replace("_", "-")


__all__ = ["TRUST_REMOTE_CODE_HELP", "Number", "Words", "normalise_token", "number_option", "old_spelling", "one_of",
           "options_from_fields",
           "shown_default", "trust_remote_code_option", "with_signature"]
