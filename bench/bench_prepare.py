"""Benchmark of ``comapoi data prepare --from gowalla`` on a generated Gowalla-sized file.

Writes a Gowalla-format file (tab-separated: user, 2010-10-19T23:55:27Z, lat, lon, location) of
``--rows`` check-ins (default 6,442,892, the size of loc-gowalla_totalCheckins.txt; 107,092 users
and 1.28 million locations with a skewed popularity, 10% of them in California / Nevada), then
times in fresh processes:

1. ``read``: pyarrow's own CSV reader reading the file (``pyarrow.csv.read_csv``, default options:
   multi-threaded, types inferred): what the library takes just to read it;
2. ``prepare``: the whole ``comapoi data prepare`` command (CLI start-up, reading, checks, filters,
   split, ids, trajectories, writing, hashes), with the default settings, and with ``--region ca``.

The machine may be loaded by other jobs, so the commands run in ``--repeat`` rounds, one of each
kind per round, alternating (read, prepare, ...; the next round again), and the JSON gives per kind
the median wall time (the ratios use these), the best, every time, the median CPU time (user +
system of the child) and the peak resident memory (ru_maxrss of the child), plus the load average
before and after. ``--baseline-repo DIR`` adds the default prepare run from another checkout (an
older commit) to every round, for a before/after under the same load.
Usage: ``python bench/bench_prepare.py [--rows N] [--dir DIR] [--repeat N] [--baseline-repo DIR]``.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def generate(path: Path, rows: int, seed: int = 7) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    users = max(1, rows * 107_092 // 6_442_892)
    locations = max(1, rows * 1_280_969 // 6_442_892)
    # skewed popularity: a few users / places hold most check-ins (as in Gowalla)
    user = np.minimum((rng.pareto(1.2, rows) * users / 20).astype(np.int64), users - 1)
    loc = np.minimum((rng.pareto(0.9, rows) * locations / 50).astype(np.int64), locations - 1)
    place_lat = rng.uniform(-40, 60, locations)
    place_lon = rng.uniform(-120, 140, locations)
    california = rng.random(locations) < 0.1
    place_lat[california] = rng.uniform(32.6, 41.9, int(california.sum()))
    place_lon[california] = rng.uniform(-124.3, -114.2, int(california.sum()))
    when = np.int64(1_234_567_890) + rng.integers(0, 600 * 86_400, rows)
    order = np.lexsort((when, user))  # the real file is sorted by user, newest first within a user
    table = pa.table({
        "user": pa.array(user[order]),
        "time": pc.strftime(pa.array(when[order].astype("datetime64[s]")), format="%Y-%m-%dT%H:%M:%SZ"),
        "lat": pa.array(np.round(place_lat[loc[order]], 10)),
        "lon": pa.array(np.round(place_lon[loc[order]], 10)),
        "location": pa.array(loc[order] + 8_904),
    })
    pacsv.write_csv(table, path, write_options=pacsv.WriteOptions(include_header=False, delimiter="\t",
                                                                  quoting_style="none"))


READ = """
import sys, time, pyarrow.csv as c
t = time.perf_counter()
table = c.read_csv(sys.argv[1], read_options=c.ReadOptions(autogenerate_column_names=True),
                   parse_options=c.ParseOptions(delimiter="\\t"))
print(table.num_rows, time.perf_counter() - t)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6_442_892)
    parser.add_argument("--dir", type=Path, default=None, help="Work folder (default: a temporary folder).")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-repo", type=Path, default=None,
                        help="Another checkout whose default prepare also runs in every round (before/after).")
    parser.add_argument("--no-region", action="store_true", help="Leave out the --region ca runs.")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = work / f"gowalla_{args.rows}.txt"
    if not raw.is_file():
        t = time.perf_counter()
        generate(raw, args.rows)
        print(f"generated {raw} ({raw.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    def env_for(repo: Path) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "COMAPOI_DATASETS_DIR": str(work / "datasets")}

    times: dict[str, list[dict[str, float]]] = {}

    def measure(name: str, cmd: list[str], repo: Path = REPO) -> None:
        # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: run each command in its own process tree
        probe = [sys.executable, "-c", "import resource, subprocess, sys, time; t = time.perf_counter(); "
                 "r = subprocess.run(sys.argv[1:]); u = resource.getrusage(resource.RUSAGE_CHILDREN); "
                 "print(time.perf_counter() - t, u.ru_maxrss, u.ru_utime + u.ru_stime); "
                 "sys.exit(r.returncode)", *cmd]
        done = subprocess.run(probe, capture_output=True, text=True, env=env_for(repo))
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        wall, rss, cpu = done.stdout.strip().splitlines()[-1].split()
        run = {"seconds": round(float(wall), 2), "cpu_seconds": round(float(cpu), 2), "peak_rss_mb": round(int(rss) / 1024)}
        times.setdefault(name, []).append(run)
        print(name, run, f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)

    out = work / "data"
    prepare = ["-m", "comapoi_cli", "data", "prepare", str(raw), "--from", "gowalla", "--output-dir", str(out),
               "--overwrite", "--json"]
    load_before = os.getloadavg()
    for _ in range(args.repeat):
        measure("read (pyarrow.csv.read_csv)", [sys.executable, "-c", READ, str(raw)])
        measure("prepare (defaults)", [sys.executable, *prepare, "--dataset", "gwall"])
        if args.baseline_repo is not None:
            measure("baseline prepare (defaults)", [sys.executable, *prepare, "--dataset", "gwbase"],
                    repo=args.baseline_repo.resolve())
        if not args.no_region:
            measure("prepare --region ca", [sys.executable, *prepare, "--dataset", "gwca", "--region", "ca"])

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return round(ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2, 2)

    results = {name: {"seconds": median([r["seconds"] for r in runs]), "best": min(r["seconds"] for r in runs),
                      "all": [r["seconds"] for r in runs], "cpu_seconds": median([r["cpu_seconds"] for r in runs]),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)} for name, runs in times.items()}
    record = json.loads((out / "gwall" / "prepare.json").read_text())
    read = results["read (pyarrow.csv.read_csv)"]
    report: dict[str, Any] = {"rows": args.rows, "bytes": raw.stat().st_size, "rounds": args.repeat, "results": results}
    for name, key in (("prepare (defaults)", "defaults"), ("baseline prepare (defaults)", "baseline_defaults"),
                      ("prepare --region ca", "region_ca")):
        if name in results:
            report[f"ratio_{key}"] = round(results[name]["seconds"] / read["seconds"], 2)
            report[f"cpu_ratio_{key}"] = round(results[name]["cpu_seconds"] / read["cpu_seconds"], 2)
    if args.baseline_repo is not None:
        same = all((out / "gwall" / f.name.replace("gwbase", "gwall")).read_bytes() == f.read_bytes()
                   for f in sorted((out / "gwbase").glob("gwbase_*")))
        report["baseline_outputs_identical"] = same
    report["prepared"] = record["summary"]
    report["machine"] = {"cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
                         "python": platform.python_version(), "platform": platform.platform()}
    import pyarrow

    report["machine"]["pyarrow"] = pyarrow.__version__
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
