"""Benchmark the local engine's decoding on the CPU: padded batches (comapoi's ``generate``) against
transformers' continuous batching (``model.generate_batch``), answers per second.

    .venv/bin/python bench/bench_generate_batch.py [--prompts 32] [--batch-size 8] [--max-new-tokens 16] [--json FILE]

Builds what the tests build (simulated NYC agent data, 24 trajectories, seed 3, 3-6 check-ins;
the tiny random base model of ``--model tiny``), takes the user turns of the agent training
records as prompts (their real lengths, about 500-1300 tokens), and decodes each greedily to
``--max-new-tokens`` both ways on the same loaded model, after one warm-up call each. The tiny
model is random: it rarely stops early, so every answer is about ``--max-new-tokens`` long.
The same answers are expected (greedy); the bench reports how many agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-generate-batch-"))
    os.environ.setdefault("COMAPOI_CACHE", str(work / "cache"))

    import torch
    import transformers
    from comapoi_cli.training.tiny import ensure_tiny_model
    from transformers import GenerationConfig

    from comapoi_cli.data import prepare_training_data
    from comapoi_cli.data.synth import synth_dataset
    from comapoi_cli.models.generation import generate, record_messages, render_prompts
    from comapoi_cli.models.loading import load_model
    from comapoi_cli.plugins import get_registry

    synth_dataset("nyc", work / "data", plain=False, trajectories=24, seed=3, min_checkins=3, max_checkins=6)
    prepared = prepare_training_data(type_="merged", dataset="nyc", data_dir=work / "data", seed=42, test_size=4,
                                     registry=get_registry())
    model_dir = ensure_tiny_model([prepared.train_path])
    loaded = load_model(str(model_dir), device="cpu", quant="none")
    prompts = []
    with open(prepared.train_path, encoding="utf-8") as handle:
        for line in handle:
            messages = record_messages(json.loads(line)) or []
            prompts.append([m for m in messages if m["role"] != "assistant"])
            if len(prompts) == args.prompts:
                break
    ids = render_prompts(loaded.tokenizer, prompts)
    model, tokenizer = loaded.model, loaded.tokenizer
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    def padded() -> list[str]:
        return generate(loaded, ids, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    def continuous() -> list[str]:
        with torch.inference_mode():
            out = model.generate_batch(inputs=[list(x) for x in ids], generation_config=config, progress_bar=False)
        by_id = sorted(out.values(), key=lambda o: int(str(o.request_id).split("_")[-1]))
        return [tokenizer.decode(o.generated_tokens, skip_special_tokens=True).strip() for o in by_id]

    rows = []
    answers = {}
    for name, fn in (("padded batches (generate, default)", padded), ("continuous batching (generate_batch)", continuous)):
        try:
            fn()  # warm-up
            load = os.getloadavg()[0]
            started = time.perf_counter()
            answers[name] = fn()
            seconds = time.perf_counter() - started
            rows.append({"way": name, "prompts": len(ids), "seconds": round(seconds, 2),
                         "answers_per_s": round(len(ids) / seconds, 2), "load_before": round(load, 2)})
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed
            rows.append({"way": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    texts = list(answers.values())
    agree = sum(a == b for a, b in zip(*texts)) if len(texts) == 2 else None
    machine = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
               "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
               "max_new_tokens": args.max_new_tokens, "prompt_tokens": [min(map(len, ids)), max(map(len, ids))],
               "answers_agree": agree}
    print(json.dumps(machine))
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
