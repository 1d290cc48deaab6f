"""Agent roles: the types of training data (and adapters) that comapoi knows.

A role says where its data lives, what a valid answer looks like, and how to read a prediction
for evaluation. CoMaPOI's three roles (agent1 Profiler, agent2 Forecaster, agent3
Final_Predictor) are defined in ``comapoi_cli/default_plugins/comapoi_roles.py``; plugins add
more through the ``register_agent_roles`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from comapoi_cli.leaks import find_leak_in_messages
from comapoi_cli.presets import DatasetPreset, preset_for

if TYPE_CHECKING:  # light at run time: roles load on every command
    from comapoi_cli.chain import ChainContext, ChainItem
    from comapoi_cli.rewards import RewardSpec

#: ``--type merged`` trains on every role's data together; it is not a role.
MERGED = "merged"


@dataclass(frozen=True)
class TeacherLabel:
    """What a teacher (``comapoi data build``) is told about the true next POI of one trajectory.

    ``rank`` is where the label must sit (1-based) in the role's ranked targets (``--label-rank``);
    ``category``/``lat``/``lon`` come from the POI table (None when the POI is not in it).
    """

    poi: int
    rank: int = 1
    category: str | None = None
    lat: str | None = None
    lon: str | None = None

    def block(self) -> str:
        """The "True Next POI Information" block appended to a teacher prompt (never to a student's)."""
        where = f"{self.category.strip()}, {self.lat},{self.lon}" if self.category else "not in the POI table"
        return (f"True Next POI Information (given to you, the teacher, only; never mention it or its id in "
                f"a text answer): POI ID {self.poi} ({where}). In a list of ids, put {self.poi} at rank {self.rank}.")


@dataclass
class TeacherAnswer:
    """A teacher's answer to one step, as a role accepted it.

    ``fields`` go to the roles downstream (as ``parse_chain_output`` fields do at inference),
    ``target`` is the assistant turn of the student record (None: the step writes no record, e.g.
    CoMaPOI's negatives), ``notes`` is what the build records beside the record (e.g. ``padded``:
    ids added from the retrieved list).
    """

    fields: dict[str, Any]
    target: str | None
    notes: dict[str, Any] | None = None


@dataclass(frozen=True)
class RoleContext:
    """What a role may use when it judges a record."""

    dataset: str | None = None

    @property
    def preset(self) -> DatasetPreset | None:
        return preset_for(self.dataset)

    @property
    def max_poi_id(self) -> int | None:
        preset = self.preset
        return preset.max_poi_id if preset else None


def _last_answer(record: dict[str, Any]) -> str:
    for message in reversed(record.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return str(message.get("content", ""))
    return ""


class AgentRole:
    """Base class of an agent role. Subclass it, set the attributes, override what differs.

    Attributes:
        id: the value of ``--type`` and the serving name, e.g. ``"agent1"``.
        display_name: e.g. ``"Profiler"``.
        description: one line for ``comapoi plugins list``.
        data_file: the training file name inside ``{data_dir}/{dataset}/``; ``{id}`` is replaced.
    """

    id: str = ""
    display_name: str = ""
    description: str = ""
    data_file: str = "{id}_train_samples.jsonl"
    #: How ``comapoi eval`` compares predictions with ``target()``: ``"text"`` (default: the
    #: items of ``parse_prediction`` are compared with the target as stripped strings, so the
    #: default parser gives exact-match scoring), ``"poi_ids"`` (a ranked list of POI ids; the
    #: target must be an id inside the dataset's range) or ``"candidates"`` (like ``"poi_ids"``,
    #: and the answer is a candidate list: evaluation also reports the recall of the true id in
    #: the whole list).
    answer_kind: str = "text"
    #: Whether every CoMaPOI workflow includes this role: ``data synth`` writes its file unasked and
    #: ``pipeline run`` needs a run for it (``--ID RUN``, or ``--merged RUN``). A role that is not
    #: required (the default, e.g. a plugin's critic) joins when named: ``data synth --role ID``,
    #: ``pipeline run --ID RUN``. CoMaPOI's three roles are required.
    required: bool = False

    def data_file_name(self) -> str:
        return self.data_file.format(id=self.id)

    def check_answer(self, answer: str, record: dict[str, Any], context: RoleContext) -> str | None:
        """Return None if ``answer`` (the last assistant turn) fits this role, else the reason why not.

        The reason is a short phrase used as the reject reason, e.g. ``"candidate list has 24 ids, expected 25"``.
        """
        return None

    def check_target(self, answer: str, record: dict[str, Any], context: RoleContext) -> str | None:
        """Return None if ``answer`` is the kind of target this role trains on, else why not.

        ``data clean`` calls it before ``check_answer``; a reason is reported under the
        ``wrong_target`` check (e.g. CoMaPOI's agent3 records whose target is a candidate list
        instead of the final prediction). Default: every answer is the right kind of target.
        """
        return None

    def check_leak(self, record: dict[str, Any], context: RoleContext) -> str | None:
        """Return None unless the prompt of ``record`` gives its label away, else how (the detail of
        the ``label_leak`` check). Default: the generic check, a system or user turn that states the
        true next POI ("True Next POI Information", "next POI ID is 22", ``"next_poi_id": 22``;
        ``comapoi_cli.leaks.find_leak_in_messages``)."""
        return find_leak_in_messages(record.get("messages") or [])

    def group_key(self, record: dict[str, Any]) -> str | None:
        """The key that ``data split --group-by user`` keeps on one side of the split (a user id),
        or None when the record has none (it is then a group of its own). Default: none."""
        return None

    def target_ids(self, record: dict[str, Any]) -> list[int] | None:
        """The POI ids of the record's answer, the true next POI first, or None when its answer is
        not an id list. ``data stats`` counts the distinct first ids ("distinct target POIs").
        Default: the answer read as ids by ``comapoi_cli.poi_ids.answer_id_list``."""
        from comapoi_cli.poi_ids import answer_id_list

        return answer_id_list(_last_answer(record))

    def target(self, record: dict[str, Any]) -> str | None:
        """The label an evaluation compares predictions with (default: the answer text)."""
        messages = record.get("messages") or []
        for message in reversed(messages):
            if message.get("role") == "assistant":
                return str(message.get("content", "")).strip()
        return None

    def parse_prediction(self, text: str, context: RoleContext) -> list[Any] | None:
        """Parse a model output into a ranked list of predictions, or None if it cannot be parsed.

        The default scores by exact match: the stripped text is the one prediction.
        """
        text = text.strip()
        return [text] if text else None

    def synth_records(self, example: Any) -> list[dict[str, Any]]:
        """The training records ``comapoi data synth`` writes to this role's file for one trajectory
        (each a ``{"messages": [...]}`` chat record). ``example`` is a
        ``comapoi_cli.data.synth.SynthExample``: the trajectory with its label (``example.trajectory.next_poi``),
        the POI table, the user's statistics, and what CoMaPOI's simulated agents said about it (profile,
        pattern, candidate lists, final ranking); ``example.rng(self.id)`` gives the role's own random draws.
        Build the prompt with the same function as ``build_inference_prompt``. Default: the role has no
        synthetic data (``data synth`` skips it)."""
        raise NotImplementedError(f"role {self.id} cannot synthesise training records")
    def rewards(self, record: dict[str, Any], context: RoleContext) -> "RewardSpec | None":
        """What ``comapoi train --method grpo`` optimises on this training record, or None when the
        record is not trained with rewards (a text answer: a profile, a pattern).

        Return a ``comapoi_cli.rewards.RewardSpec``: the record's step, its label (the
        trajectory's true next POI) and the reward parts, each a named scorer of one completion's
        text in [0, 1] with a weight. The prompt GRPO samples from is the record's turns before its
        answer. Default: None (the role is not trained with rewards).
        """
        return None

    def describe(self) -> dict[str, str]:
        return {
            "id": self.id,
            "display_name": self.display_name,
            "description": self.description,
            "data_file": self.data_file_name(),
        }

    # -- comapoi pipeline: the role's place and work in the inference chain ------------------------------
    #: Where the role runs in ``comapoi pipeline`` (lower first; CoMaPOI's roles are 1, 2, 3). A role with
    #: neither ``chain_position`` nor ``chain_after`` is not part of the chain.
    chain_position: float | None = None
    #: Run right after this role id (e.g. ``"agent3"``); wins over ``chain_position``.
    chain_after: str | None = None
    #: Whether the role's prompt shows the retriever's "similar POIs" (``ChainItem.similar``): the chain's
    #: scores then list the retrieved list as a stage right before this role's candidates.
    uses_retrieved: bool = False

    def chain_steps(self) -> tuple[str, ...]:
        """The generations this role makes per trajectory, in order (default: one, ``"answer"``)."""
        return ("answer",)

    def build_inference_prompt(self, trajectory: "ChainItem", upstream: dict[str, dict[str, Any]],
                               context: "ChainContext", step: str = "answer") -> list[dict[str, str]]:
        """The prompt turns (system, user) for one step on one test trajectory, without any label.

        ``upstream`` holds the outputs of the roles that ran before (``{role_id: {field: value}}``,
        this role's earlier steps included). Build it with the same function that builds the
        role's training records, so that training and inference prompts cannot drift.
        """
        raise NotImplementedError(f"role {self.id} cannot build an inference prompt")

    def parse_chain_output(self, step: str, text: str, context: "ChainContext") -> dict[str, Any]:
        """The fields one step's output gives the roles downstream. ``"ranking"`` (a ranked id list)
        makes it the chain's final ranking; ``"candidates"`` is scored as a per-stage recall.
        Default: the parsed prediction list as ``ranking``."""
        parsed = self.parse_prediction(text, RoleContext(dataset=context.dataset))
        return {"ranking": [p for p in parsed or [] if isinstance(p, int)]}

    # -- comapoi data build: the role's training records written by a teacher LLM ------------------------
    # The teacher sees the label (``TeacherLabel.block``); the student record is exactly the role's
    # inference prompt (``build_inference_prompt``) + the accepted answer, so training = inference.

    def teacher_steps(self) -> tuple[str, ...]:
        """The steps the teacher pass runs per trajectory, in order (default: ``chain_steps()``).
        A step may be teacher-only (no record, e.g. negatives) or derived (no request)."""
        return self.chain_steps()

    def teacher_pairs(self) -> bool:
        """Whether ``data build --pairs`` writes DPO pairs for this role's id-list records (chosen: the
        teacher's list with the label; rejected: the trajectory's ``negatives`` field). Default: no."""
        return False

    def teacher_request(self, step: str) -> dict[str, Any]:
        """The sampling of one teacher ask: ``{"temperature": float, "max_new_tokens": int}``."""
        return {"temperature": 0.0, "max_new_tokens": 256}

    def build_teacher_prompt(self, trajectory: "ChainItem", upstream: dict[str, dict[str, Any]], context: "ChainContext",
                             step: str, label: TeacherLabel) -> list[dict[str, str]]:
        """The teacher's prompt for one step: the inference prompt with the label block appended to
        its last user turn (default)."""
        messages = [dict(m) for m in self.build_inference_prompt(trajectory, upstream, context, step)]
        for message in reversed(messages):
            if message.get("role") == "user":
                message["content"] = f"{message['content']}\n\n{label.block()}"
                break
        return messages

    def derive_teacher_answer(self, step: str, trajectory: "ChainItem", upstream: dict[str, dict[str, Any]],
                              context: "ChainContext", label: TeacherLabel) -> TeacherAnswer | None:
        """An answer made from the earlier steps without asking the teacher, or None (ask; default)."""
        return None

    def parse_teacher_answer(self, step: str, text: str, trajectory: "ChainItem", upstream: dict[str, dict[str, Any]],
                             context: "ChainContext", label: TeacherLabel) -> TeacherAnswer | str:
        """The accepted answer, or the reason it is rejected (the build retries, then writes the
        reason and the raw answer to ``build.rejects.jsonl``). Default: a non-empty text that does
        not name the label becomes the target; its fields are ``parse_chain_output``'s."""
        from comapoi_cli.leaks import find_label_leak

        text = text.strip()
        if not text:
            return "empty answer"
        leak = find_label_leak(text) or (f"the answer names the true next POI id {label.poi}"
                                         if names_id(text, label.poi) else None)
        if leak:
            return f"{leak} (it would leak the label into the student prompts)"
        return TeacherAnswer(self.parse_chain_output(step, text, context), text)


def names_id(text: str, poi: int) -> bool:
    """``text`` names ``poi`` as a POI: ``POI 22``, ``POI ID 22``, ``id: 22``, ``#22``, or 22 inside a list of
    numbers (a count such as "22 places" or a decimal such as 40.22 is not naming it)."""
    import re

    n = str(poi)
    return (re.search(rf"(?:\bpoi\b|\bids?\b|#|\bno\.)\s*(?:id)?\s*[:#=]?\s*{n}(?![\d]|\.\d)", text, re.I) is not None
            or re.search(rf"(?<![\d.])\d+\s*,\s*{n}(?![\d]|\.\d)|(?<![\d.]){n}\s*,\s*\d+(?!\.\d)", text) is not None)
