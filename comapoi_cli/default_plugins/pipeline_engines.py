"""The built-in engines of ``comapoi pipeline``: ``transformers`` (local) and ``openai`` (a server).

- ``transformers``: one base model on the CPU or a GPU with every adapter loaded once and
  switched per agent (never a model copy per agent); batched greedy generation across
  trajectories (left padding, longest prompts first); a prompt whose tokens plus
  ``--max-new-tokens`` exceed the model's context is a miss with that reason (never truncated).
- ``openai``: any OpenAI-compatible server (``vllm serve BASE --enable-lora --lora-modules
  agent1=DIR1 agent2=DIR2 agent3=DIR3``): ``/v1/chat/completions`` with the adapter's served
  name as ``model``, temperature 0; the served names are checked against ``/v1/models`` up front.
  A concurrent session: the scheduler keeps up to ``--concurrency`` requests in flight; the HTTP
  client (timeouts, retries, size cap, redirects, secrets) is :mod:`comapoi_cli.models.http`.

Heavy imports stay inside the methods (plugins load on every command).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from comapoi_cli.engines import Engine, EngineSession, EngineSpec, Generation, context_problem
from comapoi_cli.errors import UsageError
from comapoi_cli.hookspecs import hookimpl
from comapoi_cli.reporting import Reporter


class TransformersSession(EngineSession):
    def __init__(self, spec: EngineSpec, reporter: Reporter):
        from comapoi_cli.models.loading import load_model

        if not spec.base_model:
            raise UsageError("The transformers engine needs the runs' base model.")
        self.spec = spec
        # ONE base model; every adapter attached once and switched per agent with use_adapter
        self.loaded = load_model(spec.base_model, adapters=spec.adapters, quant=spec.quant, device=spec.device,
                                 dtype=spec.dtype, trust_remote_code=spec.trust_remote_code, tokenizer=spec.tokenizer,
                                 recorded_quant=spec.run_quant, recorded_dtype=spec.extra.get("run_dtype"))
        self.max_context = self.loaded.max_context
        self.description = (f"transformers: {spec.base_model} on {self.loaded.device} ({self.loaded.dtype}, "
                            f"quantisation {self.loaded.quant}), adapters {', '.join(self.loaded.adapter_names)}")

    def generate(self, adapter: str, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int) -> list[Generation]:
        from comapoi_cli.models.generation import generate, render_prompts

        token_ids = render_prompts(self.loaded.tokenizer, prompts)
        out: list[Generation] = [Generation(None, None, len(ids)) for ids in token_ids]
        keep = []
        for index, ids in enumerate(token_ids):
            problem = context_problem(len(ids), max_new_tokens, self.max_context)
            if problem:
                out[index].problem = problem
            else:
                keep.append(index)
        if keep:
            self.loaded.use_adapter(adapter)
            texts = generate(self.loaded, [token_ids[i] for i in keep], batch_size=self.spec.batch_size,
                             max_new_tokens=max_new_tokens)
            for index, text in zip(keep, texts):
                out[index].text = text
        return out


class TransformersEngine(Engine):
    name = "transformers"
    description = "Local transformers + PEFT: one base model, every adapter loaded once, batched greedy generation."

    def open(self, spec: EngineSpec, reporter: Reporter) -> EngineSession:
        return TransformersSession(spec, reporter)


class OpenAISession(EngineSession):
    """Chat completions against an OpenAI-compatible server (:mod:`comapoi_cli.models.http`)."""

    concurrent = True

    def __init__(self, spec: EngineSpec, reporter: Reporter):
        from comapoi_cli.models.http import ClientSettings, api_base, printable, redact_url, served_models

        if not spec.url:
            raise UsageError("The openai engine needs the server's address: --url http://HOST:PORT/v1.")
        self.spec = spec
        self.base = api_base(spec.url)
        self.settings = ClientSettings(url=spec.url, api_key=spec.api_key, timeout_s=spec.timeout_s, retries=spec.retries,
                                       concurrency=max(spec.concurrency, spec.batch_size))
        served = served_models(self.settings)
        missing = [name for name in spec.adapters if name not in served]
        shown = redact_url(spec.url)
        if missing:
            raise UsageError(f"The server at {shown} does not serve {', '.join(printable(n) for n in missing)} (it serves: "
                             f"{', '.join(printable(n, 60) for n in sorted(served)[:20]) or 'nothing'}).",
                             hint="Start it with --lora-modules " + " ".join(f"{printable(n)}=DIR" for n in spec.adapters)
                             + ", or name the served adapters with --served-name.")
        self.description = f"openai: {redact_url(self.base)}, models {', '.join(printable(n) for n in spec.adapters)}"
        self._client: Any = None
        self._loop: Any = None
        self._batch_loop: Any = None

    def _async_client(self) -> Any:
        import asyncio

        from comapoi_cli.models.http import AsyncOpenAIClient

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = AsyncOpenAIClient(self.settings), loop
        return self._client

    async def agenerate(self, adapter: str, messages: list[dict[str, str]], max_new_tokens: int) -> Generation:
        return await self._async_client().chat(adapter, messages, max_new_tokens)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client, self._loop = self._client, None, None
            await client.aclose()

    def generate(self, adapter: str, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int) -> list[Generation]:
        """The batch path: every prompt in flight at once, the answers in order (one event loop kept
        across calls, so that connections are reused)."""
        import asyncio

        if self._batch_loop is None:
            self._batch_loop = asyncio.new_event_loop()

        async def batch() -> list[Generation]:
            return list(await asyncio.gather(*(self.agenerate(adapter, p, max_new_tokens) for p in prompts)))

        return self._batch_loop.run_until_complete(batch())

    def close(self) -> None:
        if self._batch_loop is not None:
            loop, self._batch_loop = self._batch_loop, None
            try:
                loop.run_until_complete(self.aclose())
            finally:
                loop.close()


class OpenAIEngine(Engine):
    name = "openai"
    description = "An OpenAI-compatible server (vllm serve --lora-modules agent1=... agent2=... agent3=...)."

    def open(self, spec: EngineSpec, reporter: Reporter) -> EngineSession:
        from comapoi_cli.models.http import redact_url

        started = time.monotonic()
        session = OpenAISession(spec, reporter)
        reporter.info(f"server {redact_url(session.base)} serves {', '.join(spec.adapters)} ({time.monotonic() - started:.1f} s to check)")
        return session


@hookimpl
def register_engines(register):
    register(TransformersEngine())
    register(OpenAIEngine())
