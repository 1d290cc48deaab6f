"""comapoi pipeline without a model: inference prompts = data synth's training prompts (no label),
the chain order the roles declare, the built-in retriever, CoMaPOI's compat scoring, input errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from comapoi_cli.chain import ChainContext
from comapoi_cli.data.chain_inputs import load_inputs
from comapoi_cli.data.synth import synth_dataset
from comapoi_cli.plugins import build_registry
from tests.support import REAL_DATA, run_comapoi

_HEAD = re.compile(r"(?:user_id: |For User_id: )(\d+), (?:subtrajectory_id|Subtrajectory_id): (\d+)")


def _ids(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


@pytest.fixture(scope="module")
def split_real(tmp_path_factory) -> tuple[Path, Path, Path]:
    """nyc_train.jsonl split into earlier trajectories (train) and each user's last one (test), and
    data synth's records over the whole file (the last trajectory's history = the earlier ones)."""
    folder = tmp_path_factory.mktemp("split")
    lines = (REAL_DATA / "nyc_train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    users = [json.loads(line)["messages"][1]["content"].split("_subtrajectory")[0] for line in lines]
    last = {user: i for i, user in enumerate(users)}
    (folder / "train.jsonl").write_text("".join(l for i, l in enumerate(lines) if last[users[i]] != i), encoding="utf-8")
    (folder / "test.jsonl").write_text("".join(l for i, l in enumerate(lines) if last[users[i]] == i), encoding="utf-8")
    synth_dataset("nyc", folder / "synth", source=REAL_DATA / "nyc_train.jsonl", poi_info=REAL_DATA / "nyc_poi_info.csv", registry=build_registry())
    return folder / "train.jsonl", folder / "test.jsonl", folder / "synth" / "nyc"


def _by_key(path: Path) -> dict[tuple[int, int], list[dict]]:
    out: dict[tuple[int, int], list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        user, sub = _HEAD.search(record["messages"][1]["content"]).groups()
        out.setdefault((int(user), int(sub)), []).append(record)
    return out


def test_inference_prompts_equal_synth_training_prompts_without_answer_or_label(split_real):
    train, test, synth = split_real
    inputs = load_inputs("nyc", 5091, 8, test, REAL_DATA / "nyc_poi_info.csv", train)
    assert len(inputs.items) == 10 and not inputs.rejected  # users 0-9, one last trajectory each
    records = {name: _by_key(synth / f"{name}_train_samples.jsonl") for name in ("agent1", "agent2", "agent3")}
    roles = build_registry(load_entry_points=False).roles
    context = ChainContext(dataset="nyc", max_poi_id=5091, world=inputs.world)
    compared = 0
    for item in inputs.items:
        assert item.trajectory.next_poi is None  # the roles never see the label
        key = (item.user, item.sub)
        (a1_profile, a1_list), (a2_pattern, a2_list), (a3,) = records["agent1"][key], records["agent2"][key], records["agent3"][key]
        profile, pattern = a1_profile["messages"][2]["content"], a2_pattern["messages"][2]["content"]
        item.similar = _ids(a2_list["messages"][1]["content"].split("Similar POI List: ")[1].split("\n")[0])
        a3_text = a3["messages"][1]["content"]
        seen1 = _ids(a3_text.split("Candidates from the Profiler: ")[1].split("\n")[0])
        seen2 = _ids(a3_text.split("Candidates from the Forecaster: ")[1])
        upstream = {"agent1": {"profile": profile, "candidates": seen1}, "agent2": {"pattern": pattern, "candidates": seen2}}
        for role, step, record in (("agent1", "profile", a1_profile), ("agent1", "candidates", a1_list),
                                   ("agent2", "pattern", a2_pattern), ("agent2", "candidates", a2_list),
                                   ("agent3", "ranking", a3)):
            prompt = roles[role].build_inference_prompt(item, upstream, context, step)
            assert prompt == record["messages"][:2], f"{role}.{step} of user {key}"
            assert record["messages"][2]["role"] == "assistant"  # what was left out: the answer
            assert all("True Next POI" not in m["content"] for m in prompt)
            compared += 1
    assert compared == 50


def test_chain_order_declared_by_roles_and_a_plugin_role_after_agent3():
    from comapoi_cli.errors import UsageError
    from comapoi_cli.pipeline.runner import chain_order
    from comapoi_cli.roles import AgentRole

    registry = build_registry(load_entry_points=False)

    class Critic(AgentRole):
        id = "agent4"
        chain_after = "agent3"

    class Lonely(AgentRole):
        id = "agent5"

    registry.roles["agent4"], registry.roles["agent5"] = Critic(), Lonely()
    assert [r.id for r in chain_order(registry, ["agent4", "agent3", "agent1", "agent2"])] == ["agent1", "agent2", "agent3", "agent4"]
    with pytest.raises(UsageError, match="runs after agent3, which is not in the chain"):
        chain_order(registry, ["agent1", "agent4"])
    with pytest.raises(UsageError, match="declares no chain_position"):
        chain_order(registry, ["agent1", "agent5"])


def test_transitions_retriever_is_deterministic_and_label_free():
    from comapoi_cli.default_plugins.pipeline_retrievers import TransitionsRetriever
    from comapoi_cli.retrievers import RetrievalIndex

    inputs = load_inputs("nyc", 5091, 8, REAL_DATA / "nyc_test.jsonl", REAL_DATA / "nyc_poi_info.csv", REAL_DATA / "nyc_train.jsonl")
    assert len(inputs.items) == 24
    lists = []
    for _ in range(2):
        retriever = TransitionsRetriever()
        retriever.prepare(RetrievalIndex(world=inputs.world, train=inputs.train, histories=inputs.histories, max_poi_id=5091))
        lists.append([retriever.retrieve(item, 100) for item in inputs.items])
    assert lists[0] == lists[1]
    assert all(len(ids) == 100 and len(set(ids)) == 100 for ids in lists[0])
    item, ids = inputs.items[0], lists[0][0]
    last = item.trajectory.checkins[-1].poi
    followers = {t.checkins[i + 1].poi for t in inputs.train for i in range(len(t.checkins) - 1) if t.checkins[i].poi == last}
    assert set(ids[: len(followers - {last})]) == followers - {last}  # transitions seen in training come first
    hits = sum(inputs.labels[it.key] in got for it, got in zip(inputs.items, lists[0]))
    assert 0 < hits < 24  # found by retrieval for some users, not handed the label


def _line(key: str, label: int, ranking: list[int], raw: str, frequent: list[int], retrieved: list[int]) -> dict:
    return {"key": key, "dataset": "nyc", "label": label, "retrieved": retrieved,
            "agents": {"agent1": {"candidates": {"raw": "", "candidates": ranking[:2]}},
                       "agent2": {"candidates": {"raw": "", "candidates": []}},
                       "agent3": {"ranking": {"raw": raw, "ranking": ranking}}},
            "ranking": ranking, "final_step": "agent3.ranking", "baselines": {"frequent": frequent}, "problems": []}


def test_score_compat_differs_exactly_where_comapoi_quirks_bite(tmp_path):
    at15 = [100 + i for i in range(14)] + [77] + [200, 201, 202, 203, 204]
    rows = [
        _line("id0", 0, [0, 5, 6], json.dumps({"next_poi_id": [0, 5, 6]}), [0], [9, 0]),     # POI 0: never correct in compat
        _line("rank15", 77, at15, json.dumps({"next_poi_id": at15}), [1], [77]),           # rank 15: cut at top_k 10
        _line("rank2", 42, [3, 42], "I think [3, 42]", [42], [1, 2]),                        # any-integer fallback agrees
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = run_comapoi("pipeline", "score", str(path), "--compat", "comapoi", "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    chain, compat = scores["chain"], scores["compat"]
    assert chain["acc@1"] == pytest.approx(100 / 3, abs=1e-3) and compat["acc@1"] == 0.0     # id 0 at rank 1
    assert chain["acc@20"] == 100.0 and compat["acc@20"] == pytest.approx(100 / 3, abs=1e-3)  # rank 15 and id 0 lost
    assert chain["acc@10"] == pytest.approx(200 / 3, abs=1e-3) and compat["acc@10"] == pytest.approx(100 / 3, abs=1e-3)
    assert compat["acc@10"] == compat["acc@20"]  # the capped list
    assert chain["mrr"] == pytest.approx(100 * (1 + 1 / 15 + 1 / 2) / 3, abs=1e-3)
    assert compat["mrr"] == pytest.approx(100 * (1 / 2) / 3, abs=1e-3)
    assert scores["stages"] == {"agent1 candidates": pytest.approx(200 / 3, abs=1e-3), "retrieved": pytest.approx(200 / 3, abs=1e-3),
                                "agent2 candidates": 0.0, "final top-10": pytest.approx(200 / 3, abs=1e-3)}
    assert scores["baselines"]["frequent"]["acc@1"] == pytest.approx(200 / 3, abs=1e-3)
    plain = json.loads(run_comapoi("pipeline", "score", str(path), "--json").stdout)
    assert "compat" not in plain and plain["chain"] == chain


def test_pipeline_input_errors_are_one_sentence(tmp_path, trained_run):
    run = str(trained_run.run_dir)
    base = ("pipeline", "run", "--dataset", "nyc", "--merged", run, "--output-dir", str(tmp_path / "out"))
    missing = run_comapoi(*base, "--test", str(tmp_path / "nope.jsonl"))
    assert missing.returncode != 0 and "Cannot find the test trajectories" in missing.stderr and "Traceback" not in missing.stderr
    no_poi = run_comapoi(*base, "--test", str(REAL_DATA / "nyc_test.jsonl"), "--poi-info", str(tmp_path / "poi.csv"))
    assert no_poi.returncode != 0 and "Cannot find the POI table" in no_poi.stderr
    bad_poi = tmp_path / "bad.csv"
    bad_poi.write_text("poi_id,category\n1,x\n")
    bad = run_comapoi(*base, "--test", str(REAL_DATA / "nyc_test.jsonl"), "--poi-info", str(bad_poi))
    assert bad.returncode != 0 and "lacks the columns lat, lon" in bad.stderr
    agents = run_comapoi("pipeline", "run", "--dataset", "nyc", "--test", str(REAL_DATA / "nyc_test.jsonl"), "--agent1", run)
    assert agents.returncode == 2 and "missing --agent2 --agent3" in agents.stderr


def test_nearest_pois_agree_with_the_scalar_haversine_order_ties_included():
    import numpy as np

    from comapoi_cli.data.synth import _km
    from comapoi_cli.default_plugins.pipeline_retrievers import nearest

    inputs = load_inputs("nyc", 5091, 8, REAL_DATA / "nyc_test.jsonl", REAL_DATA / "nyc_poi_info.csv", REAL_DATA / "nyc_train.jsonl")
    rows = sorted((poi, float(info[1]), float(info[2])) for poi, info in inputs.world.info.items())
    # three POIs at one place (a tie the ids must break) and one far away
    first = rows[0]
    rows += [(9001, first[1], first[2]), (9000, first[1], first[2]), (9002, first[1] + 5, first[2])]
    points = (np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))
    for lat, lon in [(first[1], first[2]), (rows[len(rows) // 2][1], rows[len(rows) // 2][2]), (40.75, -73.99)]:
        expected = [poi for poi, _, _ in sorted(rows, key=lambda r: (_km(lat, lon, r[1], r[2]), r[0]))]
        for count in (1, 3, 10, 100, len(rows) + 5):
            assert nearest(points, lat, lon, count) == expected[:count]
    assert nearest(points, first[1], first[2], 3) == sorted([first[0], 9000, 9001])
