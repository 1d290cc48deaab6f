"""Hostile files in run folders and models, through the real CLI (issue 12, remote code and Low).

``adapters export`` copies only regular files inside the run folder; ``adapters merge`` and
``train`` never run or copy a model's own code; ``--resume`` neither follows a symlinked
checkpoint nor stops at a corrupt last one; ``adapters list/show`` do not hang on a FIFO or a
device as run.json. The session's trained run is copied, never changed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import TRAIN_FAST
from tests.support import plant_remote_code, run_comapoi

#: A tokenizer / model module that leaves a mark when Python imports it.


def _copy_run(trained_run, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, target, symlinks=True)
    return target


def test_export_copies_no_symlink_out_of_the_run_folder(trained_run, tmp_path):
    run_dir = _copy_run(trained_run, tmp_path)
    (run_dir / "tokenizer.json").unlink(missing_ok=True)
    (run_dir / "tokenizer.json").symlink_to("/etc/passwd")
    config = json.loads((run_dir / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (run_dir / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_comapoi("adapters", "export", str(run_dir), "--to", str(tmp_path / "served"), "--names", "a3")
    assert result.returncode == 0, result.stdout + result.stderr
    exported = tmp_path / "served" / "a3"
    assert not (exported / "tokenizer.json").exists()
    assert "not copied tokenizer.json" in " ".join(result.stdout.split() + result.stderr.split())
    assert all(not p.is_symlink() for p in exported.iterdir())
    assert "auto_map" not in json.loads((exported / "tokenizer_config.json").read_text())
    assert "root:" not in "".join(p.read_text(errors="replace") for p in exported.iterdir() if p.suffix != ".safetensors")

    (run_dir / "adapter_config.json").rename(run_dir / "real_config.json")
    (run_dir / "adapter_config.json").symlink_to(run_dir / "real_config.json")
    refused = run_comapoi("adapters", "export", str(run_dir), "--to", str(tmp_path / "served2"))
    assert refused.returncode != 0 and "export copies only regular files inside the run folder" in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.stderr


def _planted_model(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "planted-model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "code-ran"
    plant_remote_code(model, marker)
    return model, marker


@pytest.mark.slow
def test_merge_never_runs_or_copies_a_models_code(trained_run, tiny_model_dir, tmp_path):
    model, marker = _planted_model(tiny_model_dir, tmp_path)
    output = tmp_path / "merged"
    result = run_comapoi("adapters", "merge", str(trained_run.run_dir), "--model", str(model), "--output", str(output),
                         "--check-inputs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists()
    assert not list(output.glob("*.py"))
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((output / name).read_text()), name
    assert not list(output.parent.glob(".merged.comapoi.lock"))  # the output lock is gone


@pytest.mark.slow
def test_train_never_runs_a_models_code(agent_data_dir, tiny_model_dir, tmp_path):
    model, marker = _planted_model(tiny_model_dir, tmp_path)
    fast = [a for a in TRAIN_FAST if a != "tiny" and a != "--model"]
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), "--type", "agent3", *fast,
                         "--model", str(model), "--max_steps", "1", "--save_freq", "1",
                         "--output_dir", str(tmp_path / "output"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_resume_skips_a_symlinked_checkpoint_and_falls_back_from_a_corrupt_one(trained_run, agent_data_dir, tmp_path):
    output = tmp_path / "output"
    shutil.copytree(trained_run.output_dir, output)
    (run_json,) = output.glob("*/sft-*/*/run.json")
    run_dir = run_json.parent
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # as if stopped before the end
        (run_dir / name).unlink()
    run = json.loads(run_json.read_text())
    run["status"] = "interrupted"
    run_json.write_text(json.dumps(run))
    (run_dir / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": 8, "log_hist')  # cut short
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_dir / "checkpoint-4", elsewhere)
    (run_dir / "checkpoint-12").symlink_to(elsewhere, target_is_directory=True)

    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), "--type", "merged", *TRAIN_FAST,
                         "--max_steps", "8", "--save_freq", "4", "--output_dir", str(output), "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join((result.stdout + result.stderr).split())
    assert "checkpoint-12 is a symbolic link: not followed, not removed and not resumed from." in text
    assert "checkpoint-8 is corrupt (trainer_state.json is unreadable" in text
    assert "falling back to checkpoint-4" in text and "Resuming from checkpoint-4 (step 4)." in text
    assert "Removed the incomplete checkpoint-12" not in text
    assert (run_dir / "checkpoint-12").is_symlink() and (elsewhere / "trainer_state.json").is_file()
    assert (run_dir / "checkpoint-8.corrupt").is_dir() and (run_dir / "checkpoint-8" / "trainer_state.json").is_file()
    final = json.loads(run_json.read_text())
    assert final["status"] == "finished" and final["segments"][-1]["from_step"] == 4


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_list_and_show_do_not_hang_on_a_fifo_or_device_run_json(trained_run, tmp_path, kind):
    root = tmp_path / "root"
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained_run.run_dir / name, run_dir / name)
    if kind == "fifo":
        os.mkfifo(run_dir / "run.json")
    else:
        (run_dir / "run.json").symlink_to("/dev/zero")
    listed = run_comapoi("adapters", "list", str(root), "--json", timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "run.json is not a regular file" in listed.stdout + listed.stderr
    shown = run_comapoi("adapters", "show", str(run_dir), "--json", timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "run.json is not a regular file" in shown.stdout + shown.stderr


def test_a_second_writer_of_prepared_data_is_refused_naming_the_first(copy_data_dir, monkeypatch):
    """Another process holds the prepared-data lock of the dataset folder: preparing there is refused."""
    import subprocess
    import sys

    from comapoi_cli.data import prepare as prepare_module
    from comapoi_cli.plugins import get_registry
    from comapoi_cli.runs.lock import LockedError

    folder = copy_data_dir / "nyc"
    train_file = folder / "agent3_train_samples_all.jsonl"
    before = train_file.read_bytes() if train_file.exists() else None  # (the session data may hold a split)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from comapoi_cli.runs.lock import acquire; "
         f"acquire(Path({str(folder / '.comapoi-prepare.lock')!r}), 'x'); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(prepare_module, "PREPARE_LOCK_WAIT", 0.5)
        with pytest.raises(LockedError) as refused:
            prepare_module.prepare_training_data(type_="agent3", dataset="nyc", data_dir=copy_data_dir, seed=7,
                                                 test_size=4, registry=get_registry())
        assert f"is being written by process {holder.pid}" in refused.value.message
        assert (train_file.read_bytes() if train_file.exists() else None) == before  # nothing written
    finally:
        holder.kill()
        holder.wait()
    prepared = prepare_module.prepare_training_data(type_="agent3", dataset="nyc", data_dir=copy_data_dir, seed=7,
                                                    test_size=4, registry=get_registry())
    assert prepared.train_path.is_file()  # the kernel dropped the killed holder's lock
