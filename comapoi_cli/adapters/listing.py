"""Finding and describing training runs (adapters) under output roots.

``scan_runs(roots)`` walks each root and returns one ``AdapterRun`` per run folder: a folder
holding ``run.json`` (a comapoi run) or ``adapter_config.json`` (a PEFT adapter from elsewhere,
e.g. the original script's ``finetune/results/...``; described from its JSON files and its folder
names). ``load_run(folder)`` describes one folder. Only JSON files are read (never
``training_args.bin``, which is a pickle); a half-written or foreign folder becomes a warning and,
where it still is an adapter, a row with what could be read. Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from comapoi_cli.errors import UsageError
from comapoi_cli.models.weights import WeightsFileError, read_safetensors_header
from comapoi_cli.runs.info import RunInfo, read_json_file, read_run
from comapoi_cli.runs.layout import ADAPTER_CONFIG, CHECKPOINT_RE, RUN_JSON, TRAINER_STATE, checkpoint_names
from comapoi_cli.runs.layout import ADAPTER_WEIGHT_NAMES as ADAPTER_WEIGHTS
from comapoi_cli.runs.lock import process_alive

ENV_OUTPUT_DIR = "COMAPOI_OUTPUT_DIR"
_SAVE_NAME = re.compile(r"^bs(?P<bs>\d+)-gas(?P<gas>\d+)-ms(?P<ms>\d+)-(?P<type>.+)-lr(?P<lr>[^-]+(?:-\d+)?)$")
_CHECKPOINT = CHECKPOINT_RE

#: ``--sort`` keys: (field, largest first?)
SORT_KEYS = {
    "date": ("date", True), "run": ("run", False), "loss": ("final_loss", False), "steps": ("steps", True),
    "size": ("size_bytes", True), "acc1": ("acc@1", True), "acc5": ("acc@5", True), "mrr": ("mrr", True),
}


def default_roots() -> list[Path]:
    return [Path(os.environ.get(ENV_OUTPUT_DIR) or "output")]


@dataclass
class AdapterRun:
    """One run folder as ``adapters list`` shows it (``to_dict`` is its ``--json`` form)."""

    path: str  #: the run folder
    run: str  #: the folder relative to its output root
    status: str  #: finished, interrupted, running, stopped (killed), failed, no run.json, unreadable
    dataset: str | None = None
    type: str | None = None
    backend: str | None = None
    base_model: str | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    steps: int | None = None
    max_steps: int | None = None
    final_loss: float | None = None
    size_bytes: int | None = None  #: the final adapter's weights (None before the run finishes)
    date: str | None = None  #: finished, else last updated (ISO 8601)
    checkpoints: list[str] = field(default_factory=list)
    adapter: bool = False  #: the final adapter is present
    evaluation: dict[str, Any] | None = None  #: the latest entry of run.json's ``evaluations``
    warnings: list[str] = field(default_factory=list)

    def metric(self, name: str) -> float | None:
        metrics = (self.evaluation or {}).get("metrics") or {}
        value = metrics.get(name)
        return value if isinstance(value, (int, float)) else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["acc@1"], data["acc@5"], data["mrr"] = self.metric("acc@1"), self.metric("acc@5"), self.metric("mrr")
        return data


def _read_json(path: Path) -> tuple[Any, str | None]:
    """A JSON file of the run folder through the one reader (regular files only, size-capped)."""
    return read_json_file(path)


_checkpoint_names = checkpoint_names


def _weights(folder: Path) -> Path | None:
    return next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)


def _iso_mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).astimezone().isoformat(timespec="seconds")


_process_alive = process_alive


def _from_names(run: AdapterRun, folder: Path) -> None:
    """Fill dataset/type/steps from the original's folder names: .../sft-{dataset}/bs..-gas..-ms..-{type}-lr.."""
    match = _SAVE_NAME.match(folder.name)
    if match:
        run.type = run.type or match.group("type")
        run.max_steps = run.max_steps or int(match.group("ms"))
    if folder.parent.name.startswith("sft-"):
        run.dataset = run.dataset or folder.parent.name[4:]


