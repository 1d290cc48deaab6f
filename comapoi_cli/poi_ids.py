"""Reading POI ids out of text: candidate lists, JSON predictions, free model output.

One lenient parser serves data validation (is this answer a candidate list?) and evaluation
(which ids did the model predict, in which order?).
"""

from __future__ import annotations

import json
import re
from typing import Any

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?![\w.])")
_ID_LIST = re.compile(r"^\s*\[?\s*\d+(\s*,\s*\d+)*\s*,?\s*\]?\s*\.?\s*$")
_JSON_SPAN = re.compile(r"(\{.*\}|\[.*\])", re.S)


def is_id_list(text: str) -> bool:
    """True if ``text`` is nothing but a comma-separated list of integers, e.g. ``"22, 1, 12"``."""
    return bool(_ID_LIST.match(text))


def _ids_from_json(value: Any) -> list[int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return [int(value.strip())]
    if isinstance(value, list):
        out: list[int] = []
        for item in value:
            got = _ids_from_json(item)
            if got is None:
                return None
            out.extend(got)
        return out
    if isinstance(value, dict):
        for key, inner in value.items():
            normalised = re.sub(r"[^a-z]", "", str(key).lower())
            if normalised in {"nextpoiid", "nextpoiids", "predictedpoiids", "poiids", "poiid", "candidates", "prediction", "predictions"}:
                return _ids_from_json(inner)
        if len(value) == 1:
            return _ids_from_json(next(iter(value.values())))
    return None


def parse_ids(text: str, max_id: int | None = None) -> list[int] | None:
    """Parse a ranked list of POI ids out of ``text``; None if no id can be read.

    JSON first (``{"next_poi_id": [3, 1]}``, ``{"next_poi_id": 3}``, ``[3, 1]``), then any
    integers in the text. Duplicates are dropped (first occurrence kept). With ``max_id``,
    ids outside ``0..max_id`` are dropped. 0 is a valid id.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    ids: list[int] | None = None
    stripped = text.strip()
    candidates = [stripped]
    match = _JSON_SPAN.search(stripped)
    if match and match.group(0) != stripped:
        candidates.append(match.group(0))
    for candidate in candidates:
        for loader in (json.loads, _loads_single_quoted):
            try:
                ids = _ids_from_json(loader(candidate))
            except (ValueError, TypeError):
                ids = None
            if ids:
                break
        if ids:
            break
    if not ids:
        ids = [int(n) for n in _NUMBER.findall(stripped)]
    seen: set[int] = set()
    out: list[int] = []
    for poi in ids:
        if poi in seen or poi < 0 or (max_id is not None and poi > max_id):
            continue
        seen.add(poi)
        out.append(poi)
    return out or None


def _loads_single_quoted(text: str) -> Any:
    return json.loads(text.replace("'", '"'))
