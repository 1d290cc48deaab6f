"""The ``comapoi`` entry points installed here, and what each plugin was last seen to register: both cached.

Light (no pluggy, no ``importlib.metadata`` on a cache hit): ``comapoi --help`` asks
:func:`cached_plugin_commands` which commands the plugins add (recorded the last time they loaded), and a
command asks :func:`plugins_may_add_commands` whether any plugin may add one, before either loads the
plugins at all.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "comapoi"


@dataclass(frozen=True)
class EntryPointSpec:
    """A ``comapoi`` entry point as found on ``sys.path``: its name, ``module:attr`` value and distribution."""

    name: str
    value: str
    dist: str | None = None
    version: str | None = None

    def load(self) -> Any:
        module_name, _, attr = self.value.partition(":")
        obj: Any = importlib.import_module(module_name.strip())
        for part in filter(None, attr.strip().split(".")):
            obj = getattr(obj, part)
        return obj


def _cache_file() -> Path | None:
    if os.environ.get("COMAPOI_CACHE_DIR"):
        return Path(os.environ["COMAPOI_CACHE_DIR"]) / "entry-points.json"
    base = os.environ.get("XDG_CACHE_HOME") or (str(Path.home() / ".cache") if Path.home() != Path("/") else "")
    return Path(base) / "comapoi" / "entry-points.json" if base else None


def _path_key() -> str:
    """What the installed entry points depend on: the interpreter and each ``sys.path`` entry's mtime
    (installing or removing a distribution adds or removes a folder there, which changes it)."""
    parts = [sys.version, sys.prefix]
    for entry in sys.path:
        try:
            parts.append(f"{entry}={os.stat(entry or '.').st_mtime_ns}")
        except OSError:
            parts.append(f"{entry}=-")
    return "\n".join(parts)  # compared as is: hashing it would cost more than it saves


def _scan_entry_points() -> list[EntryPointSpec]:
    from importlib import metadata

    found = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        found.append(EntryPointSpec(ep.name, ep.value, dist.name if dist else None, dist.version if dist else None))
    return found


#: How many ``sys.path`` configurations each cache file remembers (``python -m comapoi_cli`` from another
#: folder, another virtual environment...): a second one does not evict the first.
CACHED_PATHS = 8


def _cached(cache: Path | None, key: str) -> Any:
    """The value cached under ``key`` in ``cache`` (``{"by_key": {key: value}}``), or None."""
    if cache is None:
        return None
    try:
        return json.loads(cache.read_text(encoding="utf-8"))["by_key"].get(key)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _store(cache: Path | None, key: str, value: Any) -> None:
    """Keep ``value`` under ``key`` in ``cache``, with the last ``CACHED_PATHS`` other keys; atomic, and
    silent where the folder is not writable (the next start computes it again)."""
    if cache is None:
        return
    try:
        by_key = json.loads(cache.read_text(encoding="utf-8"))["by_key"]
        by_key = by_key if isinstance(by_key, dict) else {}
    except (OSError, ValueError, TypeError, KeyError):
        by_key = {}
    by_key.pop(key, None)
    by_key[key] = value  # the newest last
    kept = dict(list(by_key.items())[-CACHED_PATHS:])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"by_key": kept}), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        pass


def entry_point_specs() -> list[EntryPointSpec]:
    """The ``comapoi`` entry points installed here. Scanning every distribution's metadata costs about
    0.2 s (importing ``importlib.metadata`` included), more than the rest of ``comapoi --help``; the result
    is kept in a small cache file, valid while no ``sys.path`` folder changes."""
    key, cache = _path_key(), _cache_file()
    cached = _cached(cache, key)
    if isinstance(cached, list):
        try:
            return [EntryPointSpec(**item) for item in cached]
        except TypeError:
            pass
    specs = _scan_entry_points()
    _store(cache, key, [s.__dict__ for s in specs])
    return specs


def third_party_entry_points() -> list[EntryPointSpec]:
    allowed = os.environ.get("COMAPOI_PLUGINS")
    wanted = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    unique: dict[str, EntryPointSpec] = {}  # one entry per name (a distribution can be visible twice on sys.path)
    for ep in entry_point_specs():
        if wanted is None or ep.name in wanted:
            unique.setdefault(ep.name, ep)
    return list(unique.values())


def _hooks_file() -> Path | None:
    cache = _cache_file()
    return cache.with_name("plugin-hooks.json") if cache is not None else None


def _source_stamp(module_file: str | None) -> int | None:
    """The newest mtime of a plugin's source: its module file, or every ``.py`` of its package folder."""
    if not module_file:
        return None
    path = Path(module_file)
    try:
        if path.name == "__init__.py":
            return max(p.stat().st_mtime_ns for p in path.parent.rglob("*.py"))
        return path.stat().st_mtime_ns
    except (OSError, ValueError):
        return None


