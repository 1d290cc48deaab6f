"""GPU training benchmark: the original recipe, Unsloth as usually run, and comapoi's two backends.

    python bench/bench_gpu_train.py --preset qwen2.5-7b                 # the H100 table (defaults below)
    python bench/bench_gpu_train.py --preset tiny --steps 3 --warmup 1  # proves the script on a CPU in seconds

What it does, in one run:

1. Makes CoMaPOI-shaped data with ``comapoi data synth`` (a simulated city; agent1/2/3 records
   in the real length mix) under ``--scratch``.
2. Builds a randomly initialised model of a real architecture (``--preset``: Qwen2.5-0.5B/1.5B/7B,
   Llama-3.1-8B shapes, or ``tiny``) with a byte-level BPE tokenizer trained on that data (digits
   split one by one, as Qwen's), and saves it with ``save_pretrained``, so that 4-bit loading and
   Unsloth's loader read it from disk like a real checkpoint. Cached in the scratch folder.
3. Runs each configuration in its own process (Unsloth patches transformers on import):

   - ``original``: the original script's recipe: transformers + bitsandbytes 4-bit NF4 (double
     quantisation, fp16 compute), ``prepare_model_for_kbit_training`` with gradient checkpointing,
     LoRA r8/alpha16/dropout 0.1 on the seven projections, batches padded to the longest record,
     loss on every token, NEFTune alpha 5, AdamW lr 1e-4.
   - ``unsloth``: Unsloth as usually run: FastLanguageModel 4-bit, ``use_gradient_checkpointing="unsloth"``,
     LoRA r8/alpha16/dropout 0, padded batches, loss on every token.
   - ``comapoi-trl`` / ``comapoi-unsloth``: the real CLI, ``comapoi train --backend trl|unsloth``
     with nothing but the shape options (model, data, steps, batch, sequence length, bf16), i.e.
     what ``comapoi train`` does by default on this machine. ``--trl-args`` / ``--unsloth-args``
     append flags (to compare levers), and ``--variant`` adds more rows.

4. Reports per configuration: real (non-padding) tokens/s, median step time, peak memory (CUDA
   allocated; peak RSS on a CPU), MFU = 4 x matmul parameters x real tokens/s / ``--peak-flops``,
   and the loss at every step. A Markdown table goes to stdout (and ``--markdown FILE``), every
   measured number to ``--json FILE``. Step times exclude the first ``--warmup`` steps.

The two hand-written loops (``original``, ``unsloth``) time forward + backward + optimiser step
with CUDA synchronised on both sides; the ``comapoi-*`` rows come from the run's own per-step
log (``run.json``), so they include everything ``comapoi train`` does per step.

A configuration that needs a missing package (Unsloth, bitsandbytes) or runs out of memory is a
row with its reason, not a crash. ``--python-unsloth`` runs the Unsloth rows with another
interpreter (e.g. ``.venv-unsloth/bin/python``), since Unsloth needs its own dependency set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("original", "unsloth", "comapoi-trl", "comapoi-unsloth")
#: dense bf16 matmul throughput of an H100 SXM as measured on the GPU machine (../shared/gpu/README.md)
H100_BF16_PEAK = 790e12
DATASET = "bench"

#: Model shapes. ``tiny`` takes its vocabulary from the tokenizer; the others are the real models'.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"architecture": "qwen2", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": None, "tie_word_embeddings": True},
    "qwen2.5-0.5b": {"architecture": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-1.5b": {"architecture": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-7b": {"architecture": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False},
    "llama3.1-8b": {"architecture": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                    "tie_word_embeddings": False, "rope_theta": 500000.0},
}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# shared helpers (driver and workers)
# ---------------------------------------------------------------------------------------------
def matmul_params(config: dict[str, Any]) -> int:
    """Parameters that take part in a matmul per token: every projection of every block, and the LM head.

    Embedding look-ups and norms are not matmuls; the LM head counts even when tied. Attention's
    score/value products (which grow with the sequence) are left out, as in the usual 6N / 4N rule.
    """
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * h * inter
    return layers * (attention + mlp) + config["vocab_size"] * h


def mfu(tokens_per_s: float | None, n_matmul: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation of LoRA training with frozen weights: 4 N FLOPs per token (2N forward, 2N backward)."""
    if not tokens_per_s or not peak_flops:
        return None
    return 4 * n_matmul * tokens_per_s / peak_flops


