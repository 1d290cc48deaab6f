"""``comapoi train`` end to end on the CPU with the tiny model, through the real CLI in subprocesses.

Covers the issue's "done when": merged and agent3 runs produce the original's layout; the loss
falls; the adapter reloads with PEFT and generates; resume after ``kill -9`` and after Ctrl-C ends
with a bit-identical adapter; 4-bit runs on the CPU (or is refused with a reason); errors are one
sentence; ``adapters list --json`` lists the runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comapoi_cli.fileio import sha256_file
from tests.conftest import TRAIN_FAST
from tests.support import run_comapoi

pytestmark = pytest.mark.slow

SEVEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json")


def train_args(data_dir: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "nyc", "--data-dir", str(data_dir), *TRAIN_FAST, "--output_dir", str(output), *extra]


def only_run_dir(output: Path) -> Path:
    runs = sorted(p.parent for p in output.glob("*/sft-*/*/run.json"))
    assert len(runs) == 1, runs
    return runs[0]


def tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not (ta[k] == tb[k]).all()]
    assert not different, f"{len(different)} of {len(ta)} tensors differ, e.g. {different[:3]}"
    assert sha256_file(a / "adapter_model.safetensors") == sha256_file(b / "adapter_model.safetensors")


def start_comapoi(*args: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "comapoi_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_checkpoint(output: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(output.glob(f"*/sft-*/*/checkpoint-{step}/trainer_state.json")):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before checkpoint-{step}:\n{proc.stdout.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no checkpoint-{step} after {timeout} s")


# -- the session's merged run (conftest.trained_run: 8 steps, a checkpoint every 4) ---------------------
def test_merged_run_has_the_original_layout(trained_run):
    run_dir = trained_run.run_dir
    assert run_dir.relative_to(trained_run.output_dir) == Path("tiny/sft-nyc/bs2-gas1-ms8-merged-lr0.005")
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    for checkpoint in run_dir.glob("checkpoint-*"):
        assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    for name in ADAPTER_FILES:
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.1)
    assert set(config["target_modules"]) == SEVEN
    assert Path(config["base_model_name_or_path"]) == Path(trained_run.run_json["base_model"]["path"])
    assert (Path(config["base_model_name_or_path"]) / "config.json").is_file()


def test_run_json_records_the_run(trained_run):
    run = trained_run.run_json
    run_dir = trained_run.run_dir
    assert run["status"] == "finished" and run["error"] is None and run["schema"] == 1
    assert run["job"]["type"] == "merged" and run["job"]["max_steps"] == 8 and run["backend"]["name"] == "trl"
    for package in ("torch", "transformers", "trl", "peft", "datasets", "comapoi", "python"):
        assert run["versions"][package], package
    assert run["base_model"]["name"].startswith("tiny:nyc:") and run["base_model"]["architecture"] == "Qwen2ForCausalLM"
    assert run["chat_template"]["generation_markers"] and "{% generation %}" in run["chat_template"]["template"]
    assert run["chat_template"]["mask_method"] == "generation-markers"
    assert run["tokenizer"]["pad_token"] == "<|endoftext|>" and run["tokenizer"]["vocab_size"] > 256
    hashes = run["data"]["input_hashes"]
    assert sorted(Path(p).name for p in hashes) == [f"agent{i}_train_samples.jsonl" for i in (1, 2, 3)]
    assert all(sha256_file(path) == digest for path, digest in hashes.items())
    assert run["data"]["train_sha256"] == sha256_file(run["data"]["train_file"])
    assert run["data"]["tokens"]["used"] > 0 and 0 < run["data"]["tokens"]["loss_tokens"] < run["data"]["tokens"]["tokens"]
    assert [e["step"] for e in run["loss_history"]] == list(range(1, 9))
    progress = run["progress"]
    assert progress["global_step"] == 8 and progress["final_loss"] == run["loss_history"][-1]["loss"]
    assert progress["tokens_trained"] > 0 and progress["wall_seconds"] > 0 and progress["tokens_per_second"] > 0
    assert progress["peak_memory"]["host_rss_gib"] > 0
    assert run["checkpoints"] == ["checkpoint-4", "checkpoint-8"]
    assert run["adapter"]["sha256"] == sha256_file(run_dir / "adapter_model.safetensors")
    assert run["device"]["type"] in ("cpu", "cuda") and run["device"]["quant"] in ("none", "4bit")
    assert [s["status"] for s in run["segments"]] == ["finished"]


def test_loss_falls_and_the_adapter_reloads_with_peft_and_generates(trained_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from comapoi_cli.training import chat

    run = trained_run.run_json
    history = [e["loss"] for e in run["loss_history"]]
    assert sum(history[-2:]) < sum(history[:2]), history

    base = AutoModelForCausalLM.from_pretrained(run["base_model"]["path"])
    tokenizer = AutoTokenizer.from_pretrained(trained_run.run_dir)  # saved with the adapter
    model = PeftModel.from_pretrained(base, str(trained_run.run_dir)).eval()
    fmt = chat.resolve_chat_format(tokenizer, "assistant")
    records = chat.read_records(run["data"]["train_file"], limit=16)
    rows, _ = chat.tokenize_records(tokenizer, fmt, records, 1536)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item()
                       for r in rows) / len(rows)

    trained = mean_loss()
    with model.disable_adapter():
        before = mean_loss()
    assert trained < before - 0.2, (before, trained)

    prompt = tokenizer.apply_chat_template(records[0]["messages"][:-1], add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = output[0, inputs["input_ids"].shape[1]:]
    assert len(new) >= 1 and tokenizer.decode(new, skip_special_tokens=True).strip()


def test_a_second_run_into_the_same_folder_is_refused(trained_run, agent_data_dir):
    result = run_comapoi(*train_args(agent_data_dir, trained_run.output_dir, "--max_steps", "8", "--save_freq", "4"))
    assert result.returncode == 2
    assert "already holds a finished run, step 8 of 8" in result.stderr
    assert "--resume" in result.stderr and "--overwrite" in result.stderr and "Traceback" not in result.stderr


# -- an agent3 run, --overwrite, --show-labels, adapters list ---------------------------------------------
def test_agent3_run_overwrite_show_labels_and_adapters_list(agent_data_dir, trained_run, tmp_path):
    output = tmp_path / "out"
    args = train_args(agent_data_dir, output, "--type", "agent3", "--max_steps", "4", "--save_freq", "2")
    first = run_comapoi(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = only_run_dir(output)
    assert run_dir.relative_to(output) == Path("tiny/sft-nyc/bs2-gas1-ms4-agent3-lr0.005")
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all((run_dir / name).is_file() for name in ADAPTER_FILES)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["job"]["type"] == "agent3"
    assert [Path(p).name for p in run["data"]["input_hashes"]] == ["agent3_train_samples.jsonl"]
    assert "no token carries loss" not in first.stderr.lower()

    again = run_comapoi(*args, "--overwrite", "--show-labels")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Removed the previous run" in again.stderr
    assert "highlighted" in again.stderr and "tokens without loss" in again.stderr
    rerun = json.loads((run_dir / "run.json").read_text())
    assert rerun["pid"] != run["pid"] and len(rerun["segments"]) == 1

    listing = run_comapoi("adapters", "list", str(trained_run.output_dir), str(output), "--json")
    assert listing.returncode == 0, listing.stderr
    runs = {r["type"]: r for r in json.loads(listing.stdout)["runs"]}
    assert set(runs) == {"merged", "agent3"}
    assert runs["merged"]["base_model"] == runs["agent3"]["base_model"]  # shared by the role and merged runs
    for kind, steps in (("merged", 8), ("agent3", 4)):
        row = runs[kind]
        assert (row["status"], row["dataset"], row["backend"]) == ("finished", "nyc", "trl")
        assert row["base_model"].startswith("tiny:nyc:")  # the dataset's one tiny base, labelled
        assert (row["steps"], row["max_steps"], row["lora_r"], row["lora_alpha"]) == (steps, steps, 8, 16)
        assert row["final_loss"] > 0 and row["size_bytes"] > 0 and row["adapter"] is True


# -- resume: kill -9 and Ctrl-C end with the same adapter as an uninterrupted run ------------------------
RESUME_FLAGS = ("--max_steps", "12", "--save_freq", "3")


@pytest.fixture(scope="module")
def reference_run(agent_data_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference") / "out"
    result = run_comapoi(*train_args(agent_data_dir, output, *RESUME_FLAGS))
    assert result.returncode == 0, result.stdout + result.stderr
    return only_run_dir(output)


def test_resume_after_kill_9_reproduces_the_uninterrupted_adapter(agent_data_dir, reference_run, tmp_path):
    output = tmp_path / "out"
    args = train_args(agent_data_dir, output, *RESUME_FLAGS)
    proc = start_comapoi(*args)
    wait_for_checkpoint(output, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    run_dir = only_run_dir(output)
    assert not (run_dir / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # what kill -9 leaves

    refused = run_comapoi(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = run_comapoi(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming from checkpoint-" in resumed.stderr
    assert_same_adapter(reference_run, run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    reference = json.loads((reference_run / "run.json").read_text())
    assert run["status"] == "finished" and len(run["segments"]) == 2
    assert [e["loss"] for e in run["loss_history"]] == [e["loss"] for e in reference["loss_history"]]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-3", "checkpoint-6", "checkpoint-9"]


def test_ctrl_c_saves_a_checkpoint_and_resume_reproduces_the_adapter(agent_data_dir, reference_run, tmp_path):
    output = tmp_path / "out"
    args = train_args(agent_data_dir, output, *RESUME_FLAGS)
    proc = start_comapoi(*args)
    wait_for_checkpoint(output, 3, proc)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    run_dir = only_run_dir(output)
    run = json.loads((run_dir / "run.json").read_text())
    stopped = run["progress"]["global_step"]
    assert run["status"] == "interrupted" and 3 <= stopped < 12, text
    assert (run_dir / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
    assert f"Stopped at step {stopped} of 12" in text and "--resume" in text and "Traceback" not in text
    assert not (run_dir / "adapter_model.safetensors").exists()

    resumed = run_comapoi(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_adapter(reference_run, run_dir)
    # the Ctrl-C checkpoint is dropped once the run finishes: the layout is the original's again
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-3", "checkpoint-6", "checkpoint-9"]
    assert [s["status"] for s in json.loads((run_dir / "run.json").read_text())["segments"]] == ["interrupted", "finished"]


# -- quantisation and refusals ------------------------------------------------------------------------------
def test_4bit_trains_on_the_cpu_or_is_refused_with_a_reason(agent_data_dir, tmp_path):
    result = run_comapoi(*train_args(agent_data_dir, tmp_path / "out", "--quant", "4bit", "--max_steps", "2", "--save_freq", "2"))
    if result.returncode != 0:
        assert result.returncode == 2 and "--quant 4bit is not possible:" in result.stderr, result.stderr
        return
    run_dir = only_run_dir(tmp_path / "out")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["device"]["quant"] == "4bit" and run["status"] == "finished"
    assert (run_dir / "adapter_model.safetensors").is_file()


def test_options_the_cpu_cannot_honour_are_refused(agent_data_dir, tmp_path):
    import torch

    from comapoi_cli.training.devices import _cpu_supports

    if torch.cuda.is_available() or _cpu_supports("fp16"):
        pytest.skip("this machine can honour --fp16")
    result = run_comapoi(*train_args(agent_data_dir, tmp_path / "out", "--fp16", "--max_steps", "2"))
    assert result.returncode == 2
    assert "--fp16 needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_no_token_carrying_loss_stops_before_step_1(agent_data_dir, tmp_path):
    result = run_comapoi(*train_args(agent_data_dir, tmp_path / "out", "--max_steps", "2"), "--seq-length", "32")
    assert result.returncode == 1
    assert "No token carries loss" in result.stderr and "--seq-length" in result.stderr
    assert "step 1/" not in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("**/checkpoint-*"))


def test_missing_data_is_one_sentence(tmp_path):
    (tmp_path / "data" / "nyc").mkdir(parents=True)
    result = run_comapoi(*train_args(tmp_path / "data", tmp_path / "out", "--max_steps", "2"))
    assert result.returncode == 1
    assert "Error: Cannot find any agent training file" in result.stderr and "Traceback" not in result.stderr
    assert "comapoi data synth" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing left behind by a run that could not start
