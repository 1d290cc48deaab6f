"""``comapoi adapters export``: hand adapters over for serving as LoRA modules of one base model.

:func:`export_adapters` checks every run first (a trained adapter in safetensors, LoRA, one base
model for all), then copies each adapter under its serving name (``TO/NAME/``: adapter_config.json,
adapter_model.safetensors, the tokenizer files and chat template; never ``training_args.bin`` or
other pickles) through a temporary sibling folder renamed into place, verifies the copied
weights' SHA-256, writes ``TO/comapoi_export.json`` and returns the vLLM command line that serves
them (``vllm serve BASE --enable-lora --max-loras N --max-lora-rank R --lora-modules NAME=DIR ...``).
Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from comapoi_cli.adapters.listing import require_run_folder
from comapoi_cli.choices import QUANTISED
from comapoi_cli.errors import ComapoiError, UsageError
from comapoi_cli.fileio import atomic_folder, read_json, sha256_file, write_json_atomic
from comapoi_cli.runs.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLED

WEIGHTS = ADAPTER_WEIGHTS
EXPORT_INFO = "comapoi_export.json"
#: The lock an export holds on its --output-dir folder while it writes there.
EXPORT_LOCK = ".comapoi-export.lock"
#: Text files copied beside the weights when the run has them (the adapter's tokenizer and chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
#: The values vLLM accepts for --max-lora-rank: ``MaxLoRARanks`` in vllm/config/lora.py (checked against vLLM v0.26.0).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ExportedAdapter:
    name: str
    source: str  #: the run (or checkpoint) folder copied from
    path: str  #: TO/NAME
    role: str | None
    dataset: str | None
    rank: int
    alpha: Any
    trained_quant: str | None
    files: list[str]
    sha256: str  #: of adapter_model.safetensors


@dataclass
class ExportResult:
    to: Path
    base_model: str
    max_lora_rank: int
    adapters: list[ExportedAdapter]
    command: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)

    def to_dict(self) -> dict[str, Any]:
        return {"to": str(self.to), "base_model": self.base_model, "max_lora_rank": self.max_lora_rank,
                "adapters": [asdict(a) for a in self.adapters], "command": self.command,
                "command_line": self.command_line, "notes": self.notes}


@dataclass
class _Source:
    run: Any  # comapoi_cli.runs.info.RunInfo
    config: dict[str, Any]
    base: str  #: as recorded
    base_key: str  #: what "the same base model" compares


def _base_of(run: Any, config: dict[str, Any]) -> tuple[str, str]:
    """The recorded base model and its identity (a resolved folder, or a hub id as written)."""
    base = run.base_model or config.get("base_model_name_or_path")
    if not base:
        raise ComapoiError(f"{run.adapter_dir} records no base model, so it cannot be checked against the others.")
    path = Path(str(base)).expanduser()
    key = str(path.resolve()) if path.is_absolute() or path.exists() else str(base)
    return str(base), key


def _read_source(folder: Path) -> _Source:
    from comapoi_cli.runs.info import locate_run

    run = locate_run(require_run_folder(folder))
    if not (run.adapter_dir / WEIGHTS).is_file():
        pickled = (run.adapter_dir / ADAPTER_WEIGHTS_PICKLED).is_file()
        raise ComapoiError(f"{run.adapter_dir} holds no {WEIGHTS}" + (
            " (only a pickled adapter_model.bin), and export copies safetensors only." if pickled else "."))
    try:
        config = read_json(run.adapter_dir / ADAPTER_CONFIG)
    except ValueError as exc:
        raise ComapoiError(f"{run.adapter_dir / ADAPTER_CONFIG} is not valid JSON ({exc}).") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ComapoiError(f"{run.adapter_dir} is not a LoRA adapter (peft_type {config.get('peft_type') if isinstance(config, dict) else None}); "
                           "vLLM serves LoRA modules only.")
    base, key = _base_of(run, config)
    return _Source(run=run, config=config, base=base, base_key=key)


def _names(sources: list[_Source], names: Sequence[str] | None) -> list[str]:
    if names:
        names = [n.strip() for n in names]
        if len(names) != len(sources):
            raise UsageError(f"--names lists {len(names)} name{'s' if len(names) != 1 else ''} for "
                             f"{len(sources)} adapter{'s' if len(sources) != 1 else ''}; give one name per run folder, in order.")
    else:
        names = [s.run.type or s.run.run_dir.name for s in sources]
    for name in names:
        if not _NAME.match(name):
            raise UsageError(f"'{name}' cannot be a serving name: use letters, digits, '_', '-' and '.', starting "
                             "with a letter or digit.")
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    twice = [n for n, c in seen.items() if c > 1]
    if twice:
        raise UsageError(f"Two adapters would both be served as '{twice[0]}'; name them with --names, e.g. "
                         f"--names {','.join(f'{twice[0]}_{i + 1}' for i in range(seen[twice[0]]))}.")
    return list(names)


def vllm_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds ``rank``."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def _rank(config: dict[str, Any]) -> int:
    ranks = [config.get("r") or 0, *(v for v in (config.get("rank_pattern") or {}).values() if isinstance(v, int))]
    return int(max(ranks))


def export_adapters(run_dirs: Sequence[str | os.PathLike[str]], to: str | os.PathLike[str],
                    names: Sequence[str] | None = None, *, overwrite: bool = False,
                    base_model: str | None = None) -> ExportResult:
    """Copy the adapters of ``run_dirs`` to ``to/NAME`` and build the vLLM command that serves them.

    ``names`` default to each run's role (its ``--type``). ``base_model`` replaces the recorded
    base model in the command only (e.g. its path on the serving machine). Every check runs before
    anything is written; an existing ``to/NAME`` is replaced only with ``overwrite``.
    """
    if not run_dirs:
        raise UsageError("Name at least one run folder to export.")
    sources = [_read_source(Path(folder)) for folder in run_dirs]
    keys = {s.base_key for s in sources}
    serving_names = _names(sources, names)
    if len(keys) > 1:
        listing = "; ".join(f"{n}: {s.base}" for n, s in zip(serving_names, sources))
        raise ComapoiError(f"The adapters were trained on different base models ({listing}), and one server "
                           "serves LoRA modules of one base model only.",
                           hint="Export the adapters of each base model separately.")
    to = Path(to).expanduser().absolute()
    if to.exists() and not to.is_dir():
        raise UsageError(f"--output-dir {to} is a file.")
    for name in serving_names:
        target = to / name
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
            raise UsageError(f"{target} already exists.", hint="Pass --overwrite to replace it, or choose another --output-dir.")
    for source in sources:
        if to.resolve().is_relative_to(source.run.run_dir.resolve()):
            raise UsageError(f"--output-dir {to} is inside the run folder {source.run.run_dir}; choose a folder outside it.")

    notes: list[str] = []
    base = base_model or sources[0].base
    local = Path(sources[0].base).expanduser()
    if base_model is None and (local.is_absolute() or sources[0].base.startswith((".", "~"))) and not local.is_dir():
        notes.append(f"the base model {sources[0].base} does not exist here; pass its path on the serving machine "
                     "with --model")
    from comapoi_cli.runs.lock import check_not_locked, hold_lock

    for source in sources:  # a run still training would be exported half-written
        check_not_locked(source.run.run_dir)
    to.mkdir(parents=True, exist_ok=True)
    with hold_lock(to / EXPORT_LOCK, f"The export folder {to}"):
        return _export(sources, serving_names, to, base, base_model, overwrite, notes)


def _export(sources: list[_Source], serving_names: list[str], to: Path, base: str, base_model: str | None,
            overwrite: bool, notes: list[str]) -> ExportResult:
    exported: list[ExportedAdapter] = []
    for name, source in zip(serving_names, sources):
        exported.append(_copy_adapter(source, to / name, name, overwrite, notes))
        quant = source.run.quant
        if quant in QUANTISED:
            notes.append(f"{name} was trained on a {quant} base (QLoRA); vLLM applies it to the 16-bit base model "
                         "named in the command, which is how QLoRA adapters are served")
        if source.config.get("modules_to_save"):
            notes.append(f"{name} saves whole modules ({', '.join(source.config['modules_to_save'])}), which vLLM's LoRA "
                         "serving does not load; merge it instead (comapoi adapters merge)")
        if source.config.get("use_dora"):
            notes.append(f"{name} is a DoRA adapter, which vLLM does not serve; merge it instead (comapoi adapters merge)")
    rank = max(_rank(s.config) for s in sources)
    max_rank = vllm_rank(rank)
    if max_rank != rank:
        notes.append(f"the largest LoRA rank is {rank}; vLLM's --max-lora-rank takes {max_rank}, the next value it accepts")
    command = ["vllm", "serve", base, "--enable-lora", "--max-loras", str(len(exported)), "--max-lora-rank", str(max_rank),
               "--lora-modules", *(f"{a.name}={a.path}" for a in exported)]
    result = ExportResult(to=to, base_model=base, max_lora_rank=max_rank, adapters=exported, command=command, notes=notes)
    info_path = to / EXPORT_INFO
    previous: dict[str, Any] = {}
    if info_path.is_file():
        try:
            loaded = read_json(info_path)
            previous = {a["name"]: a for a in loaded.get("adapters", []) if isinstance(a, dict) and "name" in a} \
                if isinstance(loaded, dict) and loaded.get("base_model") == base else {}
        except (OSError, ValueError, TypeError, KeyError):
            previous = {}
    write_json_atomic(info_path, result.to_dict() | {"adapters": [
        *(a for n, a in previous.items() if n not in serving_names and (to / n).is_dir()),
        *(asdict(a) for a in exported)]})
    return result


def _regular_file(path: Path) -> bool:
    """A regular file itself (not a symbolic link to one, not a FIFO or device)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _copy_regular(source: Path, target: Path) -> None:
    """Copy a regular file without following a symbolic link swapped in meanwhile."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ComapoiError(f"{source} is not a regular file, so it was not exported.")
        with open(target, "wb") as out:
            shutil.copyfileobj(handle, out, 1 << 20)


def strip_remote_code(folder: Path) -> list[str]:
    """Remove code files (``*.py``) and ``auto_map`` entries from a folder about to be handed over."""
    removed = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".py" and not path.is_dir():
            path.unlink()
            removed.append(path.name)
        elif path.suffix == ".json" and _regular_file(path):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "auto_map" in data:
                del data["auto_map"]
                write_json_atomic(path, data)
                removed.append(f"{path.name}: auto_map")
    return removed


def _copy_adapter(source: _Source, target: Path, name: str, overwrite: bool, notes: list[str]) -> ExportedAdapter:
    folder = source.run.adapter_dir
    for required in (ADAPTER_CONFIG, WEIGHTS):
        if not _regular_file(folder / required):
            raise ComapoiError(f"{folder / required} is a symbolic link or not a regular file; export copies only "
                               "regular files inside the run folder.")
    skipped = [f for f in TOKENIZER_FILES if (folder / f).is_symlink() or ((folder / f).exists() and not _regular_file(folder / f))]
    if skipped:
        notes.append(f"{name}: not copied {', '.join(skipped)} (symbolic links or not regular files; only regular "
                     "files inside the run folder are exported)")
    files = [ADAPTER_CONFIG, WEIGHTS, *(f for f in TOKENIZER_FILES if _regular_file(folder / f))]
    with atomic_folder(target) as tmp:
        for file in files:
            _copy_regular(folder / file, tmp / file)
        strip_remote_code(tmp)
        digest = sha256_file(tmp / WEIGHTS)
        if digest != sha256_file(folder / WEIGHTS):
            raise ComapoiError(f"The copy of {folder / WEIGHTS} differs from the original (disk or file changing?).")
    return ExportedAdapter(name=name, source=str(folder.resolve()), path=str(target), role=source.run.type,
                           dataset=source.run.dataset, rank=_rank(source.config), alpha=source.config.get("lora_alpha"),
                           trained_quant=source.run.quant, files=files, sha256=digest)
