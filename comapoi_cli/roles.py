"""Agent roles: the types of training data (and adapters) that comapoi knows.

A role says where its data lives, what a valid answer looks like, and how to read a prediction
for evaluation. CoMaPOI's three roles (agent1 Profiler, agent2 Forecaster, agent3
Final_Predictor) are defined in ``comapoi_cli/default_plugins/comapoi_roles.py``; plugins add
more through the ``register_agent_roles`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from comapoi_cli.presets import DatasetPreset, preset_for

if TYPE_CHECKING:  # light at run time: roles load on every command
    from comapoi_cli.pipeline.chain import ChainContext, ChainItem
    from comapoi_cli.training.rewards import RewardSpec

#: ``--type merged`` trains on every role's data together; it is not a role.
MERGED = "merged"


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
        ``comapoi_cli.data.records.find_leak_in_messages``)."""
        from comapoi_cli.data.records import find_leak_in_messages

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

    def rewards(self, record: dict[str, Any], context: RoleContext) -> "RewardSpec | None":
        """What ``comapoi train --method grpo`` optimises on this training record, or None when the
        record is not trained with rewards (a text answer: a profile, a pattern).

        Return a ``comapoi_cli.training.rewards.RewardSpec``: the record's step, its label (the
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
