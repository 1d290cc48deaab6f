"""CoMaPOI's teacher pass (``comapoi data build``) for its three roles, without the original's defects.

Per training trajectory the teacher is asked five things (CoMaPOI's p1-p5), each prompt being the
role's inference prompt plus the "True Next POI Information" block:

- agent1 ``profile`` (p1, temperature 0.5, 512 tokens): a long-term profile -> record 1;
- agent1 ``candidates`` (p2, 0.2, 256): 25 ids from the profile -> record 2;
- agent2 ``pattern`` (p3, 0.5, 512): the recent mobility pattern -> record 1;
- agent2 ``candidates`` (p4, 0.2, 256): 25 ids refined from the 100 retrieved -> record 2;
- agent3 ``negatives`` (p5, 0.2, 256): up to 20 ids the user is unlikely to visit next (no
  record; the rejected side of ``--pairs``);
- agent3 ``ranking``: derived, not asked: the final top-10 with the label at its rank, the other
  ids from the teacher's refined and profile lists (never another agent's list as such).

Strict: an id answer is a JSON list / ``{"next_poi_id": [...]}`` or a comma list of ids and nothing
else (prose, years, coordinates make it a reject), every id inside the dataset's range, no
duplicates. A list of 10 to 25 ids is padded to 25 from the retrieved list (``padded`` is recorded
per record); the label is moved (or added) to its rank. The student records' prompts are the
inference prompts: the label block exists only in the teacher's prompt.
"""

from __future__ import annotations

import json
from typing import Any

from comapoi_cli.roles import TeacherAnswer, TeacherLabel

CANDIDATES = 25
#: A candidate answer with fewer valid ids than this is a reject, not padded into a retrieval list.
MIN_IDS = 10
NEGATIVES = 20
FINAL_TOP_K = 10

#: CoMaPOI's sampling per ask (temperature, max new tokens).
REQUESTS = {
    ("agent1", "profile"): (0.5, 512),
    ("agent1", "candidates"): (0.2, 256),
    ("agent2", "pattern"): (0.5, 512),
    ("agent2", "candidates"): (0.2, 256),
    ("agent3", "negatives"): (0.2, 256),
}

_TEXT_GUIDE = ("Write it so that it explains why this user would go to a place like the true next POI, "
               "without naming that POI or any POI id.")
_LIST_GUIDE = "Answer with the comma-separated ids only, no other words or numbers."


def strict_ids(text: str, max_id: int) -> list[int] | str:
    """The ids of an answer that is nothing but an id list, or why it is not one."""
    from comapoi_cli.poi_ids import answer_ids

    ids, _form = answer_ids(text)
    if ids is None:
        return "not a JSON or comma list of POI ids (prose or other numbers such as years or coordinates in it)"
    if not ids:
        return "the list holds no id"
    bad = [i for i in ids if not 0 <= i <= max_id]
    if bad:
        return f"ids outside 0..{max_id} ({', '.join(map(str, bad[:3]))})"
    if len(set(ids)) != len(ids):
        return f"the list repeats ids ({len(ids) - len(set(ids))} duplicates)"
    return ids


def place_label(ids: list[int], label: int, rank: int, length: int) -> list[int]:
    """``ids`` cut to ``length`` with ``label`` at 1-based ``rank`` (moved there, or added)."""
    rest = [i for i in ids if i != label][: length - 1]
    rest.insert(min(rank, len(rest) + 1) - 1, label)
    return rest


def _csv(ids: list[int]) -> str:
    return ", ".join(map(str, ids))