def record_plugin_hooks(seen: dict[str, tuple[EntryPointSpec, list[str]]]) -> None:
    """Remember, per third-party plugin that loaded, its entry point, its source's mtime and its hooks
    (``seen``: entry-point name -> (spec, hook names)). A plugin that failed to load is not recorded,
    so the next start loads it again."""
    plugins: dict[str, Any] = {}
    for name, (spec, hooks) in seen.items():
        module = sys.modules.get(spec.value.partition(":")[0].strip())
        module_file = getattr(module, "__file__", None)
        plugins[name] = {"value": spec.value, "file": module_file, "stamp": _source_stamp(module_file), "hooks": hooks}
    _store(_hooks_file(), _path_key(), plugins)


def _unchanged_plugins(specs: list[EntryPointSpec]) -> dict[str, Any] | None:
    """What each installed third-party plugin was last seen to register (its record), when every one of them
    was seen and is unchanged since; None when one is new, changed or never loaded."""
    recorded = _cached(_hooks_file(), _path_key())
    if not isinstance(recorded, dict):
        return None
    unchanged = {}
    try:
        for spec in specs:
            seen = recorded.get(spec.name)
            if (seen is None or seen["value"] != spec.value or seen["stamp"] is None
                    or _source_stamp(seen["file"]) != seen["stamp"]):
                return None
            unchanged[spec.name] = seen
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return unchanged


def plugins_may_add_commands() -> bool:
    """Whether a third-party plugin may add commands (``register_commands``), known without importing any:
    False when no plugin is installed, or when every installed one was seen, unchanged, without that
    hook; True when one has it or anything is unknown (a new, changed or never loaded plugin). The
    built-in plugins add no commands (a built-in command is a line in ``cli/app.py: COMMANDS``)."""
    specs = third_party_entry_points()
    if not specs:
        return False
    seen = _unchanged_plugins(specs)
    return seen is None or any("register_commands" in record["hooks"] for record in seen.values())


def _commands_key(seen: dict[str, Any]) -> str:
    """The plugins a command listing was taken with: the path key, then each plugin's entry point and source stamp."""
    return "\n".join([_path_key(), *(f"{name}={record['value']}@{record['stamp']}" for name, record in sorted(seen.items()))])


def cached_plugin_commands() -> dict[str, dict[str, Any]] | None:
    """The commands the installed plugins added when they were last loaded (name -> what ``comapoi --help``
    shows of it), known without importing a plugin: ``{}`` when none adds a command, None when unknown
    (a plugin is new, changed or never loaded, or no listing was recorded since)."""
    specs = third_party_entry_points()
    if not specs:
        return {}
    seen = _unchanged_plugins(specs)
    if seen is None:
        return None
    if not any("register_commands" in record["hooks"] for record in seen.values()):
        return {}
    listing = _cached(_commands_file(), _commands_key(seen))
    return listing if isinstance(listing, dict) else None


def record_plugin_commands(listing: dict[str, dict[str, Any]]) -> None:
    """Remember the commands the installed plugins added (``comapoi --help`` after loading them), for as long as
    no plugin changes: the next ``comapoi --help`` lists them without importing any plugin."""
    seen = _unchanged_plugins(third_party_entry_points())
    if seen is not None:
        try:
            _store(_commands_file(), _commands_key(seen), listing)
        except (TypeError, ValueError):  # not JSON: not recorded, and the next start loads the plugins again
            pass


def _commands_file() -> Path | None:
    cache = _cache_file()
    return cache.with_name("plugin-commands.json") if cache is not None else None
