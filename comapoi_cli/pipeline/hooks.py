"""The engines and retrievers the plugins registered (``register_engines``, ``register_retrievers``)."""

from __future__ import annotations

from typing import Any

from comapoi_cli.errors import UsageError
from comapoi_cli.engines import Engine
from comapoi_cli.retrievers import Retriever


def _collect(registry: Any, hook_name: str, base: type, kind: str) -> dict[str, Any]:
    store: dict[str, Any] = {}
    manager = registry.manager
    if manager is None:
        return store
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        info = registry.plugin(manager.get_name(impl.plugin) or "")
        pending: list[Any] = []

        def register(obj: Any, pending: list[Any] = pending) -> None:
            if not isinstance(obj, base):
                raise TypeError(f"{hook_name} must register {base.__name__} instances, got {type(obj).__name__}")
            pending.append(obj)

        try:
            impl.function(register)
            for obj in pending:
                if not obj.name:
                    raise ValueError(f"an {kind} without a name")
                if obj.name in store:
                    raise ValueError(f"{kind} '{obj.name}' is already registered by another plugin")
        except Exception as exc:  # a broken plugin must not break the others
            if info is not None:
                info.error = f"{hook_name} failed: {type(exc).__name__}: {exc}"
            continue
        for obj in pending:
            store[obj.name] = obj
            if info is not None and f"{kind} {obj.name}" not in info.registered:
                info.registered.append(f"{kind} {obj.name}")
    return store


def engines(registry: Any) -> dict[str, Engine]:
    return _collect(registry, "register_engines", Engine, "engine")


def retrievers(registry: Any) -> dict[str, Retriever]:
    return _collect(registry, "register_retrievers", Retriever, "retriever")


def engine(registry: Any, name: str) -> Engine:
    found = engines(registry)
    if name not in found:
        raise UsageError(f"Unknown engine '{name}'; registered engines: {', '.join(sorted(found)) or 'none'}.")
    return found[name]


def retriever(registry: Any, name: str) -> Retriever:
    found = retrievers(registry)
    if name not in found:
        raise UsageError(f"Unknown retriever '{name}'; registered retrievers: {', '.join(sorted(found)) or 'none'}.")
    return found[name]