def measure_matmul_peak(size: int = 8192, repeats: int = 20) -> float:
    """The bf16 matmul rate this GPU reaches (FLOP/s, best of three timings of ``repeats`` square GEMMs)."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 * repeats / best


def summarise(steps: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Throughput and step time over the steps after ``warmup`` (all steps when there are no more)."""
    timed = [s for s in steps if s.get("time_s")]
    measured = timed[warmup:] if len(timed) > warmup else timed
    if not measured:
        return {"tokens_per_s": None, "step_s_median": None, "measured_steps": 0}
    tokens = sum(s["tokens"] for s in measured)
    seconds = sum(s["time_s"] for s in measured)
    return {
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "step_s_median": statistics.median(s["time_s"] for s in measured),
        "tokens_per_step_mean": tokens / len(measured),
        "measured_steps": len(measured),
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth-zoo",
                 "liger-kernel", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _device_report() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"kind": "cuda", "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda}
    return {"kind": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def _peak_memory_gib() -> tuple[float, str]:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda-allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu-peak-rss"


# ---------------------------------------------------------------------------------------------
# data and model (driver)
# ---------------------------------------------------------------------------------------------
def comapoi_cmd(python: str) -> list[str]:
    return [python, "-m", "comapoi_cli"]


def child_env(*paths: Path | str) -> dict[str, str]:
    """This environment with ``paths`` and the checkout first on PYTHONPATH (comapoi need not be installed)."""
    parts = [str(p) for p in paths] + [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts)}


def unsloth_plugin_site(python: str, scratch: Path, log) -> tuple[Path | None, str | None]:
    """Make ``comapoi train --backend unsloth`` available to ``python``: (extra PYTHONPATH entry, problem).

    Where the plugin is not installed (the GPU machine runs comapoi from the checkout), it is
    installed without dependencies into ``scratch/plugin-site`` (its entry point comes with it).
    """
    probe = ("import sys; from comapoi_cli.plugins import build_registry; "
             "sys.exit(0 if 'unsloth' in build_registry().backends else 3)")
    if subprocess.run([python, "-c", probe], env=child_env(), capture_output=True).returncode == 0:
        return None, None
    site = scratch / "plugin-site"
    if subprocess.run([python, "-c", probe], env=child_env(site), capture_output=True).returncode == 0:
        return site, None
    cmd = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
           "--upgrade", "--target", str(site), str(REPO / "plugins" / "comapoi-unsloth")]
    log(f"$ {shlex.join(cmd)}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return None, f"could not install plugins/comapoi-unsloth for {python}: {(result.stderr or result.stdout).strip()[-300:]}"
    return site, None


def make_data(scratch: Path, trajectories: int, seed: int, log) -> Path:
    """``comapoi data synth`` into ``scratch/data/bench`` (a simulated NYC); reused when present."""
    folder = scratch / "data" / DATASET
    marker = folder / f".bench-synth-{trajectories}-{seed}"
    if marker.is_file():
        return folder
    cmd = [*comapoi_cmd(sys.executable), "data", "synth", "--dataset", DATASET, "--preset", "nyc",
           "--out", str(scratch / "data"), "--trajectories", str(trajectories), "--seed", str(seed)]
    log(f"$ {shlex.join(cmd)}")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"comapoi data synth failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    marker.write_text("ok\n")
    return folder


def agent_files(data: Path) -> list[Path]:
    return [data / f"agent{i}_train_samples.jsonl" for i in (1, 2, 3)]


def read_records(data: Path, seed: int) -> list[dict[str, Any]]:
    """All agent1/2/3 records, shuffled with ``seed`` (the original merges then shuffles)."""
    records = []
    for path in agent_files(data):
        with open(path, encoding="utf-8") as handle:
            records.extend(json.loads(line) for line in handle if line.strip())
    random.Random(seed).shuffle(records)
    return records


def build_model(preset: str, data: Path, scratch: Path, log) -> tuple[Path, dict[str, Any]]:
    """A randomly initialised model of ``preset``'s shape and a tokenizer trained on ``data``, saved once."""
    shape = dict(PRESETS[preset])
    import hashlib

    key = hashlib.sha256(json.dumps([preset, shape, [p.stat().st_size for p in agent_files(data)]],
                                    sort_keys=True).encode()).hexdigest()[:12]
    folder = scratch / "models" / f"{preset}-{key}"
    marker = folder / "bench_model.json"
    if marker.is_file():
        return folder, json.loads(marker.read_text())["config"]

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from comapoi_cli.models.tiny import IM_END, PAD_TOKEN, ensure_tiny_model

    started = time.perf_counter()
    # the tiny model's tokenizer: byte-level BPE trained on this data, Qwen's split rule, ChatML template
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(agent_files(data), cache=scratch / "cache"))
    architecture = shape.pop("architecture")
    if shape["vocab_size"] is None:
        shape["vocab_size"] = -(-len(tokenizer) // 64) * 64
    config = AutoConfig.for_model(
        architecture, **shape, max_position_embeddings=32768, rms_norm_eps=1e-6,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END), pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        bos_token_id=None, use_cache=True,
    )
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="5GB")
    tokenizer.save_pretrained(tmp)
    del model
    if cuda:
        torch.cuda.empty_cache()
    saved = config.to_dict()
    (tmp / "bench_model.json").write_text(json.dumps({"preset": preset, "config": saved}, indent=1))
    tmp.rename(folder)
    log(f"built {preset} ({_count(matmul_params(saved))} matmul parameters) in {time.perf_counter() - started:.0f} s: {folder}")
    return folder, saved


