"""Benchmark the ``openai`` engine's scheduling against a simulated server: trajectories per second.

    .venv/bin/python bench/bench_engine.py [--trajectories 480] [--concurrency 64] [--workers 8]
        [--median-ms 40] [--p99-ratio 10] [--server-cap 256] [--json FILE]

A real OpenAI-compatible HTTP server runs on 127.0.0.1 in a child process (loopback only;
asyncio, HTTP/1.1 keep-alive). It serves ``agent1``, ``agent2``, ``agent3`` and answers each chat
completion after a simulated latency drawn from a lognormal distribution (median ``--median-ms``,
p99 = ``--p99-ratio`` x the median, seeded), working on at most ``--server-cap`` requests at once
(a GPU's batch; the others queue). The answer is a fixed, parseable next-POI list.

The client side is comapoi's own: the real roles build every prompt (agent1 profile + candidates,
agent2 pattern + candidates, agent3 ranking: 5 requests per trajectory) from the real nyc test
trajectories of ``../shared/data/real/`` (repeated to ``--trajectories``), the real retriever,
the ``openai`` engine's HTTP client, and the scheduler of :mod:`comapoi_cli.pipeline.scheduler`.
Compared, in one run, on the same server:

- ``ideal``: concurrency / (steps per trajectory x mean latency), with the mean of the latencies
  the server actually drew;
- ``concurrent``: the new scheduler, ``--concurrency`` requests in flight, each trajectory moving
  on as soon as its answer arrives (``pipeline run --engine openai``);
- ``lockstep``: the old way, batches of ``--concurrency`` trajectories, each step of a batch in
  parallel, the next step after the batch's slowest answer (``--scheduler lockstep``);
- ``comapoi``: CoMaPOI's own pattern, ``--workers`` worker processes, each running its
  trajectories one after another and each trajectory's steps one after another.

Each row gives the whole run's trajectories/s (ramp-up and the drain of the last, long-tailed
trajectories included: with few trajectories per slot the drain weighs) and this process's CPU
time per request (the client's cost: prompts, retrieval, HTTP, parsing), which bounds the rate
a loaded machine can reach.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import heapq
import json
import math
import multiprocessing
import os
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL = REPO.parent / "shared" / "data" / "real"
NAMES = ("agent1", "agent2", "agent3")
TEACHER = "teacher"
ANSWER = json.dumps({"next_poi_id": [1, 2, 3, 4, 5]})
PROFILE = "The user keeps to a few familiar places and moves between them, mostly in the evening."


def teacher_answer(request: dict[str, Any]) -> str:
    """``data build``'s teacher by rules (an answer the roles accept at the first try): a fixed text for
    the text asks; for a list ask the label, then the trajectory's POIs and the ids 1..59."""
    prompt = next((m["content"] for m in request.get("messages", []) if m.get("role") == "user"), "")
    if "comma-separated ids only" not in prompt:
        return PROFILE
    label = re.search(r"True Next POI Information.*?POI ID (\d+)", prompt, re.S)
    truth = int(label.group(1)) if label else None
    pool = [int(x) for x in re.findall(r"POI ID (\d+) \(", prompt)] + list(range(1, 60))
    if "least likely" in prompt:
        ids = [i for i in dict.fromkeys(reversed(pool)) if i != truth][:20]
    else:
        ids = list(dict.fromkeys(([truth] if truth is not None else []) + pool))[:25]
    return ", ".join(map(str, ids))


# -- the simulated server (child process) ----------------------------------------------------------------


