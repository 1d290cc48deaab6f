"""The plugin manager: loads built-in and third-party plugins and collects what they register.

Built-in plugins (``DEFAULT_PLUGINS``) and third-party plugins (entry-point group ``comapoi``)
go through the same hooks. A plugin that fails to import, fails validation (an unknown hook
name), or raises while registering is recorded in ``Registry.plugins`` with its error and
skipped; it never breaks another command. ``COMAPOI_PLUGINS`` (a comma list of entry-point
names) restricts which third-party plugins load; set it to an empty string to load none.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from comapoi_cli import hookspecs
from comapoi_cli.backends import Backend
from comapoi_cli.checkins import CheckinReader
from comapoi_cli.engines import Engine
from comapoi_cli.entrypoints import EntryPointSpec, record_plugin_hooks, third_party_entry_points
from comapoi_cli.errors import UsageError, first_line
from comapoi_cli.retrievers import Retriever
from comapoi_cli.roles import MERGED, AgentRole

DEFAULT_PLUGINS = (
    "comapoi_cli.default_plugins.comapoi_roles",
    "comapoi_cli.default_plugins.trl_backend",
    "comapoi_cli.default_plugins.pipeline_engines",
    "comapoi_cli.default_plugins.pipeline_retrievers",
    "comapoi_cli.default_plugins.teacher_engines",
    "comapoi_cli.default_plugins.checkin_readers",
)


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin, as ``comapoi plugins list`` shows it."""

    name: str
    source: str  # "built-in" or "entry point (distribution version)"
    hooks: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)  # e.g. "backend trl", "role agent1"
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "hooks": self.hooks,
            "registered": self.registered,
            "error": self.error,
        }


@dataclass
class Registry:
    """Everything the plugins registered."""

    backends: dict[str, Backend] = field(default_factory=dict)
    roles: dict[str, AgentRole] = field(default_factory=dict)
    engines: dict[str, Engine] = field(default_factory=dict)
    retrievers: dict[str, Retriever] = field(default_factory=dict)
    readers: dict[str, CheckinReader] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    manager: pluggy.PluginManager | None = None

    def plugin(self, name: str) -> PluginInfo | None:
        return next((p for p in self.plugins if p.name == name), None)

    def backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise UsageError(
                f"Unknown backend '{name}'; registered backends: {', '.join(sorted(self.backends)) or 'none'}."
            ) from None

    def role(self, role_id: str) -> AgentRole:
        try:
            return self.roles[role_id]
        except KeyError:
            raise UsageError(
                f"Unknown agent role '{role_id}'; registered roles: {', '.join(self.roles) or 'none'}."
            ) from None

    def engine(self, name: str) -> Engine:
        try:
            return self.engines[name]
        except KeyError:
            raise UsageError(
                f"Unknown engine '{name}'; registered engines: {', '.join(sorted(self.engines)) or 'none'}."
            ) from None

    def retriever(self, name: str) -> Retriever:
        try:
            return self.retrievers[name]
        except KeyError:
            raise UsageError(
                f"Unknown retriever '{name}'; registered retrievers: {', '.join(sorted(self.retrievers)) or 'none'}."
            ) from None

    def reader(self, name: str) -> CheckinReader:
        try:
            return self.readers[name]
        except KeyError:
            raise UsageError(
                f"Unknown check-in format '{name}'; registered formats: {', '.join(sorted(self.readers)) or 'none'}."
            ) from None

    def training_types(self) -> list[str]:
        """What ``train --type`` accepts: ``merged`` and every registered role."""
        return [MERGED, *self.roles]


