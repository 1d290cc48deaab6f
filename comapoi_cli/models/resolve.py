"""Which base model a run needs: ``--model``, else what its run.json recorded.

:func:`resolve_base_model` returns a local model folder or a Hugging Face id that is in the local
cache. It never downloads: an id that is not cached fails at once with one sentence (comapoi
loads every model with ``local_files_only=True``, as ``HF_HUB_OFFLINE=1`` would), so a machine
without network gets an answer in well under a second instead of minutes of download retries.
A run trained on ``--model tiny`` whose cached tiny model is gone gets it rebuilt: the tiny
model is a deterministic function of the data files its run.json records with their hashes.
``smollm2-135m`` (and a run trained on it) is the converted SmolLM2-135M-Instruct in comapoi's
cache, converted again from its wheel when gone (:mod:`comapoi_cli.models.smollm2`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Protocol

from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.models.smollm2 import SMOLLM2

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
TINY = "tiny"


class RunLike(Protocol):
    """What resolution reads of a run (``RunInfo``, the run.json reader)."""

    run_dir: Path

    @property
    def base_model(self) -> str | None: ...

    @property
    def base_model_kind(self) -> str | None: ...

    @property
    def train_file(self) -> tuple[Path, str | None] | None: ...

    @property
    def base_model_corpus(self) -> list[tuple[Path, str | None]] | None: ...

    @property
    def base_model_dataset(self) -> str | None: ...


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` (one slash, no leading ``/`` or ``.``, no backslash): the shape of a Hugging Face id."""
    parts = name.split("/")
    return (len(parts) == 2 and all(p.strip() for p in parts) and not name.startswith(("/", ".", "~"))
            and "\\" not in name and " " not in name)


def resolve_base_model(model: str | None, run: RunLike) -> str:
    """The base model folder (absolute) or cached Hugging Face id: ``model`` (``--model``), else the run's.

    Raises:
        UsageError: the run records no base model and none is given; ``tiny`` for a run not trained on it.
        DataError: a folder that is not a model folder, a path that does not exist, a Hugging Face id
            that is not in the local cache, a tiny base that cannot be rebuilt.
    """
    name = model or run.base_model
    if not name:
        raise UsageError(f"{run.run_dir} records no base model; pass it with --model DIR.")
    if name == TINY or (model is None and run.base_model_kind == TINY and not Path(name).is_dir()):
        return tiny_base(run)
    if name == SMOLLM2 or (model is None and run.base_model_kind == SMOLLM2 and not Path(name).is_dir()):
        from comapoi_cli.models.smollm2 import ensure_smollm2

        return str(ensure_smollm2())  # the cached conversion, or converted again from its wheel
    path = Path(name).expanduser()
    if path.exists():
        return check_model_folder(path)
    if looks_like_hub_id(name):
        return require_cached(name)
    raise DataError(f"Base model {name} does not exist.",
                    hint="Pass the base model folder with --model DIR (the adapter was trained on it).")


def check_model_folder(path: Path) -> str:
    """``path`` as an absolute model folder, or one sentence saying why it is not one."""
    if not path.is_dir():
        raise DataError(f"{path} is a file, not a model folder (a folder with config.json and the weights).",
                        hint="Pass the base model folder with --model DIR.")
    if (path / CONFIG).is_file():
        return str(path.absolute())
    if (path / ADAPTER_CONFIG).is_file():
        raise DataError(f"{path} holds a LoRA adapter, not a base model: it is not a model folder.",
                        hint="Pass the adapter's base model (its adapter_config.json names it) with --model DIR.")
    raise DataError(f"{path} is not a model folder (it has no {CONFIG}).",
                    hint="Pass a Hugging Face model folder (config.json, weights, tokenizer files) with --model DIR.")


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Hugging Face's hub cache as the environment (``os.environ`` by default) sets it (``HF_HUB_CACHE``, ``HF_HOME``)."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = Path(env["HF_HOME"]).expanduser() if env.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def cached_hub_model(name: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The cached snapshot folder of Hugging Face model ``name`` (one that holds config.json), or None.

    Reads only the local cache (``models--owner--name/refs`` and ``snapshots``); no network.
    """
    repo = hub_cache_dir(env) / ("models--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except OSError:
            commit = ""
        if commit and (snapshots / commit / CONFIG).is_file():
            return snapshots / commit
    found = sorted((p for p in snapshots.iterdir() if (p / CONFIG).is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def require_cached(name: str) -> str:
    """``name`` if the Hugging Face model is in the local cache, else one sentence (comapoi never downloads)."""
    if cached_hub_model(name) is None:
        raise DataError(f"The model {name} is not in the local Hugging Face cache ({hub_cache_dir()}), and comapoi "
                        "does not download models.",
                        hint=f"Download it first (hf download {name}), or pass a local model folder with --model DIR.")
    return name


def tiny_base(run: RunLike) -> str:
    """The tiny base model of a run trained on ``--model tiny``: the recorded folder, or rebuilt from its data."""
    recorded = run.base_model
    if recorded and recorded != TINY and Path(recorded).is_dir():
        return check_model_folder(Path(recorded))
    if run.base_model_kind != TINY:
        raise UsageError("--model tiny is built from a run's training data, and this run was not trained on it.",
                         hint="Pass the base model folder with --model DIR.")
    corpus = run.base_model_corpus  # the tiny model's corpus as run.json's base_model.corpus records it
    dataset = None
    if corpus is None:  # a run from before the tiny base was shared by the dataset's roles: its training file
        train = run.train_file
        if train is None:
            raise UsageError("This tiny run records neither its tiny model's data nor its training file.",
                             hint="Pass the tiny model folder with --model DIR.")
        corpus = [train]
    else:
        dataset = run.base_model_dataset
    for path, digest in corpus:
        if not path.is_file() or (digest and _sha256(path) != digest):
            raise DataError(f"The tiny base model of this run is gone from the cache and cannot be rebuilt: its "
                            f"data file {path} is {'missing' if not path.is_file() else 'changed'}.",
                            hint="Pass the tiny model folder with --model DIR.")
    from comapoi_cli.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model([p for p, _ in corpus], dataset=dataset))


def _sha256(path: Path) -> str:
    from comapoi_cli.fileio import sha256_file

    return sha256_file(path)
