"""comapoi_cli.models: resolving, loading (one base, several adapters), generating, remote code, no downloads.

Real models only: the session's trained tiny run (its checkpoint-4 and its final adapter are two
different adapters of one base) and copies of the tiny model folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.models import looks_like_hub_id, resolve_base_model
from comapoi_cli.models.generation import generate, record_messages, render_prompts
from comapoi_cli.models.loading import load_model, plan_device
from comapoi_cli.reporting import Reporter
from comapoi_cli.runs.info import locate_run
from tests.support import REPO, plant_remote_code, run_comapoi

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


def one_sentence_error(result) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Unexpected" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result.stderr
    return lines[0]


class Recorder(Reporter):
    def __init__(self):
        self.events: list[tuple] = []

    def info(self, text):
        self.events.append(("info", text))

    def warn(self, text):
        self.events.append(("warn", text))

    def progress_start(self, total, done=0, *, description="", unit=""):
        self.events.append(("start", total, description, unit))

    def progress_update(self, done, **fields):
        self.events.append(("update", done))

    def progress_stop(self):
        self.events.append(("stop",))


# -- resolution ----------------------------------------------------------------------------------------

def test_hub_id_shape():
    assert looks_like_hub_id("Qwen/Qwen2.5-7B-Instruct")
    for name in ("tiny", "./a/b", "/abs/path", "a/b/c", "a/", "~/x", "a b/c"):
        assert not looks_like_hub_id(name), name


def test_a_random_folder_is_not_a_model_folder(trained_run, tmp_path):
    run = locate_run(trained_run.run_dir)
    folder = tmp_path / "random"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="is not a model folder"):
        resolve_base_model(str(folder), run)
    with pytest.raises(DataError, match="holds a LoRA adapter, not a base model"):
        resolve_base_model(str(trained_run.run_dir), run)
    result = run_comapoi("eval", "--adapter", str(trained_run.run_dir), "--model", str(folder), "--output-dir",
                         str(tmp_path / "out"))
    assert "is not a model folder" in one_sentence_error(result)


def test_an_uncached_hub_id_fails_at_once_with_one_sentence(trained_run, tmp_path):
    """No network here: the id is looked up in the (empty) local cache only, never downloaded."""
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    env_no_offline = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run([sys.executable, "-m", "comapoi_cli", "eval", "--adapter", str(trained_run.run_dir),
                             "--model", "someone/not-a-cached-model", "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, env={**env_no_offline, **env, "NO_COLOR": "1",
                                                                 "COLUMNS": "200"}, timeout=120)
    line = one_sentence_error(result)
    assert "The model someone/not-a-cached-model is not in the local Hugging Face cache" in line
    assert "does not download models" in line
    assert result.stderr.count("not in the local Hugging Face cache") == 1  # one sentence, no retries


def test_a_cached_hub_id_resolves_and_loads_offline(trained_run, tiny_model_dir, tmp_path, monkeypatch):
    """A model in the hub cache layout (models--owner--name/snapshots/<commit>) is found without network."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (hub / "models--someone--tiny" / "refs").mkdir()
    (hub / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    run = locate_run(trained_run.run_dir)
    assert resolve_base_model("someone/tiny", run) == "someone/tiny"
    with pytest.raises(DataError, match="not in the local Hugging Face cache"):
        resolve_base_model("someone/other", run)
    probe = ("from comapoi_cli.models.loading import load_model; "
             "m = load_model('someone/tiny', device='cpu'); print(m.model.config.model_type, m.adapter_names)")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**env, "HF_HUB_CACHE": str(hub)})
    assert loaded.returncode == 0 and loaded.stdout.split() == ["qwen2", "[]"], loaded.stderr


def test_plan_device_on_this_cpu():
    assert plan_device("cpu", "auto", "4bit") == ("cpu", "none")
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        plan_device("cpu", "4bit")
    with pytest.raises(UsageError, match="--quant must be"):
        plan_device("cpu", "3bit")


def test_record_messages_reads_both_formats():
    assert record_messages({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 1}]}) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}]
    assert record_messages({"messages": [{"role": "robot", "content": "x"}]}) is None
    assert record_messages([1]) is None


# -- one base, several adapters ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_adapters(trained_run):
    run = locate_run(trained_run.run_dir)
    base = resolve_base_model(None, run)
    loaded = load_model(base, adapters={"early": trained_run.run_dir / "checkpoint-4", "final": trained_run.run_dir},
                        device="cpu", quant="none")
    return base, loaded


def _logits(loaded, ids):
    import torch

    with torch.inference_mode():
        return loaded.model(input_ids=torch.tensor([ids])).logits[0]


