"""Scheduling generation: the chain per trajectory, and lists of independent prompts, on any engine session.

Two ways to drive an :class:`~comapoi_cli.engines.EngineSession`:

- **concurrent** (:func:`run_concurrent`, a server such as vLLM): every trajectory is a small
  coroutine that walks the chain step by step; it moves to its next step as soon as its previous
  answer arrives, and up to ``concurrency`` requests are in flight at once across trajectories,
  so a server's continuous batching never sees its queue drain between steps. Trajectories are
  started in test-file order (at most ``window`` started and not yet written), and a reorder
  buffer hands the finished lines on in test-file order, so the predictions file is always a
  prefix of the whole run's file (``--resume`` continues it to the same file, timings aside).
- **lockstep** (:func:`run_lockstep`, the local ``transformers`` engine): fixed slices of
  ``batch_size`` trajectories; each step of the chain runs on the whole slice in one batched
  ``generate`` call with one adapter (the same step across trajectories pads well).

:func:`comapoi_cli.models.answering.answer_all` answers a list of independent prompts (``eval``,
``data build``'s teacher) with either kind of session; its ``Throttle`` and ``ordered`` drive the concurrent chain here. Progress goes to the :class:`~comapoi_cli.reporting.Reporter`: trajectories (or
records) done, trajectories/s, answers/s and the requests in flight.

Light module: no torch; the chain's roles and the engine do the heavy work.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from comapoi_cli.chain import RANKING, ChainContext, ChainItem
from comapoi_cli.engines import EngineSession, Generation
from comapoi_cli.models.answering import Throttle, frozen_heap, ordered
from comapoi_cli.models.generation import prompt_hash
from comapoi_cli.retrievers import SIMILAR

Ask = Callable[[str, list[dict[str, str]], int], Awaitable[Generation]]


def frequent_pois(item: ChainItem, k: int = SIMILAR) -> list[int]:
    """The no-model baseline: the user's POIs (training history + current trajectory), most visited
    first, the most recently visited first among equals, then the smaller id."""
    counts: Counter = Counter()
    recency: dict[int, int] = {}
    if item.history is not None:
        counts.update(item.history.pois)
    for position, checkin in enumerate(item.trajectory.checkins):
        counts[checkin.poi] += 1
        recency[checkin.poi] = position
    return sorted(counts, key=lambda poi: (-counts[poi], -recency.get(poi, -1), poi))[:k]


@dataclass
class ChainPlan:
    """What every trajectory runs: the roles in order, their adapters, the context, the labels."""

    chain: list[Any]
    role_adapters: dict[str, str]
    context: ChainContext
    labels: dict[str, int]
    retriever: Any
    max_new_tokens: int

    def steps(self) -> list[tuple[Any, str]]:
        return [(role, step) for role in self.chain for step in role.chain_steps()]


@dataclass
class _Trajectory:
    """One trajectory's way through the chain."""

    item: ChainItem
    upstream: dict[str, dict[str, Any]] = field(default_factory=dict)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    final: tuple[str | None, list[int]] = (None, [])
    stages: dict[str, float] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)

    def prompt(self, plan: ChainPlan, role: Any, step: str) -> list[dict[str, str]]:
        return role.build_inference_prompt(self.item, self.upstream, plan.context, step)

    def take(self, plan: ChainPlan, role: Any, step: str, prompt: list[dict[str, str]], answer: Generation) -> None:
        fields = role.parse_chain_output(step, answer.text or "", plan.context)
        self.upstream.setdefault(role.id, {}).update(fields)
        entry: dict[str, Any] = {"raw": answer.text, **fields, "prompt_sha256": prompt_hash(prompt)}
        if answer.problem:
            entry["problem"] = answer.problem
            self.problems.append(f"{role.id}.{step}: {answer.problem}")
        if answer.attempts > 1:
            self.retries[f"{role.id}.{step}"] = answer.attempts - 1
        self.agents.setdefault(role.id, {})[step] = entry
        if RANKING in fields:
            self.final = (f"{role.id}.{step}", list(fields[RANKING]))

    def line(self, plan: ChainPlan, timings: dict[str, Any]) -> dict[str, Any]:
        item = self.item
        step_name, ranking = self.final
        if self.retries:
            timings = {**timings, "retries": self.retries}
        return {
            "key": item.key, "line": item.line, "dataset": plan.context.dataset, "user": item.user,
            "subtrajectory": item.sub, "label": plan.labels[item.key],
            "retrieved": item.similar, "agents": self.agents, "ranking": ranking, "final_step": step_name,
            "baselines": {"frequent": frequent_pois(item)},
            "problems": self.problems,
            "timings": timings,
        }


