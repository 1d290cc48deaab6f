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

from comapoi_cli.metrics import ndcg_at, rank_of
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


def test_a_backend_without_a_method_names_those_that_have_it():
    from comapoi_cli.backends import Backend, method_problem

    class SftOnly(Backend):
        name = "sftonly"

    class Both(Backend):
        name = "both"
        methods = ("sft", "grpo")

    backends = {"sftonly": SftOnly(), "both": Both()}
    assert method_problem(backends["both"], "grpo", backends) is None
    assert method_problem(backends["sftonly"], "grpo", backends) == \
        "--backend sftonly does not train --method grpo: use --backend both."
    assert method_problem(backends["sftonly"], "dpo", backends) == \
        "--backend sftonly does not train --method dpo: no installed backend trains it."
    from comapoi_cli.plugins import get_registry

    assert set(get_registry().backend("trl").methods) == {"sft", "grpo", "dpo"}
    assert get_registry().backend("trl").describe()["methods"] == ["sft", "grpo", "dpo"]


def test_the_unsloth_plugin_declares_its_methods():
    from comapoi_unsloth import UnslothBackend

    assert UnslothBackend.methods == ("sft",)


@pytest.mark.parametrize("flags, sentence", [
    (("--method", "dpo", "--type", "agent3"), "--method dpo trains on preference pairs: give a JSONL"),
    (("--method", "grpo", "--type", "merged"), "--method grpo trains one role with that role's rewards"),
    (("--method", "grpo", "--type", "agent3", "--num-generations", "3"), "must be a multiple of --num-generations 3"),
    (("--method", "ppo",), "unknown --method 'ppo'; choose sft, grpo, dpo."),
])
def test_bad_method_flags_are_one_sentence(flags, sentence, tmp_path):
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(tmp_path), "--batch-size", "2", *flags,
                         "--output-dir", str(tmp_path / "out"))
    assert result.returncode != 0 and sentence in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- real runs: the tiny model on CoMaPOI agent records synthesised from the real nyc trajectories ---------------
#: Real nyc prompts run 1,300-3,200 tokens in the tiny tokenizer; 2,000 keeps the shortest few (fast) and shows
#: the "left out" count. Two completions of 12 tokens per prompt.
SEQ = ("--seq-length", "2000")
GRPO_FLAGS = ("--method", "grpo", "--num-generations", "2", "--max-completion-length", "12", *SEQ)