def serve(median_ms: float, p99_ratio: float, cap: int, seed: int) -> None:
    sigma = math.log(p99_ratio) / 2.3263  # p99 of a lognormal = median * exp(2.3263 sigma)
    rng = random.Random(seed)
    drawn: list[float] = []
    since = [time.process_time()]  # the server's own CPU time since the last /stats
    models = json.dumps({"object": "list", "data": [{"id": n, "object": "model"} for n in (*NAMES, TEACHER)]}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: asyncio.Semaphore) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if method == "GET" and path.startswith("/v1/models"):
                    data = models
                elif method == "GET" and path.startswith("/stats"):
                    cpu = time.process_time()
                    data = json.dumps({"n": len(drawn), "mean_s": sum(drawn) / len(drawn) if drawn else None,
                                       "cpu_s": cpu - since[0]}).encode()
                    drawn.clear()
                    since[0] = cpu
                else:
                    request = json.loads(body)
                    latency = median_ms / 1000 * math.exp(rng.gauss(0.0, sigma))
                    async with gate:
                        await asyncio.sleep(latency)
                    drawn.append(latency)
                    content = teacher_answer(request) if request.get("model") == TEACHER else ANSWER
                    data = json.dumps({"id": "x", "object": "chat.completion", "model": request.get("model"),
                                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                    "finish_reason": "stop"}],
                                       "usage": {"prompt_tokens": 100, "completion_tokens": 10}}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(data)).encode() + b"\r\n\r\n" + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        gate = asyncio.Semaphore(cap)
        server = await asyncio.start_server(lambda r, w: handle(r, w, gate), "127.0.0.1", 0, backlog=1024)
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- the bound: a scheduler that costs nothing -------------------------------------------------------------


def zero_cost_bound(trajectories: int, concurrency: int, steps: int, median_ms: float, p99_ratio: float, seed: int) -> float:
    """The share of ideal that a scheduler with no cost at all reaches on a run of this length (an event
    simulation: the same latency distribution, ``concurrency`` slots, a free slot to the earliest
    trajectory waiting). Below 1 only because a finite run ramps up and drains: its last trajectories
    finish alone, each after the sum of its own long-tailed latencies."""
    sigma = math.log(p99_ratio) / 2.3263
    rng = random.Random(seed)
    waiting = [(i, 0) for i in range(trajectories)]
    heapq.heapify(waiting)
    running: list[tuple[float, int, int]] = []
    now, drawn = 0.0, []
    while waiting or running:
        while waiting and len(running) < concurrency:
            index, step = heapq.heappop(waiting)
            latency = median_ms / 1000 * math.exp(rng.gauss(0.0, sigma))
            drawn.append(latency)
            heapq.heappush(running, (now + latency, index, step))
        now, index, step = heapq.heappop(running)
        if step + 1 < steps:
            heapq.heappush(waiting, (index, step + 1))
    ideal = concurrency / (steps * sum(drawn) / len(drawn))
    return trajectories / now / ideal


# -- the client ---------------------------------------------------------------------------------------------


def build_plan(trajectories: int) -> tuple[Any, list[Any]]:
    from comapoi_cli.chain import ChainContext
    from comapoi_cli.data.chain_inputs import load_inputs
    from comapoi_cli.pipeline.runner import chain_order
    from comapoi_cli.pipeline.scheduler import ChainPlan
    from comapoi_cli.plugins import get_registry
    from comapoi_cli.presets import preset_for
    from comapoi_cli.retrievers import RetrievalIndex

    registry = get_registry()
    preset = preset_for("nyc")
    inputs = load_inputs("nyc", preset.max_poi_id, preset.coord_decimals, REAL / "nyc_test.jsonl",
                         REAL / "nyc_poi_info.csv", REAL / "nyc_train.jsonl")
    retriever = registry.retriever("transitions")
    retriever.prepare(RetrievalIndex(world=inputs.world, train=inputs.train, histories=inputs.histories,
                                     max_poi_id=preset.max_poi_id))
    labels = dict(inputs.labels)
    items = []
    for n in range(trajectories):
        base = inputs.items[n % len(inputs.items)]
        key = f"{base.key}#{n}"
        labels[key] = inputs.labels[base.key]
        # a trajectory of its own (not the repeated one's object), so that nothing one trajectory's
        # steps cache (formatted check-ins) serves another: as in a real test file, every line is new
        items.append(replace(base, key=key, line=n + 1, trajectory=copy.deepcopy(base.trajectory)))
    context = ChainContext(dataset="nyc", max_poi_id=preset.max_poi_id, world=inputs.world)
    plan = ChainPlan(chain=chain_order(registry, list(NAMES)), role_adapters={n: n for n in NAMES}, context=context,
                     labels=labels, retriever=retriever, max_new_tokens=256)
    return plan, items


