"""Benchmark ``comapoi data build``: samples (trajectories, 5 records each) per second of the teacher pass.

    .venv/bin/python bench/bench_build.py [--limit 8] [--batch-sizes 8 1] [--max-new-tokens 16] [--model DIR] [--json FILE]

On the real nyc training trajectories of ``../shared/data/real/`` (25), it runs the build with:

- ``template``: no model (all 25 trajectories);
- ``transformers``: the tiny random model on the CPU (``--device cpu``), the first ``--limit`` trajectories,
  once per batch size; every ask capped at ``--max-new-tokens`` (the tiny model rarely stops earlier);
- ``openai``: the same tiny model behind ``tests/openai_server.py`` (a real localhost HTTP server that
  generates one request at a time), and that server's rule teacher (``--rules``: no model, so the row
  shows the engine's and HTTP's own cost).

``--retries 0``: a random model's answers fail the parser, so its trajectories end in the rejects after
the first failing list ask (2 asks each: the profile and the candidates); the figure is samples/s of that
pass (answers are about ``--max-new-tokens`` long), and ``asks/s`` the requests answered per second. The
rule teacher row runs with ``--retries 1`` (its first list answer is prose, its retry a valid list: 8 asks
per built trajectory).
"samples/s" is the trajectories done / the teacher pass's own time (``teacher_seconds_this_run`` in
build.json: loading and file writing excluded). Without ``--model`` it builds the tiny base the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL = REPO.parent / "shared" / "data" / "real"


def _tiny(folder: Path) -> Path:
    from comapoi_cli.data import prepare_training_data
    from comapoi_cli.data.synth import synth_dataset
    from comapoi_cli.models.tiny import ensure_tiny_model
    from comapoi_cli.plugins import get_registry

    synth_dataset("nyc", folder / "data", plain=False, trajectories=24, seed=3, min_checkins=3, max_checkins=6)
    prepared = prepare_training_data(type_="merged", dataset="nyc", data_dir=folder / "data", seed=42, test_size=4,
                                     registry=get_registry())
    return ensure_tiny_model([prepared.train_path])


def _build(work: Path, name: str, retries: int = 0, **kwargs) -> dict:
    from comapoi_cli.data.build import BuildRequest, build_dataset
    from comapoi_cli.plugins import get_registry
    from comapoi_cli.reporting import Reporter

    out = work / name
    request = BuildRequest(dataset="nyc", train=work / "nyc" / "nyc_train.jsonl", output_dir=out, retries=retries,
                           overwrite=True, **kwargs)
    result = build_dataset(request, get_registry(), Reporter())
    record = json.loads((out / "build.json").read_text())
    return {"row": name, "teacher": request.teacher, "batch_size": request.batch_size, "trajectories": result.processed,
            "built": result.built, "rejected": result.rejected, "teacher_s": record["teacher_seconds_this_run"],
            "samples_per_s": record["samples_per_s_this_run"], "asks": record["counts"]["asks"],
            "asks_per_s": record["asks_per_s_this_run"], "run_s": round(result.seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-build-"))
    os.environ.setdefault("COMAPOI_CACHE", str(work / "cache"))
    (work / "nyc").mkdir()
    for name in ("nyc_train.jsonl", "nyc_poi_info.csv"):
        shutil.copy(REAL / name, work / "nyc" / name)
    model = args.model or _tiny(work)
    rows = [_build(work, "template", teacher="template")]
    for size in args.batch_sizes:
        rows.append(_build(work, f"transformers-b{size}", teacher="transformers", model=str(model), device="cpu",
                           batch_size=size, limit=args.limit, max_new_tokens=args.max_new_tokens))
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "openai_server.py"), "--base-model", str(model),
                               "--tokenizer", str(model), "--serve-base", "tiny", "--rules", "rules"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("READY"):
            raise SystemExit(f"the test server did not start: {line}{server.stderr.read()}")
        url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        for size in args.batch_sizes:
            rows.append(_build(work, f"openai-tiny-b{size}", teacher="openai", url=url, served_names={"teacher": "tiny"},
                               batch_size=size, limit=args.limit, max_new_tokens=args.max_new_tokens))
        rows.append(_build(work, "openai-rules-b8", retries=1, teacher="openai", url=url, served_names={"teacher": "rules"},
                           batch_size=8))
    finally:
        server.kill()
        server.wait()
    import torch
    import transformers

    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "load_average": os.getloadavg(), "rows": rows}
    print(f"{'row':<20} {'traj':>5} {'built':>5} {'asks':>5} {'teacher s':>10} {'samples/s':>10} {'asks/s':>8} {'run s':>8}")
    for row in rows:
        print(f"{row['row']:<20} {row['trajectories']:>5} {row['built']:>5} {row['asks']:>5} {row['teacher_s']:>10} "
              f"{row['samples_per_s']:>10} {row['asks_per_s']:>8} {row['run_s']:>8}")
    print(f"load average {info['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