def _only_run(output: Path, kind: str) -> Path:
    runs = sorted(p.parent for p in output.glob(f"*/{kind}-*/*/run.json"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def real_agent_data(tmp_path_factory) -> Path:
    """``DIR/nyc/agent{1,2,3}_train_samples.jsonl`` made by `comapoi data synth` from the 25 real nyc trajectories."""
    root = tmp_path_factory.mktemp("rl-data")
    result = run_comapoi("data", "synth", "--dataset", "nyc", "--source", str(REAL_DATA / "nyc_train.jsonl"),
                         "--poi-info", str(REAL_DATA / "nyc_poi_info.csv"), "--output-dir", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def _train(data: Path, output: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return run_comapoi("train", "--dataset", "nyc", "--data-dir", str(data), *RL_FAST, "--output-dir", str(output), *flags)


@pytest.fixture(scope="module")
def sft_run(real_agent_data, tmp_path_factory) -> Path:
    """SFT first (the usual recipe): a merged tiny run of 2 steps on the real-trajectory agent records."""
    output = tmp_path_factory.mktemp("rl-sft") / "out"
    result = _train(real_agent_data, output, "--type", "merged", "--max-steps", "2", *SEQ)
    assert result.returncode == 0, result.stdout + result.stderr
    return _only_run(output, "sft")


@pytest.fixture(scope="module")
def grpo_run(real_agent_data, sft_run, tmp_path_factory) -> tuple[Path, str, list[str]]:
    output = tmp_path_factory.mktemp("rl-grpo") / "out"
    args = ["--type", "agent3", *GRPO_FLAGS, "--max-steps", "3", "--init-adapter", str(sft_run)]
    result = _train(real_agent_data, output, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return _only_run(output, "grpo"), result.stderr, args


def _pairs(data: Path, target: Path) -> Path:
    """TRL-format preference pairs from the real agent3 records: chosen = the target list (the label first),
    rejected = the same list without the label; plus two broken lines, which must land in the rejects."""
    lines = []
    for line in (data / "nyc" / "agent3_train_samples.jsonl").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        ids = json.loads(messages[-1]["content"])["next_poi_id"]
        without = [i for i in ids if i != ids[0]] + [max(ids) + 1]
        lines.append(json.dumps({"prompt": messages[:-1], "chosen": [messages[-1]],
                                 "rejected": [{"role": "assistant", "content": json.dumps({"next_poi_id": without})}]}))
    lines[3:3] = ['{"prompt": "where next?", "chosen": "22"}', "not json"]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


DPO_STEPS = ("--max-steps", "3")


@pytest.fixture(scope="module")
def dpo_run(real_agent_data, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    folder = tmp_path_factory.mktemp("rl-dpo")
    pairs = _pairs(real_agent_data, folder / "pairs.jsonl")
    args = ["--type", "agent3", "--method", "dpo", "--data-path", str(pairs), *SEQ, *DPO_STEPS]
    result = _train(real_agent_data, folder / "out", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return _only_run(folder / "out", "dpo"), pairs, args


def test_grpo_run_logs_rewards_and_records_the_chain(grpo_run, sft_run):
    run_dir, stderr, _args = grpo_run
    assert run_dir.parent.name == "grpo-nyc" and run_dir.name == "bs2-gas1-ms3-agent3-lr0.005"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["method"] == "grpo" and run["job"]["num_generations"] == 2
    assert run["rewards"]["parts"] == [{"name": "ndcg@10", "weight": 1.0}, {"name": "format", "weight": 0.2}]
    history = run["loss_history"]
    assert [row["step"] for row in history] == [1, 2, 3]
    for row in history:  # every step: the reward and each part (TRL's rewards/<part>/mean), the KL, completion length
        assert {"reward", "rewards/ndcg@10/mean", "rewards/format/mean", "kl", "completions/mean_length"} <= set(row), row
        assert 0 <= row["rewards/ndcg@10/mean"] <= 1 and 0 <= row["rewards/format/mean"] <= 1
        assert row["reward"] == pytest.approx(row["rewards/ndcg@10/mean"] + 0.2 * row["rewards/format/mean"], abs=1e-5)
        assert 0 < row["completions/mean_length"] <= 12
    assert run["progress"]["final_reward"] == history[-1]["reward"]
    assert "ndcg@10 " in stderr and "format " in stderr and "reward " in stderr  # the progress lines show them
    tokens = run["data"]["tokens"]
    assert tokens["prompts"] >= 1 and tokens["too_long_left_out"] > 0 and "longer than --seq-length 2000" in stderr
    # SFT then GRPO: the chain of runs, and the LoRA of the SFT run continued
    (link,) = run["chain"]
    assert link["run_dir"] == str(sft_run.resolve()) and link["method"] == "sft" and link["global_step"] == 2
    assert run["init_adapter"] == link and run["lora"]["from"] == str(sft_run.resolve())
    assert "Starting from the adapter of" in stderr
    assert not (run_dir / "ref").exists()  # TRL's frozen reference copy is not part of the result
    # data_keys.json: the agent3 prompts it sampled on, and every record the SFT run it continues trained on
    keys = json.loads((run_dir / "data_keys.json").read_text())
    sft_keys = json.loads((sft_run / "data_keys.json").read_text())["train"]
    assert set(sft_keys) <= set(keys["train"]) and keys["holdout_file"].endswith("agent3_train_samples_100.jsonl")
    from safetensors.torch import load_file

    before, after = load_file(str(sft_run / "adapter_model.safetensors")), load_file(str(run_dir / "adapter_model.safetensors"))
    assert before.keys() == after.keys()


def test_grpo_leaves_text_steps_out_and_says_so(real_agent_data, sft_run):
    from transformers import AutoTokenizer

    from comapoi_cli.plugins import get_registry
    from comapoi_cli.training.methods import reward_prompts

    tokenizer = AutoTokenizer.from_pretrained(json.loads((sft_run / "run.json").read_text())["base_model"]["path"])
    found = reward_prompts(real_agent_data / "nyc" / "agent1_train_samples.jsonl", get_registry().role("agent1"),
                           CONTEXT, tokenizer, limit=0, max_prompt_tokens=10_000)
    assert found.text_steps == 25 and len(found.prompts) == 25  # 25 profiles (text) and 25 candidate lists
    assert found.part_names() == ["recall@25", "format"] and {s.step for s in found.specs} == {"candidates"}
    assert all(p[-1]["role"] == "user" for p in found.prompts)  # the answer is not in the prompt


def test_dpo_run_trains_on_pairs_and_rejects_broken_lines(dpo_run):
    run_dir, pairs, _args = dpo_run
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["method"] == "dpo" and run["progress"]["global_step"] == 3
    assert run["data"]["prepare_summary"]["in"] == 27 and run["data"]["prepare_summary"]["rejected"] == 2
    rejects = [json.loads(line) for line in pairs.with_name("pairs.pairs.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (4, "no rejected (a pair has prompt, chosen and rejected)"), (5, "not JSON (Expecting value)")]
    for row in run["loss_history"]:
        assert {"rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"} <= set(row), row
    assert "final_reward_margin" in run["progress"]
    from comapoi_cli.runs.datakeys import prompt_key

    prompts = [json.loads(line)["prompt"] for line in pairs.read_text().splitlines() if line.startswith('{"prompt": [')]
    trained = set(json.loads((run_dir / "data_keys.json").read_text())["train"])
    assert run["data"]["tokens"]["pairs"] == len(trained) >= 2 and trained <= {prompt_key(p) for p in prompts}


def test_grpo_and_dpo_adapters_are_normal_runs(grpo_run, dpo_run, sft_run, tmp_path):
    grpo_dir = grpo_run[0]
    dpo_dir = dpo_run[0]
    listed = run_comapoi("adapters", "list", str(grpo_dir.parents[2]), "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)["runs"] if isinstance(json.loads(listed.stdout), dict) else json.loads(listed.stdout)
    assert row["status"] == "finished" and row["adapter"] is True and row["type"] == "agent3"
    for run_dir in (grpo_dir, dpo_dir):
        out = tmp_path / run_dir.parent.name
        result = run_comapoi("pipeline", "run", "--dataset", "nyc", "--test", str(REAL_DATA / "nyc_test.jsonl"),
                             "--poi-info", str(REAL_DATA / "nyc_poi_info.csv"), "--train", str(REAL_DATA / "nyc_train.jsonl"),
                             "--merged", str(sft_run), "--agent3", str(run_dir), "--output-dir", str(out),
                             "--max-new-tokens", "8", "--limit", "2", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads(result.stdout)
        assert summary["processed"] == 2 and summary["scores"]["n"] == 2
        record = json.loads((out / "pipeline.json").read_text())
        assert len(set(record["settings"]["adapters"])) == 2  # the SFT run for agent1/agent2, the new one for agent3
    # eval on the GRPO run's holdout (the agent3 split it sampled from); its data_keys.json holds the SFT run's
    # training keys too, which eval checks the holdout against (--allow-train-overlap: score them regardless)
    result = run_comapoi("eval", "--adapter", str(grpo_dir), "--max-new-tokens", "8", "--allow-train-overlap",
                         "--output-dir", str(tmp_path / "eval"), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    entry = json.loads(result.stdout)
    assert entry["metrics"]["n"] == 2 and "ndcg@10" in entry["metrics"]


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "comapoi_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _kill_and_resume(data: Path, output: Path, kind: str, args: list[str], reference: Path) -> None:
    """Kill -9 a run once checkpoint-1 is complete, resume it, and expect the uninterrupted run's adapter."""
    from comapoi_cli.fileio import sha256_file

    full = ["train", "--dataset", "nyc", "--data-dir", str(data), *RL_FAST, "--output-dir", str(output), *args]
    proc = _start(*full)
    deadline = time.monotonic() + 300
    while not list(output.glob(f"*/{kind}-*/*/checkpoint-1/trainer_state.json")):
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit code {proc.returncode}) before checkpoint-1:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint-1 after 300 s")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    run_dir = _only_run(output, kind)
    assert not (run_dir / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # what kill -9 leaves
    resumed = run_comapoi(*full, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming from checkpoint-" in resumed.stderr
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and len(run["segments"]) == 2 and run["progress"]["global_step"] == 3
    assert run["method"] == kind and run["chain"] == json.loads((reference / "run.json").read_text())["chain"]
    assert sha256_file(run_dir / "adapter_model.safetensors") == sha256_file(reference / "adapter_model.safetensors")


def test_dpo_resumes_after_kill_9_to_the_same_adapter(real_agent_data, dpo_run, tmp_path):
    reference, _pairs_file, args = dpo_run
    _kill_and_resume(real_agent_data, tmp_path / "out", "dpo", args, reference)


def test_grpo_resumes_after_kill_9_to_the_same_adapter(real_agent_data, grpo_run, tmp_path):
    reference, _stderr, args = grpo_run
    _kill_and_resume(real_agent_data, tmp_path / "out", "grpo", args, reference)