def open_session(url: str, concurrency: int, batch_size: int) -> Any:
    from comapoi_cli.default_plugins.pipeline_engines import OpenAIEngine
    from comapoi_cli.engines import EngineSpec
    from comapoi_cli.reporting import Reporter

    spec = EngineSpec(base_model=None, adapters={n: Path(".") for n in NAMES}, role_adapters={n: n for n in NAMES},
                      url=url, batch_size=batch_size, concurrency=concurrency, timeout_s=60, retries=0)
    return OpenAIEngine().open(spec, Reporter())


def stats(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url.replace("/v1", "") + "/stats", timeout=10) as response:  # noqa: S310 - loopback
        return json.loads(response.read())


def check(lines: list[dict[str, Any]], count: int) -> None:
    misses = sum(len(line["problems"]) for line in lines)
    if len(lines) != count or misses:
        raise SystemExit(f"benchmark run broken: {len(lines)} lines of {count}, {misses} misses")


def run_concurrent(url: str, plan: Any, items: list[Any], concurrency: int) -> float:
    from comapoi_cli.pipeline.scheduler import run_concurrent as schedule

    session = open_session(url, concurrency, concurrency)
    lines: list[dict[str, Any]] = []
    started = time.perf_counter()
    schedule(items, plan, session, concurrency=concurrency, emit=lines.extend, progress=lambda *a: None)
    seconds = time.perf_counter() - started
    check(lines, len(items))
    return seconds


