"""Generation engines of ``comapoi pipeline``: what answers the agents' prompts.

An engine is registered through the ``register_engines`` hook (built in:
``comapoi_cli/default_plugins/pipeline_engines.py``). ``Engine.open(spec, reporter)`` returns an
``EngineSession``; the chain calls ``session.generate(adapter, prompts, max_new_tokens)`` once per
agent step and batch of trajectories, switching adapters between calls, and ``close()`` at the end.

Light module (no torch): engines import their heavy libraries inside ``open``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from comapoi_cli.reporting import Reporter


@dataclass
class Generation:
    """One answer: ``text``, or None and ``problem`` (the prompt does not fit, the server refused...)."""

    text: str | None
    problem: str | None = None
    prompt_tokens: int | None = None


@dataclass
class EngineSpec:
    """What an engine is asked to serve.

    ``adapters`` maps each adapter name the chain will ask for to its folder (one entry per
    distinct adapter: a merged run used for every role is one adapter); ``role_adapters`` maps
    each role id to its adapter name. For the ``openai`` engine the adapter names are the
    served model names (``vllm serve --lora-modules NAME=DIR``).
    """

    base_model: str | None
    adapters: dict[str, Path]
    role_adapters: dict[str, str]
    tokenizer: str | None = None
    device: str = "auto"
    quant: str = "auto"
    dtype: str | None = None
    run_quant: str | None = None
    batch_size: int = 8
    trust_remote_code: bool = False
    url: str | None = None
    api_key: str | None = None
    timeout_s: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)


class EngineSession:
    """An open engine. ``description`` says what it runs on (for the run's record)."""

    description: str = ""
    #: tokens the model reads at most (prompt + new tokens), if known: longer prompts are a miss with a reason
    max_context: int | None = None

    def generate(self, adapter: str, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int) -> list[Generation]:
        raise NotImplementedError

    def close(self) -> None:
        return None


class Engine:
    """Base class of an engine: set ``name`` and ``description``, implement ``open``."""

    name: str = ""
    description: str = ""

    def open(self, spec: EngineSpec, reporter: Reporter) -> EngineSession:
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "description": self.description}
