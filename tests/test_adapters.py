"""``comapoi adapters show / merge / export / list --role`` on real tiny runs, through the real CLI.

Covers the issue's "done when": the merged model loads with plain transformers and generates the
same greedy tokens as base + adapter (and its logits match); exporting three role adapters writes
the folders (safetensors only) and the vLLM command; ``show --json`` holds the loss history; a
QLoRA adapter is merged into 16-bit weights with a note; the errors are one sentence each.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from comapoi_cli.fileio import sha256_file
from tests.support import run_comapoi

pytestmark = pytest.mark.slow

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
#: Quick tiny runs: 2 steps at a constant learning rate large enough to move the adapter.
ROLE_FAST = ("--seq-length", "1536", "--batch-size", "2", "--test-size", "4", "--max_steps", "2", "--save_freq", "2",
             "--learning_rate", "0.005", "--warmup-steps", "0")


#: Pin the math libraries to one thread (deterministic kernels and summation order).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def one_sentence_error(result) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def train_role(data_dir: Path, output: Path, type_: str, model: str, *extra: str):
    return run_comapoi("train", "--dataset", "nyc", "--data-dir", str(data_dir), "--type", type_, "--model", model,
                       *ROLE_FAST, "--output_dir", str(output), *extra)


def run_dir_of(output: Path, type_: str) -> Path:
    found = sorted(p.parent for p in output.glob(f"*/sft-nyc/*-{type_}-*/run.json"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def role_runs(agent_data_dir, tiny_model_dir, tmp_path_factory) -> dict:
    """agent1, agent2, agent3 (QLoRA when this machine can) on one base (the session's tiny model folder), and
    ``other``: an agent1 run on another base (the tiny model built from agent1's own data)."""
    root = tmp_path_factory.mktemp("role-runs")
    shared, other = root / "shared", root / "other"
    runs: dict = {"qlora": True, "root": shared}
    for type_ in ("agent1", "agent2"):
        result = train_role(agent_data_dir, shared, type_, str(tiny_model_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        runs[type_] = run_dir_of(shared, type_)
    result = train_role(agent_data_dir, shared, "agent3", str(tiny_model_dir), "--quant", "4bit")
    if result.returncode != 0:  # bitsandbytes cannot run 4-bit here: a plain LoRA run then
        assert result.returncode == 2 and "--quant 4bit is not possible:" in result.stderr, result.stderr
        runs["qlora"] = False
        result = train_role(agent_data_dir, shared, "agent3", str(tiny_model_dir))
        assert result.returncode == 0, result.stdout + result.stderr
    runs["agent3"] = run_dir_of(shared, "agent3")
    result = train_role(agent_data_dir, other, "agent1", "tiny")
    assert result.returncode == 0, result.stdout + result.stderr
    runs["other"] = run_dir_of(other, "agent1")
    return runs


# -- show ------------------------------------------------------------------------------------------------

def test_show_json_holds_run_json_adapter_config_and_the_loss_history(trained_run, tmp_path):
    result = run_comapoi("adapters", "show", str(trained_run.run_dir), "--json", "--plot", str(tmp_path / "loss.png"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    run = trained_run.run_json
    assert [(e["step"], e["loss"]) for e in info["loss_history"]] == [(e["step"], e["loss"]) for e in run["loss_history"]]
    assert [e["step"] for e in info["loss_history"]] == list(range(1, 9))
    assert info["base_model"]["path"] == run["base_model"]["path"] and info["base_model"]["exists"] is True
    assert info["job"]["type"] == "merged" and info["backend"]["name"] == "trl"
    assert info["data"]["train_sha256"] == run["data"]["train_sha256"]
    assert info["lora"]["r"] == 8 and info["lora"]["alpha"] == 16
    assert info["lora"]["target_modules"] == sorted(run["lora"]["target_modules"])
    assert info["lora"]["trainable_parameters"] == run["lora"]["trainable_parameters"] > 0
    assert info["adapter_config"]["r"] == 8 and info["adapter_config"]["peft_type"] == "LORA"
    assert [(c["name"], c["step"], c["adapter"]) for c in info["checkpoints"]] == [
        ("checkpoint-4", 4, True), ("checkpoint-8", 8, True)]
    assert info["checkpoints"][1]["loss"] == run["loss_history"][-1]["loss"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the trainable-parameter count read from the safetensors header agrees with training's count
    from comapoi_cli.adapters import safetensors_parameters

    assert safetensors_parameters(trained_run.run_dir / "adapter_model.safetensors") == run["lora"]["trainable_parameters"]


def test_show_renders_the_settings_and_a_terminal_loss_chart(trained_run):
    result = run_comapoi("adapters", "show", str(trained_run.run_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("role (type)", "merged", "trainable parameters", "target modules", "q_proj",
                 trained_run.run_json["data"]["train_sha256"], "Training loss (8 logged steps)", "step 1", "step 8",
                 "checkpoint-4", "checkpoint-8"):
        assert text in out, text
    assert any(block in out for block in "▁▂▃▄▅▆▇█")


def test_show_of_a_checkpoint_has_its_own_loss_history(trained_run):
    result = run_comapoi("adapters", "show", str(trained_run.run_dir / "checkpoint-4"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert [e["step"] for e in info["loss_history"]] == [1, 2, 3, 4]
    assert info["checkpoint_of"] == str(trained_run.run_dir.resolve()) and "progress" not in info


def test_plot_without_matplotlib_is_one_sentence(trained_run, tmp_path):
    blocker = tmp_path / "site"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    result = run_comapoi("adapters", "show", str(trained_run.run_dir), "--plot", str(tmp_path / "loss.png"),
                         env={"PYTHONPATH": str(blocker)})
    line = one_sentence_error(result)
    assert "--plot needs matplotlib" in line and "comapoi[plot]" in line
    assert not (tmp_path / "loss.png").exists()


def test_loss_chart_and_vllm_rank_helpers():
    from comapoi_cli.adapters.export import vllm_rank
    from comapoi_cli.cli.adapters import _loss_chart

    lines = _loss_chart([(s, 10.0 - s * 0.01) for s in range(1, 201)], width=50, height=4)
    assert len(lines) == 6 and lines[0].startswith("9.9") and lines[3].startswith("8.0")
    bars = [line.split("┤", 1)[1] for line in lines[:4]]
    assert all(len(b) == 50 for b in bars) and bars[0][0] == "█" and bars[0][-1] == " " and bars[3][-1] != " "
    assert lines[-1].split() == ["step", "1", "step", "200"]
    assert [vllm_rank(r) for r in (1, 4, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]


# -- errors: not a run ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["show"], ["merge", "--output", "OUT"], ["export", "--to", "OUT"]],
                         ids=lambda c: c[0])
def test_a_folder_that_is_not_a_run_is_one_sentence(command, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run\n")
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    result = run_comapoi("adapters", args[0], str(tmp_path), *args[1:])
    line = one_sentence_error(result)
    assert f"{tmp_path} is not a training run" in line
    assert not (tmp_path / "out").exists()


# -- merge -----------------------------------------------------------------------------------------------

def holdout_prompts(run_json: dict, count: int = 3) -> list[list[dict]]:
    prompts = []
    with open(run_json["data"]["holdout_file"], encoding="utf-8") as handle:
        for line in handle:
            messages = json.loads(line)["messages"]
            prompts.append([m for m in messages if m["role"] != "assistant"])
            if len(prompts) == count:
                break
    return prompts


def test_merged_model_loads_with_transformers_and_matches_base_plus_adapter(trained_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "merged"
    result = run_comapoi("adapters", "merge", str(trained_run.run_dir), "--output", str(output))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Logit check on 3 inputs" in result.stdout and str(output) in result.stdout
    files = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "comapoi_merge.json"} <= files
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)], files
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
    info = json.loads((output / "comapoi_merge.json").read_text())
    assert info["dtype"] == "float32" and len(info["checks"]) == 3 and all(c["ok"] for c in info["checks"])

    run = trained_run.run_json
    merged = AutoModelForCausalLM.from_pretrained(str(output)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    reference_tokenizer = AutoTokenizer.from_pretrained(str(trained_run.run_dir))
    assert tokenizer.chat_template == reference_tokenizer.chat_template is not None
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["base_model"]["path"]),
                                             str(trained_run.run_dir)).eval()
    for messages in holdout_prompts(run):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v for k, v in ids.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            expected_logits = with_adapter(**ids).logits
            merged_logits = merged(**ids).logits
            with with_adapter.disable_adapter():
                base_logits = with_adapter(**ids).logits
        assert (merged_logits - expected_logits).abs().max().item() < 1e-3
        assert (base_logits - expected_logits).abs().max().item() > 1e-2  # the adapter matters on this input
        settings = dict(max_new_tokens=12, do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            expected = with_adapter.generate(**ids, **settings)
            got = merged.generate(**ids, **settings)
        assert got.tolist() == expected.tolist()


def test_merge_refuses_a_non_empty_output_and_replaces_it_with_overwrite(trained_run, tmp_path):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine\n")
    result = run_comapoi("adapters", "merge", str(trained_run.run_dir), "--output", str(output), "--check-inputs", "1")
    line = one_sentence_error(result)
    assert "already exists and is not empty" in line and result.returncode == 2
    assert (output / "keep.txt").read_text() == "mine\n"
    result = run_comapoi("adapters", "merge", str(trained_run.run_dir), "--output", str(output), "--check-inputs", "1",
                         "--overwrite", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(output)
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()


def test_merge_of_an_adapter_whose_base_model_is_gone_is_one_sentence(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run_dir)
    gone = str(tmp_path / "models" / "moved-away")
    record = json.loads((run_dir / "run.json").read_text())
    record["base_model"].update(path=gone, name=gone, kind="local")
    (run_dir / "run.json").write_text(json.dumps(record))
    config = json.loads((run_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = gone
    (run_dir / "adapter_config.json").write_text(json.dumps(config))
    result = run_comapoi("adapters", "merge", str(run_dir), "--output", str(tmp_path / "merged"))
    line = one_sentence_error(result)
    assert f"Base model {gone} does not exist" in line and "--model DIR" in result.stderr
    assert not (tmp_path / "merged").exists()
    shown = run_comapoi("adapters", "show", str(run_dir), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["base_model"]["exists"] is False
    assert "does not exist" in shown.stderr


def test_qlora_adapter_is_merged_into_16_bit_weights_with_a_note(role_runs, tmp_path):
    if not role_runs["qlora"]:
        pytest.skip("bitsandbytes cannot train 4-bit on this machine")
    output = tmp_path / "merged"
    # one thread: the same kernels and summation order on every machine, however loaded
    result = run_comapoi("adapters", "merge", str(role_runs["agent3"]), "--output", str(output), "--dtype", "bfloat16",
                         "--json", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    merged = json.loads(result.stdout)
    assert merged["trained_quant"] == "4bit" and merged["dtype"] == "bfloat16"
    assert any("trained on a 4bit quantised base" in n and "bfloat16 weights" in n for n in merged["notes"])
    assert all(c["ok"] for c in merged["checks"]), merged["checks"]
    # the tolerance is measured: at least NOISE_FACTOR x bfloat16's own error on that input
    from comapoi_cli.adapters.merge import NOISE_FACTOR

    assert all(c["dtype_error"] > 0 and c["tolerance"] >= NOISE_FACTOR * c["dtype_error"] for c in merged["checks"])
    config = json.loads((output / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "bfloat16"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(output))
    assert {str(p.dtype) for p in model.parameters()} == {"torch.bfloat16"}


def test_merge_check_tolerance_still_refuses_a_merge_that_lost_the_adapter(role_runs):
    """The measured bfloat16 tolerance passes the real merge and refuses the base without the adapter."""
    import torch

    from comapoi_cli.adapters.merge import _check_inputs, _dtype_errors, _logits, compare_logits
    from comapoi_cli.models.loading import load_model, tokenizer_folder
    from comapoi_cli.models.resolve import resolve_base_model
    from comapoi_cli.runs.info import locate_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = locate_run(role_runs["agent3"])
        base = resolve_base_model(None, run)
        loaded = load_model(base, adapters={"adapter": run.adapter_dir}, quant="none", device="cpu", dtype="bfloat16",
                            dequantize=True, tokenizer=tokenizer_folder(run, base))
        inputs = _check_inputs(loaded.tokenizer, run, 3)
        with_adapter = _logits(loaded.model, inputs)
        with loaded.model.disable_adapter():
            without = _logits(loaded.model, inputs)
        merged = loaded.model.merge_and_unload()
        after = _logits(merged, inputs)
        errors = _dtype_errors(merged, inputs, after, "bfloat16", [])
    finally:
        torch.set_num_threads(threads)
    assert all(c.ok for c in compare_logits(inputs, with_adapter, after, errors, "bfloat16"))
    lost = compare_logits(inputs, with_adapter, without, errors, "bfloat16")
    assert not all(c.ok for c in lost), [(c.max_abs_diff, c.tolerance) for c in lost]


# -- export ----------------------------------------------------------------------------------------------

def test_export_of_three_roles_writes_the_folders_and_the_vllm_command(role_runs, tiny_model_dir, tmp_path):
    to = tmp_path / "serve"
    sources = [role_runs[t] for t in ("agent1", "agent2", "agent3")]
    result = run_comapoi("adapters", "export", *map(str, sources), "--to", str(to))
    assert result.returncode == 0, result.stdout + result.stderr
    for name, source in zip(("agent1", "agent2", "agent3"), sources):
        folder = to / name
        assert (folder / "adapter_config.json").read_bytes() == (source / "adapter_config.json").read_bytes()
        assert sha256_file(folder / "adapter_model.safetensors") == sha256_file(source / "adapter_model.safetensors")
    everything = [p.name for p in to.rglob("*")]
    assert not [n for n in everything if n.endswith(PICKLE_SUFFIXES) or n.startswith(".")], everything
    assert sorted(p.name for p in to.iterdir()) == ["agent1", "agent2", "agent3", "comapoi_export.json"]

    command_line = next(line for line in result.stdout.splitlines() if line.startswith("vllm serve"))
    command = shlex.split(command_line)
    assert command[:3] == ["vllm", "serve", str(tiny_model_dir)] and "--enable-lora" in command
    assert command[command.index("--max-lora-rank") + 1] == "8" and command[command.index("--max-loras") + 1] == "3"
    modules = command[command.index("--lora-modules") + 1:]
    assert modules == [f"{n}={to / n}" for n in ("agent1", "agent2", "agent3")]
    manifest = json.loads((to / "comapoi_export.json").read_text())
    assert manifest["command"] == command and [a["role"] for a in manifest["adapters"]] == ["agent1", "agent2", "agent3"]
    if role_runs["qlora"]:
        assert "agent3 was trained on a 4bit base (QLoRA)" in result.stdout

    # an exported adapter is an ordinary PEFT adapter of that base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(to / "agent2"))
    assert model.peft_config["default"].r == 8

    again = run_comapoi("adapters", "export", str(sources[0]), "--to", str(to))
    assert "already exists" in one_sentence_error(again)
    renamed = run_comapoi("adapters", "export", str(sources[0]), str(sources[1]), "--to", str(to), "--names",
                          "profiler,forecaster", "--json")
    assert renamed.returncode == 0, renamed.stderr
    assert [a["name"] for a in json.loads(renamed.stdout)["adapters"]] == ["profiler", "forecaster"]
    assert (to / "profiler" / "adapter_model.safetensors").is_file() and (to / "agent1").is_dir()


def test_export_refuses_mixed_base_models_and_duplicate_names(role_runs, tmp_path):
    to = tmp_path / "serve"
    mixed = run_comapoi("adapters", "export", str(role_runs["agent2"]), str(role_runs["other"]), "--to", str(to))
    line = one_sentence_error(mixed)
    assert "trained on different base models" in line and "one base model only" in line
    assert not to.exists()
    twice = run_comapoi("adapters", "export", str(role_runs["agent1"]), str(role_runs["other"]), "--to", str(to),
                        "--names", "a,b,c")
    assert "--names lists 3 names for 2 adapters" in one_sentence_error(twice) and twice.returncode == 2
    same = run_comapoi("adapters", "export", str(role_runs["agent1"]), str(role_runs["agent1"]), "--to", str(to))
    assert "both be served as 'agent1'" in one_sentence_error(same)
    assert not to.exists()


# -- list --role -----------------------------------------------------------------------------------------

def test_list_filters_by_role_and_dataset(role_runs):
    root = str(role_runs["root"])
    by_role = run_comapoi("adapters", "list", root, "--role", "agent2", "--json")
    assert by_role.returncode == 0, by_role.stderr
    assert [r["path"] for r in json.loads(by_role.stdout)["runs"]] == [str(role_runs["agent2"])]
    by_type = run_comapoi("adapters", "list", root, "--type", "agent2", "--json")
    assert json.loads(by_type.stdout)["runs"] == json.loads(by_role.stdout)["runs"]
    every = json.loads(run_comapoi("adapters", "list", root, "--dataset", "nyc", "--json").stdout)["runs"]
    assert sorted(r["type"] for r in every) == ["agent1", "agent2", "agent3"]
    assert json.loads(run_comapoi("adapters", "list", root, "--dataset", "tky", "--json").stdout)["runs"] == []