# ---------------------------------------------------------------------------------------------
# workers: the two hand-written recipes
# ---------------------------------------------------------------------------------------------
def _batches(records: list[dict[str, Any]], tokenizer, batch_size: int, seq_length: int, count: int):
    """Padded-to-longest batches of whole conversations (labels on every real token), truncated at ``seq_length``."""
    import torch

    pad = tokenizer.pad_token_id
    encoded = []
    for record in records:
        ids = tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        encoded.append(list(ids)[:seq_length])
        if len(encoded) >= batch_size * count:
            break
    while len(encoded) < batch_size * count:  # cycle the data for long runs
        encoded.extend(encoded[: batch_size * count - len(encoded)])
    for start in range(0, batch_size * count, batch_size):
        rows = encoded[start:start + batch_size]
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        yield input_ids, mask, labels


def _neftune(model, alpha: float) -> None:
    """NEFTune noise on the input embeddings while training (the original always used alpha 5)."""
    import torch

    def hook(module, args, output):
        if module.training:
            dims = output.size(1) * output.size(2)
            magnitude = alpha / math.sqrt(dims)
            output = output + torch.zeros_like(output).uniform_(-magnitude, magnitude)
        return output

    model.get_input_embeddings().register_forward_hook(hook)


def run_recipe(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    config = spec["config"]
    knobs = spec["knobs"]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    quant = knobs.get("quant", "4bit")
    checkpointing = knobs.get("gc", "on")
    lora = {"r": int(knobs.get("lora_r", 8)), "lora_alpha": int(knobs.get("lora_alpha", 16))}
    batch_size, seq_length = int(knobs.get("batch", spec["batch_size"])), spec["seq_length"]
    total = spec["warmup"] + spec["steps"]

    if config == "unsloth":
        from unsloth import FastLanguageModel  # first: it patches transformers

        model, tokenizer = FastLanguageModel.from_pretrained(
            spec["model"], max_seq_length=seq_length, load_in_4bit=quant == "4bit",
            dtype=torch.bfloat16 if bf16 else (torch.float16 if cuda else torch.float32))
        model = FastLanguageModel.get_peft_model(
            model, target_modules=SEVEN, lora_dropout=0.0, bias="none", random_state=0,
            use_gradient_checkpointing={"on": "unsloth", "unsloth": "unsloth", "off": False, "torch": True}[checkpointing],
            **lora)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        kwargs: dict[str, Any] = {"device_map": {"": device}}
        if quant == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float16 if cuda else torch.float32)  # the original: fp16 even with --bf16
        else:
            kwargs["dtype"] = torch.bfloat16 if bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs)
        if quant == "4bit":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing != "off")
        elif checkpointing != "off":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=SEVEN, lora_dropout=0.1,
                                                 bias="none", **lora))
        _neftune(model, 5.0)
    model.train()
    if config == "unsloth":
        compute = "bf16" if bf16 else ("fp16" if cuda else "fp32")
    else:  # bitsandbytes computes in fp16 (the original's choice) inside a bf16 autocast (its --bf16)
        compute = ("fp16" if cuda else "fp32") if quant == "4bit" else ("bf16" if bf16 else "fp32")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    records = read_records(Path(spec["data"]), spec["seed"])
    steps = []
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16 and config == "original")
    for step, (input_ids, mask, labels) in enumerate(_batches(records, tokenizer, batch_size, seq_length, total), 1):
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast:
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        steps.append({"step": step, "time_s": time.perf_counter() - started, "tokens": int(mask.sum()),
                      "padded_tokens": int(mask.numel()), "loss": float(loss.detach())})
        print(f"[{config}] step {step}/{total} loss {steps[-1]['loss']:.4f} {steps[-1]['time_s']:.3f} s", flush=True)
    peak, kind = _peak_memory_gib()
    return {"steps": steps, "peak_memory_gib": peak, "memory_kind": kind, "loss_kind": "all tokens",
            "settings": {"batch_size": batch_size, "quant": quant, "compute": compute, "gradient_checkpointing": checkpointing,
                         "padding": "longest in batch", "loss": "all", "lora": lora}}


