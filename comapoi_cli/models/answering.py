"""Answering prompts on any engine session: many in flight on a server, batched on a local model.

The engine-independent half of scheduling, used by ``eval`` (:func:`answer_all`), ``data build``'s teacher
and the chain's scheduler (``comapoi_cli/pipeline/scheduler.py``: :class:`Throttle`, :func:`ordered`).

- :class:`Throttle`: at most ``concurrency`` requests in flight on a concurrent session (a server), the
  earliest trajectories first.
- :func:`ordered`: run numbered pieces of work with a window, hand the results on in order (a reorder buffer).
- :func:`answer_all`: one answer per prompt, in order, with either kind of session.

Light module: no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
from typing import Any, Awaitable, Callable, Iterator, Sequence

from comapoi_cli.engines import EngineSession, Generation


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects that exist now (the test set, the POI table, the retriever's index, the loaded
    libraries) are left out of the garbage collector's full passes while many requests are in
    flight: a full pass over them stalled the event loop for up to 229 ms at a time (measured on the
    engine benchmark: 5 such passes in a 1,920-trajectory run), leaving request slots idle."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Throttle:
    """``concurrency`` requests in flight at most; counts what is in flight and what was answered.

    A free slot goes to the waiting request with the smallest ``priority`` (then the earliest): the
    chain and ``data build`` pass the trajectory's index, so the earliest trajectories finish first
    and their lines are written early (the output is in input order), instead of every started
    trajectory creeping forward together and the first line coming near the end.
    """

    def __init__(self, session: EngineSession, concurrency: int):
        self.session = session
        self.limit = max(1, concurrency)
        self.in_flight = 0
        self.answers = 0
        self._waiting: list[tuple[int, int, asyncio.Future]] = []
        self._arrivals = 0

    async def __call__(self, adapter: str, messages: list[dict[str, str]], max_new_tokens: int, *, priority: int = 0,
                      **options: Any) -> Generation:
        await self._acquire(priority)
        try:
            return await self.session.agenerate(adapter, messages, max_new_tokens, **options)
        finally:
            self.in_flight -= 1
            self.answers += 1
            self._grant()

    async def _acquire(self, priority: int) -> None:
        if self.in_flight < self.limit and not self._waiting:
            self.in_flight += 1
            return
        slot: asyncio.Future = asyncio.get_running_loop().create_future()
        self._arrivals += 1
        heapq.heappush(self._waiting, (priority, self._arrivals, slot))
        try:
            await slot  # the slot is counted in in_flight when it is granted
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():  # granted, then cancelled before it was used
                self.in_flight -= 1
                self._grant()
            slot.cancel()
            raise

    def _grant(self) -> None:
        while self._waiting and self.in_flight < self.limit:
            _priority, _arrival, slot = heapq.heappop(self._waiting)
            if not slot.done():
                self.in_flight += 1
                slot.set_result(None)


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

        with frozen_heap():
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
