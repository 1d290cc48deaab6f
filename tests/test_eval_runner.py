"""The ``comapoi eval --adapter`` pipeline in-process, with the model replaced by canned answers.

Everything but the forward pass is real: locating the run, choosing the holdout, roles and
labels, parsing, metrics, predictions.jsonl / metrics.json / metrics.csv, run.json's
``evaluations``; and scoring the written predictions again gives the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.evaluation import runner
from comapoi_cli.evaluation.predictions import score_predictions
from comapoi_cli.models.loading import LoadedModel
from comapoi_cli.plugins import build_registry
from comapoi_cli.roles import AgentRole

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def record(prompt, answer, **extra):
    return {"messages": [SYSTEM, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], **extra}


def agent3(i, label):
    return record(f"For User_id: {i}, Subtrajectory_id: 1\nRank the candidates.",
                  json.dumps({"next_poi_id": [label, label + 1, label + 2]}), agent="agent3")


def candidates(i, label, role="agent1", **extra):
    ids = [label, *range(1000, 1024)]
    return record(f"user_id: {i}, subtrajectory_id: 1\nList 25 candidates.", ", ".join(map(str, ids)), agent=role, **extra)


def profile(i):
    return record(f"user_id: {i}, subtrajectory_id: 1\nDescribe the user.", "Likes coffee.", agent="agent2")


class FakeTokenizer:
    """Enough of a tokenizer for the runner: each rendered text gets a unique one-token id."""

    def __init__(self):
        self.texts: list[str] = []

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert add_generation_prompt and not tokenize
        assert messages[-1]["role"] != "assistant"  # the answer is never part of the prompt
        return json.dumps(messages)

    def __call__(self, text, add_special_tokens=False):
        self.texts.append(text)
        return {"input_ids": [len(self.texts) - 1] * 4}


@pytest.fixture
def fake_model(monkeypatch):
    """Replace model loading and generation; ``answers`` maps a prompt's user text to the output."""
    answers: dict[str, str] = {}
    calls: dict[str, object] = {}
    tokenizer = FakeTokenizer()

    def load_model(base_model, *, adapters=None, trust_remote_code=False, **kwargs):
        calls["base_model"] = base_model
        calls["adapters"] = adapters
        calls["trust_remote_code"] = trust_remote_code
        names = list(adapters or {})
        return LoadedModel(model=None, tokenizer=tokenizer, device="cpu", dtype="float32", quant="none",
                           max_context=None, adapter_names=names, active_adapter=names[0] if names else None)

    def generate(loaded, token_ids, *, batch_size, max_new_tokens, reporter=None, **kwargs):
        calls["max_new_tokens"] = max_new_tokens
        out = []
        for ids in token_ids:
            messages = json.loads(tokenizer.texts[ids[0]])
            out.append(answers.get(messages[-1]["content"], ""))
        return out

    # eval generates through the transformers engine, which imports these inside its methods
    from comapoi_cli.models import generation, loading

    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(generation, "generate", generate)
    return answers, calls


@pytest.fixture(scope="module")
def registry():
    return build_registry(load_entry_points=False)


def make_run(tmp_path: Path, records: list[dict], type_: str = "agent3", dataset: str = "nyc") -> Path:
    run_dir = tmp_path / "output" / "tiny" / f"sft-{dataset}" / f"bs2-gas1-ms4-{type_}-lr0.003"
    run_dir.mkdir(parents=True)
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text("{}")
    holdout = tmp_path / f"{type_}_train_samples_100.jsonl"
    holdout.write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (run_dir / "adapter_model.safetensors").write_bytes(b"")
    (run_dir / "run.json").write_text(json.dumps({
        "job": {"type": type_, "dataset": dataset, "seed": 42, "test_size": 4},
        "base_model": {"name": "tiny", "path": str(base), "kind": "tiny"},
        "device": {"quant": "none", "dtype": "float32"},
        "data": {"train_file": "x", "holdout_file": str(holdout)},
    }))
    return run_dir


def evaluate(run_dir, registry, **kwargs):
    request = runner.EvalRequest(adapter=run_dir, **kwargs)
    return runner.evaluate_adapter(request, registry=registry)