def _retrieve(plan: ChainPlan, item: ChainItem) -> None:
    item.similar = list(plan.retriever.retrieve(item, SIMILAR))[:SIMILAR]


# -- lockstep (batch sessions) -----------------------------------------------------------------------------


def run_batch(index: int, batch: list[ChainItem], plan: ChainPlan, session: EngineSession) -> list[dict[str, Any]]:
    """One slice of trajectories, each step of the chain on the whole slice in one ``generate`` call."""
    batch_started = time.monotonic()
    for item in batch:
        _retrieve(plan, item)
    stages: dict[str, float] = {"retrieval": round(time.monotonic() - batch_started, 4)}
    states = [_Trajectory(item) for item in batch]
    for role, step in plan.steps():
        prompts = [state.prompt(plan, role, step) for state in states]
        step_started = time.monotonic()
        answers = session.generate(plan.role_adapters[role.id], prompts, plan.max_new_tokens)
        stages[f"{role.id}.{step}"] = round(time.monotonic() - step_started, 4)
        for state, prompt, answer in zip(states, prompts, answers):
            state.take(plan, role, step, prompt, answer)
    total = round(time.monotonic() - batch_started, 4)
    return [state.line(plan, {"batch": index, "batch_size": len(batch), "batch_seconds": total, "stage_seconds": stages})
            for state in states]


def run_lockstep(batches: Sequence[tuple[int, list[ChainItem]]], plan: ChainPlan, session: EngineSession,
                 emit: Callable[[list[dict[str, Any]]], None], progress: Callable[[int, int, int], None]) -> None:
    """The slices in order; ``emit`` gets each slice's lines, ``progress(trajectories, answers, in_flight)``."""
    done = answers = 0
    steps = len(plan.steps())
    for index, batch in batches:
        lines = run_batch(index, batch, plan, session)
        emit(lines)
        done += len(batch)
        answers += len(batch) * steps
        progress(done, answers, 0)


# -- concurrent (servers) ------------------------------------------------------------------------------------


async def chain_one(item: ChainItem, plan: ChainPlan, ask: Ask) -> dict[str, Any]:
    """One trajectory through the chain, each step as soon as the one before has its answer."""
    started = time.monotonic()
    _retrieve(plan, item)
    state = _Trajectory(item)
    stages: dict[str, float] = {"retrieval": round(time.monotonic() - started, 4)}
    for role, step in plan.steps():
        prompt = state.prompt(plan, role, step)
        step_started = time.monotonic()
        answer = await ask(plan.role_adapters[role.id], prompt, plan.max_new_tokens)
        stages[f"{role.id}.{step}"] = round(time.monotonic() - step_started, 4)
        state.take(plan, role, step, prompt, answer)
    return state.line(plan, {"seconds": round(time.monotonic() - started, 4), "stage_seconds": stages})


def run_concurrent(items: Sequence[ChainItem], plan: ChainPlan, session: EngineSession, *, concurrency: int,
                   emit: Callable[[list[dict[str, Any]]], None], progress: Callable[[int, int, int], None],
                   window: int | None = None) -> None:
    """Every trajectory on its own through the chain, ``concurrency`` requests in flight; lines in test order."""

    async def main() -> None:
        throttle = Throttle(session, concurrency)
        try:
            await ordered(len(items), lambda i: chain_one(items[i], plan, functools.partial(throttle, priority=i)),
                          window=window or max(16 * concurrency, 256), emit=emit,
                          tick=lambda done: progress(done, throttle.answers, throttle.in_flight))
        finally:
            await session.aclose()

    with frozen_heap():
        asyncio.run(main())
