"""bench/bench_gpu_train.py: its arithmetic, and its small preset end-to-end on the CPU.

The end-to-end test runs the script as a user would (a subprocess): ``comapoi data synth``, a
tiny model saved with ``save_pretrained``, then each configuration in its own process, the
``comapoi-*`` rows through the real ``comapoi train``. The Unsloth rows run with
``.venv-unsloth`` when it exists and are reported as skipped (with the reason) otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.support import REPO
from tests.test_unsloth_plugin import UNSLOTH_PYTHON, _unsloth_venv_problem

spec = importlib.util.spec_from_file_location("bench_gpu_train", REPO / "bench" / "bench_gpu_train.py")
bench = sys.modules.setdefault("bench_gpu_train", importlib.util.module_from_spec(spec))
spec.loader.exec_module(bench)


def test_matmul_parameters_of_the_7b_shape_match_the_gpu_readme():
    config = {k: v for k, v in bench.PRESETS["qwen2.5-7b"].items() if k != "architecture"}
    n = bench.matmul_params(config)
    assert n == 7_070_285_824  # ../shared/gpu/README.md: N = 7.07e9 incl. lm_head
    # ... and 100% MFU on the H100 is about 27,900 tokens/s there
    assert bench.mfu(27_900, n, bench.H100_BF16_PEAK) == pytest.approx(1.0, abs=0.002)
    assert bench.mfu(None, n, 1e12) is None and bench.mfu(100.0, n, None) is None


def test_summary_leaves_out_the_warm_up_steps():
    steps = [{"time_s": 10.0, "tokens": 100}, {"time_s": 1.0, "tokens": 300}, {"time_s": 3.0, "tokens": 500}]
    summary = bench.summarise(steps, warmup=1)
    assert summary["tokens_per_s"] == pytest.approx(800 / 4.0)
    assert summary["step_s_median"] == pytest.approx(2.0)
    assert summary["measured_steps"] == 2


def test_comapoi_rows_read_per_step_times_and_tokens_from_run_json():
    run = {"loss_history": [
        {"step": 1, "loss": 7.0, "num_input_tokens_seen": 1000, "train_seconds": 5.0},
        {"step": 2, "loss": 6.5, "num_input_tokens_seen": 2500, "train_seconds": 6.0},
        {"step": 3, "loss": 6.0, "num_input_tokens_seen": 3700, "train_seconds": 7.5},
    ]}
    steps = bench.comapoi_steps(run)
    assert [s["tokens"] for s in steps] == [1000, 1500, 1200]
    assert [s["time_s"] for s in steps] == pytest.approx([5.0, 1.0, 1.5])
    assert [s["loss"] for s in steps] == [7.0, 6.5, 6.0]


def test_rows_and_variants():
    rows = bench.parse_rows("original,comapoi-trl", ["trl-4bit=comapoi-trl:--quant 4bit --packing", "o-bf16=original:quant=none,gc=off"],
                            "--liger", "")
    assert [(r.name, r.base, r.extra) for r in rows] == [
        ("original", "original", []), ("comapoi-trl", "comapoi-trl", ["--liger"]),
        ("trl-4bit", "comapoi-trl", ["--quant", "4bit", "--packing"]), ("o-bf16", "original", ["quant=none", "gc=off"])]
    with pytest.raises(SystemExit):
        bench.parse_rows("fast", [], "", "")
    with pytest.raises(SystemExit):
        bench.parse_rows("", ["x=nothing:"], "", "")


def test_tiny_preset_runs_every_configuration_on_the_cpu(tmp_path):
    unsloth = _unsloth_venv_problem() is None
    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "bench" / "bench_gpu_train.py"), "--preset", "tiny", "--steps", "2",
               "--warmup", "1", "--batch-size", "1", "--seq-length", "4096", "--trajectories", "6",
               "--scratch", str(tmp_path / "scratch"), "--json", str(out), "--peak-flops", "1e12",
               "--python-unsloth", str(UNSLOTH_PYTHON if unsloth else sys.executable),
               "--trl-args", "--memory-budget 4"]  # a --fit plan on the CPU too: its estimate goes into the row
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    rows = {row["config"]: row for row in report["rows"]}
    assert list(rows) == list(bench.CONFIGS)
    expected_ok = set(bench.CONFIGS) if unsloth else {"original", "comapoi-trl"}
    for name, row in rows.items():
        if name not in expected_ok:
            assert row["status"] == "skipped" and "Unsloth is not installed" in row["error"]
            continue
        assert row["status"] == "ok", row
        summary = row["summary"]
        assert summary["measured_steps"] == 2 and summary["tokens_per_s"] > 0 and summary["step_s_median"] > 0
        assert len(row["steps"]) == 3 and all(math.isfinite(s["loss"]) for s in row["steps"])
        # real tokens: the records are 1,000-3,000 tokens long, batches of one are never padded
        assert all(s["tokens"] > 500 for s in row["steps"])
        assert row["peak_memory_gib"] > 0 and row["memory_kind"] == "cpu-peak-rss"
        assert row["mfu"] == pytest.approx(4 * report["matmul_params"] * summary["tokens_per_s"] / 1e12)
    assert rows["comapoi-trl"]["command"].split()[2:4] == ["comapoi_cli", "train"]  # the real CLI
    planned = rows["comapoi-trl"]
    assert planned["settings"]["plan"] == "fit" and planned["settings"]["micro_batch"] == 1
    assert 0 < planned["estimated_peak_gib"] < 4 and "fit estimated" in result.stdout
    assert report["device"]["kind"] == "cpu" and report["versions"]["torch"]
    for name in bench.CONFIGS:
        assert f"| {name} |" in result.stdout  # the Markdown table


def test_deadline_skips_the_rows_it_has_no_time_for_and_still_writes_the_report(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "bench" / "bench_gpu_train.py"), "--preset", "tiny", "--trajectories", "6",
               "--configs", "comapoi-trl,original", "--deadline", "30", "--scratch", str(tmp_path / "scratch"),
               "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["status"], r["error"]) for r in rows] == [
        ("comapoi-trl", "skipped", "--deadline reached"), ("original", "skipped", "--deadline reached")]


def test_merge_reports_prints_one_table(tmp_path, capsys):
    base = {"preset": "tiny", "batch_size": 1, "seq_length": 64, "steps": 1, "warmup": 0, "matmul_params": 10,
            "device": {"kind": "cpu", "name": "x"}}
    row = {"status": "ok", "steps": [{"loss": 2.0, "tokens": 5, "time_s": 1.0}], "peak_memory_gib": 0.1,
           "memory_kind": "cpu-peak-rss", "mfu": None, "summary": {"tokens_per_s": 5.0, "step_s_median": 1.0}}
    files = []
    for name in ("original", "comapoi-trl"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**base, "command": name, "rows": [{**row, "config": name}]}))
        files.append(str(path))
    assert bench.main(["--merge", *files, "--json", str(tmp_path / "all.json")]) == 0
    printed = capsys.readouterr().out
    assert "| original | 1 |" in printed and "| comapoi-trl | 1 |" in printed
    assert [r["config"] for r in json.loads((tmp_path / "all.json").read_text())["rows"]] == ["original", "comapoi-trl"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**base, "batch_size": 4, "command": "x", "rows": []}))
    with pytest.raises(SystemExit, match="batch_size"):
        bench.main(["--merge", files[0], str(other)])