def test_agent3_run_end_to_end(tmp_path, fake_model, registry):
    answers, calls = fake_model
    records = [agent3(0, 22), agent3(1, 0), agent3(2, 7), agent3(3, 9)]
    answers.update({
        records[0]["messages"][1]["content"]: '{"next_poi_id": [22, 5]}',        # rank 1
        records[1]["messages"][1]["content"]: '{"next_poi_id": [3, 0]}',         # id 0 at rank 2
        records[2]["messages"][1]["content"]: "1, 2, 3, 4, 5, 6, 7",             # rank 7
        # records[3]: empty output -> unparsable
    })
    run_dir = make_run(tmp_path, records)
    result = evaluate(run_dir, registry)
    m = result.entry["metrics"]
    assert m["n"] == 4 and m["acc@1"] == 25.0 and m["acc@5"] == 50.0 and m["acc@10"] == 75.0
    assert m["unparsable"] == 25.0
    assert m["mrr"] == pytest.approx(round(100 * (1 + 1 / 2 + 1 / 7) / 4, 4))
    assert calls["base_model"] == str(tmp_path / "base")
    # auto max_new_tokens: 1.5 x the longest reference answer (4 fake tokens) + 16
    assert calls["max_new_tokens"] == 22

    lines = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [1, 2, 3, 4]
    assert lines[1] | {"prompt_sha256": None} == {
        "id": 2, "role": "agent3", "dataset": "nyc", "prompt_sha256": None, "label": 0,
        "output": '{"next_poi_id": [3, 0]}', "predicted_poi_ids": [3, 0], "rank": 2}
    assert lines[3]["predicted_poi_ids"] is None and lines[3]["parse_error"] == "empty output"
    assert len(lines[0]["prompt_sha256"]) == 64

    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["metrics"] == m and saved["data_sha256"] and saved["role"] == "agent3"
    csv = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv[0].split(",")[:3] == ["scope", "acc@1", "acc@5"] and csv[1].startswith("all,25.0,50.0")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["job"]["type"] == "agent3"  # the rest of run.json is kept
    (entry,) = run["evaluations"]
    assert set(entry) >= {"data", "data_sha256", "metrics", "time"}
    assert set(entry["metrics"]) == {"acc@1", "acc@5", "acc@10", "acc@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr",
                                     "unparsable", "n"}

    # the written predictions score to the same numbers, without the model
    assert score_predictions(run_dir / "predictions.jsonl", registry=registry).metrics == m
    assert score_predictions(run_dir / "predictions.jsonl", reparse=True, registry=registry).metrics == m

    # a second evaluation is appended, not replacing the first
    evaluate(run_dir, registry, num_samples=2)
    run = json.loads((run_dir / "run.json").read_text())
    assert [e["metrics"]["n"] for e in run["evaluations"]] == [4, 2]


def test_merged_run_scores_each_record_as_its_role(tmp_path, fake_model, registry):
    answers, _ = fake_model
    records = [agent3(0, 22), candidates(1, 40, next_poi_id=40), candidates(2, 41, role="agent2"), profile(3),
               record("<historical trajectory of user_4_subtrajectory_1>\nAt ...", '{"next_poi_id": 12}')]
    answers.update({
        records[0]["messages"][1]["content"]: "[22]",
        records[1]["messages"][1]["content"]: ", ".join(map(str, [*range(1000, 1021), 40])),  # rank 22
        records[4]["messages"][1]["content"]: '{"next_poi_id": 12}',
    })
    run_dir = make_run(tmp_path, records, type_="merged")
    result = evaluate(run_dir, registry)
    entry = result.entry
    assert entry["metrics"]["n"] == 3 and entry["skipped"] == 2
    assert set(entry["by_role"]) == {"agent1", "agent3", "poi_ids"}
    assert entry["by_role"]["agent1"]["candidate_recall"] == 100.0 and entry["by_role"]["agent1"]["acc@20"] == 0.0
    assert entry["metrics"]["candidate_recall"] == 100.0 and entry["metrics"]["acc@1"] == pytest.approx(66.6667)
    assert any("agent2" in note and "no true next POI id" in note for note in result.notes)
    csv = (run_dir / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in csv[1:]] == ["all", "agent1", "agent3", "poi_ids"]
    rescored = score_predictions(run_dir / "predictions.jsonl", registry=registry)
    assert rescored.metrics == entry["metrics"] and rescored.by_role == entry["by_role"]

    # --type agent3 on a merged run: only the agent3 records of the run's own holdout
    only = evaluate(run_dir, registry, type="agent3")
    assert only.entry["metrics"]["n"] == 1 and any("agent3 records of the merged" in n for n in only.notes)