def run_lockstep(url: str, plan: Any, items: list[Any], batch_size: int) -> float:
    from comapoi_cli.pipeline.scheduler import run_lockstep as schedule

    session = open_session(url, batch_size, batch_size)
    batches = [(i // batch_size, items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    lines: list[dict[str, Any]] = []
    started = time.perf_counter()
    schedule(batches, plan, session, emit=lines.extend, progress=lambda *a: None)
    seconds = time.perf_counter() - started
    session.close()
    check(lines, len(items))
    return seconds


def run_build(url: str, trajectories: int, concurrency: int, work: Path) -> tuple[float, int]:
    """``data build`` (the real ``build_dataset``, teacher ``openai``) on ``trajectories`` simulated nyc
    training trajectories: the teacher pass's seconds and the asks it made."""
    from comapoi_cli.data.build import BuildRequest, build_dataset
    from comapoi_cli.data.synth import synth_dataset
    from comapoi_cli.plugins import get_registry

    registry = get_registry()
    data = work / "data"
    if not (data / "nyc" / "nyc_train.jsonl").exists():
        synth_dataset("nyc", data, trajectories=trajectories, seed=0, min_checkins=4, max_checkins=8, registry=registry)
    request = BuildRequest(dataset="nyc", train=data / "nyc" / "nyc_train.jsonl", teacher="openai", url=url,
                           served_names={"teacher": TEACHER}, output_dir=work / f"build-{concurrency}", overwrite=True,
                           retries=0, concurrency=concurrency)
    build_dataset(request, registry)
    record = json.loads((request.output_dir / "build.json").read_text())
    if record["counts"]["rejected"] or record["counts"]["built"] != trajectories:
        raise SystemExit(f"benchmark build broken: {record['counts']}")
    return float(record["teacher_seconds_this_run"]), int(record["counts"]["asks"])


_WORKER: dict[str, Any] = {}


def _worker_run(args: tuple[str, list[int]]) -> list[dict[str, Any]]:
    """One CoMaPOI-style worker: its trajectories one after another, each one's steps one after another."""
    from comapoi_cli.pipeline.scheduler import chain_one

    url, indices = args
    plan, items = _WORKER["plan"], _WORKER["items"]
    session = open_session(url, 1, 1)

    async def sequential() -> list[dict[str, Any]]:
        try:
            return [await chain_one(items[i], plan, session.agenerate) for i in indices]
        finally:
            await session.aclose()

    return asyncio.run(sequential())


def run_workers(url: str, plan: Any, items: list[Any], workers: int) -> float:
    _WORKER.update(plan=plan, items=items)
    shares = [(url, list(range(w, len(items), workers))) for w in range(workers)]
    context = multiprocessing.get_context("fork")
    with context.Pool(workers) as pool:
        pool.map(_worker_run, [(url, [0])] * workers)  # start-up (imports, first connection) not timed
        started = time.perf_counter()
        results = pool.map(_worker_run, shares)
        seconds = time.perf_counter() - started
    check([line for share in results for line in share], len(items))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=480)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--median-ms", type=float, default=40.0)
    parser.add_argument("--p99-ratio", type=float, default=10.0)
    parser.add_argument("--server-cap", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", default=["concurrent", "lockstep", "comapoi", "build"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.median_ms, args.p99_ratio, args.server_cap, args.seed)
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--median-ms", str(args.median_ms), "--p99-ratio",
                               str(args.p99_ratio), "--server-cap", str(args.server_cap), "--seed", str(args.seed)],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline() if server.stdout else ""
        url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        plan, items = build_plan(args.trajectories)
        steps = len(plan.steps())
        run_concurrent(url, plan, items[:32], 16)  # warm-up: imports, first connections, the retriever's caches
        stats(url)
        rows = []
        for name in args.only:
            load = os.getloadavg()[0]
            cpu = time.process_time()
            if name == "concurrent":
                seconds = run_concurrent(url, plan, items, args.concurrency)
                how = f"{args.concurrency} in flight"
            elif name == "lockstep":
                seconds = run_lockstep(url, plan, items, args.concurrency)
                how = f"batches of {args.concurrency}"
            elif name == "build":
                import tempfile

                with tempfile.TemporaryDirectory(prefix="bench-engine-build-") as work:
                    seconds, asks = run_build(url, len(items), args.concurrency, Path(work))
                how = f"data build, {args.concurrency} in flight, {asks / len(items):.2f} asks per trajectory"
            else:
                seconds = run_workers(url, plan, items, args.workers)
                how = f"{args.workers} worker processes"
            cpu = time.process_time() - cpu  # this process only (the comapoi workers' CPU is theirs)
            drawn = stats(url)
            per_item = asks / len(items) if name == "build" else steps
            ideal = args.concurrency / (per_item * drawn["mean_s"])
            rows.append({"scheduler": name, "how": how, "trajectories": len(items), "seconds": round(seconds, 3),
                         "traj_per_s": round(len(items) / seconds, 2), "mean_latency_ms": round(drawn["mean_s"] * 1000, 1),
                         "ideal_traj_per_s": round(ideal, 2), "of_ideal": round(len(items) / seconds / ideal, 3),
                         "load_before": round(load, 2),
                         "client_cpu_ms_per_request": round(1000 * cpu / (len(items) * per_item), 2) if name != "comapoi" else None,
                         "server_cpu_ms_per_request": round(1000 * drawn["cpu_s"] / drawn["n"], 2)})
    finally:
        server.kill()
        server.wait()
    import httpx2

    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
               "httpx2": httpx2.__version__, "steps": steps, "median_ms": args.median_ms, "p99_ratio": args.p99_ratio,
               "server_cap": args.server_cap}
    bounds = [round(zero_cost_bound(len(items), args.concurrency, steps, args.median_ms, args.p99_ratio, seed), 3)
              for seed in range(5)]
    machine["zero_cost_bound"] = bounds
    print(json.dumps(machine))
    print(f"a scheduler that costs nothing would reach {min(bounds)}-{max(bounds)} of ideal on {len(items)} trajectories "
          f"(5 simulated runs)")
    print("| scheduler | how | trajectories | seconds | traj/s | server mean latency | ideal traj/s | of ideal "
          "| client CPU per request | server CPU per request | load before |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cpu_text = "-" if row["client_cpu_ms_per_request"] is None else f"{row['client_cpu_ms_per_request']} ms"
        print(f"| {row['scheduler']} | {row['how']} | {row['trajectories']} | {row['seconds']} | {row['traj_per_s']} | "
              f"{row['mean_latency_ms']} ms | {row['ideal_traj_per_s']} | {row['of_ideal']} | {cpu_text} | "
              f"{row['server_cpu_ms_per_request']} ms | {row['load_before']} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
