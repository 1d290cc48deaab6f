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
from comapoi_cli.runs.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_PREFIX,
    DATA_KEYS,
    RUN_JSON,
    RUN_JSON_MAX_BYTES,
)


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
    """The run's run.json, or None when absent, unreadable or not an object (for ``runs/`` itself)."""
    data, _ = read_json_file(run_dir / RUN_JSON)
    return data if isinstance(data, dict) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class RunInfo:
    """A run folder and what its run.json recorded (schema: docs/training.md): THE reader of run.json.

    Every section is a property: ``job``, ``progress``, ``lora``, ``base_model_info`` (the
    ``base_model`` section; ``base_model`` is the path it records), ``backend``, ``device``,
    ``fit``, ``tokenizer``, ``chat_template``, ``data``, ``init_adapter``, ``chain``, ``rewards``,
    ``adapter``, ``distributed``, ``versions``, ``segments``, ``loss_history``, ``eval_history``,
    ``evaluations``; the top-level keys (``status``, ``pid``, ``host``, ``command``, ``created``,
    ...) likewise. A section an older run.json lacks (or holds in another shape) reads as empty
    (``{}``, ``[]``) or None, never as an error. Without run.json the base model comes from
    adapter_config.json and everything else from the command line.

    ``run`` is the parsed run.json as written: code outside ``comapoi_cli/runs/`` reads it through
    the properties only (tests/test_runinfo.py checks that).
    """

    adapter_dir: Path
    run_dir: Path
    run_json: Path | None
    run: dict[str, Any]
    is_checkpoint: bool
    #: Why run.json could not be read (:func:`read_run`; :func:`locate_run` raises instead).
    problem: str | None = None
    #: run.json is there and readable JSON, but not an object (:func:`read_run`).
    not_object: bool = False

    @classmethod
    def from_record(cls, record: dict[str, Any], run_dir: Path | str = ".") -> RunInfo:
        """A RunInfo over a run.json already in memory (``run_dir``: the folder it describes)."""
        folder = Path(run_dir)
        return cls(adapter_dir=folder, run_dir=folder, run_json=None, run=_dict(record), is_checkpoint=False)

    # -- the whole record ----------------------------------------------------------------------
    @property
    def recorded(self) -> bool:
        """run.json was read and holds an object (perhaps an empty one)."""
        return self.problem is None and not self.not_object and (self.run_json is not None or bool(self.run))

    def sections(self, *, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
        """run.json's sections as recorded (a copy), less ``leave_out`` (``adapters show`` prints them)."""
        return {k: v for k, v in self.run.items() if k not in leave_out}

    def _section(self, name: str) -> dict[str, Any]:
        return _dict(self.run.get(name))

    def job_value(self, name: str) -> Any:
        value = self.job.get(name)
        return None if value in (None, "") else value

    # -- sections ------------------------------------------------------------------------------
    @property
    def job(self) -> dict[str, Any]:
        """The ``TrainingJob`` as started (``TrainingJob.from_dict`` reads it back)."""
        return self._section("job")

    @property
    def progress(self) -> dict[str, Any]:
        return self._section("progress")

    @property
    def lora(self) -> dict[str, Any]:
        return self._section("lora")

    @property
    def base_model_info(self) -> dict[str, Any]:
        """The ``base_model`` section (``path``, ``name``, ``kind``, ``corpus``, ``dataset``, ...)."""
        return self._section("base_model")

    @property
    def backend(self) -> dict[str, Any]:
        """The ``backend`` section (``name``, ``path``); an older run.json's plain name becomes ``{"name": ...}``."""
        value = self.run.get("backend")
        if isinstance(value, str):
            return {"name": value}
        return _dict(value)

    @property
    def device(self) -> dict[str, Any]:
        return self._section("device")

    @property
    def fit(self) -> dict[str, Any]:
        """The memory plan the run executed (``FitPlan.from_dict`` reads it back)."""
        return self._section("fit")

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self._section("tokenizer")

    @property
    def chat_template(self) -> dict[str, Any]:
        return self._section("chat_template")

    @property
    def data(self) -> dict[str, Any]:
        """The ``data`` section (``train_file``, ``train_sha256``, ``holdout_file``, ``data_keys``, ``tokens``, ...)."""
        return self._section("data")

    @property
    def init_adapter(self) -> dict[str, Any]:
        return self._section("init_adapter")

    @property
    def chain(self) -> list[dict[str, Any]]:
        """The runs this one continues (``--init-adapter``), oldest first."""
        return [step for step in _list(self.run.get("chain")) if isinstance(step, dict)]

    @property
    def rewards(self) -> dict[str, Any]:
        return self._section("rewards")

    @property
    def adapter(self) -> dict[str, Any]:
        """The final adapter's files and hashes (empty until the run finished)."""
        return self._section("adapter")

    @property
    def distributed(self) -> dict[str, Any]:
        return self._section("distributed")

    @property
    def versions(self) -> dict[str, Any]:
        return self._section("versions")

    @property
    def segments(self) -> list[dict[str, Any]]:
        """One entry per process that trained the run (a resumed run has several)."""
        return [s for s in _list(self.run.get("segments")) if isinstance(s, dict)]

    @property
    def loss_history(self) -> list[Any]:
        return _list(self.run.get("loss_history"))

    @property
    def eval_history(self) -> list[Any]:
        return _list(self.run.get("eval_history"))

    @property
    def evaluations(self) -> list[Any]:
        """The ``evaluations`` list ``comapoi eval`` appends to (as recorded)."""
        return _list(self.run.get("evaluations"))

    # -- top-level values ----------------------------------------------------------------------
    @property
    def schema(self) -> Any:
        return self.run.get("schema")

    @property
    def comapoi_version(self) -> str | None:
        return _text(self.run.get("comapoi_version"))

    @property
    def platform(self) -> str | None:
        return _text(self.run.get("platform"))

    @property
    def recorded_run_dir(self) -> str | None:
        """The run folder as the training process saw it (absolute, on its machine)."""
        return _text(self.run.get("run_dir"))

    @property
    def recorded_checkpoints(self) -> list[str]:
        """The checkpoint folders run.json last listed (``layout.checkpoints`` reads the folder itself)."""
        return [str(name) for name in _list(self.run.get("checkpoints"))]

    @property
    def status(self) -> str | None:
        return _text(self.run.get("status"))

    @property
    def error(self) -> str | None:
        return _text(self.run.get("error"))

    @property
    def pid(self) -> Any:
        return self.run.get("pid")

    @property
    def host(self) -> Any:
        return self.run.get("host")

    @property
    def command(self) -> Any:
        return self.run.get("command")

    @property
    def created(self) -> str | None:
        return _text(self.run.get("created"))

    @property
    def updated(self) -> str | None:
        return _text(self.run.get("updated"))

    @property
    def finished(self) -> str | None:
        return _text(self.run.get("finished"))

    @property
    def date(self) -> Any:
        """When it finished, else when it was last updated, else when it was created."""
        return self.run.get("finished") or self.run.get("updated") or self.run.get("created")

    @property
    def method(self) -> str:
        """sft, grpo or dpo (an older run.json records none: sft)."""
        return str(self.job.get("method") or self.run.get("method") or "sft")

    # -- values of the sections ----------------------------------------------------------------
    @property
    def global_step(self) -> Any:
        return self.progress.get("global_step")

    @property
    def max_steps(self) -> Any:
        return self.progress.get("max_steps", self.job.get("max_steps"))

    @property
    def final_loss(self) -> Any:
        return self.progress.get("final_loss")

    @property
    def backend_name(self) -> Any:
        """The backend that trained it (``backend.name``, else the job's ``backend``)."""
        value = self.run.get("backend")
        if isinstance(value, dict):
            return value.get("name")
        return value if isinstance(value, str) else self.job.get("backend")

    @property
    def latest_evaluation(self) -> dict[str, Any] | None:
        """The latest (by ``time``, then position) entry of ``evaluations`` that holds metrics."""
        entries = [e for e in self.evaluations if isinstance(e, dict) and isinstance(e.get("metrics"), dict)]
        if not entries:
            return None
        return max(enumerate(entries), key=lambda pair: (str(pair[1].get("time") or ""), pair[0]))[1]

    @property
    def last_metrics(self) -> dict[str, Any] | None:
        """The metrics of the last entry of ``evaluations`` that holds metrics (in recorded order)."""
        for entry in reversed(self.evaluations):
            if isinstance(entry, dict) and isinstance(entry.get("metrics"), dict):
                metrics: dict[str, Any] = entry["metrics"]
                return metrics
        return None

    @property
    def base_model(self) -> str | None:
        value: Any = self.base_model_info.get("path") or self.job_value("base_model")
        if not value:
            config, _ = read_json_file(self.adapter_dir / ADAPTER_CONFIG)
            value = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        return str(value) if value else None

    @property
    def base_model_kind(self) -> str | None:
        return self.base_model_info.get("kind")

    @property
    def base_model_corpus(self) -> list[tuple[Path, str | None]] | None:
        """The tiny base's corpus as ``base_model.corpus`` records it (``[{file, sha256}]``), or None."""
        corpus = self.base_model_info.get("corpus")
        if not isinstance(corpus, list) or not corpus:
            return None
        out = []
        for item in corpus:
            if not isinstance(item, dict) or not isinstance(item.get("file"), str):
                return None
            out.append((Path(item["file"]), item.get("sha256") if isinstance(item.get("sha256"), str) else None))
        return out

    @property
    def base_model_dataset(self) -> str | None:
        value = self.base_model_info.get("dataset")
        return value if isinstance(value, str) and value else None

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
        value = self.device.get("quant") or self.job_value("quant")
        return str(value) if value else None

    @property
    def dtype(self) -> str | None:
        """The dtype the base weights were loaded in for training, if recorded."""
        value = self.device.get("dtype")
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
        data = self.data
        path = self._recorded_path(data.get("train_file"))
        return (path, data.get("train_sha256")) if path else None

    @property
    def holdout(self) -> Path | None:
        """The held-out file the run recorded (its ``*_100.jsonl``), if any."""
        return self._recorded_path(self.data.get("holdout_file"))

    @property
    def holdout_sha256(self) -> str | None:
        value = self.data.get("holdout_sha256")
        return value if isinstance(value, str) and value else None

    @property
    def data_keys(self) -> Path:
        """The run's data_keys.json (the conversation keys it trained on and held out)."""
        return self.run_dir / DATA_KEYS

    # -- the folder's files --------------------------------------------------------------------
    @property
    def adapter_weights(self) -> Path:
        """The adapter's safetensors weights (``adapter_model.safetensors``; may not exist)."""
        return self.adapter_dir / ADAPTER_WEIGHTS

    @property
    def adapter_config(self) -> Path:
        return self.adapter_dir / ADAPTER_CONFIG


def read_run(folder: str | os.PathLike[str]) -> RunInfo:
    """The run.json of ``folder``, never raising for its content: ``run`` is empty when it is absent
    (``run_json`` None), unreadable (``problem`` says why) or not an object (``not_object``)."""
    path = Path(folder)
    run_json: Path | None = path / RUN_JSON
    assert run_json is not None
    loaded, problem = read_json_file(run_json)
    info = RunInfo(adapter_dir=path, run_dir=path, run_json=run_json, run={}, is_checkpoint=False, problem=problem)
    if isinstance(loaded, dict):
        info.run = loaded
    elif loaded is not None:
        info.not_object = True
    elif problem is None:
        info.run_json = None
    return info


def previous_run(run_dir: Path) -> RunInfo | None:
    """The run.json of ``run_dir`` when it holds a readable object, else None (what ``--resume`` reads)."""
    info = read_run(run_dir)
    return info if info.recorded else None


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
