"""The scores of a chain's predictions file (``comapoi pipeline run`` and ``comapoi pipeline score``).

From the predictions lines alone (so that ``pipeline score FILE`` reproduces the run's numbers):

- ``chain``: CoMaPOI's metrics (``comapoi_cli.metrics``: Acc@1/5/10/20, NDCG@5/10/20,
  MRR, percent) on each line's final ``ranking`` (the whole list, id 0 included);
- ``stages``: per-stage candidate recall, the percent of lines whose label is in each role's
  candidate list, in the retrieved list, and in the final top-k, in chain order;
- ``baselines``: the same metrics for two rankings made without any model in the same run: the
  user's most frequent POIs (``frequent``) and the retriever's own list (``retriever``);
- with ``compat="comapoi"``, ``compat``: what CoMaPOI's own evaluation would print for the final
  agent's raw answer: its parser (JSON ``next_poi_id``, a regex for ``"next_poi_id": [...]``, a
  fenced block, then ANY integers in the text), the first ``top_k`` (10) kept, only ids in
  ``1..max_id`` (so POI 0 never scores), duplicates dropped: its Acc@20 equals its Acc@10. An
  answer it cannot read (no id, ``{"next_poi_id": 1e400}``, ``Infinity``) is a miss, counted by
  reason in ``compat.misses``;
- ``stages_empty``: per stage, how many lines have an empty list there;
- ``invalid_lines`` and ``duplicates``: the lines not scored, each with its number and reason
  (not JSON, invalid UTF-8, nested too deeply, not an object, a field of the wrong type, e.g.
  ``label: true``, which is no POI id) and the repeats of an earlier line's ``key`` (the first
  is scored, once). Every line is scored or listed there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Collection, Iterable

from comapoi_cli.errors import DataError
from comapoi_cli.evaluation.predictions import MAX_SHOWN_PROBLEMS
from comapoi_cli.fileio import iter_jsonl
from comapoi_cli.metrics import compute_metrics, outcome
from comapoi_cli.presets import preset_for

COMPAT_MODES = ("none", "comapoi")
COMAPOI_TOP_K = 10
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_NEXT_LIST = re.compile(r'"next_poi_id"\s*:\s*\[(.*?)\]', re.S)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 and Infinity are floats inf
        return None


def _json_next(text: str) -> list[Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return None
    if isinstance(value, dict) and "next_poi_id" in value:
        inner = value["next_poi_id"]
        return inner if isinstance(inner, list) else [inner]
    return None


def comapoi_parse(text: str | None, max_id: int, top_k: int = COMAPOI_TOP_K, why: list[str] | None = None) -> list[int]:
    """CoMaPOI's own parsing and cleaning of an answer (quirks kept, see the module doc).

    When nothing is kept and ``why`` is a list, the reason is appended to it.
    """
    out = _comapoi_parse(text, max_id, top_k, why)
    if not out and why is not None and not why:
        why.append("no answer" if not text else f"no POI id in 1..{max_id} among the first {top_k} it read")
    return out


def _comapoi_parse(text: str | None, max_id: int, top_k: int, why: list[str] | None) -> list[int]:
    if not text:
        return []
    found = _json_next(text)
    if found is None:
        match = _NEXT_LIST.search(text)
        if match:
            found = re.findall(r"-?\d+", match.group(1))
    if found is None:
        fence = _FENCE.search(text)
        if fence:
            found = _json_next(fence.group(1).strip())
    if found is None:
        found = re.findall(r"\d+", text)
    out: list[int] = []
    for value in found[:top_k]:
        poi = _int(value)
        if poi is None and isinstance(value, float) and why is not None and not why:
            why.append(f"next_poi_id {value!r} is not a finite number")
        if poi is None or not 1 <= poi <= max_id or poi in out:
            continue
        out.append(poi)
    return out


def _max_id(line: dict[str, Any], fallback: int | None) -> int:
    preset = preset_for(line.get("dataset"))
    if preset is not None:
        return preset.max_poi_id
    if fallback is not None:
        return fallback
    raise DataError(f"Line for {line.get('key')} names no known dataset; pass --max-poi-id N.")


def _final_raw(line: dict[str, Any]) -> str | None:
    """The raw answer of the step that made the final ranking."""
    final = line.get("final_step")
    if isinstance(final, str) and "." in final:
        role, step = final.split(".", 1)
        return (((line.get("agents") or {}).get(role) or {}).get(step) or {}).get("raw")
    return None


def stage_names(line: dict[str, Any], top_k: int, retrieval_roles: Collection[str] = ()) -> list[str]:
    """The stages of the candidate-recall table: each role's candidates in chain order, the retrieved list
    right before the candidates of the first role that refines it (``AgentRole.uses_retrieved``; else
    second), the final list last."""
    names: list[str] = []
    for role, steps in (line.get("agents") or {}).items():
        for fields in (steps or {}).values():
            if isinstance(fields, dict) and "candidates" in fields:
                if role in retrieval_roles and "retrieved" not in names:
                    names.append("retrieved")
                names.append(f"{role} candidates")
    if "retrieved" not in names:
        names.insert(min(1, len(names)), "retrieved")
    names.append(f"final top-{top_k}")
    return names


def _stage_list(line: dict[str, Any], name: str, top_k: int) -> list[Any]:
    if name == "retrieved":
        return list(line.get("retrieved") or [])
    if name.startswith("final top-"):
        return list(line.get("ranking") or [])[:top_k]
    role = name.split(" ", 1)[0]
    for fields in ((line.get("agents") or {}).get(role) or {}).values():
        if isinstance(fields, dict) and "candidates" in fields:
            return list(fields.get("candidates") or [])
    return []


class PredictionRows(list):
    """The valid lines of a predictions file, with the lines that were not (``invalid``: (line, reason))
    and the repeats of an earlier key (``duplicates``: (line, reason))."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), invalid: list[tuple[int, str]] | None = None,
                 duplicates: list[tuple[int, str]] | None = None):
        super().__init__(rows)
        self.invalid: list[tuple[int, str]] = invalid or []
        self.duplicates: list[tuple[int, str]] = duplicates or []


