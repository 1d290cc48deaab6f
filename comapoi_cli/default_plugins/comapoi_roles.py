"""CoMaPOI's three agent roles: agent1 Profiler, agent2 Forecaster, agent3 Final_Predictor."""

from __future__ import annotations

import re
from typing import Any

from comapoi_cli.hookspecs import hookimpl
from comapoi_cli.poi_ids import is_id_list, parse_ids
from comapoi_cli.roles import AgentRole, RoleContext

CANDIDATES_PER_LIST = 25

_USER_PATTERNS = (
    re.compile(r"user_id:\s*(\d+)", re.I),
    re.compile(r"For User_id:\s*(\d+)", re.I),
    re.compile(r"user_(\d+)_subtrajectory", re.I),
)


def _answer(record: dict[str, Any]) -> str:
    for message in reversed(record.get("messages") or []):
        if message.get("role") == "assistant":
            return str(message.get("content", ""))
    return ""


def _prompt(record: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content", "")) for m in record.get("messages") or [] if m.get("role") == "user")


def check_candidate_list(answer: str, context: RoleContext, expected: int = CANDIDATES_PER_LIST) -> str | None:
    """Reason why a comma-separated candidate list is invalid, or None."""
    raw = [int(n) for n in re.findall(r"-?\d+", answer)]
    if len(raw) != expected:
        return f"candidate list has {len(raw)} ids, expected {expected}"
    if len(set(raw)) != len(raw):
        return f"candidate list repeats ids ({len(raw) - len(set(raw))} duplicates)"
    max_id = context.max_poi_id
    low = min(raw)
    if low < 0 or (max_id is not None and max(raw) > max_id):
        return f"candidate list has ids outside 0..{max_id if max_id is not None else 'max'}"
    return None


class _CoMaPOIRole(AgentRole):
    def group_key(self, record: dict[str, Any]) -> str | None:
        prompt = _prompt(record)
        for pattern in _USER_PATTERNS:
            match = pattern.search(prompt)
            if match:
                return match.group(1)
        return None


class _ProfileOrCandidates(_CoMaPOIRole):
    """agent1 and agent2 answer either a profile text or a list of 25 candidate ids."""

    def check_answer(self, answer: str, record: dict[str, Any], context: RoleContext) -> str | None:
        if is_id_list(answer):
            return check_candidate_list(answer, context)
        return None

    def parse_prediction(self, text: str, context: RoleContext) -> list[Any] | None:
        return parse_ids(text, context.max_poi_id)


class Profiler(_ProfileOrCandidates):
    id = "agent1"
    display_name = "Profiler"
    description = "Long-term user profile from the history, and a 25-id candidate list from it."


class Forecaster(_ProfileOrCandidates):
    id = "agent2"
    display_name = "Forecaster"
    description = "Recent mobility pattern, and a refined 25-id candidate list from retrieved POIs."


class FinalPredictor(_CoMaPOIRole):
    id = "agent3"
    display_name = "Final_Predictor"
    description = "Ranks the candidates into the final next-POI prediction (true id first)."

    def check_answer(self, answer: str, record: dict[str, Any], context: RoleContext) -> str | None:
        ids = parse_ids(answer)
        if not ids:
            return "final prediction holds no POI id"
        max_id = context.max_poi_id
        if max_id is not None and parse_ids(answer, max_id) != ids:
            return f"final prediction has ids outside 0..{max_id}"
        return None

    def target(self, record: dict[str, Any]) -> str | None:
        ids = parse_ids(_answer(record))
        return str(ids[0]) if ids else None

    def parse_prediction(self, text: str, context: RoleContext) -> list[Any] | None:
        return parse_ids(text, context.max_poi_id)


@hookimpl
def register_agent_roles(register):
    register(Profiler())
    register(Forecaster())
    register(FinalPredictor())
