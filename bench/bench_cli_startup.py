"""How long `comapoi --help` (and sub-command --help) takes, and what it imports.

    .venv/bin/python bench/bench_cli_startup.py [--runs 20]
    .venv/bin/python bench/bench_cli_startup.py --ratio [--runs 30] [--other CHECKOUT]

``--ratio``: `comapoi --help` against a bare Typer + Rich app with the same number of commands (the
floor any Typer CLI of that size pays), run alternately in one process so both see the same machine
load; prints both medians and their ratio (target: at most 1.1). ``--other CHECKOUT`` adds a third
command to the alternation: ``comapoi --help`` of another checkout (e.g. the main branch), so a change
is compared with what it changes under the same load.

Reports, per command: median / min / max wall time of the whole process (interpreter start
included) over N runs, and the import time of comapoi's CLI measured with `python -X importtime`.
Target: `comapoi --help` under 0.3 s on the 2-core CI machine, with no torch import.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["train", "--help"], ["data", "clean", "--help"], ["plugins", "list", "--help"]]
HEAVY = ("torch", "transformers", "trl", "datasets", "peft")


def wall_times(args: list[str], runs: int) -> list[float]:
    return median_of([sys.executable, "-m", "comapoi_cli", *args], runs)


def import_profile(args: list[str]) -> tuple[float, list[str]]:
    """Cumulative import time of comapoi_cli.cli.app (seconds) and any heavy package imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "comapoi_cli", *args],
                            capture_output=True, text=True, check=True)
    app_us, heavy = 0, []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        if name == "comapoi_cli.cli.app":
            app_us = int(cumulative)
        if name.split(".")[0] in HEAVY:
            heavy.append(name)
    return app_us / 1e6, heavy


#: The floor any Typer + Rich CLI pays: a two-command app with Rich help, nothing else.
MINIMAL_TYPER_APP = """
import typer
app = typer.Typer(rich_markup_mode="rich")
@app.command()
def first(x: int = 1):
    "First."
@app.command()
def second(y: int = 1):
    "Second."
app()
"""


#: As on a user's machine: Python writes and reuses bytecode (a PYTHONDONTWRITEBYTECODE=1 environment
#: would recompile every comapoi module on every start, while typer and rich come precompiled by pip).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def median_of(argv: list[str], runs: int, cwd: str | None = None, env: dict[str, str] | None = None) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env or ENV, cwd=cwd)
        times.append(time.perf_counter() - start)
    return times


def bare_app(commands: int) -> str:
    """A Typer + Rich app with ``commands`` commands, each with one option and a one-line help."""
    lines = ["import typer", 'app = typer.Typer(rich_markup_mode="rich")']
    for i in range(commands):
        lines += [f'@app.command("c{i}")', f"def c{i}(x: int = 1):", f'    "Command {i}: one line of help."']
    return "\n".join([*lines, "app()"])


def ratio(runs: int, other: str | None = None) -> None:
    import tempfile

    from comapoi_cli.cli.app import COMMANDS

    baseline = [sys.executable, "-c", bare_app(len(COMMANDS)), "--help"]
    comapoi = [sys.executable, "-m", "comapoi_cli", "--help"]
    # each comapoi its own entry-point cache (COMAPOI_CACHE_DIR), as one user's machine has: on a machine
    # shared with other checkouts and test runs, each with its own sys.path, one cache file keeps being replaced
    caches = tempfile.TemporaryDirectory()
    ours_env = {**ENV, "COMAPOI_CACHE_DIR": os.path.join(caches.name, "ours")}
    other_env = None
    if other:  # the other checkout's comapoi_cli first on sys.path (cwd, as -m puts it first)
        other_env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [other, ENV.get("PYTHONPATH", "")])),
                     "COMAPOI_CACHE_DIR": os.path.join(caches.name, "other")}
    median_of(baseline, 2)  # warm the page cache, the bytecode cache and the entry-point caches
    median_of(comapoi, 2, env=ours_env)
    if other:
        median_of(comapoi, 2, cwd=other, env=other_env)
    base_times, comapoi_times, other_times = [], [], []
    for _ in range(runs):  # alternate, so that all see the same load
        base_times += median_of(baseline, 1)
        comapoi_times += median_of(comapoi, 1, env=ours_env)
        if other:
            other_times += median_of(comapoi, 1, cwd=other, env=other_env)
    caches.cleanup()
    base, ours = statistics.median(base_times), statistics.median(comapoi_times)
    print(f"bare Typer + Rich app, {len(COMMANDS)} commands, --help: median {base:.3f} s (min {min(base_times):.3f})")
    print(f"comapoi --help ({len(COMMANDS)} commands):             median {ours:.3f} s (min {min(comapoi_times):.3f})")
    print(f"ratio (medians): {ours / base:.3f}; ratio (minimums): {min(comapoi_times) / min(base_times):.3f}; runs {runs}")
    if other:
        theirs = statistics.median(other_times)
        print(f"comapoi --help of {other}: median {theirs:.3f} s (min {min(other_times):.3f}); ratio (medians) "
              f"{theirs / base:.3f}; ratio (minimums) {min(other_times) / min(base_times):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ratio", action="store_true", help="comapoi --help against a bare Typer app of the same size")
    parser.add_argument("--other", help="with --ratio: also time comapoi --help of this other checkout (its folder)")
    args = parser.parse_args()
    if args.ratio:
        ratio(args.runs, args.other)
        return
    wall_times(["--help"], 2)  # warm the page cache and the bytecode cache
    python_only = median_of([sys.executable, "-c", "pass"], args.runs)
    print(f"bare interpreter start: median {statistics.median(python_only):.3f} s")
    typer_floor = median_of([sys.executable, "-c", MINIMAL_TYPER_APP, "--help"], args.runs)
    print(f"minimal Typer app with Rich help (the floor of any Typer CLI), --help: median "
          f"{statistics.median(typer_floor):.3f} s, min {min(typer_floor):.3f} s")
    print("| command | median s | min s | max s | import of comapoi_cli.cli.app s | heavy imports |")
    print("|---|---|---|---|---|---|")
    for command in COMMANDS:
        times = wall_times(command, args.runs)
        app_s, heavy = import_profile(command)
        print(f"| `comapoi {' '.join(command)}` | {statistics.median(times):.3f} | {min(times):.3f} | "
              f"{max(times):.3f} | {app_s:.3f} | {', '.join(heavy) or 'none'} |")


if __name__ == "__main__":
    main()