def grouped_lines(problems: list[tuple[int, str]], shown: int = MAX_SHOWN_PROBLEMS) -> str:
    """``(line, reason)`` pairs as one text, each reason once with its lines (``lines 1-3, 7: reason``),
    the first ``shown`` reasons in the order they first appear."""
    by_reason: dict[str, list[int]] = {}
    for line, why in problems:
        by_reason.setdefault(why, []).append(line)
    parts = []
    for why, lines in list(by_reason.items())[:shown]:
        runs: list[list[int]] = []
        for line in sorted(set(lines)):
            if runs and line == runs[-1][1] + 1:
                runs[-1][1] = line
            else:
                runs.append([line, line])
        spans = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
        parts.append(f"line{'s' if len(lines) > 1 else ''} {spans}: {why}")
    more = len(by_reason) - shown
    return "; ".join(parts) + (f"; and {more} other reason{'s' if more != 1 else ''}" if more > 0 else "")


def score_lines(lines: Iterable[dict[str, Any]], *, top_k: int = 10, compat: str = "none",
                max_poi_id: int | None = None, retrieval_roles: Collection[str] = ()) -> dict[str, Any]:
    """Score predictions lines (see the module doc); ``lines`` from :func:`read_predictions` carry the
    invalid and repeated lines, reported in the result; ``retrieval_roles``: the roles whose prompts show the
    retrieved list (it is reported as the stage before their candidates)."""
    invalid = list(getattr(lines, "invalid", []))
    duplicates = list(getattr(lines, "duplicates", []))
    rows = list(lines)
    if not rows:
        detail = f" ({len(invalid)} invalid line{'s' if len(invalid) != 1 else ''}: {grouped_lines(invalid)})" if invalid else ""
        raise DataError(f"No predictions to score{detail}.")
    chain, frequent, retrieved, compat_outcomes = [], [], [], []
    names = stage_names(rows[0], top_k, retrieval_roles)
    hits = dict.fromkeys(names, 0)
    empty = dict.fromkeys(names, 0)
    misses = 0
    compat_misses: dict[str, int] = {}
    for line in rows:
        label = line.get("label")
        chain.append(outcome(label, line.get("ranking") or None))
        frequent.append(outcome(label, (line.get("baselines") or {}).get("frequent") or None))
        retrieved.append(outcome(label, line.get("retrieved") or None))
        misses += 1 if line.get("problems") else 0
        for name in names:
            found = _stage_list(line, name, top_k)
            hits[name] += 1 if label in found else 0
            empty[name] += 0 if found else 1
        if compat == "comapoi":
            why: list[str] = []
            ids = comapoi_parse(_final_raw(line), _max_id(line, max_poi_id), why=why)
            compat_outcomes.append(outcome(label, ids or None))
            if not ids:
                compat_misses[why[0]] = compat_misses.get(why[0], 0) + 1
    n = len(rows)
    result: dict[str, Any] = {
        "n": n,
        "chain": compute_metrics(chain),
        "stages": {name: round(100.0 * hits[name] / n, 4) for name in names},
        "stages_empty": empty,
        "baselines": {"frequent": compute_metrics(frequent), "retriever": compute_metrics(retrieved)},
        "lines_with_problems": misses,
        "invalid_lines": [{"line": number, "reason": why} for number, why in invalid],
        "duplicates": [{"line": number, "reason": why} for number, why in duplicates],
        "top_k": top_k,
    }
    if compat == "comapoi":
        result["compat"] = {"mode": "comapoi", **compute_metrics(compat_outcomes), "misses": compat_misses}
    return result


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _id_list_problem(value: Any, name: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, list) or not all(_is_id(v) for v in value):
        return f"'{name}' is not a list of POI ids ({_short(value)})"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def line_problem(value: Any) -> str | None:
    """Why a parsed line is not a chain prediction that can be scored (None when it is)."""
    if not isinstance(value, dict):
        return f"not a JSON object (a {type(value).__name__})"
    for name in ("label", "ranking"):
        if name not in value:
            return f"no '{name}' (is the file a 'comapoi pipeline run' predictions file?)"
    if not _is_id(value["label"]):
        return f"label {_short(value['label'])} is not a POI id (a non-negative integer)"
    problem = _id_list_problem(value["ranking"], "ranking", optional=False) or _id_list_problem(value.get("retrieved"), "retrieved")
    if problem:
        return problem
    for name, kind in (("key", str), ("dataset", str), ("final_step", str), ("problems", list)):
        if value.get(name) is not None and not isinstance(value[name], kind):
            return f"'{name}' is not a {'string' if kind is str else 'list'} ({_short(value[name])})"
    baselines = value.get("baselines")
    if baselines is not None:
        if not isinstance(baselines, dict):
            return f"'baselines' is not an object ({_short(baselines)})"
        problem = _id_list_problem(baselines.get("frequent"), "baselines.frequent")
        if problem:
            return problem
    agents = value.get("agents")
    if agents is not None:
        if not isinstance(agents, dict):
            return f"'agents' is not an object ({_short(agents)})"
        for role, steps in agents.items():
            if steps is None:
                continue
            if not isinstance(steps, dict):
                return f"'agents.{role}' is not an object ({_short(steps)})"
            for step, fields in steps.items():
                if not isinstance(fields, dict):
                    return f"'agents.{role}.{step}' is not an object ({_short(fields)})"
                if fields.get("raw") is not None and not isinstance(fields["raw"], str):
                    return f"'agents.{role}.{step}.raw' is not a string ({_short(fields['raw'])})"
                problem = (_id_list_problem(fields.get("candidates"), f"agents.{role}.{step}.candidates")
                           or _id_list_problem(fields.get("ranking"), f"agents.{role}.{step}.ranking"))
                if problem:
                    return problem
    return None