def test_checkpoint_output_dir_and_explicit_data(tmp_path, fake_model, registry):
    answers, _ = fake_model
    run_dir = make_run(tmp_path, [agent3(0, 22)])
    checkpoint = run_dir / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text("{}")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(agent3(5, 3)) + "\n" + "{broken\n")
    answers[agent3(5, 3)["messages"][1]["content"]] = "3"
    result = evaluate(checkpoint, registry, data=other, output_dir=tmp_path / "out")
    assert result.entry["metrics"]["acc@1"] == 100.0 and result.entry["skipped"] == 1
    assert (tmp_path / "out" / "predictions.jsonl").is_file() and (tmp_path / "out" / "metrics.csv").is_file()
    assert "evaluations" not in json.loads((run_dir / "run.json").read_text())  # a checkpoint leaves run.json alone
    assert any("checkpoint" in n for n in result.notes) and any("unreadable line" in n for n in result.notes)


def test_third_party_text_role_is_exact_match(tmp_path, fake_model, registry):
    class Summary(AgentRole):
        id = "agent9"

    registry.roles["agent9"] = Summary()
    try:
        answers, _ = fake_model
        records = [record("Summarise A", "alpha"), record("Summarise B", "beta")]
        answers.update({"Summarise A": " alpha\n", "Summarise B": "gamma"})
        run_dir = make_run(tmp_path, records, type_="agent9")
        m = evaluate(run_dir, registry).entry["metrics"]
        assert m == {"exact_match": 50.0, "unparsable": 0.0, "n": 2}  # no acc@k / ndcg@k for text
        lines = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
        assert lines[0]["label"] == "alpha" and "predicted_poi_ids" not in lines[0]
        assert score_predictions(run_dir / "predictions.jsonl", registry=registry).metrics == m
        assert (run_dir / "metrics.csv").read_text().splitlines()[1].endswith(",50.0,2")
    finally:
        del registry.roles["agent9"]


def test_unparsable_is_not_called_empty_and_a_plugin_role_error_names_the_plugin(tmp_path, fake_model, registry):
    from comapoi_cli.plugins import PluginInfo

    class Strict(AgentRole):
        id = "agent9"

        def parse_prediction(self, text, context):
            if "boom" in text:
                raise RuntimeError("parser bug")
            return None if "?" in text else [text.strip()]

    registry.roles["agent9"] = Strict()
    registry.plugins.append(PluginInfo(name="my-roles", source="entry point (my-roles 1.0)", registered=["role agent9"]))
    try:
        answers, _ = fake_model
        records = [record(f"Q{i}", "alpha") for i in range(3)]
        answers.update({"Q0": "what?", "Q1": "boom", "Q2": "   "})
        run_dir = make_run(tmp_path, records, type_="agent9")
        m = evaluate(run_dir, registry).entry["metrics"]
        assert m == {"exact_match": 0.0, "unparsable": 100.0, "n": 3}
        errors = [json.loads(x).get("parse_error") for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
        assert errors[0] == "unparsable: the role found no prediction in it"  # not "empty output"
        assert errors[1] == "unparsable: agent9's parse_prediction() (the plugin my-roles) raised RuntimeError: parser bug"
        assert errors[2] == "empty output"
    finally:
        del registry.roles["agent9"]
        registry.plugins.pop()


def test_errors_are_sentences(tmp_path, fake_model, registry):
    with pytest.raises(UsageError, match="does not exist"):
        evaluate(tmp_path / "nope", registry)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="not a trained adapter"):
        evaluate(empty, registry)
    run_dir = make_run(tmp_path, [profile(1)], type_="agent2")
    with pytest.raises(DataError, match="Nothing to evaluate"):
        evaluate(run_dir, registry)
    with pytest.raises(UsageError, match="Unknown agent role"):
        evaluate(run_dir, registry, type="agent77")
    with pytest.raises(DataError, match="does not exist"):
        evaluate(run_dir, registry, data=tmp_path / "missing.jsonl")
    holdout = Path(json.loads((run_dir / "run.json").read_text())["data"]["holdout_file"])
    holdout.unlink()
    with pytest.raises(DataError, match="no longer exists"):
        evaluate(run_dir, registry)


def test_prompt_hash_is_canonical():
    a = runner.prompt_hash([{"role": "user", "content": "x"}])
    assert a == runner.prompt_hash([{"content": "x", "role": "user"}])
    import hashlib
    assert a == hashlib.sha256(b'[{"content":"x","role":"user"}]').hexdigest()
