"""Benchmark of the data commands (issue 3): clean throughput and memory, stats tokens/s.

    .venv/bin/python bench/bench_data.py                     # 100 MB and 1 GB clean, 50 MB stats
    .venv/bin/python bench/bench_data.py --sizes 20 --stats-mb 10   # a quick check

What it measures, each in a fresh subprocess (so that peak memory is per run):

1. ``clean``: ``clean_file`` on a CoMaPOI-format file made by ``comapoi data synth`` (simulated
   tky, the three agent files concatenated) of each size in ``--sizes`` (MB), against a plain
   Python loop over the same file in the same run
   (``for line in f: out.write(json.dumps(json.loads(line)) + "\\n")``). Reports MB/s, the ratio,
   and the peak RSS of the parent process and of the largest worker: streaming means it does
   not grow with the file.
2. ``stats --tokenizer``: tokens/s of ``compute_stats`` (chat template + tokenizer, both cores)
   against ``datasets.load_dataset("json") + Dataset.map(batched=True)`` doing the same count
   (``apply_chat_template`` over each batch), with ``num_proc`` 1 and 2. The tokenizer is a local
   byte-level BPE (8k vocabulary) trained on the generated data, with a chat template; pass
   ``--tokenizer DIR`` to use another local tokenizer folder.

Generated files live in ``--workdir`` (default a temporary folder) and are deleted at the end
unless ``--keep``. Prints a Markdown table; ``--json FILE`` writes the raw numbers.
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
import time
from pathlib import Path

from comapoi_cli.plugins import get_registry as _REGISTRY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


# -- child processes ------------------------------------------------------------------------------
def _rss_mb() -> tuple[float, float]:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def child_baseline(path: str) -> dict:
    out = path + ".baseline.jsonl"
    started = time.perf_counter()
    with open(path, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as o:
        for line in f:
            o.write(json.dumps(json.loads(line)) + "\n")
    seconds = time.perf_counter() - started
    os.unlink(out)
    own, _ = _rss_mb()
    return {"seconds": seconds, "peak_rss_mb": own}


def child_clean(path: str, workers: int) -> dict:
    from comapoi_cli.data import clean_file

    out = path + ".clean.jsonl"
    started = time.perf_counter()
    summary = clean_file(path, out, workers=workers, dataset="tky", registry=_REGISTRY())
    seconds = time.perf_counter() - started
    os.unlink(out)
    os.unlink(summary.rejects)
    own, children = _rss_mb()
    return {"seconds": seconds, "peak_rss_mb": own, "worker_peak_rss_mb": children, "workers": summary.workers,
            "kept": summary.kept, "rejected": summary.rejected_total}


def child_stats(path: str, tokenizer: str, workers: int) -> dict:
    from comapoi_cli.data.stats import compute_stats

    started = time.perf_counter()
    report = compute_stats([path], dataset="tky", tokenizer=tokenizer, workers=workers, registry=_REGISTRY())
    seconds = time.perf_counter() - started
    tokens = sum(r.total_tokens for r in report.roles.values())
    loss = sum(r.loss_tokens for r in report.roles.values())
    return {"seconds": seconds, "tokens": tokens, "loss_tokens": loss, "workers": report.workers}


def child_datasets(path: str, tokenizer: str, num_proc: int, cache: str) -> dict:
    os.environ["HF_DATASETS_CACHE"] = cache
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer)

    def count(batch):
        full = tok.apply_chat_template(batch["messages"], tokenize=True, return_dict=True)["input_ids"]
        prompt = tok.apply_chat_template([m[:-1] for m in batch["messages"]], tokenize=True,
                                         add_generation_prompt=True, return_dict=True)["input_ids"]
        return {"tokens": [len(x) for x in full], "prompt": [len(x) for x in prompt]}

    started = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=path, split="train")
    loaded = time.perf_counter()
    ds = ds.map(count, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                remove_columns=ds.column_names)
    tokens = sum(ds["tokens"])
    loss = tokens - sum(ds["prompt"])
    done = time.perf_counter()
    return {"seconds": done - started, "load_seconds": loaded - started, "map_seconds": done - loaded,
            "tokens": tokens, "loss_tokens": loss}


def _run_child(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- data -----------------------------------------------------------------------------------------
def make_file(workdir: Path, size_mb: float, seed: int = 11) -> Path:
    """A CoMaPOI-format file of about ``size_mb`` MB: simulated tky agent files, concatenated."""
    from comapoi_cli.data.synth import synth_dataset

    target = workdir / f"agents_{size_mb:g}mb.jsonl"
    if target.exists():
        return target
    trajectories = max(10, int(size_mb * 1e6 / 19_500))  # ~19.5 kB of agent records per trajectory
    synth_dataset("tky", workdir / f"synth_{size_mb:g}", trajectories=trajectories, seed=seed, plain=False, registry=_REGISTRY())
    folder = workdir / f"synth_{size_mb:g}" / "tky"
    with open(target, "wb") as out:
        for i in (1, 2, 3):
            with open(folder / f"agent{i}_train_samples.jsonl", "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 22)
    shutil.rmtree(workdir / f"synth_{size_mb:g}")
    return target


def make_tokenizer(workdir: Path, corpus: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = workdir / "bench_tokenizer"
    if folder.exists():
        return folder
    texts = []
    with open(corpus, encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if i >= 2000:
                break
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    special = ["<|im_start|>", "<|im_end|>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(str(folder))
    return folder


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "cpu_cores": os.cpu_count(), "platform": platform.platform()}
    for name in ("comapoi", "transformers", "tokenizers", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=float, nargs="+", default=[100, 1000], help="clean file sizes in MB")
    parser.add_argument("--stats-mb", type=float, default=50, help="size of the stats file in MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", help="a local tokenizer folder (default: a BPE trained on the data)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"baseline": child_baseline, "clean": child_clean, "stats": child_stats, "datasets": child_datasets}[kind]
        rest = [int(x) if x.isdigit() else x for x in rest]
        print(json.dumps(fn(*rest)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="comapoi-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"versions": versions(), "command": " ".join([Path(sys.executable).name, *sys.argv]), "clean": [], "stats": {}}
    try:
        for size in args.sizes:
            path = make_file(workdir, size)
            mb = path.stat().st_size / 1e6
            base = _run_child("baseline", str(path))
            single = _run_child("clean", str(path), "1")
            multi = _run_child("clean", str(path), str(args.workers))
            row = {"size_mb": round(mb, 1), "baseline_mb_s": round(mb / base["seconds"], 1),
                   "clean_1_mb_s": round(mb / single["seconds"], 1), "clean_n_mb_s": round(mb / multi["seconds"], 1),
                   "workers": multi["workers"], "ratio_1": round(base["seconds"] / single["seconds"], 2),
                   "ratio_n": round(base["seconds"] / multi["seconds"], 2),
                   "peak_rss_parent_mb": round(multi["peak_rss_mb"]), "peak_rss_worker_mb": round(multi["worker_peak_rss_mb"]),
                   "peak_rss_single_mb": round(single["peak_rss_mb"]), "baseline_peak_rss_mb": round(base["peak_rss_mb"]),
                   "records": multi["kept"] + multi["rejected"]}
            results["clean"].append(row)
            print(json.dumps(row), flush=True)
            if size != args.sizes[-1] or size >= 500:
                pass
        stats_file = make_file(workdir, args.stats_mb, seed=12)
        tokenizer = args.tokenizer or str(make_tokenizer(workdir, stats_file))
        ours_1 = _run_child("stats", str(stats_file), tokenizer, "1")
        ours_n = _run_child("stats", str(stats_file), tokenizer, str(args.workers))
        cache = str(workdir / "hf-datasets-cache")
        ds_1 = _run_child("datasets", str(stats_file), tokenizer, "1", cache)
        ds_n = _run_child("datasets", str(stats_file), tokenizer, str(args.workers), cache)
        assert ours_n["tokens"] == ds_n["tokens"] == ours_1["tokens"], (ours_n, ds_n)
        assert ours_n["loss_tokens"] == ds_n["loss_tokens"], (ours_n, ds_n)
        results["stats"] = {
            "size_mb": round(stats_file.stat().st_size / 1e6, 1), "tokens": ours_n["tokens"],
            "comapoi_1_tok_s": round(ours_1["tokens"] / ours_1["seconds"]),
            "comapoi_n_tok_s": round(ours_n["tokens"] / ours_n["seconds"]),
            "datasets_1_tok_s": round(ds_1["tokens"] / ds_1["seconds"]),
            "datasets_n_tok_s": round(ds_n["tokens"] / ds_n["seconds"]),
            "datasets_n_map_only_tok_s": round(ds_n["tokens"] / ds_n["map_seconds"]),
            "workers": ours_n["workers"], "tokenizer": "bench BPE 8k" if not args.tokenizer else args.tokenizer,
        }
        print(json.dumps(results["stats"]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("| file | plain json loop | clean, 1 process | clean, %d processes | speed-up (1 / %d) | peak RSS parent / worker / 1 process |" % (args.workers, args.workers))
    print("|---|---|---|---|---|---|")
    for row in results["clean"]:
        print(f"| {row['size_mb']} MB ({row['records']} records) | {row['baseline_mb_s']} MB/s | {row['clean_1_mb_s']} MB/s | "
              f"{row['clean_n_mb_s']} MB/s | {row['ratio_1']}x / {row['ratio_n']}x | "
              f"{row['peak_rss_parent_mb']} / {row['peak_rss_worker_mb']} / {row['peak_rss_single_mb']} MB |")
    s = results["stats"]
    if s:
        print()
        print(f"stats on {s['size_mb']} MB, {s['tokens']} tokens ({s['tokenizer']}):")
        print(f"| comapoi data stats, 1 process, tokenizer threads on every core (the default) | comapoi, {s['workers']} processes "
              f"| datasets.map, 1 process (tokenizer threads) | datasets.map num_proc={args.workers} (map only) |")
        print("|---|---|---|---|")
        print(f"| {s['comapoi_1_tok_s']:,} tok/s | {s['comapoi_n_tok_s']:,} tok/s | {s['datasets_1_tok_s']:,} tok/s | "
              f"{s['datasets_n_tok_s']:,} tok/s ({s['datasets_n_map_only_tok_s']:,}) |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
