"""From flags and config files to a ``TrainingJob``: precedence, spellings, model location.

Precedence: built-in defaults < environment defaults (``COMAPOI_DATA_DIR``, ``COMAPOI_OUTPUT_DIR``,
``COMAPOI_MODEL_PATH``) < the config file (``--config FILE``, YAML or TOML) < flags given on the
command line. A config file holds the same options as the flags, under their field names
(``seq_length``), their kebab-case spelling (``seq-length``), or the original's names, either at the
top level or under a ``train`` table/mapping. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from comapoi_cli.errors import UsageError, first_line
from comapoi_cli.models.smollm2 import SMOLLM2
from comapoi_cli.roles import MERGED
from comapoi_cli.runs.layout import ADAPTER_CONFIG
from comapoi_cli.training.job import DEFAULT_TARGET_MODULES, TINY, TINY_LEARNING_RATE, TrainingJob, _safe_name

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry

ENV_DATA_DIR = "COMAPOI_DATA_DIR"
ENV_OUTPUT_DIR = "COMAPOI_OUTPUT_DIR"
ENV_MODEL_PATH = "COMAPOI_MODEL_PATH"

#: Option names that are not ``TrainingJob`` fields but are accepted in config files.
EXTRA_KEYS = {"unsloth"}
#: Fields a user never sets (they are derived).
DERIVED_FIELDS = {"base_model", "config_file"}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "yes", "on", "1", "false", "no", "off", "0"}:
        return value.strip().lower() in {"true", "yes", "on", "1"}
    raise ValueError(f"expected true or false, got {value!r}")


def _to_optional_bool(value: Any) -> bool | None:
    """``true``/``false`` or ``auto``/empty (None: comapoi decides)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "auto"}):
        return None
    return _to_bool(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value.strip())
    raise ValueError(f"expected a whole number, got {value!r}")


def _to_optional_int(value: Any) -> int | None:
    return None if value is None or value == "" else _to_int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _to_count_or_fraction(value: Any) -> int | float:
    number = _to_float(value)
    return int(number) if number >= 1 and number.is_integer() else number


def _to_str(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        raise ValueError(f"expected text, got {value!r}")
    return str(value)


def _to_optional_str(value: Any) -> str | None:
    return None if value is None or value == "" else _to_str(value)


def parse_target_modules(value: Any) -> tuple[str, ...]:
    """``"q_proj,v_proj"``, ``["q_proj", "v_proj"]`` or ``"all-linear"`` to a tuple of names."""
    if isinstance(value, str):
        items = [part.strip() for part in value.replace(" ", ",").split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(part).strip() for part in value]
    else:
        raise ValueError(f"expected a comma list of module names, got {value!r}")
    return tuple(item for item in items if item)


def _to_str_tuple(value: Any) -> tuple[str, ...]:
    """``"a=b"`` or ``["a=b", "c=d"]`` (a config file's list) to a tuple of strings."""
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, Mapping):
        return tuple(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_to_str(v) for v in value)
    raise ValueError(f"expected CHECK=POLICY items, got {value!r}")


def _coercer(f: dataclasses.Field) -> Callable[[Any], Any]:
    special = {"on": _to_str_tuple, "num_processes": _to_optional_int, "accelerate_config": _to_optional_str, "test_size": _to_count_or_fraction, "target_modules": parse_target_modules,
               "dataset": _to_optional_str, "data_path": _to_optional_str, "model_path": _to_optional_str,
               "chat_template": _to_optional_str, "bf16": _to_optional_bool, "fp16": _to_optional_bool,
               "gradient_checkpointing": _to_optional_bool}
    if f.name in special:
        return special[f.name]
    default = f.default
    if isinstance(default, bool):
        return _to_bool
    if isinstance(default, int):
        return _to_int
    if isinstance(default, float):
        return _to_float
    return _to_str


FIELDS = {f.name: f for f in dataclasses.fields(TrainingJob)}
COERCERS = {name: _coercer(f) for name, f in FIELDS.items()}


def normalise_key(key: str) -> str:
    """``--seq-length``, ``seq-length``, ``seq_length`` -> ``seq_length``."""
    return key.strip().lstrip("-").replace("-", "_").lower()


