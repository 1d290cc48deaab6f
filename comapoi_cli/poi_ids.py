"""Reading POI ids out of text: candidate lists, JSON predictions, free model output.

One lenient parser serves data validation (is this answer a candidate list?) and evaluation
(which ids did the model predict, in which order?). The rules, in order:

1. JSON: the whole text, then every JSON object or list embedded in it (a fenced code block,
   a sentence around it), first to last; single-quoted Python-style literals are read too.
   Known keys (``next_poi_id``, ``"next POI ID"``, ``predicted_poi_ids``, ``candidates``, ...)
   are looked up at any depth; a list of ids, a list of ``{"next POI ID": n}`` objects, a bare
   number or a numeric string all count. The first JSON value that holds an id wins.
2. A ``key: ids`` phrase such as ``next POI ID: 22`` or ``Candidates: [3, 4]``.
3. Any id list in the text: the longest comma- (or semicolon-) separated run of integers;
   failing that, every standalone integer in order. Numbers that are part of dates, times,
   coordinates, decimals or words (``user_0``, ``2012-04-04``, ``15:36``, ``40.75``) and list
   markers at the start of a line (``1.``, ``2)``) are not ids.

A number of more than :data:`MAX_ID_DIGITS` digits is not an id (no dataset has that many
POIs) and is skipped without being converted: Python refuses to convert integers of more than
4,300 digits, and one such number in a line must not stop a whole file.

Then duplicates are dropped (first occurrence kept, so the ranking holds), and ids outside the
dataset's range (``0..max_id``; negative ids always) are rejected. 0 is a valid id.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

# is_id_list: nothing but integers separated by commas, optionally in brackets, optionally a final period.
_ID_LIST = re.compile(r"^\s*\[?\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*\]?\s*\.?\s*$")

# A standalone integer: not glued to a word, a decimal, a date, a time or a path.
_NUM = r"(?<![\w.:/\-+])\d+(?![\w]|[.:/\-]\d)"
_NUMBER = re.compile(_NUM)
_NUMBER_RUN = re.compile(_NUM + r"(?:\s*[,;]\s*" + _NUM + r")+")
_LIST_MARKER = re.compile(r"(?m)^(\s*)(?:\(?\d{1,3}[.)](?!\d)|[-*\u2022])[ \t]+")
_KEY_PHRASE = re.compile(
    r"(?P<key>next[\s_-]*poi(?:[\s_-]*ids?)?|predicted[\s_-]*poi[\s_-]*ids?|poi[\s_-]*ids?|candidates?"
    r"(?:[\s_-]*list)?|predictions?|answer)\s*[\"']?\s*(?:is|are|[:=])\s*[\"']?\s*\[?\s*"
    r"(?P<ids>" + _NUM + r"(?:\s*[,;]\s*" + _NUM + r")*)",
    re.I,
)

# JSON keys that hold the prediction, compared after dropping everything but letters.
_ID_KEYS = (
    "nextpoiid", "nextpoiids", "nextpoi", "predictedpoiids", "predictedpoiid", "predictedpois",
    "poiids", "poiid", "candidatepoiids", "candidatepois", "candidatelist", "candidates",
    "rankedpoiids", "ranking", "topk", "prediction", "predictions", "recommendations", "answer", "ids",
)
_RANK_KEY = re.compile(r"\s*(?:rank|top|no\.?)?[\s_-]*(\d{1,18})\s*", re.I)
_MAX_JSON_STARTS = 200  # embedded JSON candidates tried per text (model output is short)
_decoder = json.JSONDecoder()
#: Digits of the longest number read as a POI id; longer numbers are skipped, never converted.
MAX_ID_DIGITS = 18


def to_id(text: str) -> int | None:
    """``int(text)`` for a (possibly signed) digit string of at most :data:`MAX_ID_DIGITS` digits,
    else None (a number that long is no POI id, and converting one of 4,300+ digits raises)."""
    digits = text.strip() if isinstance(text, str) else ""
    body = digits[1:] if digits[:1] in "+-" else digits
    if not body.isdigit() or not body.isascii():
        return None
    if len(body.lstrip("0")) > MAX_ID_DIGITS:
        return None
    return int(digits)


def oversized_number(text: str) -> int | None:
    """The digit count of the longest run of digits in ``text`` when it exceeds
    :data:`MAX_ID_DIGITS` (so it cannot be an id), else None."""
    longest = max((len(m.group(0)) for m in _DIGIT_RUN.finditer(text)), default=0) if isinstance(text, str) else 0
    return longest if longest > MAX_ID_DIGITS else None


_DIGIT_RUN = re.compile(r"\d{%d,}" % (MAX_ID_DIGITS + 1))


ANSWER_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*(.*?)\s*```\s*$", re.S)


def answer_id_list(text: str) -> list[int] | None:
    """The ids of an answer that is nothing but an id list, in order (duplicates and out-of-range
    ids kept), or None: a comma list (``22, 1, 12``), or JSON (``[22, 1]``, ``{"next_poi_id": 22}``),
    optionally in a fenced code block. Free text is not read (a profile's numbers are no target)."""
    if not isinstance(text, str):
        return None
    body = text.strip()
    fenced = ANSWER_FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if is_id_list(body):
        return _ints(re.findall(r"-?\d+", body)) or None
    if body[:1] in "[{":
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return None
        return _ids_from_json(value)
    return None


def _ints(numbers: list[str]) -> list[int]:
    """The numbers that can be ids, converted (longer ones skipped)."""
    out = []
    for n in numbers:
        value = to_id(n)
        if value is not None:
            out.append(value)
    return out


def is_id_list(text: str) -> bool:
    """True if ``text`` is nothing but a comma-separated list of integers, e.g. ``"22, 1, 12"``.

    Negative numbers count as list items (so that a checker can reject them as out of range).
    """
    return isinstance(text, str) and bool(_ID_LIST.match(text))


@dataclass
class IdParse:
    """What :func:`read_ids` found.

    Attributes:
        ids: the valid ids, in the text's order, duplicates and out-of-range ids removed.
        found: every id read before filtering (duplicates and rejected ids included).
        source: ``"json"``, ``"phrase"``, ``"list"``, ``"numbers"`` or ``"none"``.
        rejected: ids outside ``0..max_id`` (or negative), in order.
        duplicates: how many repeated ids were dropped.
    """

    ids: list[int] = field(default_factory=list)
    found: list[int] = field(default_factory=list)
    source: str = "none"
    rejected: list[int] = field(default_factory=list)
    duplicates: int = 0

    @property
    def problem(self) -> str | None:
        """Why no valid id came out of the text, or None when some did."""
        if self.ids:
            return None
        if not self.found:
            return "no POI id in the output"
        return f"every id is outside the dataset's range ({_preview(self.rejected)})"


def _preview(ids: list[int], limit: int = 5) -> str:
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (", ..." if len(ids) > limit else "")


def _norm_key(key: Any) -> str:
    return re.sub(r"[^a-z]", "", str(key).lower())


def _int_of(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if abs(value) < 10 ** MAX_ID_DIGITS else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return to_id(value)
    return None


def _ids_from_json(value: Any, depth: int = 0) -> list[int] | None:
    """Ids held by a decoded JSON value, or None if it holds none."""
    if depth > 20:
        return None
    single = _int_of(value)
    if single is not None:
        return [single]
    if isinstance(value, str):
        ids = _text_ids(value)[0]
        return ids or None
    if isinstance(value, list):
        out: list[int] = []
        for item in value:
            got = _ids_from_json(item, depth + 1)
            if got:
                out.extend(got)
        return out or None
    if isinstance(value, dict):
        by_key = {_norm_key(k): v for k, v in value.items()}
        for key in _ID_KEYS:
            if key in by_key:
                got = _ids_from_json(by_key[key], depth + 1)
                if got:
                    return got
        for key, inner in by_key.items():
            if "poi" in key or "candidate" in key:
                got = _ids_from_json(inner, depth + 1)
                if got:
                    return got
        ranks = [_RANK_KEY.fullmatch(str(k)) for k in value]
        if value and all(ranks):  # {"1": 22, "2": 35} or {"rank_1": 22, ...}: values in rank order
            out = []
            for _, inner in sorted(zip((int(m.group(1)) for m in ranks if m), value.values()), key=lambda kv: kv[0]):
                out.extend(_ids_from_json(inner, depth + 1) or [])
            return out or None
        if len(value) == 1:
            return _ids_from_json(next(iter(value.values())), depth + 1)
    return None


def _json_ids(text: str) -> list[int] | None:
    """Ids from the whole text as JSON, else from the first embedded JSON object/list that holds any."""
    for variant in (text, text.replace("'", '"')) if "'" in text else (text,):
        try:
            got = _ids_from_json(json.loads(variant))
        except (ValueError, RecursionError):
            got = None
        if got:
            return got
    starts = [m.start() for m in re.finditer(r"[\[{]", text)][:_MAX_JSON_STARTS]
    for start in starts:
        for variant in (text, text.replace("'", '"')) if "'" in text else (text,):
            try:
                value, _ = _decoder.raw_decode(variant, start)
            except (ValueError, RecursionError):
                continue
            if isinstance(value, (dict, list)):
                got = _ids_from_json(value)
                if got:
                    return got
    return None


def _text_ids(text: str) -> tuple[list[int], str]:
    """Ids from free text: a ``key: ids`` phrase, else the longest id run, else every standalone integer."""
    phrases = list(_KEY_PHRASE.finditer(text))
    if phrases:
        # "next POI ..." / "predicted POI ids ..." beat "candidates: ..." or "answer: ..."
        best = next((m for m in phrases if re.match(r"(?i)next|predicted", m.group("key"))), phrases[0])
        return _ints(_NUMBER.findall(best.group("ids"))), "phrase"
    cleaned = _LIST_MARKER.sub(r"\1", text)
    runs = [m.group(0) for m in _NUMBER_RUN.finditer(cleaned)]
    if runs:
        best = max(runs, key=lambda run: len(_NUMBER.findall(run)))  # the first of the longest
        return _ints(_NUMBER.findall(best)), "list"
    numbers = _ints(_NUMBER.findall(cleaned))
    return numbers, "numbers" if numbers else "none"


def read_ids(text: Any, max_id: int | None = None) -> IdParse:
    """Parse a ranked list of POI ids out of ``text`` and say how (see the module's rules)."""
    if not isinstance(text, str) or not text.strip():
        return IdParse()
    stripped = text.strip()
    found = _json_ids(stripped)
    source = "json"
    if not found:
        found, source = _text_ids(stripped)
    return _filter(found or [], source, max_id)


def _filter(found: list[int], source: str, max_id: int | None) -> IdParse:
    result = IdParse(found=list(found), source=source if found else "none")
    seen: set[int] = set()
    for poi in found:
        if poi < 0 or (max_id is not None and poi > max_id):
            result.rejected.append(poi)
            continue
        if poi in seen:
            result.duplicates += 1
            continue
        seen.add(poi)
        result.ids.append(poi)
    return result


def clean_ids(values: list[Any], max_id: int | None = None) -> IdParse:
    """Normalise a ready list of ids (e.g. a predictions file's ``predicted_poi_ids``).

    Items may be integers or numeric strings; raises ``ValueError`` naming the first item that
    is neither. Duplicates are dropped and out-of-range ids rejected, as for parsed text.
    """
    found: list[int] = []
    for item in values:
        value = _int_of(item)
        if value is None:
            raise ValueError(f"{item!r} is not a POI id")
        found.append(value)
    return _filter(found, "list", max_id)


def parse_ids(text: str, max_id: int | None = None) -> list[int] | None:
    """Parse a ranked list of POI ids out of ``text``; None if no valid id can be read.

    JSON first (``{"next_poi_id": [3, 1]}``, ``{"next_poi_id": 3}``, ``[3, 1]``), then any id
    list in the text. Duplicates are dropped (first occurrence kept). Negative ids, and with
    ``max_id`` ids above it, are rejected. 0 is a valid id.
    """
    return read_ids(text, max_id).ids or None


# -- an answer that is nothing but an id list (the CoMaPOI roles' checks, data build's teacher) --------
ANSWER_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*(.*?)\s*```\s*$", re.S)
INT_RUN = re.compile(r"-?\d+")
_LIST_KEYS = {"nextpoiid", "nextpoiids", "candidates", "candidatepoiids", "candidatelist", "poiids", "predictedpoiids"}


def _answer_json_ids(value: Any) -> list[int] | None:
    """Raw ids of a JSON answer that is a list of ids, or an object holding one under a list key."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if re.sub(r"[^a-z]", "", str(key).lower()) in _LIST_KEYS:
                return _answer_json_ids(inner)
        return None
    if isinstance(value, list) and value:
        out = []
        for item in value:
            if isinstance(item, bool):
                return None
            if isinstance(item, int) and abs(item) < 10 ** MAX_ID_DIGITS:
                out.append(item)
            elif isinstance(item, str) and item.strip().lstrip("-").isdigit():
                value_id = to_id(item)
                if value_id is None:
                    return None
                out.append(value_id)
            else:
                return None
        return out
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10 ** MAX_ID_DIGITS:
        return [value]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        single = to_id(value)
        return None if single is None else [single]
    return None


def answer_ids(answer: str) -> tuple[list[int] | None, str]:
    """``(raw ids, form)`` of an answer that is an id list; form is ``"comma"``, ``"json"`` or ``"text"``.

    Raw means duplicates and out-of-range ids are kept, so that a check can count them.
    """
    text = answer.strip()
    fenced = ANSWER_FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if is_id_list(text):
        numbers = INT_RUN.findall(text)
        ids = [to_id(n) for n in numbers]
        if any(i is None for i in ids):
            return None, "text"  # a number too long to be an id: not an id list
        return [i for i in ids if i is not None], "comma"
    if text[:1] in "[{\"":
        try:
            ids = _answer_json_ids(json.loads(text))
        except ValueError:
            ids = None
        if ids is not None:
            return ids, "json"
    return None, "text"
