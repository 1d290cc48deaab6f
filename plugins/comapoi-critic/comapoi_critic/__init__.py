"""An example comapoi plugin: agent4, a critic that reranks the Final_Predictor's list.

Module import stays light (no torch): comapoi loads plugins on every command, ``--help`` included.
"""

from __future__ import annotations

import json
import re
from typing import Any

from comapoi_cli import hookimpl
from comapoi_cli.poi_ids import parse_ids
from comapoi_cli.roles import AgentRole, RoleContext

RERANKED_LENGTH = 10
_USER = re.compile(r"user_id:\s*(\d+)", re.I)


class Critic(AgentRole):
    id = "agent4"
    display_name = "Critic"
    description = "Reranks the Final_Predictor's top-10 list using the recent trajectory (example plugin)."
    data_file = "{id}_train_samples.jsonl"
    answer_kind = "poi_ids"  # evaluation scores a ranked id list (Acc@k, NDCG@k, MRR), not exact text

    def check_answer(self, answer: str, record: dict[str, Any], context: RoleContext) -> str | None:
        try:
            value = json.loads(answer)
        except ValueError:
            return 'answer is not JSON {"reranked_poi_ids": [...]}'
        ids = value.get("reranked_poi_ids") if isinstance(value, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return 'answer lacks a "reranked_poi_ids" list of integers'
        if len(ids) != RERANKED_LENGTH or len(set(ids)) != len(ids):
            return f"reranked list must hold {RERANKED_LENGTH} unique ids, got {len(ids)} ({len(set(ids))} unique)"
        max_id = context.max_poi_id
        if min(ids) < 0 or (max_id is not None and max(ids) > max_id):
            return f"reranked list has ids outside 0..{max_id}"
        return None

    def target(self, record: dict[str, Any]) -> str | None:
        answer = super().target(record) or ""
        ids = parse_ids(answer)
        return str(ids[0]) if ids else None

    def parse_prediction(self, text: str, context: RoleContext) -> list[Any] | None:
        return parse_ids(text, context.max_poi_id)

    def group_key(self, record: dict[str, Any]) -> str | None:
        for message in record.get("messages") or []:
            if message.get("role") == "user":
                match = _USER.search(str(message.get("content", "")))
                if match:
                    return match.group(1)
        return None

    # comapoi pipeline: the critic joins the chain right after the Final_Predictor and reranks its list
    chain_after = "agent3"

    def chain_steps(self) -> tuple[str, ...]:
        return ("rerank",)

    def synth_records(self, example) -> list[dict[str, Any]]:
        """``comapoi data synth --role agent4``: the Final_Predictor's list (shuffled, as a model might give it),
        and the true next POI moved to the front."""
        shown = list(example.final)
        example.rng(self.id).shuffle(shown)
        truth = example.trajectory.next_poi
        reranked = [truth, *[i for i in shown if i != truth]][:RERANKED_LENGTH]
        return [{"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": critic_prompt(example.trajectory, shown)},
            {"role": "assistant", "content": json.dumps({"reranked_poi_ids": reranked})},
        ]}]

    def build_inference_prompt(self, trajectory, upstream, context, step="rerank"):
        return [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": critic_prompt(trajectory.trajectory, list(upstream.get("agent3", {}).get("ranking", [])))}]

    def parse_chain_output(self, step, text, context):
        return {"ranking": (parse_ids(text, context.max_poi_id) or [])[:RERANKED_LENGTH]}


def critic_prompt(trajectory: Any, final_list: list[int], recent: int = 5) -> str:
    """The critic's user turn (the format of ``EXAMPLE_RECORD``): the last check-ins and the list to rerank."""
    u = trajectory.user
    checkins = " ".join(c.text(u) for c in trajectory.checkins[-recent:])
    return (f"user_id: {u}, subtrajectory_id: {trajectory.sub}\nRerank the Final_Predictor's list for the next POI.\n"
            f"Recent trajectory: {checkins}\nFinal_Predictor list: {json.dumps(final_list)}")


EXAMPLE_RECORD = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": (
            "user_id: 0, subtrajectory_id: 1\nRerank the Final_Predictor's list for the next POI.\n"
            "Recent trajectory: At 2012-05-31 15:57:11, Thursday, user 0 visit POI ID 20 (Coffee Shop, 40.73,-73.99).\n"
            "Final_Predictor list: [12, 22, 1, 35, 4, 10, 2, 8, 14, 19]"
        )},
        {"role": "assistant", "content": json.dumps({"reranked_poi_ids": [22, 12, 1, 35, 4, 10, 2, 8, 14, 19]})},
    ]
}


@hookimpl
def register_agent_roles(register):
    register(Critic())


@hookimpl
def register_commands(app):
    @app.command("critic-example")
    def critic_example() -> None:
        """Print one valid agent4 (Critic) training record as JSON Lines."""
        print(json.dumps(EXAMPLE_RECORD, ensure_ascii=False))
