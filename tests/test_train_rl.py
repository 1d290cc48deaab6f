"""`comapoi train --method grpo|dpo`: the rewards the roles declare, checked against the metrics module on
hand-written completions; short GRPO and DPO runs of the tiny model on real nyc trajectories (the real
CLI) whose adapters `pipeline run` accepts; `--init-adapter` chains; resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comapoi_cli.evaluation.metrics import ndcg_at, rank_of
from comapoi_cli.poi_ids import parse_ids
from comapoi_cli.roles import RoleContext
from tests.support import REAL_DATA, run_comapoi

CONTEXT = RoleContext(dataset="nyc")
MAX_ID = CONTEXT.max_poi_id
#: Tiny GRPO/DPO runs: short sequences, 2-3 steps, 2 generations of a few tokens.
RL_FAST = ("--model", "tiny", "--batch-size", "2", "--test-size", "2", "--save-freq", "1", "--logging-steps", "1")


def _roles():
    from comapoi_cli.plugins import get_registry

    registry = get_registry()
    return registry.role("agent1"), registry.role("agent3")


def _record(user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


LABEL = 22
TOP10 = [22, 15, 12, 2, 7, 1, 3, 10, 16, 17]
AT7 = [15, 12, 2, 7, 1, 3, 22, 10, 16, 17]
ABSENT = [15, 12, 2, 7, 1, 3, 10, 16, 17, 40]


@pytest.fixture(scope="module")
def agent3_spec():
    _agent1, agent3 = _roles()
    spec = agent3.rewards(_record("For User_id: 0 ...", json.dumps({"next_poi_id": TOP10})), CONTEXT)
    assert spec is not None and spec.label == LABEL and spec.step == "ranking"
    assert [p.name for p in spec.parts] == ["ndcg@10", "format"]
    return spec


def _expected_ndcg(text: str) -> float:
    return ndcg_at(rank_of(LABEL, parse_ids(text, MAX_ID)), 10)


@pytest.mark.parametrize("text, rank, fmt", [
    (json.dumps({"next_poi_id": TOP10}), 1, 1.0),                      # label at rank 1, a perfect answer
    (json.dumps({"next_poi_id": AT7}), 7, 1.0),                        # label at rank 7
    (json.dumps({"next_poi_id": ABSENT}), None, 1.0),                  # label absent
    ('{"next_poi_id": [22, 15, 12', 1, 0.0),                           # malformed JSON: eval still reads the ids
    (json.dumps({"next_poi_id": [99999999, 22, *TOP10[1:9]]}), 1, 0.75),  # an out-of-range id (dropped by eval)
    (json.dumps({"next_poi_id": [15, 15, 22, 12, 2, 7, 1, 3, 10, 16]}), 2, 0.75),  # a duplicate
    ("I think the user goes home.", None, 0.0),                        # no list at all
    (json.dumps({"next_poi_id": TOP10[:5]}), 1, 0.75),                 # too short
])
def test_agent3_rewards_equal_the_metrics_module(agent3_spec, text, rank, fmt):
    scores = agent3_spec.scores(text)
    assert rank_of(LABEL, parse_ids(text, MAX_ID)) == rank
    assert scores["ndcg@10"] == pytest.approx(_expected_ndcg(text))
    assert scores["ndcg@10"] == pytest.approx(ndcg_at(rank, 10))
    assert scores["format"] == pytest.approx(fmt)
    assert agent3_spec.total(text) == pytest.approx(scores["ndcg@10"] + 0.2 * scores["format"])


def test_rank_7_scores_below_rank_1_and_above_absent(agent3_spec):
    one, seven, absent = (agent3_spec.scores(json.dumps({"next_poi_id": ids}))["ndcg@10"] for ids in (TOP10, AT7, ABSENT))
    assert one == 1.0 and absent == 0.0 and seven == pytest.approx(1 / 3)  # 1/log2(8)


def test_candidate_step_rewards_recall_in_25_and_format():
    agent1, _agent3 = _roles()
    ids = [22, *range(100, 124)]
    spec = agent1.rewards(_record("user_id: 0 ... list the 25 POI ids", ", ".join(map(str, ids))), CONTEXT)
    assert spec is not None and spec.label == 22 and [p.name for p in spec.parts] == ["recall@25", "format"]
    assert spec.scores(", ".join(map(str, ids))) == {"recall@25": 1.0, "format": 1.0}
    at_end = [*range(100, 124), 22]
    assert spec.scores(", ".join(map(str, at_end)))["recall@25"] == 1.0
    beyond = [*range(100, 125), 22]  # the label is the 26th id: not in the 25
    assert spec.scores(", ".join(map(str, beyond))) == {"recall@25": 0.0, "format": 0.75}
    assert spec.scores(", ".join(map(str, [22, 22, *range(100, 123)])))["format"] == 0.75
    assert spec.scores(", ".join(map(str, [99999999, *range(100, 124)]))) == {"recall@25": 0.0, "format": 0.75}
    assert spec.scores("no ids here") == {"recall@25": 0.0, "format": 0.0}
    # a record carrying the true next POI beside the conversation: that is the label
    labelled = {**_record("user_id: 0", ", ".join(map(str, ids))), "next_poi_id": 105}
    assert agent1.rewards(labelled, CONTEXT).label == 105


def test_text_steps_are_not_trained_with_rewards():
    agent1, _agent3 = _roles()
    assert agent1.rewards(_record("user_id: 0 ... profile", "The user likes coffee shops in the morning."), CONTEXT) is None
