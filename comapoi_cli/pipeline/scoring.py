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
  ``1..max_id`` (so POI 0 never scores), duplicates dropped: its Acc@20 equals its Acc@10.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Collection, Iterable

from comapoi_cli.errors import DataError
from comapoi_cli.metrics import compute_metrics, outcome
from comapoi_cli.presets import preset_for

COMPAT_MODES = ("none", "comapoi")
COMAPOI_TOP_K = 10
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_NEXT_LIST = re.compile(r'"next_poi_id"\s*:\s*\[(.*?)\]', re.S)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
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


def comapoi_parse(text: str | None, max_id: int, top_k: int = COMAPOI_TOP_K) -> list[int]:
    """CoMaPOI's own parsing and cleaning of an answer (quirks kept, see the module doc)."""
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


def score_lines(lines: Iterable[dict[str, Any]], *, top_k: int = 10, compat: str = "none",
                max_poi_id: int | None = None, retrieval_roles: Collection[str] = ()) -> dict[str, Any]:
    """Score predictions lines (see the module doc); ``retrieval_roles``: the roles whose prompts show the
    retrieved list (it is reported as the stage before their candidates)."""
    rows = list(lines)
    if not rows:
        raise DataError("No predictions to score.")
    chain, frequent, retrieved, compat_outcomes = [], [], [], []
    names = stage_names(rows[0], top_k, retrieval_roles)
    hits = dict.fromkeys(names, 0)
    misses = 0
    for line in rows:
        label = line.get("label")
        chain.append(outcome(label, line.get("ranking") or None))
        frequent.append(outcome(label, (line.get("baselines") or {}).get("frequent") or None))
        retrieved.append(outcome(label, line.get("retrieved") or None))
        misses += 1 if line.get("problems") else 0
        for name in names:
            hits[name] += 1 if label in _stage_list(line, name, top_k) else 0
        if compat == "comapoi":
            compat_outcomes.append(outcome(label, comapoi_parse(_final_raw(line), _max_id(line, max_poi_id)) or None))
    n = len(rows)
    result: dict[str, Any] = {
        "n": n,
        "chain": compute_metrics(chain),
        "stages": {name: round(100.0 * hits[name] / n, 4) for name in names},
        "baselines": {"frequent": compute_metrics(frequent), "retriever": compute_metrics(retrieved)},
        "lines_with_problems": misses,
        "top_k": top_k,
    }
    if compat == "comapoi":
        result["compat"] = {"mode": "comapoi", **compute_metrics(compat_outcomes)}
    return result


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The lines of a predictions file; a line that is not a prediction is one sentence."""
    if not path.is_file():
        raise DataError(f"Cannot find the predictions file {path}." if not path.exists() else f"{path} is not a file.")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except ValueError:
                raise DataError(f"Line {number} of {path} is not JSON: is the file a 'comapoi pipeline run' predictions file?") from None
            if not isinstance(value, dict) or "label" not in value or "ranking" not in value:
                raise DataError(f"Line {number} of {path} is not a chain prediction (it lacks 'label' or 'ranking').")
            rows.append(value)
    return rows