def _plugin_failure(exc: BaseException) -> None:
    """Re-raise what must stop comapoi itself (Ctrl-C); anything else from plugin code is the plugin's failure."""
    if isinstance(exc, KeyboardInterrupt):
        raise exc


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}): the plugin tried to end the program"
    text = first_line(exc, default="")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _hookimpls_of(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    return sorted(impl.name for impl in (pm.get_hookcallers(plugin) or []))


def build_registry(load_entry_points: bool = True) -> Registry:
    """Create a plugin manager, load every plugin and collect what they register."""
    pm = pluggy.PluginManager("comapoi")
    pm.add_hookspecs(hookspecs)
    registry = Registry(manager=pm)
    infos: dict[object, PluginInfo] = {}

    def add(plugin: object, info: PluginInfo) -> None:
        try:
            pm.register(plugin, name=info.name)
            pm.check_pending()
        except BaseException as exc:  # unknown hook names, bad signatures, duplicate names
            _plugin_failure(exc)
            if pm.is_registered(plugin):
                pm.unregister(plugin)
            info.error = _error_text(exc)
        else:
            info.hooks = _hookimpls_of(pm, plugin)
            infos[plugin] = info
        registry.plugins.append(info)

    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        add(module, PluginInfo(name=module_name.rsplit(".", 1)[1], source="built-in"))

    if load_entry_points:
        seen: dict[str, tuple[EntryPointSpec, list[str]]] = {}
        for ep in third_party_entry_points():
            source = f"entry point ({ep.dist} {ep.version})" if ep.dist else "entry point"
            info = PluginInfo(name=ep.name, source=source)
            try:
                plugin = ep.load()
            except BaseException as exc:  # a broken plugin (even one calling sys.exit) must not break the CLI
                _plugin_failure(exc)
                info.error = f"failed to import {ep.value}: {_error_text(exc)}"
                registry.plugins.append(info)
                continue
            add(plugin, info)
            if info.error is None:
                seen[ep.name] = (ep, info.hooks)
        record_plugin_hooks(seen)  # lets `comapoi --help` skip loading plugins that add no command

    def collect(hook_name: str, store: dict[str, Any], kind: str, key: Callable[[Any], str], base: type) -> None:
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            info = infos.get(impl.plugin)
            pending: list[tuple[str, Any]] = []

            def register(obj: Any, pending: list[tuple[str, Any]] = pending) -> None:
                if not isinstance(obj, base):
                    raise TypeError(f"{hook_name} must register {base.__name__} instances, got {type(obj).__name__}")
                pending.append((key(obj), obj))

            try:
                impl.function(register)
                names = [name for name, _ in pending]
                for name in names:
                    if not name:
                        raise ValueError(f"a {kind} without a name")
                    if name == MERGED and kind == "role":
                        raise ValueError(f"'{MERGED}' is reserved and cannot be a role id")
                    if name in store:
                        raise ValueError(f"{kind} '{name}' is already registered by another plugin")
                    if names.count(name) > 1:
                        raise ValueError(f"{kind} '{name}' is registered twice")
            except BaseException as exc:
                _plugin_failure(exc)
                if info is not None:
                    info.error = f"{hook_name} failed: {_error_text(exc)}"
                continue
            for name, obj in pending:
                store[name] = obj
                if info is not None:
                    info.registered.append(f"{kind} {name}")

    collect("register_agent_roles", registry.roles, "role", lambda r: r.id, AgentRole)
    collect("register_backends", registry.backends, "backend", lambda b: b.name, Backend)
    collect("register_engines", registry.engines, "engine", lambda e: e.name, Engine)
    collect("register_retrievers", registry.retrievers, "retriever", lambda r: r.name, Retriever)
    collect("register_checkin_readers", registry.readers, "reader", lambda r: r.name, CheckinReader)
    return registry


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use. Only the command line calls this; it passes the
    registry to every service explicitly (services take ``registry`` as an argument)."""
    global _registry
    if _registry is None:
        _registry = build_registry()
    return _registry


def _command_names(commands: list[Any], groups: list[Any]) -> list[str]:
    """The names of Typer's registered commands (``CommandInfo``) and groups (``TyperInfo``)."""
    from typer.main import get_command_name

    names = [info.name or get_command_name(getattr(info.callback, "__name__", "") or "") for info in commands]
    names += [info.name or getattr(getattr(info.typer_instance, "info", None), "name", None) or "" for info in groups]
    return names


def register_plugin_commands(app: Any, registry: Registry, reserved: frozenset[str] | set[str] = frozenset()) -> None:
    """Call every plugin's ``register_commands(app)``; a failing plugin is recorded against it, never fatal.

    A command whose name is in ``reserved`` (the built-in commands) or was already added by another
    plugin is removed again and recorded as that plugin's error: a plugin cannot replace a command.
    """
    if registry.manager is None:
        return
    for impl in registry.manager.hook.register_commands.get_hookimpls():
        info = registry.plugin(registry.manager.get_name(impl.plugin) or "")
        commands, groups = list(app.registered_commands), list(app.registered_groups)
        taken = set(reserved) | set(_command_names(commands, groups))
        try:
            impl.function(app)
            new_names = _command_names(app.registered_commands[len(commands):], app.registered_groups[len(groups):])
            clashes = sorted(set(new_names) & taken)
            if clashes:
                raise ValueError(f"command {', '.join(repr(c) for c in clashes)} is already a comapoi command; "
                                 "a plugin cannot replace it")
        except BaseException as exc:
            _plugin_failure(exc)
            app.registered_commands[:], app.registered_groups[:] = commands, groups
            if info is not None:
                info.error = f"register_commands failed: {_error_text(exc)}"