def load_run(folder: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> AdapterRun:
    """Describe one run folder from its JSON files (raises nothing for bad content: see ``warnings``)."""
    folder = Path(folder)
    rel = os.path.relpath(folder, root) if root is not None else str(folder)
    run = AdapterRun(path=str(folder), run=rel, status="no run.json")
    run.checkpoints = _checkpoint_names(folder)
    weights = _weights(folder)
    run.adapter = weights is not None and (folder / ADAPTER_CONFIG).is_file()
    run.size_bytes = weights.stat().st_size if weights is not None else None
    info = read_run(folder)
    if info.problem:
        run.warnings.append(f"{info.problem}; listed from its other files")
        run.status = "unreadable"
    if info.recorded:
        job = info.job
        run.status = str(info.status or "unknown")
        if run.status == "running":
            alive = _process_alive(info.pid, info.host)
            if alive is False:
                run.status = "stopped"
        run.dataset = job.get("dataset") or (Path(job["data_path"]).stem if job.get("data_path") else None)
        run.type = job.get("type")
        run.backend = info.backend_name
        run.base_model = info.base_model_info.get("name") or job.get("model")
        run.lora_r = info.lora.get("r", job.get("lora_r"))
        run.lora_alpha = info.lora.get("alpha", job.get("lora_alpha"))
        run.steps = info.global_step
        run.max_steps = info.max_steps
        run.final_loss = info.final_loss
        run.date = info.date
        run.evaluation = info.latest_evaluation
        if run.status == "finished" and not run.adapter:
            run.warnings.append("run.json says finished but the adapter files are missing")
    elif info.not_object:
        run.warnings.append("run.json does not hold a JSON object; listed from its other files")
        run.status = "unreadable"
    if not info.recorded:
        config, problem = _read_json(folder / ADAPTER_CONFIG)
        if problem:
            run.warnings.append(problem)
        if isinstance(config, dict):
            base_path = config.get("base_model_name_or_path")
            run.base_model = Path(base_path).name if isinstance(base_path, str) and base_path else None
            run.lora_r, run.lora_alpha = config.get("r"), config.get("lora_alpha")
        _from_names(run, folder)
        if run.checkpoints:
            state, _ = _read_json(folder / run.checkpoints[-1] / TRAINER_STATE)
            if isinstance(state, dict):
                run.steps = state.get("global_step")
                losses = [e["loss"] for e in state.get("log_history") or [] if isinstance(e, dict) and "loss" in e]
                run.final_loss = losses[-1] if losses else None
        if run.status == "no run.json" and run.adapter:
            run.status = "finished" if run.steps is None or run.max_steps is None or run.steps >= run.max_steps else "interrupted"
            run.warnings.append("no run.json (not made by comapoi, or made before it); listed from adapter_config.json and its folder names")
        run.date = run.date or _iso_mtime(folder)
    return run


def _is_run_folder(names: Iterable[str]) -> bool:
    names = set(names)
    return RUN_JSON in names or ADAPTER_CONFIG in names


def scan_runs(roots: Sequence[str | os.PathLike[str]]) -> tuple[list[AdapterRun], list[str]]:
    """Every run folder under ``roots`` (checkpoints are part of their run), and warnings."""
    runs: list[AdapterRun] = []
    warnings: list[str] = []
    seen: set[str] = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            warnings.append(f"{root}: no such folder")
            continue
        for current, dirs, files in os.walk(root, onerror=lambda exc: warnings.append(f"{exc.filename}: {exc.strerror}")):
            here = Path(current)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if not _is_run_folder(files):
                continue
            dirs[:] = []  # checkpoints and the rest belong to this run
            key = str(here.resolve())
            if key in seen:
                continue
            seen.add(key)
            try:
                run = load_run(here, root)
            except OSError as exc:  # vanished while listing, permissions
                warnings.append(f"{here}: {exc.strerror or exc}")
                continue
            runs.append(run)
            warnings.extend(f"{run.path}: {w}" for w in run.warnings)
    return runs, warnings


def sort_runs(runs: list[AdapterRun], key: str, reverse: bool = False) -> list[AdapterRun]:
    """Sort by a ``SORT_KEYS`` name; runs without the value go last."""
    if key not in SORT_KEYS:
        raise UsageError(f"--sort must be one of {', '.join(SORT_KEYS)}, got {key!r}.")
    name, descending = SORT_KEYS[key]
    descending ^= reverse

    def value(run: AdapterRun) -> Any:
        if name in ("acc@1", "acc@5", "mrr"):
            return run.metric(name)
        return getattr(run, name)

    present = [r for r in runs if value(r) is not None]
    missing = [r for r in runs if value(r) is None]
    present.sort(key=lambda r: (value(r), r.run), reverse=descending)
    return present + sorted(missing, key=lambda r: r.run)


# -- one run in full: ``adapters show`` ---------------------------------------------------------------

_NOT_A_RUN_HINT = "List the trained runs with: comapoi adapters list"


def require_run_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path when it is a run folder (run.json or adapter_config.json), else one sentence."""
    path = Path(folder)
    if not path.exists():
        raise UsageError(f"{path} does not exist.", hint=_NOT_A_RUN_HINT)
    if not path.is_dir():
        raise UsageError(f"{path} is a file, not a training run folder.", hint=_NOT_A_RUN_HINT)
    if not (path / RUN_JSON).is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise UsageError(f"{path} is not a training run: it holds neither {RUN_JSON} nor {ADAPTER_CONFIG}.",
                         hint=_NOT_A_RUN_HINT)
    return path


def safetensors_parameters(path: str | os.PathLike[str]) -> int | None:
    """The number of values stored in a .safetensors file, read from its header (no torch); None when the
    file cannot be read."""
    try:
        return read_safetensors_header(path).parameters
    except WeightsFileError:
        return None


def _loss_entries(entries: Any) -> list[dict[str, Any]]:
    out = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("loss"), (int, float)):
            out.append({k: v for k, v in entry.items() if isinstance(v, (int, float, str)) or v is None})
    return out


def _trainer_state(folder: Path, checkpoints: list[str]) -> dict[str, Any] | None:
    """trainer_state.json of a checkpoint folder itself, else of the run's last checkpoint."""
    for candidate in [folder, *(folder / name for name in reversed(checkpoints))]:
        state, _ = _read_json(candidate / TRAINER_STATE)
        if isinstance(state, dict):
            return state
    return None


def describe_run(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything known about one run folder, for ``adapters show`` (JSON-ready).

    The keys are run.json's sections as recorded (job, versions, device, base_model, tokenizer,
    chat_template, data, lora, adapter, segments, progress, loss_history, eval_history,
    evaluations, ...) plus: ``path``, ``summary`` (the ``adapters list`` row), ``adapter_config``
    (the PEFT file as written), ``lora`` completed from adapter_config.json, ``base_model.exists``,
    ``checkpoints`` (one object per checkpoint-N folder), ``metrics`` (the latest evaluation's) and
    ``warnings``. A checkpoint folder or a PEFT adapter without run.json is described from its
    JSON files (its loss history from trainer_state.json). Reads JSON and safetensors headers only.
    """
    path = require_run_folder(folder)
    summary = load_run(path)
    warnings = list(summary.warnings)
    info = read_run(path)
    problem = info.problem
    source: dict[str, Any] = info.sections() if info.recorded else {}
    absent = not info.recorded and not info.not_object  # no run.json, or one that cannot be read
    if absent and _CHECKPOINT.match(path.name):
        parent = read_run(path.parent)
        if parent.recorded:
            warnings = [w for w in warnings if not w.startswith("no run.json")]
            # the run's sections that describe the checkpoint too (not its progress, final adapter, evaluations)
            source = parent.sections(leave_out=("progress", "adapter", "evaluations", "loss_history", "eval_history",
                                                "checkpoints", "segments", "status", "finished", "error"))
            source["checkpoint_of"] = str(path.parent.resolve())
    described = RunInfo.from_record(source, path)
    config, config_problem = _read_json(path / ADAPTER_CONFIG)
    if config_problem:
        warnings.append(config_problem)
    config = config if isinstance(config, dict) else None

    out: dict[str, Any] = {"path": str(path.resolve())}
    out.update(source)
    out["summary"] = summary.to_dict()
    out["status"] = summary.status
    out["adapter_config"] = config

    lora = dict(described.lora)
    if config:
        for key, name in (("r", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout"),
                          ("target_modules", "target_modules")):
            if lora.get(key) is None and config.get(name) is not None:
                lora[key] = config[name]
        for key in ("peft_type", "bias", "use_rslora", "use_dora", "modules_to_save", "task_type"):
            if key in config:
                lora[key] = config[key]
        if isinstance(lora.get("target_modules"), list):
            lora["target_modules"] = sorted(lora["target_modules"])
    weights = _weights(path)
    if lora.get("trainable_parameters") is None and weights is not None and weights.suffix == ".safetensors":
        lora["trainable_parameters"] = safetensors_parameters(weights)
    trainable, total = lora.get("trainable_parameters"), lora.get("total_parameters")
    if isinstance(trainable, int) and isinstance(total, int) and total > 0:
        lora["trainable_percent"] = round(100.0 * trainable / total, 4)
    out["lora"] = lora

    base = dict(described.base_model_info)
    if not base and config and config.get("base_model_name_or_path"):
        base = {"name": Path(str(config["base_model_name_or_path"])).name, "path": config["base_model_name_or_path"]}
    base_path = base.get("path")
    if isinstance(base_path, str) and base_path:
        local = Path(base_path).expanduser()
        looks_local = local.is_absolute() or base_path.startswith((".", "~")) or local.exists()
        base["exists"] = local.is_dir() if looks_local else None  # None: a hub id, not checked
        if base["exists"] is False:
            warnings.append(f"the base model {base_path} does not exist (moved or deleted); "
                            "merge needs it (or --model DIR)" + (", or it is rebuilt from the training data for a tiny run"
                                                                  if base.get("kind") == "tiny" else ""))
    out["base_model"] = base or None

    history = _loss_entries(described.loss_history)
    if absent:  # a checkpoint or a foreign adapter: trainer_state.json
        state = _trainer_state(path, summary.checkpoints)
        if state is not None:
            history = _loss_entries(state.get("log_history"))
            out["eval_history"] = [e for e in state.get("log_history") or [] if isinstance(e, dict) and "eval_loss" in e]
            if _CHECKPOINT.match(path.name):
                step = int(path.name.split("-")[1])
                history = [e for e in history if not isinstance(e.get("step"), int) or e["step"] <= step]
    out["loss_history"] = history

    history_by_step = {e.get("step"): e.get("loss") for e in history}
    checkpoints = []
    for name in summary.checkpoints:
        step = int(name.split("-")[1])
        cp = path / name
        cp_weights = _weights(cp)
        checkpoints.append({"name": name, "step": step, "path": str(cp.resolve()),
                            "adapter": cp_weights is not None and (cp / ADAPTER_CONFIG).is_file(),
                            "resumable": (cp / TRAINER_STATE).is_file() and (cp / "optimizer.pt").is_file(),
                            "size_bytes": cp_weights.stat().st_size if cp_weights is not None else None,
                            "loss": history_by_step.get(step)})
    out["checkpoints"] = checkpoints
    out["evaluations"] = described.evaluations
    out["metrics"] = (summary.evaluation or {}).get("metrics")
    out["adapter_files"] = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if problem:
        warnings.append(problem)
    out["warnings"] = list(dict.fromkeys(warnings))
    return out


def write_loss_plot(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "",
                    eval_history: Sequence[dict[str, Any]] = ()) -> Path:
    """Write the loss curve (``loss_history`` entries, plus ``eval_loss`` ones if any) as a PNG, atomically."""
    from comapoi_cli.errors import ComapoiError
    from comapoi_cli.fileio import atomic_writer

    points = [(e["step"], e["loss"]) for e in history
              if isinstance(e.get("step"), (int, float)) and isinstance(e.get("loss"), (int, float))]
    if not points:
        raise ComapoiError("The run has no loss history to plot.")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ComapoiError("--plot needs matplotlib, which is not installed (pip install 'comapoi[plot]').") from None
    target = Path(path)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 40 else None,
                  markersize=3, label="training loss")
        evals = [(e["step"], e["eval_loss"]) for e in eval_history
                 if isinstance(e.get("step"), (int, float)) and isinstance(e.get("eval_loss"), (int, float))]
        if evals:
            axes.plot([p[0] for p in evals], [p[1] for p in evals], marker="s", markersize=4, label="holdout loss")
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.grid(True, alpha=0.3)
        if title:
            axes.set_title(title, fontsize=9)
        axes.legend()
        figure.tight_layout()
        with atomic_writer(target, "wb") as handle:
            figure.savefig(handle, format="png")
    finally:
        plt.close(figure)
    return target


def filter_runs(runs: Sequence[AdapterRun], *, dataset: str | None = None, type_: str | None = None,
                role: str | None = None) -> list[AdapterRun]:
    """The runs on ``dataset`` whose type is ``type_`` and ``role`` (each None = any)."""
    return [r for r in runs if (dataset is None or r.dataset == dataset) and (type_ is None or r.type == type_)
            and (role is None or r.type == role)]
