"""The openai engine's HTTP client (comapoi_cli/models/http.py) against a real asyncio HTTP server on loopback:
its connection pools together hold exactly ``concurrency`` requests in flight."""

from __future__ import annotations

import asyncio
import json
from typing import Awaitable, Callable

import pytest

from comapoi_cli.models.http import POOL_CONNECTIONS, AsyncOpenAIClient, ClientSettings

ANSWER = json.dumps({"choices": [{"message": {"role": "assistant", "content": "[1, 2, 3]"}}],
                     "usage": {"prompt_tokens": 5}}).encode()


async def _loopback(answer: Callable[[bytes, bytes], Awaitable[bytes]]) -> tuple[asyncio.AbstractServer, str, dict[str, int]]:
    """A keep-alive HTTP/1.1 server on 127.0.0.1 whose responses are ``await answer(request line, body)``;
    the server, its ``/v1`` address, and how many connections it was opened."""
    seen = {"connections": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:")), 0)
                data = await answer(lines[0], await reader.readexactly(length) if length else b"")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(data)).encode() + b"\r\n\r\n" + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", seen


async def _serve_and_ask(concurrency: int, requests: int) -> tuple[int, int, list[str]]:
    """Each request is held until ``concurrency`` are in flight (or 10 s pass), then all are answered."""
    state = {"in_flight": 0, "most": 0}
    full = asyncio.Event()

    async def answer(_request_line: bytes, _body: bytes) -> bytes:
        state["in_flight"] += 1
        state["most"] = max(state["most"], state["in_flight"])
        if state["in_flight"] >= concurrency:
            full.set()
        try:
            await asyncio.wait_for(full.wait(), 10)
        except asyncio.TimeoutError:
            pass
        state["in_flight"] -= 1
        return ANSWER

    server, url, seen = await _loopback(answer)
    client = AsyncOpenAIClient(ClientSettings(url=url, concurrency=concurrency, timeout_s=30, retries=0))
    try:
        answers = await asyncio.gather(*(client.chat("agent3", [{"role": "user", "content": f"q{i}"}], 8) for i in range(requests)))
    finally:
        await client.aclose()
        server.close()
    assert all(answer.problem is None for answer in answers), [a.problem for a in answers]
    return state["most"], seen["connections"], [answer.text or "" for answer in answers]


@pytest.mark.parametrize("concurrency", [1, POOL_CONNECTIONS + 1, 20, 64])
def test_the_pools_hold_exactly_concurrency_requests_in_flight(concurrency):
    most, connections, texts = asyncio.run(_serve_and_ask(concurrency, concurrency + 5))
    assert most == concurrency  # never more than asked for, and no pool left a request waiting while another idled
    assert connections == concurrency
    assert texts == ["[1, 2, 3]"] * (concurrency + 5)


def test_the_earliest_trajectories_are_answered_first_so_lines_are_written_early():
    """Six trajectories of three asks each, two in flight (the chain's Throttle + ordered, the openai engine's
    session against a real loopback server): a free slot goes to the earliest trajectory waiting, so the first
    line is written before the last trajectory has sent its first ask (a FIFO would send every first ask first)."""
    from pathlib import Path

    from comapoi_cli.default_plugins.pipeline_engines import OpenAIEngine
    from comapoi_cli.engines import EngineSpec
    from comapoi_cli.models.answering import Throttle, ordered
    from comapoi_cli.reporting import Reporter

    events: list[str] = []
    models = json.dumps({"data": [{"id": "agent3"}]}).encode()

    async def answer(request_line: bytes, body: bytes) -> bytes:
        if request_line.startswith(b"GET"):
            return models
        events.append("ask " + json.loads(body)["messages"][-1]["content"])
        await asyncio.sleep(0.02)
        return ANSWER

    async def main() -> None:
        server, url, _seen = await _loopback(answer)
        session = await asyncio.to_thread(OpenAIEngine().open, EngineSpec(
            base_model=None, adapters={"agent3": Path(".")}, role_adapters={"agent3": "agent3"}, url=url,
            concurrency=2, batch_size=2, timeout_s=30, retries=0), Reporter())
        throttle = Throttle(session, 2)

        async def trajectory(index: int) -> int:
            for step in "abc":
                reply = await throttle("agent3", [{"role": "user", "content": f"{index}{step}"}], 8, priority=index)
                assert reply.problem is None, reply.problem
            return index

        try:
            await ordered(6, trajectory, window=256, emit=lambda done: events.extend(f"line {i}" for i in done))
        finally:
            await session.aclose()
            server.close()

    asyncio.run(main())
    assert [e for e in events if e.startswith("line")] == [f"line {i}" for i in range(6)]
    assert sorted(e for e in events if e.startswith("ask")) == sorted(f"ask {i}{s}" for i in range(6) for s in "abc")
    assert events.index("line 0") < events.index("ask 5a"), events