def worker_main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    result: dict[str, Any] = {"config": spec["name"], "versions": _versions()}
    try:
        result.update(run_recipe(spec))
        result["status"] = "ok"
    except Exception as exc:  # the row says why; the driver goes on with the next configuration
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        result["status"] = "out of memory" if "out of memory" in str(exc).lower() else "failed"
        result["error"] = text
        import traceback

        traceback.print_exc()
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------
# comapoi rows: the real CLI, then its run.json
# ---------------------------------------------------------------------------------------------
def comapoi_steps(run_json: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-step ``time_s``, ``tokens`` (non-padding) and ``loss`` from a run.json's loss history.

    Needs one entry per step (``comapoi train`` logs every step up to 20 steps, or pass
    ``--logging-steps 1``) with the Trainer's cumulative ``num_input_tokens_seen`` (non-padding)
    and ``train_seconds`` (seconds since training began, stamped when the step was logged).
    """
    steps, last_tokens, last_time = [], 0, 0.0
    for entry in run_json.get("loss_history") or []:
        tokens, seconds = entry.get("num_input_tokens_seen"), entry.get("train_seconds")
        steps.append({"step": entry.get("step"), "loss": entry.get("loss"),
                      "tokens": None if tokens is None else tokens - last_tokens,
                      "time_s": None if seconds is None else seconds - last_time})
        last_tokens, last_time = tokens or last_tokens, seconds if seconds is not None else last_time
    return steps


def run_comapoi(spec: dict[str, Any], python: str, log_file: Path, timeout: float,
                extra_path: Path | None = None) -> dict[str, Any]:
    out = Path(spec["output"])
    cmd = [*comapoi_cmd(python), "train", "--backend", spec["backend"], "--model", spec["model"],
           "--data-dir", str(Path(spec["data"]).parent), "--dataset", DATASET, "--type", "merged",
           "--max_steps", str(spec["warmup"] + spec["steps"]), "--batch_size", str(spec["batch_size"]),
           "--seq_length", str(spec["seq_length"]), "--save_freq", str(10**6), "--output_dir", str(out),
           "--run-tag", spec["name"], "--seed", str(spec["seed"]), "--overwrite", *spec["extra_args"]]
    if spec["bf16"]:
        cmd.append("--bf16")
    result: dict[str, Any] = {"config": spec["name"], "command": shlex.join(cmd)}
    env = child_env(*([extra_path] if extra_path else []))
    with open(log_file, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**result, "status": "failed", "error": f"timed out after {timeout:.0f} s"}
    runs = sorted(out.rglob("run.json"), key=lambda p: p.stat().st_mtime)
    tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
    if proc.returncode != 0 or not runs:
        status = "out of memory" if any("out of memory" in line.lower() for line in tail) else "failed"
        return {**result, "status": status, "error": " / ".join(tail) or f"exit code {proc.returncode}"}
    run = json.loads(runs[-1].read_text())
    steps = comapoi_steps(run)
    if not steps or any(s["time_s"] is None or s["tokens"] is None for s in steps):
        return {**result, "status": "failed",
                "error": f"{runs[-1]} has no per-step times and token counts (loss_history train_seconds)"}
    peaks = (run.get("progress") or {}).get("peak_memory") or {}
    job, device, fit = run.get("job") or {}, run.get("device") or {}, run.get("fit") or {}
    cuda = "cuda_allocated_gib" in peaks
    # what ran: the --fit plan (micro-batch, accumulation, checkpointing, weights) where there is one
    settings = {"batch_size": job.get("batch_size"), "micro_batch": fit.get("micro_batch", job.get("batch_size")),
                "accumulation": fit.get("gradient_accumulation_steps", job.get("gradient_accumulation_steps")),
                "quant": device.get("quant"), "precision": device.get("precision"),
                "gradient_checkpointing": fit.get("gradient_checkpointing", job.get("gradient_checkpointing")),
                "packing": job.get("packing"), "loss": job.get("loss"), "plan": fit.get("source")}
    estimate = (fit.get("estimate") or {}).get("total")
    return {**result, "status": "ok", "steps": steps, "estimated_peak_gib": estimate,
            "peak_memory_gib": peaks.get("cuda_allocated_gib" if cuda else "host_rss_gib"),
            "memory_kind": "cuda-allocated" if cuda else "cpu-peak-rss",
            "loss_kind": f"{job.get('loss', 'assistant')} tokens", "run_dir": str(runs[-1].parent),
            "settings": settings, "versions": run.get("versions")}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    base: str
    extra: list[str] = field(default_factory=list)  # CLI flags (comapoi rows) or key=value knobs (recipes)


def parse_rows(configs: str, variants: list[str], trl_args: str, unsloth_args: str) -> list[Row]:
    rows = []
    for name in [c.strip() for c in configs.split(",") if c.strip()]:
        if name not in CONFIGS:
            raise SystemExit(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
        extra = shlex.split(trl_args if name == "comapoi-trl" else unsloth_args if name == "comapoi-unsloth" else "")
        rows.append(Row(name, name, extra))
    for text in variants:
        label, sep, rest = text.partition("=")
        base, _, args = rest.partition(":")
        if not sep or base not in CONFIGS:
            raise SystemExit(f"--variant must be NAME=CONFIG:ARGS with CONFIG one of {', '.join(CONFIGS)}, got {text!r}")
        extra = shlex.split(args) if base.startswith("comapoi-") else [a for a in args.split(",") if a]
        rows.append(Row(label, base, extra))
    return rows


def unsloth_missing(python: str) -> str | None:
    probe = "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('unsloth') else 3)"
    code = subprocess.run([python, "-c", probe]).returncode
    return None if code == 0 else f"Unsloth is not installed for {python}"


def markdown(report: dict[str, Any]) -> str:
    lines = ["| configuration | batch | settings | real tokens/s | step s (median) | peak GiB | MFU | loss first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['config']} | {report['batch_size']} | | {row.get('status')}: {row.get('error', '')} | | | | |")
            continue
        s = row["summary"]
        settings = ", ".join(f"{k}={v}" for k, v in (row.get("settings") or {}).items() if k != "lora")
        losses = [st["loss"] for st in row["steps"] if st.get("loss") is not None]
        loss = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
        tps = f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else ""
        step = f"{s['step_s_median']:.3f}" if s["step_s_median"] else ""
        peak = f"{row['peak_memory_gib']:.1f} ({row['memory_kind']})" if row.get("peak_memory_gib") is not None else ""
        if row.get("estimated_peak_gib") is not None:  # --fit's estimate, to check its memory model
            peak += f"; fit estimated {row['estimated_peak_gib']:.1f}"
        util = f"{row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else "n/a"
        lines.append(f"| {row['config']} | {row.get('settings', {}).get('batch_size', report['batch_size'])} | "
                     f"{settings} | {tps} | {step} | {peak} | {util} | {loss} |")
    return "\n".join(lines)


def header(report: dict[str, Any]) -> str:
    device = report["device"]
    return (f"device: {device.get('name')} ({device['kind']}); preset {report['preset']} "
            f"({_count(report['matmul_params'])} matmul parameters); batch {report['batch_size']}, "
            f"sequence <= {report['seq_length']}; {report['steps']} measured steps after {report['warmup']} warm-up")


def merge_reports(files: list[str], json_out: str | None, markdown_out: str | None) -> int:
    reports = [json.loads(Path(f).read_text()) for f in files]
    keys = ("preset", "batch_size", "seq_length", "steps", "warmup")
    for other in reports[1:]:
        different = [k for k in keys if other[k] != reports[0][k]]
        if different:
            raise SystemExit(f"cannot merge: the reports differ in {', '.join(different)}")
    merged = {**reports[0], "rows": [row for r in reports for row in r["rows"]], "command": [r["command"] for r in reports]}
    print(header(merged))
    table = markdown(merged)
    print(table)
    if json_out:
        Path(json_out).write_text(json.dumps(merged, indent=1))
    if markdown_out:
        Path(markdown_out).write_text(table + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-7b", choices=sorted(PRESETS))
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=CONFIG:ARGS",
                        help="an extra row: comapoi rows take CLI flags (e.g. 'trl-4bit=comapoi-trl:--quant 4bit'), "
                             "the recipes take knobs quant=4bit|none,gc=on|off,batch=N,lora_r=N")
    parser.add_argument("--trl-args", default="", help="flags appended to the comapoi-trl row's 'comapoi train'")
    parser.add_argument("--unsloth-args", default="", help="flags appended to the comapoi-unsloth row's 'comapoi train'")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--trajectories", type=int, default=300, help="simulated trajectories for comapoi data synth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-flops", type=float, default=None,
                        help=f"the card's dense bf16 matmul peak for MFU (default on CUDA: {H100_BF16_PEAK:.0f}, the H100 "
                             "figure measured on the GPU machine; none on a CPU, where MFU is not reported)")
    parser.add_argument("--scratch", default=os.environ.get("COMAPOI_BENCH_SCRATCH", "/tmp/comapoi-bench"))
    parser.add_argument("--python-unsloth", default=sys.executable,
                        help="interpreter for the Unsloth rows (default: this one)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="stop starting rows this long after the start, and cut each row's timeout to what is left "
                             "(for a device session with a fixed time budget; --json is rewritten after every row)")
    parser.add_argument("--measure-peak", action="store_true",
                        help="measure this GPU's bf16 matmul rate first and use it for MFU (instead of --peak-flops)")
    parser.add_argument("--json", dest="json_out", help="write every measured number here")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="print one table from reports written by --json (e.g. one configuration per command "
                             "where a command may only run for a few minutes); needs the same preset, batch and sequence")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.merge:
        return merge_reports(args.merge, args.json_out, args.markdown)

    started = time.perf_counter()
    scratch = Path(args.scratch).resolve()
    (scratch / "logs").mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    rows = parse_rows(args.configs, args.variant, args.trl_args, args.unsloth_args)
    import torch

    cuda = torch.cuda.is_available()
    peak_flops = args.peak_flops if args.peak_flops else (H100_BF16_PEAK if cuda else None)
    measured_peak = None
    if args.measure_peak and cuda:
        measured_peak = measure_matmul_peak()
        peak_flops = measured_peak
        log(f"bf16 matmul peak measured: {measured_peak / 1e12:.0f} TFLOP/s")
    data = make_data(scratch, args.trajectories, args.seed, log)
    model, config = build_model(args.preset, data, scratch, log)
    n_matmul = matmul_params(config)
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench_gpu_train.py", *argv]),
        "preset": args.preset, "model": str(model), "matmul_params": n_matmul, "batch_size": args.batch_size,
        "seq_length": args.seq_length, "steps": args.steps, "warmup": args.warmup, "peak_flops": peak_flops,
        "peak_flops_source": "measured (--measure-peak)" if measured_peak else
                             ("--peak-flops" if args.peak_flops else "H100 bf16 rate from ../shared/gpu/README.md" if cuda else None),
        "device": _device_report(), "versions": _versions(), "rows": [],
    }
    timeout = args.timeout
    for row in rows:
        if args.deadline is not None:
            left = args.deadline - (time.perf_counter() - started)
            if left < 60:
                report["rows"].append({"config": row.name, "status": "skipped", "error": "--deadline reached"})
                continue
            timeout = min(args.timeout, left)
        unsloth_row = row.base in ("unsloth", "comapoi-unsloth")
        python = args.python_unsloth if unsloth_row else sys.executable
        log_file = scratch / "logs" / f"{row.name}.log"
        log(f"== {row.name} (log: {log_file})")
        missing = unsloth_missing(python) if unsloth_row else None
        extra_path = None
        if not missing and row.base == "comapoi-unsloth":
            extra_path, missing = unsloth_plugin_site(python, scratch, log)
        if missing:
            result: dict[str, Any] = {"config": row.name, "status": "skipped", "error": missing}
        elif row.base.startswith("comapoi-"):
            spec = {"name": row.name, "backend": row.base.split("-", 1)[1], "model": str(model), "data": str(data),
                    "output": str(scratch / "runs" / row.name), "batch_size": args.batch_size, "seq_length": args.seq_length,
                    "steps": args.steps, "warmup": args.warmup, "seed": args.seed, "bf16": cuda and torch.cuda.is_bf16_supported(),
                    "extra_args": row.extra}
            result = run_comapoi(spec, python, log_file, timeout, extra_path)
        else:
            spec = {"name": row.name, "config": row.base, "model": str(model), "data": str(data),
                    "batch_size": args.batch_size, "seq_length": args.seq_length, "steps": args.steps,
                    "warmup": args.warmup, "seed": args.seed, "result": str(scratch / "logs" / f"{row.name}.json"),
                    "knobs": dict(kv.split("=", 1) for kv in row.extra)}
            spec_file = scratch / "logs" / f"{row.name}.spec.json"
            spec_file.write_text(json.dumps(spec))
            Path(spec["result"]).unlink(missing_ok=True)
            with open(log_file, "w") as handle:
                try:
                    subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(spec_file)], stdout=handle,
                                   stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout, env=child_env())
                except subprocess.TimeoutExpired:
                    pass
            if Path(spec["result"]).is_file():
                result = json.loads(Path(spec["result"]).read_text())
            else:
                tail = log_file.read_text(errors="replace").strip().splitlines()[-2:]
                result = {"config": row.name, "status": "failed", "error": " / ".join(tail) or "no result"}
        result["config"] = row.name
        if result.get("status") == "ok":
            result["summary"] = summarise(result["steps"], args.warmup)
            result["mfu"] = mfu(result["summary"]["tokens_per_s"], n_matmul, peak_flops)
        report["rows"].append(result)
        if args.json_out:  # row by row: what was measured survives a run cut short
            Path(args.json_out).write_text(json.dumps(report, indent=1))
        log(f"   {result.get('status')}" + (f": {result.get('error')}" if result.get("error") else
                                            f", {result['summary']['tokens_per_s'] or 0:,.0f} real tokens/s"))
    report["wall_s"] = time.perf_counter() - started
    table = markdown(report)
    print(header(report))
    print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0 if all(r.get("status") in ("ok", "skipped") for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
