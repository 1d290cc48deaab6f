"""Reading and scoring a predictions file (``comapoi eval score``), with a report per bad line.

A predictions file is JSON Lines, one object per scored record:

- ``label`` (required): the true POI id (an integer, or a string of digits); for a role whose
  ``answer_kind`` is ``"text"``, the expected text.
- ``output``: the raw model text, parsed with the role's parser (CoMaPOI's lenient POI id parser
  when no role applies); or ``predicted_poi_ids``: a ready ranked list of ids (the original
  evaluation's field name). At least one of them; ``predicted_poi_ids`` wins when both are
  present (``null`` meaning "could not be parsed") unless ``reparse`` is asked for.
- optional: ``id`` (unique), ``role`` (or ``agent``: a registered role id), ``dataset``
  (e.g. ``nyc``: the POI id range); anything else is ignored.

``comapoi eval`` writes files of exactly this shape, so scoring them again gives its numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from comapoi_cli import fileio
from comapoi_cli.errors import DataError
from comapoi_cli.evaluation.scoring import LabelError, Scorer, role_origin, summarize
from comapoi_cli.metrics import RecordOutcome
from comapoi_cli.roles import RoleContext

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry

MAX_SHOWN_PROBLEMS = 20


@dataclass(frozen=True)
class LineProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class PredictionsFileError(DataError):
    """A predictions file with invalid lines; ``problems`` lists each one."""

    def __init__(self, message: str, problems: list[LineProblem], *, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.problems = problems


@dataclass
class ScoreReport:
    """The result of scoring a predictions file."""

    path: str
    metrics: dict[str, Any]
    by_role: dict[str, dict[str, Any]] = field(default_factory=dict)
    lines: int = 0  # non-blank lines read
    skipped: list[LineProblem] = field(default_factory=list)  # invalid lines left out (skip_invalid)
    roles: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "predictions": self.path,
            "metrics": self.metrics,
            "by_role": self.by_role,
            "lines": self.lines,
            "skipped_lines": [{"line": p.line, "reason": p.message} for p in self.skipped],
            "roles": self.roles,
        }


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line_number, value, problem)`` per non-blank line; ``problem`` set when the line is unreadable.

    Tolerates a UTF-8 BOM, CRLF line ends and a missing final newline; invalid UTF-8 or JSON
    becomes a problem for that line only (:func:`comapoi_cli.fileio.iter_jsonl` reads the lines).
    """
    for number, _raw, value, error in fileio.iter_jsonl(path):
        yield number, value, None if error is None else _line_problem(error)


def _line_problem(error: ValueError | RecursionError) -> str:
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte {error.start + 1})"
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error.msg} at column {error.colno})"
    if isinstance(error, RecursionError):
        return "not valid JSON (nested too deeply)"
    return "not valid JSON (a number of more than 4,300 digits)"  # an integer literal past Python's conversion limit


def _check_path(path: Path) -> None:
    if not path.exists():
        raise DataError(f"Predictions file {path} does not exist.")
    if path.is_dir():
        raise DataError(f"{path} is a folder; expected a predictions file (JSON Lines).",
                        hint="'comapoi eval' writes predictions.jsonl inside the adapter folder.")
    if not os.access(path, os.R_OK):
        raise DataError(f"Predictions file {path} cannot be read (permission denied).")


