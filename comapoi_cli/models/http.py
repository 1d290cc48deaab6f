"""The HTTP client of the ``openai`` engine: one OpenAI-compatible server, many requests in flight.

Built on httpx (the ``httpx2`` distribution that ``huggingface_hub`` already brings; plain
``httpx`` is used where that is what is installed). What it guarantees:

- **Timeouts.** A connect timeout (at most 10 s), a read timeout, and a deadline on each whole
  attempt (``--request-timeout``): a server that drips its answer a byte at a time cannot hang a
  run; a timeout is a miss with its reason, never a retry (it would just wait again).
- **Retries** (``--retries``) with exponential backoff and jitter on connection errors, 429 and
  5xx; a ``Retry-After`` header (seconds or an HTTP date) is honoured, up to 60 s. Each answer
  says how many attempts it took (``Generation.attempts``).
- **A bound on an answer's size** (``MAX_ANSWER_BYTES``): the body is read in chunks and a bigger
  one is a miss with that reason, not a line of hundreds of megabytes.
- **No redirect to another origin**: redirects are followed by hand, only to the same scheme,
  host and port (and a POST only on 307/308), so the API key never leaves ``--url``'s server.
- **Wrong JSON types** (a body that is not an object, no choices, a content that is null, a
  number or blank, a ``usage`` that is not an object) are each a miss with the reason;
  ``/v1/models`` that is not ``{"data": [...]}`` is one sentence.
- **Secrets**: :func:`redact` takes the API key out of any text that is recorded (an answer that
  echoes it, an error message), :func:`redact_url` the ``user:pass@`` of a URL, and
  :func:`printable` escapes what a server names before it reaches a terminal.

Light module: httpx is imported inside the functions.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from comapoi_cli.engines import Generation
from comapoi_cli.errors import ComapoiError, UsageError
from comapoi_cli.fileio import wire_json

#: the largest response body read (an answer of 256 tokens is a few kB)
MAX_ANSWER_BYTES = 1_000_000
#: the longest ``Retry-After`` honoured, and the longest backoff between attempts
MAX_RETRY_AFTER_S = 60.0
MAX_BACKOFF_S = 8.0
CONNECT_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
#: connections per pool (the client opens ``concurrency / POOL_CONNECTIONS`` pools)
POOL_CONNECTIONS = 8
REDACTED = "[redacted]"


def httpx_module() -> Any:
    """The httpx module: ``httpx2`` (installed with huggingface_hub) or ``httpx``."""
    try:
        import httpx2 as module
    except ImportError:  # pragma: no cover - depends on the environment
        try:
            import httpx as module  # type: ignore[no-redef]
        except ImportError:
            raise ComapoiError("The openai engine needs httpx: pip install httpx2.") from None
    return module


def redact_url(url: str | None) -> str | None:
    """``url`` without the password of a ``user:pass@`` part (``user:[redacted]@``)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    if "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:{REDACTED}@{host}", parts.path, parts.query, parts.fragment))


def redact(text: str | None, *secrets: str | None) -> str | None:
    """``text`` with every occurrence of each (non-trivial) secret replaced by ``[redacted]``."""
    if text is None:
        return None
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def printable(text: Any, limit: int = 200) -> str:
    """A server-supplied name as printable text: control characters (escape sequences) escaped, cut at ``limit``."""
    value = text if isinstance(text, str) else repr(text)
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in value)
    return out if len(out) <= limit else out[:limit] + "..."


