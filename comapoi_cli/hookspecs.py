"""The hooks a comapoi plugin can implement.

A plugin is a module (or any object) with functions decorated by ``comapoi_cli.hookimpl``
whose names are the hooks below. Third-party plugins are found through the entry-point group
``comapoi``; the built-in TRL backend and the three CoMaPOI roles are plugins too, loaded through
the same hooks (see ``comapoi_cli/default_plugins/``). docs/plugins.md documents every hook.

Hooks run when the plugin manager loads, also for ``comapoi --help``: keep their module
imports light (no torch, transformers or trl at module level) and import heavy packages inside
the methods that need them.
"""

from __future__ import annotations

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("comapoi")
hookimpl = HookimplMarker("comapoi")


@hookspec
def register_backends(register):
    """Register training backends.

    Call ``register(backend)`` once per backend, where ``backend`` is an instance of a
    subclass of ``comapoi_cli.backends.Backend`` (a name, what it needs, how to check that it
    is usable here, and how to run a training job).
    """


@hookspec
def register_agent_roles(register):
    """Register agent roles (the types that ``comapoi train --type`` accepts).

    Call ``register(role)`` once per role, where ``role`` is an instance of a subclass of
    ``comapoi_cli.roles.AgentRole`` (an id such as ``agent1``, a display name such as
    ``Profiler``, its data file name, how to validate a record's answer and, optionally, how
    to parse predictions for evaluation).
    """


@hookspec
def register_commands(app):
    """Add commands to the CLI.

    ``app`` is the root ``typer.Typer``; use ``@app.command()`` or ``app.add_typer(...)``.
    """


# -- comapoi pipeline: engines and retrievers -----------------------------------------------------------
from typing import TYPE_CHECKING, Callable  # noqa: E402

if TYPE_CHECKING:
    from comapoi_cli.pipeline.engines import Engine
    from comapoi_cli.pipeline.retrieval import Retriever


@hookspec
def register_engines(register: "Callable[[Engine], None]") -> None:
    """Register generation engines for ``comapoi pipeline run --engine NAME``.

    :param register: call ``register(engine)`` once per engine, where ``engine`` is an instance of
        a subclass of ``comapoi_cli.pipeline.engines.Engine``: a ``name``, a ``description`` and
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
        instance of a subclass of ``comapoi_cli.pipeline.retrieval.Retriever``: a ``name``, a
        ``description``, ``prepare(index)`` (called once with the training trajectories and the
        POI table) and ``retrieve(item, k) -> list[int]`` (up to ``k`` ids, best first, for one
        test trajectory). Built in: ``transitions`` (offline and deterministic).
    """
