"""Answering prompts on any engine session: many in flight on a server, batched on a local model.

The engine-independent half of scheduling, used by ``eval`` (:func:`answer_all`), ``data build``'s teacher
and the chain's scheduler (``comapoi_cli/pipeline/scheduler.py``: :class:`Throttle`, :func:`ordered`).

- :class:`Throttle`: at most ``concurrency`` requests in flight on a concurrent session (a server).
- :func:`ordered`: run numbered pieces of work with a window, hand the results on in order (a reorder buffer).
- :func:`answer_all`: one answer per prompt, in order, with either kind of session.

Light module: no torch.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Sequence

from comapoi_cli.engines import EngineSession, Generation


class Throttle:
    """``concurrency`` requests in flight at most; counts what is in flight and what was answered."""

    def __init__(self, session: EngineSession, concurrency: int):
        self.session = session
        self.semaphore = asyncio.Semaphore(max(1, concurrency))
        self.in_flight = 0
        self.answers = 0

    async def __call__(self, adapter: str, messages: list[dict[str, str]], max_new_tokens: int, **options: Any) -> Generation:
        async with self.semaphore:
            self.in_flight += 1
            try:
                return await self.session.agenerate(adapter, messages, max_new_tokens, **options)
            finally:
                self.in_flight -= 1
                self.answers += 1


async def ordered(count: int, work: Callable[[int], Awaitable[Any]], *, window: int,
                  emit: Callable[[list[Any]], None], tick: Callable[[int], None] | None = None) -> None:
    """Run ``work(0..count-1)`` with at most ``window`` started and not yet emitted; emit results in index order.

    Each finished piece of work lands in a queue (O(1) per result, however many are running). On
    an error or a cancellation (Ctrl-C) the work in flight is cancelled; what was emitted stays.
    """
    results: dict[int, Any] = {}
    finished: asyncio.Queue[tuple[int, asyncio.Task]] = asyncio.Queue()
    running: set[asyncio.Task] = set()
    next_start = next_emit = 0

    def start(index: int) -> None:
        task = asyncio.ensure_future(work(index))
        running.add(task)

        def report(done: asyncio.Task) -> None:
            finished.put_nowait((index, done))

        task.add_done_callback(report)

    try:
        while next_emit < count:
            while next_start < count and next_start - next_emit < window:
                start(next_start)
                next_start += 1
            index, task = await finished.get()
            running.discard(task)
            results[index] = task.result()  # an error in one trajectory's work stops the run
            ready = []
            while next_emit in results:
                ready.append(results.pop(next_emit))
                next_emit += 1
            if ready:
                emit(ready)
            if tick is not None:
                tick(next_emit)
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


# -- independent prompts (eval, a teacher pass) -------------------------------------------------------------


def answer_all(session: EngineSession, adapter: str, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int, *,
               batch_size: int, concurrency: int, on_done: Callable[[int, int], None] | None = None) -> list[Generation]:
    """One answer per prompt, in order, with either kind of session.

    A concurrent session gets up to ``concurrency`` prompts in flight; a batch session gets them
    longest first (less padding) in groups of ``batch_size`` (a few batches per call, so that
    progress moves). ``on_done(answered, in_flight)`` after each answer or group.
    """
    out: list[Generation | None] = [None] * len(prompts)
    if session.concurrent:
        async def main() -> None:
            throttle = Throttle(session, concurrency)

            async def one(index: int) -> None:
                out[index] = await throttle(adapter, list(prompts[index]), max_new_tokens)
                if on_done is not None:
                    on_done(throttle.answers, throttle.in_flight)

            try:
                await asyncio.gather(*(one(i) for i in range(len(prompts))))
            finally:
                await session.aclose()

        asyncio.run(main())
    else:
        order = sorted(range(len(prompts)), key=lambda i: -sum(len(m["content"]) for m in prompts[i]))
        group = max(1, batch_size) * 4
        answered = 0
        for start in range(0, len(order), group):
            chunk = order[start:start + group]
            for index, answer in zip(chunk, session.generate(adapter, [prompts[i] for i in chunk], max_new_tokens)):
                out[index] = answer
            answered += len(chunk)
            if on_done is not None:
                on_done(answered, 0)
    return [answer if answer is not None else Generation(None, "no answer") for answer in out]
