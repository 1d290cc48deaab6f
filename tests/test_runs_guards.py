"""Run-folder guards through the real CLI (issue 12): honest holdouts, run locks, the NaN stop.

Each test trains the tiny model for a few steps on a private copy of the session data (the
guards need a run whose data the test may change); the concurrent-training test keeps its first
training alive with SIGSTOP while the second is refused, so no timing decides the outcome.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TRAIN_FAST
from tests.support import REPO, run_comapoi

AGENT3 = ("--dataset", "nyc", "--type", "agent3", *TRAIN_FAST)


def _train(data_dir: Path, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_comapoi("train", "--data-dir", str(data_dir), *AGENT3, "--output_dir", str(output), *extra)


def _run_dir(output: Path) -> Path:
    (run_json,) = output.glob("*/sft-nyc/*/run.json")
    return run_json.parent


@pytest.mark.slow
def test_eval_refuses_a_resplit_holdout_and_records_it_trained_on(copy_data_dir, tmp_path):
    output = tmp_path / "output"
    trained = _train(copy_data_dir, output, "--max_steps", "1", "--save_freq", "1")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    run_dir = _run_dir(output)
    run = json.loads((run_dir / "run.json").read_text())
    holdout = Path(run["data"]["holdout_file"])
    assert run["data"]["holdout_sha256"] and run["data"]["data_keys"] == "data_keys.json"
    keys = json.loads((run_dir / "data_keys.json").read_text())
    assert len(keys["train"]) == run["data"]["prepare_summary"]["train"] and len(keys["holdout"]) == 4
    assert not set(keys["train"]) & set(keys["holdout"])

    # re-split with another seed: the holdout file the run recorded now holds other records
    resplit = run_comapoi("data", "clean", "--dataset", "nyc", "--data-dir", str(copy_data_dir), "--type", "agent3",
                          "--test-size", "4", "--seed", "7")
    assert resplit.returncode == 0, resplit.stdout + resplit.stderr
    refused = run_comapoi("eval", "--adapter", str(run_dir), "--max-new-tokens", "4")
    assert refused.returncode != 0
    message = " ".join(refused.stderr.split())
    assert f"The holdout {holdout} changed since the run trained" in message
    assert str(run_dir / "run.json") in message and "--seed 42" in message and "Traceback" not in refused.stderr
    assert not (run_dir / "metrics.json").exists()

    # the re-split holdout named explicitly: the records of it that the run trained on are refused
    from comapoi_cli.runs.datakeys import file_keys

    now_held_out = file_keys(holdout)
    trained_on = sum(1 for key in now_held_out if key not in set(keys["holdout"]))  # the rest were training records
    assert trained_on > 0
    refused = run_comapoi("eval", "--adapter", str(run_dir), "--data", str(holdout), "--max-new-tokens", "4")
    assert refused.returncode != 0
    message = " ".join(refused.stderr.split())
    assert f"{trained_on} of the {len(now_held_out)} records of {holdout} were in this adapter's training data" in message
    assert "--allow-train-overlap" in message and "Traceback" not in refused.stderr

    allowed = run_comapoi("eval", "--adapter", str(run_dir), "--data", str(holdout), "--max-new-tokens", "4",
                          "--allow-train-overlap")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert (f"Warning: {trained_on} of the {len(now_held_out)} records scored were in this adapter's training data"
            in " ".join(allowed.stderr.split()))
    entry = json.loads((run_dir / "metrics.json").read_text())
    assert entry["train_overlap"] == trained_on
    assert json.loads((run_dir / "run.json").read_text())["evaluations"][-1]["train_overlap"] == trained_on

    # put the run's split back (its seed): the holdout is the recorded one again and is scored
    restored = run_comapoi("data", "clean", "--dataset", "nyc", "--data-dir", str(copy_data_dir), "--type", "agent3",
                           "--test-size", "4", "--seed", "42")
    assert restored.returncode == 0, restored.stderr
    scored = run_comapoi("eval", "--adapter", str(run_dir), "--max-new-tokens", "4", "--json")
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert json.loads(scored.stdout)["train_overlap"] == 0


def _wait_for_lock(output: Path, pid: int, process: subprocess.Popen, timeout: float = 300) -> Path:
    """The run folder whose lock names ``pid`` (the first training holds it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        for lock in output.glob("*/sft-nyc/*/.comapoi.lock"):
            try:
                if json.loads(lock.read_text()).get("pid") == pid:
                    return lock.parent
            except (OSError, ValueError):
                pass
        time.sleep(0.1)
    raise AssertionError(f"no lock under {output} named process {pid}")


@pytest.mark.slow
def test_two_concurrent_trainings_into_one_folder_the_second_is_refused(copy_data_dir, tmp_path):
    output = tmp_path / "output"
    args = ["train", "--data-dir", str(copy_data_dir), *AGENT3, "--output_dir", str(output),
            "--max_steps", "2", "--save_freq", "2"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    first = subprocess.Popen([sys.executable, "-m", "comapoi_cli", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = _wait_for_lock(output, first.pid, first)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock, does nothing: the second start is refused for sure
        try:
            for extra in ((), ("--resume",), ("--overwrite",)):
                second = run_comapoi(*args, *extra)
                assert second.returncode != 0, second.stdout
                message = " ".join(second.stderr.split())
                assert f"is being written by process {first.pid} on {socket.gethostname()}" in message, message
                assert "comapoi train" in message and "Traceback" not in second.stderr
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out + err
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["pid"] == first.pid and len(run["segments"]) == 1
    assert not (run_dir / ".comapoi.lock").exists()

    # a lock left by a process that is gone (dead pid on this host) is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".comapoi.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                       "command": ["comapoi", "train"]}))
    again = run_comapoi(*args, "--overwrite")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Took over the stale lock of process {dead.pid}" in " ".join((again.stdout + again.stderr).split())


@pytest.mark.slow
def test_a_run_whose_weights_become_nan_stops_failed_keeping_the_last_good_checkpoint(copy_data_dir, tmp_path):
    output = tmp_path / "output"
    result = _train(copy_data_dir, output, "--learning-rate", "1e30", "--warmup-steps", "10",
                    "--max_steps", "6", "--save_freq", "1")
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "Training stopped at step" in message and "became NaN or infinite" in message, message
    assert "Traceback" not in result.stderr
    run_dir = _run_dir(output)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and "became NaN or infinite" in run["error"]
    stopped = int(message.split("Training stopped at step ")[1].split()[0])
    assert stopped < 6
    kept = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert kept and max(kept) < stopped, (kept, stopped)
    assert f"checkpoint-{max(kept)}, is kept" in message
    import numpy as np
    from safetensors.numpy import load_file

    weights = load_file(str(run_dir / f"checkpoint-{max(kept)}" / "adapter_model.safetensors"))
    assert all(np.isfinite(v).all() for v in weights.values())
    assert not (run_dir / "adapter_model.safetensors").exists()  # no final adapter from a failed run