def coerce_options(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Normalise keys and convert values; unknown keys and bad values are ``UsageError`` naming ``source``."""
    out: dict[str, Any] = {}
    allowed = (set(FIELDS) - DERIVED_FIELDS) | EXTRA_KEYS
    for key, value in raw.items():
        name = normalise_key(str(key))
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"{source}: unknown option '{key}'{hint}.")
        if name == "unsloth":
            try:
                out[name] = _to_bool(value)
            except ValueError as exc:
                raise UsageError(f"{source}: option '{key}': {exc}.") from None
            continue
        try:
            out[name] = COERCERS[name](value)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{source}: option '{key}': {exc}.") from None
    return out


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of training options (keys coerced)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"Config file {file} does not exist.")
    text = file.read_text(encoding="utf-8-sig")
    suffix = file.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib  # Python 3.11+
            except ModuleNotFoundError:  # pragma: no cover - Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise UsageError("TOML config files need Python 3.11 or the tomli package; use YAML instead.") from None
            data = tomllib.loads(text)
        elif suffix in {".yaml", ".yml", ".json"}:
            import yaml

            data = yaml.safe_load(text)
        else:
            raise UsageError(f"Config file {file} must end in .yaml, .yml or .toml.")
    except UsageError:
        raise
    except Exception as exc:  # a syntax error in the user's file: one sentence with the parser's words
        raise UsageError(f"Config file {file} could not be read: {first_line(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"Config file {file} must hold a mapping of option names to values.")
    section = data.get("train")
    if isinstance(section, dict):
        data = {**{k: v for k, v in data.items() if k != "train" and not isinstance(v, dict)}, **section}
    return coerce_options(data, str(file))


# -- the base model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelLocation:
    """Where ``--model`` / ``--model_path`` point. ``kind``: tiny, smollm2-135m, local, hub or missing."""

    kind: str
    ref: str  #: ``tiny``, an absolute folder, or a Hugging Face id (for ``missing``: what was looked for)
    name: str  #: short name, the default run tag
    problem: str | None = None
    hint: str | None = None


_MODEL_HINT = ("Pass --model_path DIR (the folder that holds the model's folder) with --model NAME, or --model DIR, "
               "a Hugging Face id such as Qwen/Qwen2.5-7B-Instruct, --model tiny or --model smollm2-135m.")


def _check_folder(folder: Path, name: str) -> ModelLocation:
    folder = folder.expanduser().resolve()
    if (folder / "config.json").is_file():
        return ModelLocation("local", str(folder), name)
    if (folder / ADAPTER_CONFIG).is_file():
        return ModelLocation("missing", str(folder), name, f"{folder} holds a LoRA adapter, not a base model.",
                             "Pass the adapter's base model (its adapter_config.json names it), or merge the adapter first.")
    return ModelLocation("missing", str(folder), name, f"{folder} is not a Hugging Face model folder (it has no config.json).",
                         _MODEL_HINT)


def locate_model(model: str, model_path: str | None, env: Mapping[str, str] | None = None) -> ModelLocation:
    """Resolve the original's ``--model_path`` + ``--model`` (or ``--model DIR``, a hub id, ``tiny``)."""
    env = os.environ if env is None else env
    model = model.strip()
    if not model:
        return ModelLocation("missing", "", "model", "--model must not be empty.", _MODEL_HINT)
    short = _safe_name(Path(model.rstrip("/")).name)
    if model.lower() == TINY and not model_path:
        return ModelLocation("tiny", TINY, TINY)
    if model.lower() == SMOLLM2 and not model_path:  # converted from its PyPI wheel on first use (models/smollm2.py)
        return ModelLocation(SMOLLM2, SMOLLM2, SMOLLM2)
    if model_path:
        folder = Path(model_path).expanduser() / model
        if folder.is_dir():
            return _check_folder(folder, short)
        return ModelLocation("missing", str(folder), short, f"Model folder {folder} does not exist.", _MODEL_HINT)
    as_path = Path(model).expanduser()
    if as_path.is_dir():
        return _check_folder(as_path, short)
    pathlike = model.startswith((".", "/", "~")) or model.rstrip("/").count("/") > 1 or "\\" in model
    if pathlike:
        return ModelLocation("missing", str(as_path), short, f"Model folder {as_path} does not exist.", _MODEL_HINT)
    default_parent = env.get(ENV_MODEL_PATH)
    if default_parent and (Path(default_parent).expanduser() / model).is_dir():
        return _check_folder(Path(default_parent).expanduser() / model, short)
    if model.count("/") == 1 and not model.endswith("/"):
        from comapoi_cli.models.resolve import cached_hub_model, hub_cache_dir

        snapshot = cached_hub_model(model, env)  # the local cache only: comapoi never downloads a model
        if snapshot is not None:
            return ModelLocation("hub", str(snapshot), short)
        return ModelLocation("missing", model, short,
                             f"The model {model} is not in the local Hugging Face cache ({hub_cache_dir(env)}), "
                             "and comapoi does not download models.",
                             f"Download it first (hf download {model}), or pass a local model folder with --model DIR.")
    where = f"{default_parent}/{model}" if default_parent else None
    looked = f"there is no folder ./{model}" + (f" or {where}" if where else "")
    tail = "" if default_parent else ", and neither --model_path nor COMAPOI_MODEL_PATH is set"
    return ModelLocation("missing", model, short, f"Model '{model}' was not found: {looked}{tail}.", _MODEL_HINT)


# -- building the job ---------------------------------------------------------------------------------
def env_defaults(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env.get(ENV_DATA_DIR):
        out["data_dir"] = env[ENV_DATA_DIR]
    if env.get(ENV_OUTPUT_DIR):
        out["output_dir"] = env[ENV_OUTPUT_DIR]
    return out


def build_job(cli: Mapping[str, Any], *, config_file: str | None = None, registry: Registry,
              env: Mapping[str, str] | None = None) -> tuple[TrainingJob, ModelLocation]:
    """Merge defaults < environment < config file < ``cli`` (only the flags actually given) into a job.

    Returns the job and where its model is (``ModelLocation.problem`` says why it cannot be used;
    training raises it, ``--dry-run`` reports it). Raises ``UsageError`` for bad values.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = env_defaults(env)
    if config_file:
        values.update(load_config_file(config_file))
    values.update(coerce_options(dict(cli), "command line"))
    unsloth = values.pop("unsloth", None)
    if unsloth:
        if values.get("backend") not in (None, "unsloth"):
            raise UsageError(f"--unsloth means --backend unsloth, but --backend {values['backend']} was given.")
        values["backend"] = "unsloth"
    if values.get("data_path") and "dataset" not in values:
        values["dataset"] = None  # the run folder then takes the data file's name
    if values.get("target_modules") == ("all_linear",):
        values["target_modules"] = ("all-linear",)
    if "learning_rate" not in values and str(values.get("model", TINY)).lower() == TINY and not values.get("model_path"):
        values["learning_rate"] = TINY_LEARNING_RATE
    job = TrainingJob(**values)
    job.config_file = str(Path(config_file).expanduser()) if config_file else None
    if job.type not in registry.training_types():
        raise UsageError(f"unknown --type '{job.type}'; choose {', '.join(registry.training_types())}.")
    if job.backend not in registry.backends:
        known = ", ".join(sorted(registry.backends)) or "none"
        if job.backend == "unsloth":
            from comapoi_cli.environment import unsloth_hint

            raise UsageError("The unsloth backend is a plugin, and it is not installed here.", hint=unsloth_hint())
        raise UsageError(f"unknown --backend '{job.backend}'; choose {known}.")
    from comapoi_cli.backends import method_problem

    problem = method_problem(registry.backend(job.backend), job.method, registry.backends)
    if problem:
        raise UsageError(problem)
    if job.method == "grpo" and job.type == MERGED:
        roles = ", ".join(sorted(registry.roles))
        raise UsageError(f"--method grpo trains one role with that role's rewards: give --type {roles}, not merged.")
    location = locate_model(job.model, job.model_path, env)
    job.base_model = location.ref if location.kind != "missing" else job.model
    if not job.run_tag:
        job.run_tag = location.name
    job.run_tag = _safe_name(job.run_tag)
    job.check()
    return job, location


def data_problems(job: TrainingJob, registry: Registry) -> list[str]:
    """Why the job's training data cannot be found (empty when it can); checks existence only."""
    if job.data_path:
        path = Path(job.data_path).expanduser()
        return [] if path.is_file() else [f"Training file {path} does not exist."]
    if not job.dataset:
        return ["Give --dataset (with --data-dir) or --data_path."]
    folder = Path(job.data_dir).expanduser() / job.dataset
    if not folder.is_dir():
        return [f"Data folder {folder} does not exist (--data-dir {job.data_dir}, --dataset {job.dataset})."]
    roles = list(registry.roles.values()) if job.type == MERGED else [registry.role(job.type)]
    names = [role.data_file_name() for role in roles]
    if not any((folder / name).is_file() for name in names):
        return [f"{folder} holds none of {', '.join(names)}."]
    return []


__all__ = ["DEFAULT_TARGET_MODULES", "ModelLocation", "build_job", "coerce_options", "data_problems",
           "load_config_file", "locate_model", "normalise_key", "parse_target_modules"]
