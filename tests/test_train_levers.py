"""Speed levers of `comapoi train`: length-grouped batches and Liger kernels.

What they gain is measured on a GPU by bench/bench_gpu_train.py; here: that each one really does
what it says on the CPU (grouping cuts padding), or is refused with one sentence where it cannot run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TRAIN_FAST
from tests.support import run_comapoi


def padding_of_a_run(data_dir: Path, output: Path, *extra: str) -> tuple[int, int, set[str]]:
    """(padding tokens, real tokens, records seen) of a 14-step merged run (batch 2), from the per-step debug log."""
    seen = output.parent / f"{output.name}.seen"
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(data_dir), "--type", "merged", *TRAIN_FAST,
                         "--batch-size", "2", "--max_steps", "14", "--save_freq", "14", "--output_dir", str(output), *extra,
                         env={"COMAPOI_DEBUG_SEEN_FILE": str(seen)})
    assert result.returncode == 0, result.stderr
    padding = real = 0
    hashes: set[str] = set()
    for line in Path(f"{seen}.rank0").read_text().splitlines():
        step = json.loads(line)
        real += sum(step["lengths"])
        padding += step["padded_length"] * len(step["lengths"]) - sum(step["lengths"])
        hashes.update(step["hashes"])
    return padding, real, hashes


@pytest.mark.slow
def test_group_by_length_cuts_the_padding(agent_data_dir, tmp_path):
    # transformers' LengthGroupedSampler sorts "megabatches" of min(records // (4 x batch), 50) batches by
    # length: 116 training records, batch 2 -> megabatches of 14 batches (28 records), all 14 steps here
    random_padding, random_real, random_seen = padding_of_a_run(agent_data_dir, tmp_path / "random")
    grouped_padding, grouped_real, grouped_seen = padding_of_a_run(agent_data_dir, tmp_path / "grouped", "--group-by-length")
    assert len(random_seen) == len(grouped_seen) == 28
    assert grouped_padding / grouped_real < 0.5 * random_padding / random_real, (grouped_padding, grouped_real,
                                                                                 random_padding, random_real)
    run = json.loads(next((tmp_path / "grouped").glob("*/sft-*/*/run.json")).read_text())
    assert run["job"]["group_by_length"] is True and run["status"] == "finished"


def test_group_by_length_and_packing_exclude_each_other(tmp_path):
    result = run_comapoi("train", "--group-by-length", "--packing", "--dry-run", "--output_dir", str(tmp_path))
    assert result.returncode == 2
    assert "--group-by-length and --packing exclude each other" in result.stderr and "Traceback" not in result.stderr


def test_liger_on_the_cpu_is_one_sentence(agent_data_dir, tmp_path):
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), *TRAIN_FAST, "--liger",
                         "--max_steps", "1", "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--liger needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "out").exists()


def test_liger_with_unsloth_is_refused_before_unsloth_loads():
    from comapoi_unsloth.training import train_with_unsloth

    from comapoi_cli.errors import ComapoiError
    from comapoi_cli.training.job import TrainingJob

    with pytest.raises(ComapoiError, match="--liger is for the trl backend"):
        train_with_unsloth(TrainingJob(backend="unsloth", liger=True))
