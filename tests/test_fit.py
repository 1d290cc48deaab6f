"""`--fit`: the memory model against measurements, the plan's choices, and `comapoi train` obeying the plan.

The memory model is checked three ways: against bytes saved for backward measured now on the CPU
in a real PEFT LoRA model of a shape the coefficients were not fitted on; against the H100 rows of
../shared/gpu/README.md (the Unsloth rows calibrate its profile, the HF rows cross-check the TRL
coefficients); and end to end: a CPU run under a budget that only fits a smaller micro-batch really
trains with that micro-batch and the same effective batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comapoi_cli.training.fit import (
    GIB,
    MEMORY_PROFILES,
    FitError,
    FitPlan,
    ModelShape,
    estimate_memory,
    plan_fit,
    quant_choices,
    speed_score,
)
from tests.conftest import TRAIN_FAST
from tests.support import run_comapoi

QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRL, UNSLOTH = MEMORY_PROFILES["trl"], MEMORY_PROFILES["unsloth"]


def seven_b(**overrides) -> dict:
    """estimate_memory's arguments for the shared README's H100 runs (batch 4 x 2048, LoRA r16, bf16)."""
    return {"precision": "bf16", "micro_batch": 4, "seq_length": 2048, "lora_r": 16, "target_modules": SEVEN,
            "lora_dropout": 0.0, "padded": False, **overrides}  # those runs used fixed-length random batches


def plan(profile=TRL, budget_gib=80.0, **overrides) -> FitPlan:
    args = {"budget_bytes": budget_gib * GIB, "budget_source": "test", "profile": profile, "precision": "bf16",
            "quants": ["none"], "batch_size": 4, "gradient_accumulation_steps": 1, "seq_length": 2048,
            "gradient_checkpointing": None, "lora_r": 8, "target_modules": SEVEN, "lora_dropout": 0.1, **overrides}
    return plan_fit(ModelShape.from_config(QWEN25_7B), **args)


# -- the memory model against measurements ---------------------------------------------------------------
def test_the_7b_shape_has_the_matmul_parameters_of_the_shared_readme():
    assert ModelShape.from_config(QWEN25_7B).matmul_params == pytest.approx(7.07e9, rel=1e-3)


@pytest.mark.parametrize("quant, checkpointing, measured_gib", [
    ("4bit", True, 8.3), ("none", True, 17.3), ("4bit", False, 36.1), ("none", False, 45.1)])
def test_unsloth_profile_reproduces_the_h100_rows_it_was_calibrated_on(quant, checkpointing, measured_gib):
    estimate = estimate_memory(ModelShape.from_config(QWEN25_7B), profile=UNSLOTH, quant=quant,
                               gradient_checkpointing=checkpointing, **seven_b())
    assert estimate.total / GIB == pytest.approx(measured_gib, rel=0.03)


@pytest.mark.parametrize("quant, measured_gib", [("none", 32.6), ("4bit", 29.5)])
def test_trl_coefficients_cross_check_against_the_h100_hf_rows(quant, measured_gib):
    # Those rows ran plain transformers + PEFT with checkpointing: the same saved tensors as the TRL path,
    # but the full logits of a plain HF loss (bf16 logits, their fp32 copy, fp32 log-softmax: 10 B per
    # token and vocabulary entry) instead of TRL's chunked LM head.
    shape = ModelShape.from_config(QWEN25_7B)
    estimate = estimate_memory(shape, profile=TRL, quant=quant, gradient_checkpointing=True, **seven_b())
    full_logits = 4 * 2048 * shape.vocab * 10
    assert (estimate.total - estimate.lm_head + full_logits) / GIB == pytest.approx(measured_gib, rel=0.15)


@pytest.mark.parametrize("precision, dropout, quant", [("bf16", 0.1, "none"), ("fp32", 0.0, "none"), ("bf16", 0.0, "4bit")])
def test_activation_coefficients_predict_a_shape_measured_now(precision, dropout, quant):
    # a shape the coefficients were not fitted on (bench/measure_activations.py SHAPES): 5 heads, 1 KV head
    pytest.importorskip("peft")
    from bench.measure_activations import bytes_per_token_layer
    from comapoi_cli.training.fit import QUANTISED_EXTRA_PER_INTERMEDIATE

    if quant == "4bit":
        from comapoi_cli.training.devices import bitsandbytes_problem

        if bitsandbytes_problem("cpu"):
            pytest.skip("bitsandbytes cannot quantise on this CPU")
    shape = ModelShape(hidden=320, intermediate=1728, layers=2, heads=5, kv_heads=1, head_dim=64, vocab=256)
    measured = bytes_per_token_layer(320, 1728, 5, 1, dropout, precision, quant)
    predicted = shape.activation_bytes_per_token_layer(precision, dropout > 0)
    if quant == "4bit":
        predicted += QUANTISED_EXTRA_PER_INTERMEDIATE * shape.intermediate
    assert predicted == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("precision, width", [("bf16", 2), ("fp32", 4)])
def test_a_padded_batch_adds_a_mask_of_the_compute_width_per_token_and_layer(precision, width):
    # what estimate_memory adds for padded batches: width x seq_length bytes per token and layer; its slope in T
    from bench.measure_activations import padding_mask_bytes

    slope = (padding_mask_bytes(precision, 1024) - padding_mask_bytes(precision, 512)) / 512
    assert slope == pytest.approx(width, rel=0.1)


# -- the plan ------------------------------------------------------------------------------------------
def test_a_large_budget_turns_checkpointing_off():
    chosen = plan(UNSLOTH, 80, quants=["4bit"], lora_dropout=0.0)
    assert (chosen.micro_batch, chosen.gradient_accumulation_steps, chosen.gradient_checkpointing) == (4, 1, False)
    assert chosen.estimate["total"] <= 0.9 * 80 and chosen.source == "fit"


def test_a_tight_budget_keeps_the_effective_batch_with_a_smaller_micro_batch():
    chosen = plan(UNSLOTH, 30, quants=["4bit"], lora_dropout=0.0)
    assert not chosen.gradient_checkpointing
    assert chosen.micro_batch < 4 and chosen.micro_batch * chosen.gradient_accumulation_steps == 4
    assert "4 records per step do not fit at once" in chosen.reason


def test_checkpointing_when_nothing_fits_without_it():
    chosen = plan(TRL, 40)
    assert chosen.gradient_checkpointing and "nothing fits without gradient checkpointing" in chosen.reason


def test_short_sequences_prefer_a_large_checkpointed_micro_batch_to_one_record_without():
    # 256 tokens: one record per micro-batch is far below full speed; 16 per micro-batch with checkpointing is faster
    assert speed_score(16, 256, True) > speed_score(1, 256, False)
    budget = estimate_memory(ModelShape.from_config(QWEN25_7B), profile=TRL, precision="bf16", quant="none", micro_batch=1,
                             seq_length=256, gradient_checkpointing=False, lora_r=8, target_modules=SEVEN,
                             lora_dropout=0.1).total / GIB / 0.9 + 0.05
    chosen = plan(TRL, budget, batch_size=16, seq_length=256)
    assert chosen.gradient_checkpointing and chosen.micro_batch > 1


def test_the_users_checkpointing_flag_is_kept():
    assert plan(UNSLOTH, 80, quants=["4bit"], gradient_checkpointing=True).gradient_checkpointing is True
    with pytest.raises(FitError, match="without gradient checkpointing"):
        plan(TRL, 20, gradient_checkpointing=False)


def test_quant_auto_takes_16_bit_weights_on_the_trl_path_when_they_fit_and_4bit_when_not():
    auto = quant_choices("auto", TRL, "cuda", quantisation_works=True)
    assert auto == ["none", "4bit"]
    assert plan(TRL, 80, quants=auto).quant == "none"
    small = plan(TRL, 16, quants=auto)
    assert small.quant == "4bit" and "unquantised weights do not fit" in small.reason
    assert quant_choices("auto", UNSLOTH, "cuda", True) == ["4bit", "none"]
    assert quant_choices("auto", TRL, "cuda", quantisation_works=False) == ["none"]
    assert quant_choices("auto", TRL, "cpu", True) == ["none"] and quant_choices("8bit", TRL, "cuda", True) == ["8bit"]


def test_nothing_fits_is_one_sentence_with_what_to_change():
    with pytest.raises(FitError) as caught:
        plan(TRL, 8, quants=["none", "4bit"])
    message = caught.value.message
    assert message.startswith("The run does not fit in 8 GiB (test): even 1 record of 2048 tokens per micro-batch")
    assert "\n" not in message and "--seq-length" in caught.value.hint and "--no-fit" in caught.value.hint


# -- comapoi train -------------------------------------------------------------------------------------
def test_dry_run_plans_for_a_gpu_this_machine_does_not_have(tmp_path):
    model = tmp_path / "qwen2.5-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN25_7B))
    result = run_comapoi("train", "--dry-run", "--model", str(model), "--memory-budget", "80", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    fit = json.loads(result.stdout)["fit"]
    assert fit["planned"] and fit["assumes"] == "a CUDA GPU, bf16" and fit["quant"] == "none"
    assert fit["micro_batch"] * fit["gradient_accumulation_steps"] == 4 and fit["estimate"]["total"] <= 72
    small = run_comapoi("train", "--dry-run", "--model", str(model), "--memory-budget", "8", "--output_dir", str(tmp_path))
    assert any(p.startswith("The run does not fit in 8 GiB") for p in json.loads(small.stdout)["problems"])
    unplanned = json.loads(run_comapoi("train", "--dry-run", "--model", str(model), "--output_dir", str(tmp_path)).stdout)
    assert unplanned["fit"]["planned"] is False and "free memory" in unplanned["fit"]["reason"]


def tiny_budget_between(micro_low: int, micro_high: int, seq_length: int) -> float:
    """A --memory-budget (GiB) in which micro-batch ``micro_low`` fits and ``micro_high`` does not (tiny model, CPU)."""
    from comapoi_cli.models.tiny import TINY_RECIPE

    shape = ModelShape.from_config(TINY_RECIPE)
    totals = [estimate_memory(shape, profile=TRL, precision="fp32", quant="none", micro_batch=m, seq_length=seq_length,
                              gradient_checkpointing=False, lora_r=8, target_modules=SEVEN, lora_dropout=0.1,
                              device="cpu").total for m in (micro_low, micro_high)]
    return sum(totals) / 2 / 0.9 / GIB


def test_train_runs_the_plan_with_the_same_effective_batch(agent_data_dir, tmp_path):
    seen = tmp_path / "seen"
    budget = tiny_budget_between(1, 2, 1536)
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), *TRAIN_FAST,
                         "--memory-budget", f"{budget:.6f}", "--max_steps", "3", "--save_freq", "3",
                         "--output_dir", str(tmp_path / "out"), env={"COMAPOI_DEBUG_SEEN_FILE": str(seen)})
    assert result.returncode == 0, result.stderr
    assert "Plan: 1 per micro-batch x 2 accumulation, gradient checkpointing off" in result.stderr
    run_dir = next((tmp_path / "out").glob("*/sft-*/bs2-gas1-*"))  # the folder keeps the asked-for batch
    run = json.loads((run_dir / "run.json").read_text())
    assert run["fit"]["source"] == "fit" and run["fit"]["budget_source"] == "--memory-budget" and run["fit"]["profile"] == "trl"
    assert (run["distributed"]["per_device_batch"], run["distributed"]["gradient_accumulation_steps"],
            run["distributed"]["effective_batch"]) == (1, 2, 2)
    micro_batches = [json.loads(line) for line in Path(f"{seen}.rank0").read_text().splitlines()]
    assert len(micro_batches) == 6 and all(len(m["hashes"]) == 1 for m in micro_batches)  # 3 steps x 2 x 1 record
    assert run["status"] == "finished"
    shown = run_comapoi("adapters", "show", str(run_dir))
    assert "memory plan (--fit)" in shown.stdout and "1 per micro-batch x 2 accumulation" in shown.stdout


def test_a_budget_nothing_fits_in_stops_before_training_and_leaves_no_run_folder(agent_data_dir, tmp_path):
    budget = tiny_budget_between(1, 2, 1536) / 4
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), *TRAIN_FAST,
                         "--memory-budget", f"{budget:.6f}", "--max_steps", "2", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "The run does not fit in" in result.stderr and "--no-fit" in result.stderr
    assert not list((tmp_path / "out").glob("*/sft-*/*"))


def test_a_resumed_run_keeps_the_plan_its_checkpoints_were_made_with(tmp_path):
    from comapoi_cli.training.devices import DevicePlan
    from comapoi_cli.training.job import TrainingJob
    from comapoi_cli.training.trl_trainer import TRLTrainingPath

    job = TrainingJob(output_dir=str(tmp_path), run_tag="t", resume=True, memory_budget=100.0, batch_size=4)
    recorded = FitPlan(1, 4, True, "none", "fit", 0.5, "--memory-budget", {"total": 0.4}, "tight")
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "run.json").write_text(json.dumps({"fit": recorded.to_dict()}))
    checkpoint = job.run_dir / "checkpoint-2"
    checkpoint.mkdir()
    for name in ("trainer_state.json", "adapter_model.safetensors"):
        (checkpoint / name).write_text("{}")
    device = DevicePlan("cpu", "cpu", 1, "fp32", "none", "float32")
    execution = TRLTrainingPath(job).plan_execution(device, str(tmp_path / "no-model"))
    assert (execution.source, execution.micro_batch, execution.gradient_accumulation_steps,
            execution.gradient_checkpointing) == ("resumed", 1, 4, True)


def test_config_files_spell_auto_and_the_budget():
    from comapoi_cli.errors import UsageError
    from comapoi_cli.training.options import coerce_options

    values = coerce_options({"gradient_checkpointing": "auto", "bf16": "false", "fit": "off", "memory-budget": "40"}, "f.yaml")
    assert values == {"gradient_checkpointing": None, "bf16": False, "fit": False, "memory_budget": 40.0}
    with pytest.raises(UsageError, match="memory-budget must not be negative"):
        from comapoi_cli.training.job import TrainingJob

        TrainingJob(memory_budget=-1, run_tag="t").check()


def test_on_a_gpu_the_plan_uses_the_free_memory(tmp_path, monkeypatch):
    # the CUDA branch of plan_execution, with the free memory of an 80 GiB card (no GPU needed)
    from comapoi_cli.training import trl_trainer
    from comapoi_cli.training.devices import DevicePlan
    from comapoi_cli.training.job import TrainingJob

    model = tmp_path / "qwen2.5-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN25_7B))
    monkeypatch.setattr(trl_trainer, "free_memory_bytes", lambda device: 79.2 * GIB if device == "cuda" else None)
    monkeypatch.setattr(trl_trainer, "bitsandbytes_problem", lambda device: None)
    job = TrainingJob(model=str(model), base_model=str(model), run_tag="t", output_dir=str(tmp_path / "out"))
    device = DevicePlan("cuda", "H100", 1, "bf16", "4bit", "bfloat16")  # plan_training_device's --quant auto without --fit
    execution = trl_trainer.TRLTrainingPath(job).plan_execution(device, str(model))
    assert (execution.source, execution.budget_source, execution.quant, device.quant) == ("fit", "free GPU memory", "none", "none")
    assert not execution.gradient_checkpointing and execution.micro_batch * execution.gradient_accumulation_steps == 4
    job.fit = False
    as_given = trl_trainer.TRLTrainingPath(job).plan_execution(DevicePlan("cuda", "H100", 1, "bf16", "4bit", "bfloat16"), str(model))
    assert (as_given.source, as_given.quant, as_given.micro_batch, as_given.reason) == ("as given", "4bit", 4, "--no-fit")


@pytest.mark.parametrize("bf16, fp16, gpu, has_bf16, expected", [
    (None, None, True, True, "bf16"), (None, None, True, False, "fp16"), (None, None, False, True, "fp32"),
    (True, None, False, True, "bf16"), (None, True, True, True, "fp16"), (False, None, True, True, "fp32"),
    (None, False, True, True, "fp32")])
def test_one_precision_rule_for_training_and_the_dry_run_plan(bf16, fp16, gpu, has_bf16, expected):
    from comapoi_cli.training.job import TrainingJob

    assert TrainingJob(bf16=bf16, fp16=fp16, run_tag="t").precision(gpu=gpu, gpu_has_bf16=has_bf16) == expected
