"""Where CoMaPOI data lives: the original's folder layout and file names.

``{data_dir}/{dataset}/agent{1,2,3}_train_samples.jsonl`` are the inputs; the derived files keep
the original script's names so that existing tooling finds them:

- ``agentN_train_samples_all.jsonl`` / ``agentN_train_samples_100.jsonl`` (cleaned, split),
- ``total_agent_train_samples.jsonl`` (merged, each record tagged with its ``agent``),
- ``cleaned_total_agent_train_samples_all.jsonl`` / ``..._100.jsonl``.

comapoi adds, beside them, ``*.rejects.jsonl`` (what cleaning removed, and why) and
``*.prepared.json`` (the content hashes of the inputs the outputs were made from).
"""

from __future__ import annotations

import os
from pathlib import Path

from comapoi_cli.errors import DataError

DATA_DIR_ENV = "COMAPOI_DATA_DIR"
MERGED_FILE = "total_agent_train_samples.jsonl"
MERGED_CLEAN_STEM = "cleaned_total_agent_train_samples"
HOLDOUT_SUFFIX = "_100"
TRAIN_SUFFIX = "_all"


def default_data_dir() -> Path:
    """``$COMAPOI_DATA_DIR`` or ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


def dataset_dir(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(data_dir if data_dir is not None else default_data_dir()) / dataset


def stem_of(path: str | os.PathLike[str]) -> str:
    name = Path(path).name
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else Path(name).stem


def plain_file_name(dataset: str, part: str) -> str:
    """CoMaPOI's plain next-POI file of a dataset: ``{dataset}_{part}.jsonl`` (part: train, val, test)."""
    return f"{dataset}_{part}.jsonl"


def split_names(stem: str) -> tuple[str, str]:
    """The original's split output names of a file stem: ``(stem_all.jsonl, stem_100.jsonl)``."""
    return f"{stem}{TRAIN_SUFFIX}.jsonl", f"{stem}{HOLDOUT_SUFFIX}.jsonl"


def missing_input(path: Path, dataset: str | None = None, role: str | None = None) -> DataError:
    """The one-sentence error for a missing training file, with how to create one."""
    if dataset:
        data_dir = path.parent.parent
        hint = (f"Create CoMaPOI-format files with: comapoi data synth --dataset {dataset} --output-dir {data_dir} "
                f"(or point --data-dir / {DATA_DIR_ENV} at the folder holding {dataset}/).")
    else:
        hint = "Pass an existing JSONL file, or create sample data with: comapoi data synth --dataset nyc"
    what = f"the {role} training file" if role else "the training file"
    return DataError(f"Cannot find {what} {path}.", hint=hint)


def no_agent_files(dataset: str, folder: Path) -> DataError:
    """The one-sentence error for a dataset folder without agent training files; when it holds prepared
    trajectories (``data prepare``'s ``{dataset}_train.jsonl``), the hint says how to read or build from them."""
    trajectories = folder / f"{dataset}_train.jsonl"
    if trajectories.is_file():
        hint = (f"{folder} holds trajectories ({trajectories.name}), not agent files: see them with "
                f"comapoi data stats {trajectories}, or write agent files from them with "
                f"comapoi data build --dataset {dataset} --train {trajectories}")
    else:
        hint = f"Create them with: comapoi data synth --dataset {dataset} --output-dir {folder.parent}"
    return DataError(f"Cannot find any agent training file in {folder}.", hint=hint)