class CoMaPOITeacher:
    """Mixed into CoMaPOI's roles: their steps, prompts and answers in ``comapoi data build``."""

    id: str

    def teacher_pairs(self) -> bool:
        return self.id in ("agent2", "agent3")

    def teacher_steps(self) -> tuple[str, ...]:
        if self.id == "agent3":
            return ("negatives", "ranking")
        return self.chain_steps()  # type: ignore[attr-defined]

    def teacher_request(self, step: str) -> dict[str, Any]:
        temperature, tokens = REQUESTS.get((self.id, step), (0.0, 256))
        return {"temperature": temperature, "max_new_tokens": tokens}

    def build_teacher_prompt(self, trajectory, upstream, context, step, label: TeacherLabel):
        if self.id == "agent3" and step == "negatives":
            return self._negatives_prompt(trajectory, upstream, context, label)
        messages = [dict(m) for m in self.build_inference_prompt(trajectory, upstream, context, step)]  # type: ignore[attr-defined]
        guide = _LIST_GUIDE if step == "candidates" else _TEXT_GUIDE
        messages[-1]["content"] = f"{messages[-1]['content']}\n\n{label.block()}\n{guide}"
        return messages

    def _negatives_prompt(self, trajectory, upstream, context, label: TeacherLabel):
        from comapoi_cli.data import synth

        one, two = upstream.get("agent1", {}), upstream.get("agent2", {})
        traj = trajectory.trajectory
        text = (f"For User_id: {traj.user}, Subtrajectory_id: {traj.sub}\n"
                f"From the candidate lists and the similar POIs below, list up to {NEGATIVES} POI ids this user is "
                "the least likely to visit next, the least likely first. Answer with the comma-separated ids only.\n\n"
                f"Current trajectory:\n{synth.current_text(traj)}\n\n"
                f"Candidates from the Profiler: {_csv(list(one.get('candidates', [])))}\n"
                f"Candidates from the Forecaster: {_csv(list(two.get('candidates', [])))}\n"
                f"Similar POI List: {_csv(list(trajectory.similar))}\n\n"
                f"{label.block()} Never list {label.poi}.")
        return synth.chat_prompt(text)

    def derive_teacher_answer(self, step, trajectory, upstream, context, label: TeacherLabel):
        if self.id != "agent3" or step != "ranking":
            return None
        one, two = upstream.get("agent1", {}), upstream.get("agent2", {})
        negatives = set(upstream.get("agent3", {}).get("negatives", []))
        pool = [i for i in dict.fromkeys(list(two.get("candidates", [])) + list(one.get("candidates", [])))
                if i not in negatives]
        final = place_label(pool, label.poi, label.rank, FINAL_TOP_K)
        return TeacherAnswer({"ranking": final}, json.dumps({"next_poi_id": final}),
                             {"label_rank": final.index(label.poi) + 1})

    def parse_teacher_answer(self, step, text, trajectory, upstream, context, label: TeacherLabel):
        if step not in ("candidates", "negatives"):
            from comapoi_cli.roles import AgentRole

            return AgentRole.parse_teacher_answer(self, step, text, trajectory, upstream, context, label)  # type: ignore[arg-type]
        ids = strict_ids(text, context.max_poi_id)
        if isinstance(ids, str):
            return ids
        if step == "negatives":
            negatives = [i for i in ids if i != label.poi][:NEGATIVES]
            if not negatives:
                return "no negative id besides the label"
            return TeacherAnswer({"negatives": negatives}, None,
                                 {"dropped_label": label.poi in ids, "cut": max(0, len(ids) - NEGATIVES)})
        if len(ids) < MIN_IDS:
            return f"only {len(ids)} ids (at least {MIN_IDS} of {CANDIDATES} are needed before padding)"
        cut = max(0, len(ids) - CANDIDATES)
        raw = ids[:CANDIDATES]
        padded = [i for i in trajectory.similar if i not in raw][: CANDIDATES - len(raw)]
        raw = raw + padded
        target = place_label(raw, label.poi, label.rank, CANDIDATES)
        if len(target) < CANDIDATES:
            return f"only {len(target)} ids after padding from the retrieved list"
        notes = {"padded": len(padded), "cut": cut, "label_in_answer": label.poi in ids,
                 "label_rank": target.index(label.poi) + 1}
        # downstream (agent3's prompt) sees the list as the teacher wrote it: the label where it put it, or missing
        return TeacherAnswer({"candidates": raw}, _csv(target), notes)
