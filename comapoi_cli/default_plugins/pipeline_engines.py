"""The built-in engines of ``comapoi pipeline``: ``transformers`` (local) and ``openai`` (a server).

- ``transformers``: one base model on the CPU or a GPU with every adapter loaded once and
  switched per agent (never a model copy per agent); batched greedy generation across
  trajectories (left padding, longest prompts first); a prompt whose tokens plus
  ``--max-new-tokens`` exceed the model's context is a miss with that reason (never truncated).
- ``openai``: any OpenAI-compatible server (``vllm serve BASE --enable-lora --lora-modules
  agent1=DIR1 agent2=DIR2 agent3=DIR3``): ``/v1/chat/completions`` with the adapter's served
  name as ``model``, temperature 0; the served names are checked against ``/v1/models`` up front.
  Requests of a batch go out in parallel (``--batch-size`` at a time); standard library only.

Heavy imports stay inside the methods (plugins load on every command).
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from comapoi_cli.engines import Engine, EngineSession, EngineSpec, Generation
from comapoi_cli.errors import ComapoiError, UsageError
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
            if self.max_context and len(ids) + max_new_tokens > self.max_context:
                out[index].problem = (f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the model's "
                                      f"context of {self.max_context} tokens (never truncated)")
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
    def __init__(self, spec: EngineSpec, reporter: Reporter):
        if not spec.url:
            raise UsageError("The openai engine needs the server's address: --url http://HOST:PORT/v1.")
        self.spec = spec
        self.base = spec.url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        served = self._served()
        missing = [name for name in spec.adapters if name not in served]
        if missing:
            raise UsageError(f"The server at {spec.url} does not serve {', '.join(missing)} (it serves: "
                             f"{', '.join(sorted(served)) or 'nothing'}).",
                             hint="Start it with --lora-modules " + " ".join(f"{n}=DIR" for n in spec.adapters)
                             + ", or name the served adapters with --served-name ROLE=NAME.")
        self.description = f"openai: {self.base}, models {', '.join(spec.adapters)}"

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        import urllib.request

        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.base + path, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        if self.spec.api_key:
            request.add_header("Authorization", f"Bearer {self.spec.api_key}")
        with urllib.request.urlopen(request, timeout=self.spec.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def _served(self) -> set[str]:
        import urllib.error

        try:
            listing = self._request("/models")
        except urllib.error.HTTPError as exc:
            raise ComapoiError(f"The server at {self.spec.url} answered {exc.code} to /v1/models.") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ComapoiError(f"Cannot reach an OpenAI-compatible server at {self.spec.url} ({reason}).",
                               hint="Start it first, e.g. the vllm serve command that 'comapoi adapters export' prints.") from None
        return {str(m.get("id")) for m in (listing.get("data") or []) if isinstance(m, dict)}

    def _one(self, adapter: str, messages: list[dict[str, str]], max_new_tokens: int) -> Generation:
        import urllib.error

        body = {"model": adapter, "messages": messages, "temperature": 0, "max_tokens": max_new_tokens}
        try:
            answer = self._request("/chat/completions", body)
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read().decode("utf-8")).get("error", {})
                message = detail.get("message") if isinstance(detail, dict) else str(detail)
            except Exception:
                message = exc.reason
            return Generation(None, f"server answered {exc.code}: {str(message).strip().splitlines()[0] if message else ''}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return Generation(None, f"request failed: {getattr(exc, 'reason', exc)}")
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return Generation(None, "the server's answer holds no choices[0].message.content")
        tokens = (answer.get("usage") or {}).get("prompt_tokens")
        return Generation((text or "").strip(), None, tokens if isinstance(tokens, int) else None)

    def generate(self, adapter: str, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int) -> list[Generation]:
        from concurrent.futures import ThreadPoolExecutor

        if len(prompts) == 1 or self.spec.batch_size == 1:
            return [self._one(adapter, p, max_new_tokens) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.spec.batch_size, len(prompts))) as pool:
            return list(pool.map(lambda p: self._one(adapter, p, max_new_tokens), prompts))


class OpenAIEngine(Engine):
    name = "openai"
    description = "An OpenAI-compatible server (vllm serve --lora-modules agent1=... agent2=... agent3=...)."

    def open(self, spec: EngineSpec, reporter: Reporter) -> EngineSession:
        started = time.monotonic()
        session = OpenAISession(spec, reporter)
        reporter.info(f"server {session.base} serves {', '.join(spec.adapters)} ({time.monotonic() - started:.1f} s to check)")
        return session


@hookimpl
def register_engines(register):
    register(TransformersEngine())
    register(OpenAIEngine())
