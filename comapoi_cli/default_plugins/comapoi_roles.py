"""CoMaPOI's three agent roles: agent1 Profiler, agent2 Forecaster, agent3 Final_Predictor.

What a valid answer is, per role (used by ``comapoi data clean``):

- agent1 / agent2 answer either a profile text (any non-empty text) or a candidate list: 25
  unique POI ids inside the dataset's id range, written as a comma list (``22, 1, 12, ...``),
  a JSON list, or ``{"next_poi_id": [...]}`` (optionally in a fenced code block).
- agent3 answers the final prediction: a ranked list of ids (``{"next_poi_id": [22, 5, ...]}``
  or a single id), the true next POI first. An agent3 answer that is a candidate list (a bare
  comma list of 25 ids, or a copy of a candidate list from its own prompt) is the original
  script's mix-up and is flagged as a wrong target (``check_target``).

The user id that ``data split --group-by user`` keeps on one side is read from the prompt
(``user_id: U``, ``For User_id: U``, ``User ID: U``, ``user_U_subtrajectory_S``).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from comapoi_cli.default_plugins.comapoi_teacher import CoMaPOITeacher
from comapoi_cli.hookspecs import hookimpl
from comapoi_cli.poi_ids import (
    ANSWER_FENCE,
    INT_RUN,
    MAX_ID_DIGITS,
    answer_ids,
    is_id_list,
    oversized_number,
    parse_ids,
    to_id,
)
from comapoi_cli.roles import AgentRole, RoleContext

if TYPE_CHECKING:  # typing only: data.synth is imported when a prompt is built, not when the plugin loads
    from comapoi_cli.data.synth import PoiWorld, SynthExample, Trajectory, _Stats

CANDIDATES_PER_LIST = 25
#: The length of agent3's final prediction (the requested length when a record's target says none).
FINAL_TOP_K = 10
#: The reward weights of ``--method grpo``: the ranking reward counts fully, the format reward adds a little.
RANKING_WEIGHT, FORMAT_WEIGHT = 1.0, 0.2

_USER_PATTERNS = (
    re.compile(r"\buser_id:\s*(\d+)", re.I),
    re.compile(r"For User_id:\s*(\d+)", re.I),
    re.compile(r"\bUser ID:\s*(\d+)", re.I),
    re.compile(r"\buser_(\d+)_subtrajectory", re.I),
    re.compile(r"\buser (\d+) visit POI ID", re.I),
)
_LIST_GOES_ON = re.compile(r"['\"]?\s*,\s*['\"]?\d")
_LIST_CAME_BEFORE = re.compile(r"\d['\"]?\s*,\s*['\"]?$")


def _answer(record: dict[str, Any]) -> str:
    for message in reversed(record.get("messages") or []):
        if message.get("role") == "assistant":
            return str(message.get("content", ""))
    return ""


def _prompt(record: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content", "")) for m in record.get("messages") or [] if m.get("role") == "user")


def user_key(record: dict[str, Any]) -> str | None:
    """The user id stated at the start of a CoMaPOI prompt, or None."""
    prompt = _prompt(record)
    head = prompt[:2000]
    for pattern in _USER_PATTERNS:
        match = pattern.search(head) or (pattern.search(prompt) if len(prompt) > 2000 else None)
        if match:
            return match.group(1)
    return None


def _explicit_label(record: dict[str, Any]) -> str | None:
    """The true next POI id when the record carries it beside the conversation, e.g. a top-level
    ``next_poi_id`` (or ``label``), or the same under ``meta`` / ``metadata`` (for evaluation)."""
    for holder in (record, record.get("meta"), record.get("metadata")):
        if not isinstance(holder, dict):
            continue
        for key in ("next_poi_id", "label", "true_poi_id"):
            value = holder.get(key)
            if isinstance(value, bool):
                continue
            if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
                label = to_id(str(value)) if isinstance(value, str) else value
                if label is not None and abs(label) < 10 ** MAX_ID_DIGITS:
                    return str(label)
    return None


def check_candidate_list(answer: str | list[int], context: RoleContext, expected: int = CANDIDATES_PER_LIST) -> str | None:
    """Reason why a candidate list is invalid (count, repeats, range), or None."""
    raw = answer if isinstance(answer, list) else [i for i in (to_id(n) for n in INT_RUN.findall(answer)) if i is not None]
    if len(raw) != expected:
        return f"candidate list has {len(raw)} ids, expected {expected}"
    if len(set(raw)) != len(raw):
        return f"candidate list repeats ids ({len(raw) - len(set(raw))} duplicates)"
    max_id = context.max_poi_id
    if min(raw) < 0 or (max_id is not None and max(raw) > max_id):
        bad = [i for i in raw if i < 0 or (max_id is not None and i > max_id)]
        return f"candidate list has ids outside 0..{max_id if max_id is not None else 'max'} ({', '.join(map(str, bad[:3]))})"
    return None


def _number_problem(answer: str) -> str | None:
    """Why an answer's numbers cannot be POI ids: one too long to convert, a JSON number that is
    not a whole non-negative integer (``NaN``, ``Infinity``, ``1e400``, ``1.5``), or ``-0``; else None."""
    digits = oversized_number(answer)
    if digits is not None:
        return f"the answer holds a number of {digits} digits, which is no POI id"
    text = answer.strip()
    fenced = ANSWER_FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    bad: list[str] = []
    if text[:1] in "[{":
        def _flag(raw: str) -> float:
            bad.append(raw)
            return 0.0

        def _int(raw: str) -> int:
            if raw.startswith("-") and raw.strip("-0") == "":
                bad.append(raw)
            return 0

        try:
            json.loads(text, parse_float=_flag, parse_constant=_flag, parse_int=_int)
        except (ValueError, RecursionError):
            return None
    elif is_id_list(text):
        bad.extend(m.group(0) for m in _NEGATIVE_ZERO.finditer(text))
    if bad:
        return f"the answer holds {', '.join(bad[:3])}, {'which is not a POI id' if len(bad) == 1 else 'which are not POI ids'} (ids are whole numbers >= 0)"
    return None


_NEGATIVE_ZERO = re.compile(r"(?<![\d.])-0+(?![\d.])")


class _CoMaPOIRole(CoMaPOITeacher, AgentRole):  # CoMaPOITeacher: its asks in comapoi data build
    required = True  # every CoMaPOI workflow has the three roles

    def group_key(self, record: dict[str, Any]) -> str | None:
        return user_key(record)

    def target_ids(self, record: dict[str, Any]) -> list[int] | None:
        ids, _form = answer_ids(_answer(record))
        return ids or None


# -- the prompts: one builder per record, shared by data synth (training) and comapoi pipeline (inference) --

def _trajectory_text(traj: "Trajectory") -> str:
    from comapoi_cli.data.synth import current_text

    return current_text(traj)


def _csv(ids: list[int]) -> str:
    return ", ".join(map(str, ids))


def _chat(user_text: str) -> list[dict[str, str]]:
    from comapoi_cli.data.synth import chat_prompt

    return chat_prompt(user_text)


def _record(user_text: str, answer: str) -> dict[str, Any]:
    from comapoi_cli.data.synth import chat_record

    return chat_record(user_text, answer)


def agent1_profile_prompt(traj: "Trajectory", stats: "_Stats", world: "PoiWorld") -> str:
    return (
        f"user_id: {traj.user}, subtrajectory_id: {traj.sub}\n"
        "You are the Profiler. Build a long-term profile of this user from the historical check-in "
        "statistics and the current trajectory: the categories the user prefers, when the user is active, "
        "and the areas the user moves in. Write plain text; do not list POI ids.\n\n"
        f"{stats.block(world, 'Historical statistics')}\n\n"
        f"Current trajectory:\n{_trajectory_text(traj)}")


def agent1_candidates_prompt(traj: "Trajectory", profile: str, max_id: int) -> str:
    return (
        f"user_id: {traj.user}, subtrajectory_id: {traj.sub}\n"
        "You are the Profiler. From the long-term profile and the current trajectory, list the 25 POI ids this "
        "user is most likely to visit next, the most likely first. Answer with exactly 25 unique ids separated "
        f"by commas; every id lies in 0..{max_id}.\n\n"
        f"Long-term profile:\n{profile}\n\n"
        f"Current trajectory:\n{_trajectory_text(traj)}")


def agent2_pattern_prompt(traj: "Trajectory", recent: "_Stats", world: "PoiWorld") -> str:
    return (
        f"user_id: {traj.user}, subtrajectory_id: {traj.sub}\n"
        "You are the Forecaster. Describe the user's recent mobility pattern: how the latest check-ins move "
        "between categories, times and places, and what that suggests for the next visit. Write plain text.\n\n"
        f"{recent.block(world, 'Recent distribution')}\n\n"
        f"Current trajectory:\n{_trajectory_text(traj)}")


def agent2_candidates_prompt(traj: "Trajectory", mobility: str, similar: list[int], max_id: int) -> str:
    return (
        f"user_id: {traj.user}, subtrajectory_id: {traj.sub}\n"
        "You are the Forecaster. Refine the retrieved POIs into the 25 ids this user is most likely to visit "
        "next, the most likely first, using the recent mobility pattern and the current trajectory. Answer with "
        f"exactly 25 unique ids separated by commas; every id lies in 0..{max_id}.\n\n"
        f"Mobility pattern:\n{mobility}\n\n"
        f"Similar POI List: {_csv(similar)}\n\n"
        f"Current trajectory:\n{_trajectory_text(traj)}")


def agent3_prompt(traj: "Trajectory", profile: str, mobility: str, candidates1: list[int], candidates2: list[int]) -> str:
    return (
        f"For User_id: {traj.user}, Subtrajectory_id: {traj.sub}\n"
        "You are the Final_Predictor. Combine the current trajectory, the long-term profile, the short-term "
        f"pattern and the two candidate lists into the {FINAL_TOP_K} most likely next POI ids, ranked. "
        f'Answer in JSON: {{"next_poi_id": [id1, id2, ..., id{FINAL_TOP_K}]}}.\n\n'
        f"Current trajectory:\n{_trajectory_text(traj)}\n\n"
        f"Long-term profile:\n{profile}\n\n"
        f"Short-term pattern:\n{mobility}\n\n"
        f"Candidates from the Profiler: {_csv(candidates1)}\n"
        f"Candidates from the Forecaster: {_csv(candidates2)}")


class _ProfileOrCandidates(_CoMaPOIRole):
    """agent1 and agent2 answer either a profile text or a list of 25 candidate ids."""

    def check_answer(self, answer: str, record: dict[str, Any], context: RoleContext) -> str | None:
        digits = oversized_number(answer)
        if digits is not None and (answer_ids(answer)[1] != "text" or is_id_list(answer.strip())):
            return f"candidate list holds a number of {digits} digits, which is no POI id"
        ids, _form = answer_ids(answer)
        if ids is not None:
            return check_candidate_list(ids, context)
        return None

    answer_kind = "candidates"  # evaluation also reports the recall of the true id in the list

    def target(self, record: dict[str, Any]) -> str | None:
        # the answer is a profile or a candidate list, not the true id: only a candidate-list
        # record that carries the true next POI beside the conversation can be scored
        return _explicit_label(record) if answer_ids(_answer(record))[0] is not None else None

    def parse_prediction(self, text: str, context: RoleContext) -> list[Any] | None:
        return parse_ids(text, context.max_poi_id)

    def rewards(self, record: dict[str, Any], context: RoleContext):
        """Candidate steps: recall of the label in the 25 ids, plus format (an id list of 25 unique ids in
        range). The label: the record's explicit ``next_poi_id``, else its target list's first id (CoMaPOI
        lists the true next POI first). Text steps (profile, pattern): None, not trained with rewards."""
        from comapoi_cli.rewards import RewardPart, RewardSpec, format_score, recall_score

        ids, _form = answer_ids(_answer(record))
        if not ids:
            return None
        explicit = _explicit_label(record)
        label = int(explicit) if explicit is not None else ids[0]
        size, max_id = CANDIDATES_PER_LIST, context.max_poi_id

        def recall(text: str) -> float:
            return recall_score(self.parse_prediction(text, context), label, size)

        def fmt(text: str) -> float:
            raw, form = answer_ids(text)
            return format_score(raw, form_ok=form in ("comma", "json"), length=size, max_id=max_id)

        return RewardSpec("candidates", label, (RewardPart(f"recall@{size}", RANKING_WEIGHT, recall),
                                                RewardPart("format", FORMAT_WEIGHT, fmt)))


class Profiler(_ProfileOrCandidates):
    id = "agent1"
    display_name = "Profiler"
    description = "Long-term user profile from the history, and a 25-id candidate list from it."

    # comapoi pipeline: a long-term profile, then 25 candidates from it (the two agent1 records of data synth)
    chain_position = 1

    def chain_steps(self) -> tuple[str, ...]:
        return ("profile", "candidates")

    def build_inference_prompt(self, trajectory, upstream, context, step="profile"):
        from comapoi_cli.data.synth import history_stats

        traj = trajectory.trajectory
        if step == "profile":
            stats = history_stats(trajectory.history, traj, context.world)
            return _chat(agent1_profile_prompt(traj, stats, context.world))
        profile = upstream.get(self.id, {}).get("profile", "")
        return _chat(agent1_candidates_prompt(traj, profile, context.max_poi_id))

    def synth_records(self, example: "SynthExample") -> list[dict[str, Any]]:
        traj = example.trajectory
        return [_record(agent1_profile_prompt(traj, example.history, example.world), example.profile),
                _record(agent1_candidates_prompt(traj, example.profile, example.max_poi_id),
                        _csv(example.long_term_candidates))]

    def parse_chain_output(self, step, text, context):
        return _chain_fields(step, "profile", text, context)


class Forecaster(_ProfileOrCandidates):
    id = "agent2"
    display_name = "Forecaster"
    description = "Recent mobility pattern, and a refined 25-id candidate list from retrieved POIs."

    # comapoi pipeline: the recent pattern, then 25 candidates refined from the retrieved POIs
    chain_position = 2
    uses_retrieved = True

    def chain_steps(self) -> tuple[str, ...]:
        return ("pattern", "candidates")

    def build_inference_prompt(self, trajectory, upstream, context, step="pattern"):
        from comapoi_cli.data.synth import recent_stats

        traj = trajectory.trajectory
        if step == "pattern":
            return _chat(agent2_pattern_prompt(traj, recent_stats(traj, context.world), context.world))
        pattern = upstream.get(self.id, {}).get("pattern", "")
        return _chat(agent2_candidates_prompt(traj, pattern, list(trajectory.similar), context.max_poi_id))

    def synth_records(self, example: "SynthExample") -> list[dict[str, Any]]:
        traj = example.trajectory
        return [_record(agent2_pattern_prompt(traj, example.recent, example.world), example.mobility),
                _record(agent2_candidates_prompt(traj, example.mobility, example.similar, example.max_poi_id),
                        _csv(example.short_term_candidates))]

    def parse_chain_output(self, step, text, context):
        return _chain_fields(step, "pattern", text, context)


class FinalPredictor(_CoMaPOIRole):
    id = "agent3"
    display_name = "Final_Predictor"
    description = "Ranks the candidates into the final next-POI prediction (true id first)."
    answer_kind = "poi_ids"

    def check_target(self, answer: str, record: dict[str, Any], context: RoleContext) -> str | None:
        """Why this answer is a candidate list rather than a final prediction (the original's mix-up), or None."""
        ids, form = answer_ids(answer)
        if not ids:
            return None
        if form == "comma" and len(ids) == CANDIDATES_PER_LIST:
            return f"the target is a bare list of {CANDIDATES_PER_LIST} candidate ids, not the final prediction"
        if len(ids) >= 10:
            prompt = _prompt(record)
            texts = [str(i) for i in ids]
            for joined in (", ".join(texts), ",".join(texts), "', '".join(texts), '", "'.join(texts)):
                index = prompt.find(joined)
                while index >= 0:
                    end = index + len(joined)
                    # the whole list, not the head or tail of a longer one
                    if not _LIST_GOES_ON.match(prompt, end) and not _LIST_CAME_BEFORE.search(prompt[max(0, index - 6): index]) \
                            and not prompt[end:end + 1].isdigit() and not prompt[index - 1: index].isdigit():
                        return "the target copies a candidate list from the prompt instead of the final prediction"
                    index = prompt.find(joined, index + 1)
        return None

    def check_answer(self, answer: str, record: dict[str, Any], context: RoleContext) -> str | None:
        problem = _number_problem(answer)
        if problem:
            return problem
        ids, _form = answer_ids(answer)
        if ids is None:
            ids = parse_ids(answer)
            if not ids:
                return "final prediction holds no POI id"
        max_id = context.max_poi_id
        bad = [i for i in ids if i < 0 or (max_id is not None and i > max_id)]
        if bad:
            return f"final prediction has ids outside 0..{max_id if max_id is not None else 'max'} ({', '.join(map(str, bad[:3]))})"
        if len(set(ids)) != len(ids):
            return f"final prediction repeats ids ({len(ids) - len(set(ids))} duplicates)"
        return None

    def target(self, record: dict[str, Any]) -> str | None:
        ids, _form = answer_ids(_answer(record))
        if ids is None:
            ids = parse_ids(_answer(record))
        return str(ids[0]) if ids else None

    def parse_prediction(self, text: str, context: RoleContext) -> list[Any] | None:
        return parse_ids(text, context.max_poi_id)

    def rewards(self, record: dict[str, Any], context: RoleContext):
        """NDCG@10 of the parsed list against the label (as ``comapoi eval`` scores it), plus format: valid
        JSON, ids in range, no duplicates, the requested length (the target list's length)."""
        from comapoi_cli.rewards import RewardPart, RewardSpec, format_score, ndcg_score

        label_text = self.target(record)
        if label_text is None or not label_text.lstrip("-").isdigit():
            return None
        label = int(label_text)
        ids, _form = answer_ids(_answer(record))
        length, max_id = len(ids) if ids else FINAL_TOP_K, context.max_poi_id

        def ndcg(text: str) -> float:
            return ndcg_score(self.parse_prediction(text, context), label, 10)

        def fmt(text: str) -> float:
            raw, form = answer_ids(text)
            return format_score(raw, form_ok=form == "json", length=length, max_id=max_id)

        return RewardSpec("ranking", label, (RewardPart("ndcg@10", RANKING_WEIGHT, ndcg),
                                             RewardPart("format", FORMAT_WEIGHT, fmt)))

    # comapoi pipeline: the final ranking from both profiles and both candidate lists
    chain_position = 3

    def chain_steps(self) -> tuple[str, ...]:
        return ("ranking",)

    def synth_records(self, example: "SynthExample") -> list[dict[str, Any]]:
        prompt = agent3_prompt(example.trajectory, example.profile, example.mobility, example.seen_long_term,
                               example.seen_short_term)
        return [_record(prompt, json.dumps({"next_poi_id": example.final}))]

    def build_inference_prompt(self, trajectory, upstream, context, step="ranking"):
        one, two = upstream.get("agent1", {}), upstream.get("agent2", {})
        return _chat(agent3_prompt(trajectory.trajectory, one.get("profile", ""), two.get("pattern", ""),
                                   list(one.get("candidates", [])), list(two.get("candidates", []))))

    def parse_chain_output(self, step, text, context):
        return {"ranking": parse_ids(text, context.max_poi_id) or []}


def _chain_fields(step: str, text_step: str, text: str, context: Any) -> dict[str, Any]:
    """agent1/agent2 chain outputs: the text step as stripped text, the candidate step as up to 25 ids."""
    if step == text_step:
        return {text_step: text.strip()}
    return {"candidates": (parse_ids(text, context.max_poi_id) or [])[:CANDIDATES_PER_LIST]}


@hookimpl
def register_agent_roles(register):
    register(Profiler())
    register(Forecaster())
    register(FinalPredictor())
