"""Generation engines of ``comapoi pipeline``: what answers the agents' prompts.

An engine is registered through the ``register_engines`` hook (built in:
``comapoi_cli/default_plugins/pipeline_engines.py``). ``Engine.open(spec, reporter)`` returns an
``EngineSession``, which answers prompts in one of two ways:

- a *batch* session (``concurrent = False``, the local ``transformers`` engine) answers
  ``generate(adapter, prompts, max_new_tokens)``: one call per agent step and batch of
  trajectories (the same step across trajectories, one adapter per call);
- a *concurrent* session (``concurrent = True``, the ``openai`` engine) also answers
  ``await agenerate(adapter, messages, max_new_tokens)``, one prompt at a time, many in flight:
  the scheduler (:mod:`comapoi_cli.pipeline.scheduler`) moves each trajectory to its next step as
  soon as its answer arrives, up to ``--concurrency`` requests at once.

``close()`` (and, for a concurrent session, ``await aclose()`` in the loop that used it) at the
end. ``eval``, ``pipeline run`` (and the teacher pass of ``data build``) all generate through
these sessions: :func:`comapoi_cli.models.answering.answer_all` answers a list of independent
prompts with either kind. :func:`context_problem` is the one context-overflow rule.

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
    #: requests it took (retries on connection errors, 429 and 5xx); 1 for a local engine
    attempts: int = 1


def context_problem(prompt_tokens: int, max_new_tokens: int, max_context: int | None) -> str | None:
    """The one context-overflow rule: why a prompt is not generated (None: it fits). Never truncated."""
    if max_context and prompt_tokens + max_new_tokens > max_context:
        return (f"prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens exceeds the model's "
                f"context of {max_context} tokens (never truncated)")
    return None


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
    #: openai: attempts after the first on connection errors, 429 and 5xx
    retries: int = 3
    #: concurrent engines: requests in flight at most
    concurrency: int = 64
    extra: dict[str, Any] = field(default_factory=dict)


class EngineSession:
    """An open engine. ``description`` says what it runs on (for the run's record)."""

    description: str = ""
    #: tokens the model reads at most (prompt + new tokens), if known: longer prompts are a miss with a reason
    max_context: int | None = None

    #: True: ``agenerate`` answers one prompt at a time and many may be in flight (a server)
    concurrent: bool = False

    def generate(self, adapter: str, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int) -> list[Generation]:
        raise NotImplementedError

    async def agenerate(self, adapter: str, messages: list[dict[str, str]], max_new_tokens: int) -> Generation:
        """One answer (concurrent sessions); by default the batch path with a batch of one."""
        return self.generate(adapter, [messages], max_new_tokens)[0]

    async def aclose(self) -> None:
        """Release what ``agenerate`` opened in the running event loop."""
        return None

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
