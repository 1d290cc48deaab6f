"""``comapoi train`` options: the original's flags and spellings, config files, the resolved job.

Everything here runs without torch (``--dry-run`` and the option services), in well under a second each.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from comapoi_cli.errors import UsageError
from comapoi_cli.plugins import get_registry
from comapoi_cli.training.job import DEFAULT_TARGET_MODULES, TrainingJob
from comapoi_cli.training.options import build_job, data_problems, load_config_file, locate_model
from tests.support import SHARED, run_comapoi

SEED_DOC = SHARED / "seed" / "sft_module.md"


def _seed_examples() -> list[str]:
    """Every ``python finetune_sft_new.py ...`` line of the seed's usage examples."""
    lines = [line.strip() for line in SEED_DOC.read_text(encoding="utf-8").splitlines()]
    return [line.split("finetune_sft_new.py", 1)[1].strip() for line in lines if line.startswith("python finetune_sft_new.py")]


def dry_run(*args: str, env: dict[str, str] | None = None) -> dict:
    result = run_comapoi("train", *args, "--dry-run", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_seed_doc_has_the_usage_examples():
    assert len(_seed_examples()) == 7


@pytest.mark.parametrize("example", _seed_examples())
def test_seed_usage_examples_parse_as_written(example, tmp_path):
    out = dry_run(*shlex.split(example))
    job = out["job"]
    args = shlex.split(example)
    assert job["dataset"] == "nyc" and job["model"] == "llama3.1-8b-instruct"
    assert job["type"] == args[args.index("--type") + 1]
    assert job["batch_size"] == 16 and job["max_steps"] == 200
    assert job["bf16"] == (True if "--bf16" in args else None)  # None: auto (bf16 on a GPU that has it)
    assert job["backend"] == ("unsloth" if "--unsloth" in args else "trl")
    if "--learning_rate" in args:
        assert job["learning_rate"] == 5e-5 and out["run_dir"].endswith("-lr5e-05")
    else:
        assert job["learning_rate"] == 1e-4 and out["run_dir"].endswith("-lr0.0001")
    assert out["run_dir"] == f"output/llama3.1-8b-instruct/sft-nyc/bs16-gas1-ms200-{job['type']}-lr{job['learning_rate']}"
    # no such model here: reported, not fatal, for a dry run
    assert any("llama3.1-8b-instruct" in p and "not found" in p for p in out["problems"])


def test_dry_run_imports_no_torch():
    code = ("import sys\nfrom comapoi_cli.cli.app import main\n"
            "try:\n    main(['train', '--dataset', 'nyc', '--type', 'agent3', '--dry-run'])\n"
            "except SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_original_and_kebab_spellings_are_the_same_option():
    original = ["--model_path", "/m", "--data_path", "x.jsonl", "--seq_length", "1024", "--max_steps", "50",
                "--num_samples", "10", "--batch_size", "8", "--gradient_accumulation_steps", "2", "--learning_rate",
                "2e-4", "--fp16", "--gradient_checkpointing", "--output_dir", "out", "--save_freq", "10"]
    kebab = [a.replace("_", "-") if a.startswith("--") else a for a in original]
    a, b = dry_run(*original)["job"], dry_run(*kebab)["job"]
    assert a == b
    assert a["seq_length"] == 1024 and a["gradient_accumulation_steps"] == 2 and a["fp16"] is True
    assert a["gradient_checkpointing"] is True and a["model_path"] == "/m" and a["num_samples"] == 10


def test_defaults_are_the_originals():
    job, location = build_job({}, registry=get_registry(), env={})
    assert (job.seq_length, job.max_steps, job.batch_size, job.gradient_accumulation_steps, job.save_freq) == (2048, 200, 4, 1, 40)
    assert (job.lora_r, job.lora_alpha, job.lora_dropout) == (8, 16, 0.1)
    assert job.target_modules == DEFAULT_TARGET_MODULES and len(job.target_modules) == 7
    assert (job.type, job.dataset, job.quant, job.loss, job.backend) == ("merged", "nyc", "auto", "assistant", "trl")
    assert (job.weight_decay, job.max_grad_norm, job.lr_scheduler, job.neftune_alpha) == (0.01, 1.0, "cosine", 5.0)
    assert location.kind == "tiny" and job.run_tag == "tiny"
    assert job.learning_rate == 5e-3  # tiny's own default; any other model keeps the original's 1e-4
    other, _ = build_job({"model": "org/name"}, registry=get_registry(), env={})
    assert other.learning_rate == 1e-4 and other.run_tag == "name"
    assert job.effective_warmup_steps == 50 and TrainingJob(max_steps=20).effective_warmup_steps == 5


def test_lora_flags_and_extras():
    job = dry_run("--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0.05", "--target-modules", "q_proj, v_proj",
                  "--loss", "all", "--packing", "--seed", "7", "--eval-size", "20", "--quant", "8bit",
                  "--report-to", "tensorboard", "--test-size", "0.1")["job"]
    assert (job["lora_r"], job["lora_alpha"], job["lora_dropout"]) == (16, 32, 0.05)
    assert job["target_modules"] == ["q_proj", "v_proj"]
    assert (job["loss"], job["packing"], job["seed"], job["eval_size"], job["quant"]) == ("all", True, 7, 20, "8bit")
    assert job["report_to"] == "tensorboard" and job["test_size"] == 0.1


def test_type_and_backend_choices_come_from_the_registry():
    registry = get_registry()
    result = run_comapoi("train", "--help")
    assert result.returncode == 0
    for name in [*registry.training_types(), *registry.backends]:
        assert name in result.stdout
    bad = run_comapoi("train", "--type", "agent9", "--dry-run")
    assert bad.returncode == 2 and "agent9" in bad.stderr


def test_unsloth_flag_means_backend_unsloth():
    registry = get_registry()
    if "unsloth" not in registry.backends:
        pytest.skip("the Unsloth plugin is not installed")
    job, _ = build_job({"unsloth": True}, registry=registry, env={})
    assert job.backend == "unsloth"
    with pytest.raises(UsageError, match="--unsloth means --backend unsloth"):
        build_job({"unsloth": True, "backend": "trl"}, registry=registry, env={})


@pytest.mark.parametrize("suffix", ["yaml", "toml"])
def test_config_file_and_flag_precedence(tmp_path, suffix):
    if suffix == "yaml":
        text = "train:\n  batch-size: 8\n  max_steps: 30\n  learning_rate: 2.0e-4\n  target-modules: [q_proj, k_proj]\n  bf16: true\n"
    else:
        text = "[train]\nbatch-size = 8\nmax_steps = 30\nlearning_rate = 2.0e-4\ntarget-modules = ['q_proj', 'k_proj']\nbf16 = true\n"
    config = tmp_path / f"job.{suffix}"
    config.write_text(text)
    job = dry_run("--config", str(config), "--max-steps", "60")["job"]
    assert job["batch_size"] == 8 and job["learning_rate"] == 2e-4 and job["bf16"] is True
    assert job["max_steps"] == 60  # the flag wins over the file
    assert job["target_modules"] == ["q_proj", "k_proj"]
    assert job["config_file"] == str(config)


def test_config_file_errors_are_one_sentence(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("batch_sise: 8\n")
    with pytest.raises(UsageError, match="unknown option 'batch_sise' \\(did you mean batch_size\\?\\)"):
        load_config_file(bad_key)
    bad_value = tmp_path / "b.toml"
    bad_value.write_text("max_steps = 'many'\n")
    with pytest.raises(UsageError, match="max_steps"):
        load_config_file(bad_value)
    broken = tmp_path / "c.yaml"
    broken.write_text("a: [1, 2\n")
    result = run_comapoi("train", "--config", str(broken), "--dry-run")
    assert result.returncode == 2 and "could not be read" in result.stderr and "Traceback" not in result.stderr
    ini = tmp_path / "d.ini"
    ini.write_text("x = 1\n")
    with pytest.raises(UsageError, match="must end in"):
        load_config_file(ini)


@pytest.mark.parametrize("args, fragment", [
    (["--fp16", "--bf16"], "exclude each other"),
    (["--resume", "--overwrite"], "exclude each other"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--test-size", "1.5"], "--test-size"),
    (["--lora-dropout", "1"], "--lora-dropout"),
])
def test_bad_values_are_usage_errors(args, fragment):
    result = run_comapoi("train", *args, "--dry-run")
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_run_dir_layout_is_the_originals():
    job, _ = build_job({"output_dir": "res", "run_tag": "exp 1", "dataset": "tky", "type": "agent2", "batch_size": 16,
                        "gradient_accumulation_steps": 2, "max_steps": 300, "learning_rate": 5e-5, "model": "m/x"}, registry=get_registry(), env={})
    assert str(job.run_dir) == "res/exp-1/sft-tky/bs16-gas2-ms300-agent2-lr5e-05"
    job, _ = build_job({"data_path": "/d/my_agent3.jsonl"}, registry=get_registry(), env={})
    assert job.dataset is None and job.run_dir.parent.name == "sft-my_agent3"


def test_environment_defaults(tmp_path):
    (tmp_path / "models" / "qwen-x").mkdir(parents=True)
    (tmp_path / "models" / "qwen-x" / "config.json").write_text("{}")
    env = {"COMAPOI_DATA_DIR": str(tmp_path / "d"), "COMAPOI_OUTPUT_DIR": str(tmp_path / "o"),
           "COMAPOI_MODEL_PATH": str(tmp_path / "models")}
    job, location = build_job({"model": "qwen-x"}, registry=get_registry(), env=env)
    assert job.data_dir == env["COMAPOI_DATA_DIR"] and job.output_dir == env["COMAPOI_OUTPUT_DIR"]
    assert location.kind == "local" and job.base_model == str((tmp_path / "models" / "qwen-x").resolve())


def test_locate_model(tmp_path):
    folder = tmp_path / "LLM" / "qwen2.5-7b-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert locate_model("qwen2.5-7b-instruct", str(tmp_path / "LLM"), env={}).ref == str(folder.resolve())
    assert locate_model(str(folder), None, env={}).kind == "local"
    assert locate_model("tiny", None, env={}).kind == "tiny"
    missing = locate_model("llama3.1-8b-instruct", str(tmp_path / "LLM"), env={})
    assert missing.kind == "missing" and missing.problem == f"Model folder {tmp_path / 'LLM' / 'llama3.1-8b-instruct'} does not exist."
    no_config = tmp_path / "empty"
    no_config.mkdir()
    assert "no config.json" in locate_model(str(no_config), None, env={}).problem
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert "LoRA adapter, not a base model" in locate_model(str(adapter), None, env={}).problem
    hub_env = {"HF_HOME": str(tmp_path / "hf")}  # an empty cache: a hub id is refused at once, never downloaded
    uncached = locate_model("Qwen/Qwen2.5-7B-Instruct", None, env=hub_env)
    assert uncached.kind == "missing" and "not in the local Hugging Face cache" in uncached.problem
    assert "does not download" in uncached.problem
    snapshot = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-7B-Instruct" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    cached = locate_model("Qwen/Qwen2.5-7B-Instruct", None, env=hub_env)
    assert cached.kind == "hub" and cached.ref == str(snapshot)  # trained from the local snapshot folder


def test_data_problems(tmp_path):
    registry = get_registry()
    job, _ = build_job({"data_dir": str(tmp_path), "dataset": "nyc", "type": "agent3"}, registry=get_registry(), env={})
    assert data_problems(job, registry) == [f"Data folder {tmp_path / 'nyc'} does not exist (--data-dir {tmp_path}, --dataset nyc)."]
    (tmp_path / "nyc").mkdir()
    assert "agent3_train_samples.jsonl" in data_problems(job, registry)[0]
    (tmp_path / "nyc" / "agent3_train_samples.jsonl").write_text("")
    assert data_problems(job, registry) == []


def test_missing_model_is_one_sentence_and_fails_fast(tmp_path):
    result = run_comapoi("train", "--model", "no-such-model", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Error: Model 'no-such-model' was not found" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_uncached_hub_model_is_one_sentence_without_a_download(tmp_path):
    result = run_comapoi("train", "--model", "Qwen/Qwen2.5-7B-Instruct", "--output_dir", str(tmp_path / "out"),
                         env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": ""})
    assert result.returncode == 1
    assert "is not in the local Hugging Face cache" in result.stderr and "Retrying" not in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
