"""The Unsloth backend plugin (plugins/comapoi-unsloth) and the Unsloth dependency set.

Always (the default set, no Unsloth, no GPU): ``comapoi env``, ``plugins list`` and
``train --backend unsloth`` / ``--unsloth`` say exactly why the backend is unusable and what to
install; the documented install line never replaces torch (pip's own resolver, ``--dry-run``);
each unusable reason; a multi-process launch is refused.

With ``.venv-unsloth`` (``bash scripts/bootstrap_unsloth.sh``: transformers 5.17.0, trl 1.15.0,
datasets 4.8.5 and Unsloth 2026.10.9 itself, on the CPU through Unsloth's CPU fallback; the
README's test command creates it in CI when the disk has room): the backend trains through the
real CLI and its adapter reloads with plain PEFT in the default set; the TRL backend trains on
that dependency set too; and a subset of the core's tests (``UNSLOTH_SET_SUBSET``) runs there. Without the
venv these are skipped, saying how to create it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.support import REPO, run_comapoi

UNSLOTH_VENV = Path(os.environ.get("COMAPOI_UNSLOTH_VENV") or REPO / ".venv-unsloth")
UNSLOTH_PYTHON = UNSLOTH_VENV / "bin" / "python"
#: Flags for a tiny CPU run of a few seconds on the short test records (conftest's agent_data_dir).
FAST = ("--model", "tiny", "--seq-length", "1024", "--batch-size", "2", "--learning-rate", "3e-3",
        "--warmup-steps", "0", "--neftune-alpha", "0", "--test-size", "4", "--save_freq", "100")


def torch_version() -> str:
    return metadata.version("torch").split("+")[0]


def install_line() -> str:
    """The documented line, with absolute paths (it works from any folder)."""
    return (f'pip install -c {REPO / "constraints" / "unsloth.txt"} "{REPO / "plugins" / "comapoi-unsloth"}[unsloth]" '
            f'"torch=={torch_version()}"')


def _unsloth_venv_problem() -> str | None:
    if not UNSLOTH_PYTHON.is_file():
        return f"{UNSLOTH_VENV} does not exist (create it with: bash scripts/bootstrap_unsloth.sh)"
    probe = subprocess.run([str(UNSLOTH_PYTHON), "-c", "import importlib.util as u, sys; sys.exit(0 if u.find_spec('unsloth') else 3)"],
                           capture_output=True)
    if probe.returncode != 0:
        return f"{UNSLOTH_VENV} has no Unsloth (re-run: bash scripts/bootstrap_unsloth.sh)"
    return None


needs_unsloth_venv = pytest.mark.skipif(_unsloth_venv_problem() is not None, reason=str(_unsloth_venv_problem()))


def run_in(python: Path | str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=timeout)


def unsloth_entry(data: dict) -> dict:
    return next(b for b in data["backends"] if b["name"] == "unsloth")


# -- the default set: unusable, and says why ------------------------------------------------------------
def test_plugins_list_and_env_say_why_and_what_to_install():
    if os.environ.get("COMAPOI_PLUGINS") is not None:
        pytest.skip("COMAPOI_PLUGINS restricts the plugins")
    for command in (("plugins", "list", "--json"), ("env", "--json")):
        result = run_comapoi(*command)
        assert result.returncode == 0, result.stderr
        entry = unsloth_entry(json.loads(result.stdout))
        assert entry["usable"] is False
        assert entry["reason"] == "Unsloth is not installed"
        # the exact line to run, with this environment's torch pinned so pip never replaces it; on a
        # machine without an NVIDIA GPU, first that Unsloth needs one
        assert entry["install_hint"].endswith(install_line())
        if not any(Path("/dev").glob("nvidia[0-9]*")):
            assert entry["install_hint"].startswith("Unsloth needs an NVIDIA GPU")
        assert entry["multi_process"] is False


@pytest.mark.parametrize("flag", [("--backend", "unsloth"), ("--unsloth",)])
def test_train_with_unsloth_refuses_with_reason_and_install_line(flag, agent_data_dir, tmp_path):
    result = run_comapoi("train", *flag, "--dataset", "nyc", "--data-dir", str(agent_data_dir), *FAST,
                         "--max_steps", "1", "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    text = " ".join((result.stdout + result.stderr).split())
    assert "Backend unsloth is not usable here: Unsloth is not installed." in text
    assert install_line() in text
    assert "Traceback" not in text
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.fixture
def backend(monkeypatch):
    """A fresh UnslothBackend whose view of the installed packages the test controls."""
    import comapoi_unsloth

    versions = {"unsloth": "2026.10.9", "transformers": "5.17.0", "trl": "1.15.0", "datasets": "4.8.5",
                "torch": "2.13.0+cpu", "torchvision": None}
    monkeypatch.setattr(comapoi_unsloth, "missing_packages", lambda *names: [])
    monkeypatch.setattr(comapoi_unsloth, "installed_version", lambda name: versions.get(name))
    monkeypatch.setattr(comapoi_unsloth, "_cpu_fallback_available", lambda: True)
    monkeypatch.delenv("UNSLOTH_DISABLE_CPU_FALLBACK", raising=False)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    instance = comapoi_unsloth.UnslothBackend()
    instance.versions = versions
    return instance


def test_reason_incompatible_versions(backend):
    backend.versions.update(transformers="5.24.0", trl="1.16.0")
    assert backend.unusable_reason() == ("incompatible versions: transformers 5.24.0 (needs 5.17.0), "
                                         "trl 1.16.0 (needs 1.15.0)")


def test_reason_cuda_torchvision_next_to_cpu_torch(backend):
    backend.versions["torchvision"] = "0.28.0"
    reason = backend.unusable_reason()
    assert reason.startswith("torchvision 0.28.0 is a CUDA build and this torch is a CPU build")
    assert "pip uninstall torchvision" in reason
    backend.versions["torchvision"] = "0.28.0+cpu"
    assert backend.unusable_reason() is None


def test_reason_no_gpu(backend, monkeypatch):
    import comapoi_unsloth

    # Unsloth's CPU fallback: usable, and env / plugins list say it is the slow fallback
    assert backend.unusable_reason() is None
    assert "CPU fallback" in backend.describe()["note"]
    monkeypatch.setenv("UNSLOTH_DISABLE_CPU_FALLBACK", "1")
    assert "UNSLOTH_DISABLE_CPU_FALLBACK" in backend.unusable_reason()
    monkeypatch.delenv("UNSLOTH_DISABLE_CPU_FALLBACK")
    monkeypatch.setattr(comapoi_unsloth, "_cpu_fallback_available", lambda: False)
    assert backend.unusable_reason() == "no CUDA GPU is visible (Unsloth trains on one CUDA GPU)"


def test_multi_process_launch_is_refused(monkeypatch):
    from comapoi_unsloth.training import train_with_unsloth

    from comapoi_cli.errors import ComapoiError
    from comapoi_cli.training.job import TrainingJob

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ComapoiError) as caught:
        train_with_unsloth(TrainingJob(backend="unsloth"))
    assert "one GPU in one process" in caught.value.message and "2 processes" in caught.value.message
    assert "--backend trl" in caught.value.hint


def test_install_line_never_replaces_torch(tmp_path):
    """pip resolves the documented line (without installing) and keeps the installed torch.

    Without the torch pin the same resolution picks the newest torchvision, which needs a newer
    torch: pip would replace the CPU torch by gigabytes of CUDA packages.
    """
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
         "--report", str(report), "-c", "constraints/unsloth.txt", "./plugins/comapoi-unsloth[unsloth]",
         f"torch=={torch_version()}"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    if result.returncode != 0 and any(word in result.stderr for word in ("NewConnectionError", "Network is unreachable",
                                                                         "Temporary failure in name resolution")):
        pytest.skip("the package index cannot be reached: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert planned.get("unsloth") == "2026.10.9" and planned.get("trl") in (None, "1.15.0")
    assert "torch" not in planned, f"pip would replace torch with {planned.get('torch')}"


# -- the Unsloth set (.venv-unsloth): Unsloth really installed ----------------------------------------------
@needs_unsloth_venv
def test_unsloth_venv_has_the_unsloth_set_and_the_backend_is_usable():
    result = run_in(UNSLOTH_PYTHON, "-m", "comapoi_cli", "env", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    packages = data["packages"]
    assert (packages["transformers"], packages["trl"], packages["datasets"], packages["unsloth"]) == \
        ("5.17.0", "1.15.0", "4.8.5", "2026.10.9")
    assert packages["torch"].split("+")[0] == torch_version()  # installing Unsloth kept the project's torch
    entry = unsloth_entry(data)
    assert entry["usable"] is True and entry["reason"] is None
    if not data["gpus"]:
        assert "CPU fallback" in entry["note"]


def _train(python: Path, data_dir: Path, output: Path, *flags: str) -> dict:
    result = run_in(python, "-m", "comapoi_cli", "train", "--dataset", "nyc", "--data-dir", str(data_dir), *FAST,
                    "--max_steps", "6", "--output_dir", str(output), *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = list(output.glob("*/sft-nyc/*/run.json"))
    assert len(runs) == 1, runs
    return json.loads(runs[0].read_text()) | {"_run_dir": str(runs[0].parent)}


@needs_unsloth_venv
def test_unsloth_backend_trains_through_the_cli_and_the_adapter_loads_with_plain_peft(copy_data_dir, tmp_path):
    run = _train(UNSLOTH_PYTHON, copy_data_dir, tmp_path / "out", "--unsloth", "--memory-budget", "4")
    run_dir = Path(run["_run_dir"])
    assert run["fit"]["source"] == "fit" and run["fit"]["profile"] == "unsloth"  # --fit with Unsloth's memory profile
    # the TRL path's layout and run.json, with the backend recorded
    assert run_dir.name == "bs2-gas1-ms6-merged-lr0.003"
    assert run["backend"]["name"] == "unsloth" and run["versions"]["unsloth"] == "2026.10.9"
    assert run["status"] == "finished" and run["progress"]["global_step"] == 6
    losses = [entry["loss"] for entry in run["loss_history"]]
    assert losses[-1] < losses[0]
    assert (run_dir / "adapter_config.json").is_file() and (run_dir / "adapter_model.safetensors").is_file()
    # plain PEFT in the default set (another transformers and trl) loads it and generates
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from peft import PeftModel\n"
        "run = sys.argv[1]\n"
        "base = json.load(open(run + '/adapter_config.json'))['base_model_name_or_path']\n"
        "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run)\n"
        "tok = AutoTokenizer.from_pretrained(run)\n"
        "lora_b = sum(float(v.abs().sum()) for k, v in model.state_dict().items() if 'lora_B' in k)\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'user_id: 1'}], add_generation_prompt=True,"
        " return_tensors='pt', return_dict=True)\n"
        "out = model.generate(**ids, max_new_tokens=4, do_sample=False)\n"
        "print(json.dumps({'lora_b': lora_b, 'new_tokens': out.shape[1] - ids['input_ids'].shape[1]}))\n"
    )
    loaded = run_in(sys.executable, "-c", script, str(run_dir))
    assert loaded.returncode == 0, loaded.stderr
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert facts["lora_b"] > 0 and facts["new_tokens"] >= 1  # trained (LoRA B starts at zero) and generates


@needs_unsloth_venv
def test_trl_backend_trains_on_the_unsloth_set(copy_data_dir, tmp_path):
    """TRL 1.15 on the CPU: needs comapoi_cli.training.trl_compat (its fused LM head is Triton-only)."""
    run = _train(UNSLOTH_PYTHON, copy_data_dir, tmp_path / "out", "--backend", "trl")
    assert run["backend"]["name"] == "trl" and run["versions"]["trl"] == "1.15.0"
    losses = [entry["loss"] for entry in run["loss_history"]]
    assert run["status"] == "finished" and losses[-1] < losses[0]


#: Tests of the core that run again under the Unsloth set (transformers 5.17, trl 1.15, datasets 4.8.5):
#: the TRL 1.15 work-around, tokenisation and masks, and train -> eval -> eval score through the CLI.
UNSLOTH_SET_SUBSET = ("tests/test_trl_compat.py", "tests/test_data_tokens.py", "tests/test_eval_e2e.py")


@needs_unsloth_venv
def test_core_subset_passes_on_the_unsloth_set():
    files = [f for f in UNSLOTH_SET_SUBSET if (REPO / f).is_file()]
    result = run_in(UNSLOTH_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout.strip().splitlines()[-1]
