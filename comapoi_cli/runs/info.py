"""THE reader of run folders: ``locate_run`` -> ``RunInfo`` (for eval, adapters, merge, export).

Every JSON file of a run folder (run.json, adapter_config.json, trainer_state.json) is read
through :func:`read_json_file`: only a regular file (a FIFO, a device such as ``/dev/zero`` or a
folder is refused without opening it for reading), at most ``RUN_JSON_MAX_BYTES``, never
unpickled. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comapoi_cli.errors import DataError, UsageError, first_line
from comapoi_cli.runs.layout import ADAPTER_CONFIG, CHECKPOINT_PREFIX, RUN_JSON, RUN_JSON_MAX_BYTES


def read_json_file(path: Path, max_bytes: int = RUN_JSON_MAX_BYTES) -> tuple[Any, str | None]:
    """``(value, None)``; ``(None, None)`` when absent; ``(None, problem)`` when it cannot be read.

    Opens with ``O_NONBLOCK`` and checks ``fstat`` before reading, so a FIFO or a character
    device never blocks or streams; a file over ``max_bytes`` is refused unread.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{path.name} is unreadable ({exc.strerror or type(exc).__name__})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, f"{path.name} is not a regular file"
        if info.st_size > max_bytes:
            return None, f"{path.name} is too large ({info.st_size:,} bytes, at most {max_bytes:,} are read)"
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                return None, f"{path.name} is too large (over {max_bytes:,} bytes)"
            chunks.append(chunk)
    except OSError as exc:
        return None, f"{path.name} is unreadable ({exc.strerror or type(exc).__name__})"
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(chunks).decode("utf-8")), None
    except (ValueError, UnicodeDecodeError) as exc:
        first = first_line(exc, default="")[:120]
        return None, f"{path.name} is unreadable ({type(exc).__name__}: {first})"


def read_run_json(run_dir: Path) -> dict[str, Any] | None:
    """The run's run.json, or None when absent, unreadable or not an object."""
    data, _ = read_json_file(run_dir / RUN_JSON)
    return data if isinstance(data, dict) else None


@dataclass
class RunInfo:
    """A trained adapter and what its run recorded in run.json (schema: docs/training.md).

    Read: ``job`` (``type``, ``dataset``, ``data_dir``, ``seed``, ``test_size``), ``base_model``
    (``path``, ``kind``), ``device`` (``quant`` and ``dtype`` as resolved for training) and
    ``data`` (``train_file``, ``train_sha256``, ``holdout_file``, ``holdout_sha256``,
    ``data_keys``). Without run.json the base model comes from adapter_config.json and everything
    else from the command line.
    """

    adapter_dir: Path
    run_dir: Path
    run_json: Path | None
    run: dict[str, Any]
    is_checkpoint: bool

    def _section(self, name: str) -> dict[str, Any]:
        value = self.run.get(name)
        return value if isinstance(value, dict) else {}

    def job_value(self, name: str) -> Any:
        value = self._section("job").get(name)
        return None if value in (None, "") else value

    @property
    def base_model(self) -> str | None:
        value: Any = self._section("base_model").get("path") or self.job_value("base_model")
        if not value:
            config, _ = read_json_file(self.adapter_dir / ADAPTER_CONFIG)
            value = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        return str(value) if value else None

    @property
    def base_model_kind(self) -> str | None:
        return self._section("base_model").get("kind")

    @property
    def type(self) -> str | None:
        value = self.job_value("type")
        return str(value) if value else None

    @property
    def dataset(self) -> str | None:
        value = self.job_value("dataset")
        return str(value) if value else None

    @property
    def data_dir(self) -> Path | None:
        return self._recorded_path(self.job_value("data_dir"))

    @property
    def quant(self) -> str | None:
        """The quantisation the run trained with (``--quant auto`` resolved)."""
        value = self._section("device").get("quant") or self.job_value("quant")
        return str(value) if value else None

    @property
    def dtype(self) -> str | None:
        """The dtype the base weights were loaded in for training, if recorded."""
        value = self._section("device").get("dtype")
        return str(value) if value else None

    @property
    def trust_remote_code(self) -> bool:
        return self.job_value("trust_remote_code") is True

    def _recorded_path(self, value: Any) -> Path | None:
        """A path run.json records; a relative one is tried from here, then from the folder training ran in."""
        if not isinstance(value, str) or not value:
            return None
        path = Path(value)
        if path.is_absolute() or path.exists():
            return path
        run_dir, output_dir = self.run.get("run_dir"), self.job_value("output_dir")
        if isinstance(run_dir, str) and isinstance(output_dir, str) and not Path(output_dir).is_absolute():
            depth = len(Path(output_dir).parts) + 3  # {output_dir}/{tag}/sft-{dataset}/{name}
            parents = Path(run_dir).parents
            if len(parents) >= depth and (parents[depth - 1] / path).exists():
                return parents[depth - 1] / path
        return path

    @property
    def train_file(self) -> tuple[Path, str | None] | None:
        data = self._section("data")
        path = self._recorded_path(data.get("train_file"))
        return (path, data.get("train_sha256")) if path else None

    @property
    def holdout(self) -> Path | None:
        """The held-out file the run recorded (its ``*_100.jsonl``), if any."""
        return self._recorded_path(self._section("data").get("holdout_file"))

    @property
    def holdout_sha256(self) -> str | None:
        value = self._section("data").get("holdout_sha256")
        return value if isinstance(value, str) and value else None


def locate_run(adapter: str | os.PathLike[str]) -> RunInfo:
    """Read a run folder (or a ``checkpoint-N`` folder inside one)."""
    path = Path(adapter)
    if not path.exists():
        raise UsageError(f"Adapter folder {path} does not exist.",
                         hint="List the trained runs with: comapoi adapters list")
    if not path.is_dir():
        raise UsageError(f"{path} is a file; --adapter takes the run folder that holds {ADAPTER_CONFIG}.")
    if not (path / ADAPTER_CONFIG).is_file():
        extra = ""
        if (path / RUN_JSON).is_file():
            extra = " (the run has not finished: train it to the end, or pass one of its checkpoint-N folders)"
        raise UsageError(f"{path} holds no {ADAPTER_CONFIG}: it is not a trained adapter{extra}.",
                         hint="List the trained runs with: comapoi adapters list")
    is_checkpoint = path.name.startswith(CHECKPOINT_PREFIX) and not (path / RUN_JSON).exists()
    run_dir = path.parent if is_checkpoint else path
    run_json: Path | None = run_dir / RUN_JSON
    run: dict[str, Any] = {}
    assert run_json is not None
    loaded, problem = read_json_file(run_json)
    if problem:
        raise DataError(f"{run_json}: {problem}.")
    if loaded is None:
        run_json = None
    elif not isinstance(loaded, dict):
        raise DataError(f"{run_json} does not hold a JSON object.")
    else:
        run = loaded
    return RunInfo(adapter_dir=path, run_dir=run_dir, run_json=run_json, run=run, is_checkpoint=is_checkpoint)
