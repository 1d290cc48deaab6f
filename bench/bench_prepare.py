"""Benchmark of ``comapoi data prepare --from gowalla`` on a generated Gowalla-sized file.

Writes a Gowalla-format file (tab-separated: user, 2010-10-19T23:55:27Z, lat, lon, location) of
``--rows`` check-ins (default 6,442,892, the size of loc-gowalla_totalCheckins.txt; 107,092 users
and 1.28 million locations with a skewed popularity, 10% of them in California / Nevada), then
times in fresh processes:

1. ``read``: pyarrow's own CSV reader reading the file (``pyarrow.csv.read_csv``, default options:
   multi-threaded, types inferred): what the library takes just to read it;
2. ``prepare``: the whole ``comapoi data prepare`` command (CLI start-up, reading, checks, filters,
   split, ids, trajectories, writing, hashes), with the default settings, and with ``--region ca``.

Each runs ``--repeat`` times; the best wall time and the peak resident memory (ru_maxrss of the
child) are printed as JSON. Usage: ``python bench/bench_prepare.py [--rows N] [--dir DIR]``.
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
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = work / f"gowalla_{args.rows}.txt"
    if not raw.is_file():
        t = time.perf_counter()
        generate(raw, args.rows)
        print(f"generated {raw} ({raw.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "COMAPOI_DATASETS_DIR": str(work / "datasets")}
    results: dict[str, dict[str, float]] = {}

    def measure(name: str, cmd: list[str]) -> None:
        best = None
        for _ in range(args.repeat):
            # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: run each kind in its own process tree
            probe = [sys.executable, "-c", "import resource, subprocess, sys, time; t = time.perf_counter(); "
                     "r = subprocess.run(sys.argv[1:]); "
                     "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
                     "sys.exit(r.returncode)", *cmd]
            done = subprocess.run(probe, capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            wall, rss = done.stdout.strip().splitlines()[-1].split()
            if best is None or float(wall) < best["seconds"]:
                best = {"seconds": round(float(wall), 2), "peak_rss_mb": round(int(rss) / 1024)}
        results[name] = best or {}
        print(name, results[name], file=sys.stderr)

    measure("read (pyarrow.csv.read_csv)", [sys.executable, "-c", READ, str(raw)])
    out = work / "data"
    prepare = [sys.executable, "-m", "comapoi_cli", "data", "prepare", str(raw), "--from", "gowalla",
               "--output-dir", str(out), "--overwrite", "--json"]
    measure("prepare (defaults)", prepare + ["--dataset", "gwall"])
    measure("prepare --region ca", prepare + ["--dataset", "gwca", "--region", "ca"])
    record = json.loads((out / "gwall" / "prepare.json").read_text())
    read = results["read (pyarrow.csv.read_csv)"]["seconds"]
    report = {
        "rows": args.rows, "bytes": raw.stat().st_size, "results": results,
        "ratio_defaults": round(results["prepare (defaults)"]["seconds"] / read, 2),
        "ratio_region_ca": round(results["prepare --region ca"]["seconds"] / read, 2),
        "prepared": record["summary"], "machine": {"cpus": os.cpu_count(), "load": os.getloadavg(),
                                                   "python": platform.python_version(), "platform": platform.platform()},
    }
    import pyarrow

    report["machine"]["pyarrow"] = pyarrow.__version__
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
