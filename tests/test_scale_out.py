"""Scale-out (issue 7): ``comapoi train`` under ``accelerate launch`` and ``--num-processes``.

Two CPU processes (gloo) train the tiny model data-parallel through accelerate's launcher. The
test proves: one adapter and one run.json (rank 0 writes), world size 2 and the effective batch
recorded, every training record seen exactly once per epoch across the two ranks (each rank logs
a hash of every record it trains on when ``COMAPOI_DEBUG_SEEN_FILE`` is set), the loss falling,
and progress printed once, not once per rank.

On a machine without CUDA, accelerate's ``--cpu`` flag starts a single process (its multi-CPU
path needs MPI), so the launch uses the torchrun path (``--multi_gpu``) and comapoi creates the
CPU (gloo) state itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import TRAIN_FAST
from tests.support import REPO, run_comapoi
from tests.test_train_run import assert_same_adapter

RECORDS, BATCH, RANKS = 24, 2, 2
STEPS_PER_EPOCH = RECORDS // (BATCH * RANKS)  # 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def isolated_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No user accelerate config (HF_HOME is private), no network, plain output."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    return {**env, **extra}


def only_run_dir(output: Path) -> Path:
    runs = sorted(p.parent for p in output.glob("*/sft-*/*/run.json"))
    assert len(runs) == 1, runs
    return runs[0]


def assert_one_printer(text: str, max_steps: int) -> None:
    assert text.count("comapoi train merged on nyc") == 1, text
    assert text.count(f"step {max_steps}/{max_steps}  loss") == 1, text
    assert text.count("Adapter saved in") == 1, text
    assert text.count("Batch: 2 per device x 2 processes x 1 accumulation = 4 records per step") == 1, text


def assert_distributed_record(run: dict) -> None:
    assert run["status"] == "finished"
    assert run["distributed"]["world_size"] == 2
    assert run["distributed"]["mode"] == "DDP" and run["distributed"]["backend"] == "gloo"
    assert run["distributed"]["per_device_batch"] == BATCH
    assert run["distributed"]["gradient_accumulation_steps"] == 1
    assert run["distributed"]["effective_batch"] == BATCH * RANKS


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(copy_data_dir, tmp_path):
    output, seen = tmp_path / "out", tmp_path / "seen"
    max_steps = 2 * STEPS_PER_EPOCH
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(RANKS),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               "-m", "comapoi_cli", "train", "--dataset", "nyc", "--data-dir", str(copy_data_dir), *TRAIN_FAST,
               "--num_samples", str(RECORDS), "--max_steps", str(max_steps), "--save_freq", str(STEPS_PER_EPOCH),
               "--output_dir", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=isolated_env(tmp_path, COMAPOI_DEBUG_SEEN_FILE=str(seen)))
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "Traceback" not in text

    # rank 0 prepared the data (the other rank waited and reused it) and printed alone
    assert_one_printer(text, max_steps)
    data_lines = [line for line in text.splitlines() if line.startswith("Data: ")]
    assert len(data_lines) == 1 and "(reused)" not in data_lines[0], data_lines

    run_dir = only_run_dir(output)
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "adapter_config.json").is_file()
    assert {p.name for p in run_dir.glob("checkpoint-*")} == {f"checkpoint-{STEPS_PER_EPOCH}", f"checkpoint-{max_steps}"}
    run = json.loads((run_dir / "run.json").read_text())
    assert_distributed_record(run)
    assert run["progress"]["global_step"] == max_steps and run["progress"]["epoch"] == pytest.approx(2.0)

    # every record once per epoch across the ranks
    dataset = json.loads(Path(f"{seen}.dataset").read_text())
    assert len(dataset) == len(set(dataset)) == RECORDS
    batches = [json.loads(line) for r in range(RANKS) for line in Path(f"{seen}.rank{r}").read_text().splitlines()]
    assert {b["rank"] for b in batches} == {0, 1}
    for epoch in range(2):
        hashes = [h for b in batches if b["step"] // STEPS_PER_EPOCH == epoch for h in b["hashes"]]
        assert len(hashes) == RECORDS, f"epoch {epoch}: {len(hashes)} records trained, expected {RECORDS}"
        assert sorted(hashes) == sorted(dataset), f"epoch {epoch}: a record was missed or seen twice"
    per_rank = {r: [h for b in batches if b["rank"] == r and b["step"] < STEPS_PER_EPOCH for h in b["hashes"]]
                for r in range(RANKS)}
    assert not set(per_rank[0]) & set(per_rank[1]), "the ranks trained on the same records"

    losses = [entry["loss"] for entry in run["loss_history"]]
    assert len(losses) == max_steps and losses[0] > losses[-1], losses


@pytest.mark.slow
def test_num_processes_runs_accelerate_launch(agent_data_dir, tmp_path):
    output = tmp_path / "out"
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), *TRAIN_FAST,
                         "--num_samples", str(RECORDS), "--max_steps", "4", "--save_freq", "4",
                         "--output_dir", str(output), "--num-processes", "2",
                         env=isolated_env(tmp_path), cwd=REPO, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "accelerate launch --multi_gpu --num_processes 2" in text
    assert_one_printer(text, 4)
    run = json.loads((only_run_dir(output) / "run.json").read_text())
    assert_distributed_record(run)
    assert "--num-processes" not in run["command"]  # the ranks ran the command without the launch flag


# -- quick checks (no training) -------------------------------------------------------------------------
def test_dry_run_shows_the_launch_without_the_launch_flags(agent_data_dir, tmp_path):
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), "--num-processes", "4",
                         "--batch-size", "2", "--dry-run", env=isolated_env(tmp_path))
    assert result.returncode == 0, result.stderr
    launch = json.loads(result.stdout)["launch"]
    assert launch[:3] == ["accelerate", "launch", "--multi_gpu"]
    assert launch[launch.index("--num_processes") + 1] == "4"
    child = launch[launch.index("-m") + 1:]
    assert child[:2] == ["comapoi_cli", "train"] and "--batch-size" in child
    assert "--num-processes" not in child and "--dry-run" in child


def test_num_processes_inside_a_launcher_is_refused(agent_data_dir, tmp_path):
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), "--num-processes", "2",
                         env=isolated_env(tmp_path, LOCAL_RANK="0", RANK="0", WORLD_SIZE="2"))
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "already started by one (accelerate launch or torchrun)" in text and "Traceback" not in text


@pytest.mark.parametrize("how", ["launcher", "flag"])
def test_unsloth_refuses_a_multi_process_launch(how, agent_data_dir, tmp_path):
    """Whether or not Unsloth is installed, the refusal names the real reason: more than one process."""
    pytest.importorskip("comapoi_unsloth")
    args = ["train", "--backend", "unsloth", "--dataset", "nyc", "--data-dir", str(agent_data_dir),
            "--output_dir", str(tmp_path / "out")]
    extra = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"} if how == "launcher" else {}
    if how == "flag":
        args += ["--num-processes", "2"]
    result = run_comapoi(*args, env=isolated_env(tmp_path, **extra))
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "The unsloth backend trains on one GPU in one process, but this is a launch of 2 processes." in text
    assert "--backend trl" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


# -- stopping a multi-process run ------------------------------------------------------------------------
STOP_STEPS = 2 * STEPS_PER_EPOCH  # 12


def start_in_own_group(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``comapoi ARGS`` as a terminal starts it: its own process group, the launcher's ranks in it."""
    return subprocess.Popen([sys.executable, "-m", "comapoi_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True)


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    text = ""
    try:
        for line in proc.stdout:
            text += line
            if marker in line:
                return text
    finally:
        timer.cancel()
    pytest.fail(f"the run ended or hung before {marker!r}:\n{text}")


def rank_pid(output: Path, rank: int) -> int:
    """The pid of the training process of ``rank`` whose command line names ``output``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(output).encode() in cmdline and f"RANK={rank}".encode() in environ and b"comapoi_cli" in cmdline:
            return int(proc.name)
    pytest.fail(f"no process of rank {rank} found for {output}")


def stop_args(data_dir: Path, output: Path) -> list[str]:
    return ["train", "--dataset", "nyc", "--data-dir", str(data_dir), *TRAIN_FAST, "--num_samples", str(RECORDS),
            "--max_steps", str(STOP_STEPS), "--save_freq", "100", "--output_dir", str(output), "--num-processes", "2"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_ctrl_c_under_num_processes_stops_every_rank_and_the_printed_command_resumes(copy_data_dir, tmp_path):
    reference = run_comapoi(*stop_args(copy_data_dir, tmp_path / "ref"), env=isolated_env(tmp_path), cwd=REPO, timeout=300)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    output = tmp_path / "out"
    proc = start_in_own_group(stop_args(copy_data_dir, output), isolated_env(tmp_path))
    text = read_until(proc, f"step 3/{STOP_STEPS}")
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the launcher and both ranks get it
    text += proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    run_dir = only_run_dir(output)
    run = json.loads((run_dir / "run.json").read_text())
    stopped = run["progress"]["global_step"]
    assert run["status"] == "interrupted" and 3 <= stopped < STOP_STEPS, text
    assert [p.name for p in run_dir.glob("checkpoint-*")] == [f"checkpoint-{stopped}"]
    assert (run_dir / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
    assert text.count(f"Stopped at step {stopped} of {STOP_STEPS}") == 1, text
    assert "Traceback" not in text and "death signal" not in text  # no torch.distributed noise either
    command = re.search(r"Continue with: (comapoi .*--resume)$", text, re.M).group(1)
    assert "--num-processes 2" in command

    resumed = run_comapoi(*shlex.split(command)[1:], env=isolated_env(tmp_path), cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["progress"]["global_step"] == STOP_STEPS
    assert [s["status"] for s in run["segments"]] == ["interrupted", "finished"]
    assert run["distributed"]["world_size"] == 2
    reference_run = json.loads((only_run_dir(tmp_path / "ref") / "run.json").read_text())
    assert [e["loss"] for e in run["loss_history"]] == [e["loss"] for e in reference_run["loss_history"]]
    assert_same_adapter(only_run_dir(tmp_path / "ref"), run_dir)  # as if it had never stopped


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_sigterm_to_one_rank_stops_both_at_the_same_step(copy_data_dir, tmp_path):
    output = tmp_path / "out"
    proc = start_in_own_group(stop_args(copy_data_dir, output), isolated_env(tmp_path))
    text = read_until(proc, f"step 3/{STOP_STEPS}")
    os.kill(rank_pid(output, 1), signal.SIGTERM)  # e.g. a scheduler ending one process
    text += proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    assert "Another process of this run got a stop signal" in text and "Traceback" not in text
    run_dir = only_run_dir(output)
    run = json.loads((run_dir / "run.json").read_text())
    stopped = run["progress"]["global_step"]
    assert run["status"] == "interrupted" and 3 <= stopped < STOP_STEPS, text
    assert (run_dir / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