def test_one_base_model_holds_every_adapter_and_switching_changes_outputs(two_adapters):
    import torch
    from transformers import AutoModelForCausalLM

    base, loaded = two_adapters
    assert loaded.adapter_names == ["early", "final"] and loaded.active_adapter == "early"
    ids = render_prompts(loaded.tokenizer, [[{"role": "user", "content": "User 7 visited POI 12. Next?"}]])[0]

    def base_weights():
        return {name: p.data_ptr() for name, p in loaded.model.named_parameters() if "lora_" not in name}

    before = base_weights()
    early = _logits(loaded, ids)
    loaded.use_adapter("final")
    final = _logits(loaded, ids)
    loaded.use_adapter(None)
    bare = _logits(loaded, ids)
    loaded.use_adapter("early")
    assert torch.equal(_logits(loaded, ids), early)  # switching back gives the same numbers
    assert not torch.allclose(early, final)  # the two adapters differ
    assert base_weights() == before  # the same base weights throughout: nothing was copied

    # one base model in memory: its parameters (without the LoRA ones) are the plain model's, once
    plain = AutoModelForCausalLM.from_pretrained(base)
    lora = {name for name, _ in loaded.model.named_parameters() if "lora_" in name}
    assert {n for n in lora if ".early." in n} and {n for n in lora if ".final." in n}
    assert sum(p.numel() for n, p in loaded.model.named_parameters() if n not in lora) == \
        sum(p.numel() for p in plain.parameters())
    with torch.inference_mode():
        plain_logits = plain(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(bare, plain_logits, atol=1e-5)  # use_adapter(None) is the bare base
    with pytest.raises(UsageError, match="No adapter named 'agent9'"):
        loaded.use_adapter("agent9")


def test_generate_is_batched_greedy_in_input_order_with_progress(two_adapters):
    _, loaded = two_adapters
    loaded.use_adapter("final")
    prompts = [[{"role": "user", "content": text}] for text in ("a", "a much longer prompt " * 5, "b c")]
    ids = render_prompts(loaded.tokenizer, prompts)
    reporter = Recorder()
    batched = generate(loaded, ids, batch_size=2, max_new_tokens=6, reporter=reporter)
    one_by_one = [generate(loaded, [x], batch_size=1, max_new_tokens=6)[0] for x in ids]
    assert batched == one_by_one and len(batched) == 3  # left padding does not change greedy answers
    assert reporter.events[0] == ("start", 3, "generating", "records")
    assert [e for e in reporter.events if e[0] == "update"] == [("update", 2), ("update", 3)]
    assert reporter.events[-1] == ("stop",)


# -- remote code ---------------------------------------------------------------------------------------

def test_planted_remote_code_is_never_run_by_eval_even_with_yes_on_stdin(trained_run, agent_data_dir, tmp_path):
    run = locate_run(trained_run.run_dir)
    model_dir = tmp_path / "model"
    shutil.copytree(resolve_base_model(None, run), model_dir)
    marker = tmp_path / "remote-code-ran"
    plant_remote_code(model_dir, marker)
    adapter = tmp_path / "run"  # the adapter without its own tokenizer: eval loads the planted one
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "run.json"):
        shutil.copy2(trained_run.run_dir / name, adapter / name)
    assert not any((adapter / n).exists() for n in TOKENIZER_FILES)
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, "-m", "comapoi_cli", "eval", "--adapter", str(adapter), "--model", str(model_dir),
               "--data", str(agent_data_dir / "nyc" / "agent3_train_samples.jsonl"), "--type", "agent3",
               "--num-samples", "2", "--max-new-tokens", "2", "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, input="y\n" * 50, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert not marker.exists(), "the planted tokenization/modeling code ran"
    assert "Traceback" not in result.stderr and "trust_remote_code" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr  # transformers' own Qwen2 classes load the folder

    # the planted code does run when trust is given: the test above could fail
    probe = ("import sys; from comapoi_cli.models.loading import load_tokenizer; "
             "load_tokenizer(sys.argv[1], trust_remote_code=True)")
    subprocess.run([sys.executable, "-c", probe, str(model_dir)], capture_output=True, text=True, env=env,
                   timeout=300, cwd=REPO)
    assert marker.exists()


def test_a_model_that_needs_its_code_is_one_sentence_without_trust(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evilmodel"  # no built-in class to fall back on
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text("raise SystemExit('ran')\n")
    with pytest.raises(DataError, match="wants to run its own Python code") as info:
        load_model(str(folder), device="cpu")
    assert "--trust-remote-code" in (info.value.hint or "")