def _line_problem(error: ValueError | RecursionError) -> str:
    if isinstance(error, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {error.start + 1})"
    if isinstance(error, RecursionError):
        return "nested too deeply to read"
    reason = str(error).split(":")[0]
    if "digits" in str(error) or "integer string conversion" in str(error):
        reason = "a number of more than 4,300 digits"
    return f"not valid JSON ({reason})"


def read_predictions(path: Path) -> PredictionRows:
    """The lines of a predictions file that can be scored, with the others listed (see :class:`PredictionRows`).

    Read as bytes, line by line: one invalid UTF-8 line, one line nested too deeply, one line of the
    wrong shape is listed with its number and reason, and the other lines are scored. A UTF-8 BOM and
    CRLF line ends are fine. A line repeating an earlier line's ``key`` is listed as a duplicate.
    """
    if not path.is_file():
        raise DataError(f"Cannot find the predictions file {path}." if not path.exists() else f"{path} is not a file.")
    rows = PredictionRows()
    first_of: dict[str, int] = {}
    for number, _raw, value, error in iter_jsonl(path):
        problem = line_problem(value) if error is None else _line_problem(error)
        if problem is not None:
            rows.invalid.append((number, problem))
            continue
        key = value.get("key")
        if isinstance(key, str):
            if key in first_of:
                rows.duplicates.append((number, f"repeats line {first_of[key]}'s key {_short(key)}: scored once"))
                continue
            first_of[key] = number
        rows.append(value)
    return rows


def rejected_test_lines(predictions: Path) -> tuple[int, Path] | None:
    """How many test lines the run that wrote ``predictions`` rejected (its ``rejects.jsonl`` beside it)."""
    rejects = Path(predictions).parent / "rejects.jsonl"
    try:
        with open(rejects, "rb") as handle:
            return sum(1 for line in handle if line.strip()), rejects
    except OSError:
        return None
