"""The hooks a comapoi plugin can implement.

A plugin is a module (or any object) with functions decorated by ``comapoi_cli.hookimpl``
whose names are the hooks below. Third-party plugins are found through the entry-point group
``comapoi``; the built-in TRL backend and the three CoMaPOI roles are plugins too, loaded through
the same hooks (see ``comapoi_cli/default_plugins/``). docs/plugins.md documents every hook, and
tests/test_hookspecs.py requires a test for each.

Hooks run when the plugin manager loads: on every command that needs the registry (their
``--help`` too), and on ``comapoi --help`` when a plugin adds commands. Keep their module
imports light (no torch, transformers or trl at module level) and import heavy packages inside
the methods that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:  # pragma: no cover - typing only (no import cost at start-up)
    import typer

    from comapoi_cli.backends import Backend
    from comapoi_cli.checkins import CheckinReader
    from comapoi_cli.engines import Engine
    from comapoi_cli.retrievers import Retriever
    from comapoi_cli.roles import AgentRole

hookspec = HookspecMarker("comapoi")
hookimpl = HookimplMarker("comapoi")


@hookspec
def register_backends(register: Callable[[Backend], None]) -> None:
    """Register training backends (what ``comapoi train --backend NAME`` runs).

    :param register: call it once per backend with an instance of a subclass of
        ``comapoi_cli.backends.Backend``: its ``name`` (the ``--backend`` value), what it needs
        (``requires``), how to check that it is usable here (``unusable_reason``, cheap: no heavy
        import), and how to run a job (``train(job, reporter)``, returning a ``TrainingResult``).
        A name another plugin already registered is refused and reported against this plugin.
    """


@hookspec
def register_agent_roles(register: Callable[[AgentRole], None]) -> None:
    """Register agent roles (the types that ``comapoi train --type`` and ``comapoi eval --type`` accept).

    :param register: call it once per role with an instance of a subclass of
        ``comapoi_cli.roles.AgentRole``: an ``id`` such as ``agent1`` (``merged`` is reserved), a
        ``display_name`` such as ``Profiler``, its data file name, how to validate a record's answer
        and, optionally, how to parse predictions for evaluation.
    """


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add commands to the CLI.

    :param app: the root ``typer.Typer``; use ``@app.command()`` or ``app.add_typer(...)``. A command
        named like a built-in one (``train``, ``data``, ...) or one another plugin added is refused:
        everything this call added is removed again and the plugin's error says why.
    """


# -- comapoi pipeline: engines and retrievers -----------------------------------------------------------

@hookspec
def register_engines(register: "Callable[[Engine], None]") -> None:
    """Register generation engines for ``comapoi pipeline run --engine NAME``.

    :param register: call ``register(engine)`` once per engine, where ``engine`` is an instance of
        a subclass of ``comapoi_cli.engines.Engine``: a ``name``, a ``description`` and
        ``open(spec, reporter) -> EngineSession``, whose ``generate(adapter, prompts,
        max_new_tokens)`` answers a batch of chat prompts with one adapter (greedy) and returns
        one ``Generation`` (text, or None and the reason) per prompt. Built in: ``transformers``
        (one base model, every adapter loaded once) and ``openai`` (an OpenAI-compatible server
        such as ``vllm serve --lora-modules``).
    """


@hookspec
def register_retrievers(register: "Callable[[Retriever], None]") -> None:
    """Register retrievers of the "similar POIs" the Forecaster refines (``--retriever NAME``).

    :param register: call ``register(retriever)`` once per retriever, where ``retriever`` is an
        instance of a subclass of ``comapoi_cli.retrievers.Retriever``: a ``name``, a
        ``description``, ``prepare(index)`` (called once with the training trajectories and the
        POI table) and ``retrieve(item, k) -> list[int]`` (up to ``k`` ids, best first, for one
        test trajectory). Built in: ``transitions`` (offline and deterministic).
    """


# -- comapoi data prepare: raw check-in formats ------------------------------------------------------------

@hookspec
def register_checkin_readers(register: "Callable[[CheckinReader], None]") -> None:
    """Register raw check-in formats for ``comapoi data prepare --from NAME``.

    :param register: call ``register(reader)`` once per format, where ``reader`` is an instance of
        a subclass of ``comapoi_cli.checkins.CheckinReader``: a ``name``, a
        ``description`` and ``read(paths, options) -> CheckinTable`` (columns user, poi, category,
        lat, lon, utc seconds, offset minutes, file, line; unreadable rows as ``Reject`` records).
        Built in: ``tsmc2014``, ``gowalla``, ``getnext``, ``comapoi``.
    """