def score_predictions(path: str | os.PathLike[str], *, role: str | None = None, dataset: str | None = None,
                      reparse: bool = False, skip_invalid: bool = False, registry: Registry) -> ScoreReport:
    """Score a predictions file. Raises ``PredictionsFileError`` listing every bad line
    (unless ``skip_invalid``: then they are left out and listed in ``ScoreReport.skipped``).

    ``role`` (a registered role id) overrides each line's ``role``; ``dataset`` overrides each
    line's ``dataset``. Lines with neither are scored as POI ids with no upper id bound.
    ``registry``: the plugin registry (the roles that parse and label the lines).
    """
    if role is not None:
        registry.role(role)  # unknown role: one sentence, exit 2
    file = Path(path)
    _check_path(file)
    scorers: dict[tuple[str | None, str | None], Scorer] = {}

    def scorer_for(role_id: str | None, ds: str | None) -> Scorer:
        key = (role_id, ds.lower() if ds else None)
        if key not in scorers:
            scorers[key] = Scorer(registry.roles[role_id] if role_id else None, RoleContext(dataset=key[1]),
                                  origin=role_origin(registry, role_id))
        return scorers[key]

    scored: list[tuple[str, RecordOutcome]] = []
    problems: list[LineProblem] = []
    seen_ids: dict[str, int] = {}
    lines = 0
    for number, value, problem in iter_jsonl(file):
        lines += 1
        if problem is None:
            try:
                name, item = _score_line(value, role, dataset, reparse, scorer_for, registry, seen_ids, number)
            except (LabelError, ValueError) as exc:
                problem = str(exc)
            else:
                scored.append((name, item))
        if problem is not None:
            problems.append(LineProblem(number, problem))
    if problems and not skip_invalid:
        bad = len(problems)
        raise PredictionsFileError(
            f"{bad} of {lines} line{'s' if lines != 1 else ''} in {file} {'is' if bad == 1 else 'are'} invalid; nothing was scored.",
            problems,
            hint="Fix those lines, or pass --skip-invalid to score the valid lines only.",
        )
    if not scored:
        raise DataError(f"{file} holds no predictions to score" + (f" ({len(problems)} invalid lines)." if problems else "."),
                        hint='Each line needs "label" and "output" (or "predicted_poi_ids").')
    metrics, by_role = summarize(scored)
    roles = sorted({name for name, _ in scored})
    return ScoreReport(path=str(file), metrics=metrics, by_role=by_role, lines=lines, skipped=problems, roles=roles)


def _score_line(value: Any, role: str | None, dataset: str | None, reparse: bool, scorer_for: Any,
                registry: Registry, seen_ids: dict[str, int], number: int) -> tuple[str, RecordOutcome]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(value)}")
    role_id = role
    if role_id is None:
        line_role = value.get("role", value.get("agent"))
        if line_role is not None:
            if not isinstance(line_role, str) or line_role not in registry.roles:
                known = ", ".join(registry.roles) or "none"
                raise ValueError(f"unknown role {line_role!r} (registered: {known}; or pass --type)")
            role_id = line_role
    ds = dataset
    if ds is None:
        line_ds = value.get("dataset")
        if line_ds is not None and not isinstance(line_ds, str):
            raise ValueError(f"'dataset' must be a name such as \"nyc\", got {_json_type(line_ds)}")
        ds = line_ds or None
    scorer = scorer_for(role_id, ds)
    if "id" in value:
        key = json.dumps(value["id"], sort_keys=True)
        if key in seen_ids:
            raise ValueError(f"id {value['id']!r} repeats line {seen_ids[key]}")
        seen_ids[key] = number
    if "label" not in value:
        raise ValueError("missing 'label' (the true POI id)")
    label = scorer.label(value["label"])
    has_output = "output" in value
    has_list = "predicted_poi_ids" in value
    if not has_output and not has_list:
        raise ValueError("needs 'output' (the model's text) or 'predicted_poi_ids' (a ranked list of ids)")
    if has_output and value["output"] is not None and not isinstance(value["output"], str):
        raise ValueError(f"'output' must be a string, got {_json_type(value['output'])}")
    if has_list and not (reparse and has_output):
        try:
            parsed = scorer.ready_list(value["predicted_poi_ids"])
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith("'predicted_poi_ids'") else f"'predicted_poi_ids': {message}") from None
    else:
        parsed = scorer.parse_output(value["output"])
    return scorer.name, scorer.outcome(label, parsed.predictions)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


__all__ = ["LineProblem", "PredictionsFileError", "ScoreReport", "iter_jsonl", "score_predictions", "MAX_SHOWN_PROBLEMS"]
