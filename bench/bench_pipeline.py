"""Benchmark ``comapoi pipeline run``: trajectories per second of the chain with the tiny model.

    .venv/bin/python bench/bench_pipeline.py [--limit 8] [--batch-sizes 1 8] [--max-new-tokens 16] [--run RUN] [--json FILE]

Without ``--run`` it builds what the tests build: simulated NYC agent data (``data synth``, 24
trajectories, seed 3, 3-6 check-ins), the tiny base model and one ``train --type merged`` run of
8 steps (real TRL + PEFT, CPU). Then it runs the chain (agent1 profile + candidates, agent2
pattern + candidates, agent3 ranking: 5 generations per trajectory) on the first ``--limit`` real
nyc test trajectories of ``../shared/data/real/`` with the transformers engine, once per batch
size, each in a fresh output folder, and reports:

- ``chain traj/s``: trajectories / the summed batch times recorded in predictions.jsonl (the chain
  itself: retrieval, prompts, 5 batched generations, parsing; model loading excluded);
- ``run s``: the whole ``run_pipeline`` call (inputs, model load, chain, scoring).

The tiny model is random, so it rarely stops before ``--max-new-tokens``: every answer is about
that long. Everything runs in this process on the CPU (``--device cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL = REPO.parent / "shared" / "data" / "real"


def _train_tiny(folder: Path) -> Path:
    from comapoi_cli.data.synth import synth_dataset
    from comapoi_cli.plugins import get_registry

    synth_dataset("nyc", folder / "data", plain=False, trajectories=24, seed=3, min_checkins=3, max_checkins=6, registry=get_registry())
    cmd = [sys.executable, "-m", "comapoi_cli", "train", "--dataset", "nyc", "--data-dir", str(folder / "data"),
           "--type", "merged", "--model", "tiny", "--seq-length", "1536", "--batch-size", "2", "--test-size", "4",
           "--max_steps", "8", "--save_freq", "8", "--output_dir", str(folder / "output")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return next((folder / "output").glob("*/sft-*/*/run.json")).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    os.environ.setdefault("COMAPOI_CACHE", str(work / "cache"))
    run = args.run or _train_tiny(work)

    from comapoi_cli.pipeline.runner import PipelineRequest, run_pipeline
    from comapoi_cli.plugins import build_registry
    from comapoi_cli.reporting import Reporter

    registry = build_registry()
    rows = []
    for batch in args.batch_sizes:
        request = PipelineRequest(dataset="nyc", test=REAL / "nyc_test.jsonl", train=REAL / "nyc_train.jsonl",
                                  poi_info=REAL / "nyc_poi_info.csv", runs=dict.fromkeys(("agent1", "agent2", "agent3"), run),
                                  out=work / f"out-b{batch}", batch_size=batch, max_new_tokens=args.max_new_tokens,
                                  limit=args.limit, device="cpu")
        started = time.perf_counter()
        result = run_pipeline(request, registry, Reporter())
        wall = time.perf_counter() - started
        lines = [json.loads(line) for line in result.predictions.read_text().splitlines()]
        chain_s = sum({(line["timings"]["batch"]): line["timings"]["batch_seconds"] for line in lines}.values())
        rows.append({"batch_size": batch, "trajectories": len(lines), "chain_s": round(chain_s, 2),
                     "chain_traj_per_s": round(len(lines) / chain_s, 3), "run_s": round(wall, 2)})
        print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    info = {"machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
            "python": platform.python_version(), "loadavg_after": [round(x, 2) for x in load],
            "max_new_tokens": args.max_new_tokens, "limit": args.limit, "rows": rows}
    print("| batch size | trajectories | chain s | chain traj/s | run s (incl. load) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch_size']} | {row['trajectories']} | {row['chain_s']} | {row['chain_traj_per_s']} | {row['run_s']} |")
    print(f"load average after: {info['loadavg_after']}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