def api_base(url: str) -> str:
    """``url`` as the API's base (``.../v1``), or one sentence when it is not an http(s) address."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url must be an http:// or https:// address, not '{printable(redact_url(url))}'.")
    base = url.strip().rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def _origin(url: Any) -> tuple[str, str, int | None]:
    return (url.scheme, url.host, url.port)


def retry_after_s(value: str | None) -> float | None:
    """The wait a ``Retry-After`` header asks for (seconds, or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _Failure(Exception):
    """One attempt failed: ``reason`` (recorded), ``retry`` (worth another attempt), ``wait_s`` (Retry-After)."""

    def __init__(self, reason: str, retry: bool = False, wait_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.wait_s = wait_s


@dataclass
class ClientSettings:
    url: str
    api_key: str | None = None
    timeout_s: float = 600.0
    retries: int = 3
    max_answer_bytes: int = MAX_ANSWER_BYTES
    concurrency: int = 64
    backoff_s: float = 0.5

    def credentials(self) -> tuple[str, str] | None:
        """The ``user:pass@`` of ``url``, if any (sent as Basic auth when there is no API key)."""
        try:
            parts = urlsplit(self.url)
        except ValueError:
            return None
        if parts.username is None:
            return None
        from urllib.parse import unquote

        return unquote(parts.username), unquote(parts.password or "")

    def secrets(self) -> list[str]:
        """What must never be recorded: the API key, the URL's password, and their Authorization forms."""
        import base64

        out = [self.api_key] if self.api_key else []
        creds = self.credentials()
        if creds is not None and creds[1]:
            out += [creds[1], base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode("ascii")]
        return out


def _timeout(httpx: Any, settings: ClientSettings) -> Any:
    return httpx.Timeout(settings.timeout_s, connect=min(CONNECT_TIMEOUT_S, settings.timeout_s))


def _headers(settings: ClientSettings) -> dict[str, str]:
    import base64

    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    creds = settings.credentials()
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    elif creds is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode("ascii")
    return headers


def _without_userinfo(base: str) -> str:
    parts = urlsplit(base)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _status_reason(status: int, body: bytes, settings: ClientSettings) -> str:
    message = ""
    try:
        detail = json.loads(body.decode("utf-8"))
        error = detail.get("error", detail) if isinstance(detail, dict) else detail
        message = error.get("message", "") if isinstance(error, dict) else str(error)
    except (ValueError, UnicodeDecodeError):
        message = body[:200].decode("utf-8", "replace")
    message = str(message).strip().splitlines()[0] if str(message).strip() else ""
    text = f"server answered {status}" + (f": {printable(message)}" if message else "")
    return redact(text, *settings.secrets()) or text


def _redirect_target(httpx: Any, response: Any, method: str, settings: ClientSettings) -> Any:
    location = response.headers.get("location")
    if not location:
        raise _Failure(f"server answered {response.status_code} without a Location")
    target = response.url.join(location)
    if _origin(target) != _origin(response.url):
        raise _Failure(f"server redirected to another origin ({printable(redact_url(str(target.copy_with(path='/', query=None))))}): "
                       "not followed, the API key stays with --url")
    if method != "GET" and response.status_code not in (307, 308):
        raise _Failure(f"server answered {response.status_code} to a {method}: not followed (only 307/308 keep the request)")
    return target


def parse_chat(payload: Any) -> tuple[str, int | None]:
    """The answer's text and prompt tokens from a chat completion, or :class:`_Failure` with what is wrong."""
    if not isinstance(payload, dict):
        raise _Failure(f"the server's answer is a JSON {type(payload).__name__}, not an object")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _Failure("the server's answer holds no choices")
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise _Failure("the server's answer holds no choices[0].message object")
    content = message.get("content")
    if content is None:
        raise _Failure("the server's answer has a null content")
    if not isinstance(content, str):
        raise _Failure(f"the server's answer has a content of type {type(content).__name__}, not text")
    if not content.strip():
        raise _Failure("the server's answer is blank")
    usage = payload.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise _Failure(f"the server's answer has a usage of type {type(usage).__name__}, not an object")
    tokens = (usage or {}).get("prompt_tokens")
    return content.strip(), tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def parse_models(payload: Any, url: str) -> set[str]:
    """The served model ids of a ``/v1/models`` answer (entries without a text ``id`` are no models)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        shown = f"a JSON {type(payload).__name__}" if not isinstance(payload, dict) else f"an object whose data is {type(data).__name__}"
        raise ComapoiError(f"The server at {redact_url(url)} answered /v1/models with {shown}, not a list of models "
                           "({\"data\": [{\"id\": ...}]}).")
    return {entry["id"] for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]}


_TIMEOUT = getattr(asyncio, "timeout", None)  # Python 3.11+


async def _within(work: Any, seconds: float) -> Any:
    """``await work`` with a deadline (``asyncio.timeout`` where there is one: no extra task per request)."""
    if _TIMEOUT is None:  # Python 3.10
        return await asyncio.wait_for(work, seconds)
    async with _TIMEOUT(seconds):
        return await work


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Failure(f"the server's answer is not JSON ({printable(str(exc).split(':')[0])}, {len(body)} bytes)") from None


def _backoff(settings: ClientSettings, attempt: int, wait_s: float | None) -> float:
    if wait_s is not None:
        return min(MAX_RETRY_AFTER_S, wait_s)
    return min(MAX_BACKOFF_S, settings.backoff_s * (2 ** (attempt - 1))) * (0.5 + random.random() / 2)


class AsyncOpenAIClient:
    """Chat completions against one server; create it inside the event loop that uses it."""

    def __init__(self, settings: ClientSettings):
        httpx = httpx_module()
        self.httpx = httpx
        self.settings = settings
        self.base = _without_userinfo(api_base(settings.url))  # credentials go in the header we build
        self.secrets = settings.secrets()
        # Several small connection pools, not one big one: httpcore walks its whole pool on every
        # request and every response (O(connections) each), which at 64 connections was the largest
        # single CPU cost per request; a request goes to the pool with the fewest in flight.
        total = max(1, settings.concurrency)
        pools = -(-total // POOL_CONNECTIONS)
        # one TLS context for all of them (building one reads the CA bundle: about 20 ms each)
        verify = httpx.create_ssl_context() if hasattr(httpx, "create_ssl_context") else True
        self.clients = []
        for index in range(pools):
            size = -(-(total - index) // pools)  # the connections shared out as evenly as they go
            limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
            self.clients.append(httpx.AsyncClient(timeout=_timeout(httpx, settings), follow_redirects=False, limits=limits,
                                                  headers=_headers(settings), trust_env=False, verify=verify))
        self.busy = [0] * pools
        self.urls: dict[str, Any] = {}

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def _attempt(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        pool = min(range(len(self.busy)), key=self.busy.__getitem__) if len(self.busy) > 1 else 0
        self.busy[pool] += 1
        try:
            return await self._attempt_on(self.clients[pool], method, path, body)
        finally:
            self.busy[pool] -= 1

    async def _attempt_on(self, client: Any, method: str, path: str, body: dict[str, Any] | None) -> Any:
        httpx = self.httpx
        url = self.urls.get(path)
        if url is None:
            url = self.urls[path] = httpx.URL(self.base + path)
        content = None if body is None else wire_json(body)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with client.stream(method, url, content=content) as response:
                    if 300 <= response.status_code < 400:
                        url = _redirect_target(httpx, response, method, self.settings)
                        continue
                    data = bytearray()
                    async for chunk in response.aiter_raw():
                        data += chunk
                        if len(data) > self.settings.max_answer_bytes:
                            raise _Failure(f"the server's answer is larger than {self.settings.max_answer_bytes:,} bytes (not read further)")
                    if response.status_code >= 400:
                        raise _Failure(_status_reason(response.status_code, bytes(data), self.settings),
                                       retry=response.status_code in RETRY_STATUS,
                                       wait_s=retry_after_s(response.headers.get("retry-after")))
                    return _decode(bytes(data))
            except httpx.TimeoutException as exc:
                raise _Failure(f"request timed out ({type(exc).__name__}, --request-timeout {self.settings.timeout_s:g} s)") from None
            except httpx.TransportError as exc:
                reason = redact(str(exc) or type(exc).__name__, *self.secrets)
                raise _Failure(f"request failed: {printable(reason)}", retry=True) from None
        raise _Failure(f"more than {MAX_REDIRECTS} redirects")

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[Any, int]:
        """The decoded JSON answer and the attempts it took, or :class:`_Failure` after the last attempt."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await _within(self._attempt(method, path, body), self.settings.timeout_s), attempt
            except asyncio.TimeoutError:
                failure = _Failure(f"no whole answer within --request-timeout {self.settings.timeout_s:g} s")
            except _Failure as exc:
                failure = exc
            if not failure.retry or attempt > self.settings.retries:
                failure.reason = f"{failure.reason} (attempt {attempt})" if attempt > 1 else failure.reason
                failure.attempts = attempt  # type: ignore[attr-defined]
                raise failure
            await asyncio.sleep(_backoff(self.settings, attempt, failure.wait_s))

    async def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int) -> Generation:
        """One greedy answer as a :class:`Generation` (a miss carries its reason; never raises for the server's faults)."""
        body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
        attempts = 1
        try:
            payload, attempts = await self.request("POST", "/chat/completions", body)
            text, tokens = parse_chat(payload)
        except _Failure as exc:
            return Generation(None, redact(exc.reason, *self.secrets), attempts=getattr(exc, "attempts", attempts))
        return Generation(redact(text, *self.secrets), None, tokens, attempts=attempts)

    async def models(self) -> set[str]:
        try:
            payload, _ = await self.request("GET", "/models")
        except _Failure as exc:
            if exc.reason.startswith("server answered"):
                raise ComapoiError(f"The server at {redact_url(self.settings.url)} {exc.reason} to /v1/models.") from None
            raise ComapoiError(f"Cannot reach an OpenAI-compatible server at {redact_url(self.settings.url)} ({exc.reason}).",
                               hint="Start it first, e.g. the vllm serve command that 'comapoi adapters export' prints.") from None
        return parse_models(payload, self.settings.url)


def served_models(settings: ClientSettings) -> set[str]:
    """``GET /v1/models`` once (its own event loop), with the client's timeouts, redirects and retries."""

    async def check() -> set[str]:
        client = AsyncOpenAIClient(settings)
        try:
            return await client.models()
        finally:
            await client.aclose()

    return asyncio.run(check())
