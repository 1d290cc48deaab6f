"""The ``template`` engine: ``comapoi data build``'s teacher without a model (``data synth``'s answers).

It answers the teacher prompts of ``data build`` with the answers that ``data synth`` writes from
its templates (the long-term profile and mobility texts of :mod:`comapoi_cli.data.synth`, candidate
lists from the user's own POIs and the retrieved list holding the true id at a random place or not
at all, as ``data synth`` shows them to agent3), and the build accepts
them through the same role parsers and the same record builder as an LLM's answers: the template and
an LLM teacher differ only in the answers. Seeded per trajectory and step (reproducible).

It answers only the prompts the build registers (``EngineSpec.extra["teacher_asks"]``); in
``pipeline run`` it is refused with one sentence.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from comapoi_cli.engines import Engine, EngineSession, EngineSpec, Generation
from comapoi_cli.errors import UsageError
from comapoi_cli.hookspecs import hookimpl
from comapoi_cli.reporting import Reporter

CANDIDATES = 25
NEGATIVES = 20


def template_answer(ask: Any) -> str | None:
    """``data synth``'s answer to one teacher ask (``comapoi_cli.data.build.TeacherAsk``) of CoMaPOI's
    roles, or None (no template for it)."""
    from comapoi_cli.data import synth

    role_id, step, item, upstream, context, label, seed = (ask.role_id, ask.step, ask.item, ask.upstream, ask.context,
                                                           ask.label, ask.seed)
    world = context.world
    rng = random.Random(f"{seed}:{item.key}:{role_id}.{step}")
    traj = item.trajectory
    stats = synth.history_stats(item.history, traj, world)
    own = list(dict.fromkeys([p for p, _ in stats.pois.most_common(40)] + [c.poi for c in reversed(traj.checkins)]))
    similar = list(item.similar)

    def ids(pool: list[int], count: int) -> list[int]:
        chosen = [p for p in dict.fromkeys(pool) if 0 <= p <= context.max_poi_id][:count]
        return synth._fill(chosen, count, rng, context.max_poi_id)

    if (role_id, step) == ("agent1", "profile"):
        return synth._profile(stats, rng, label.category)
    # candidate lists as data synth shows them to agent3: the true id at a random place, or missing
    # (synth's hit rates); the build then puts it at its rank in the record's target
    if (role_id, step) == ("agent1", "candidates"):
        return ", ".join(map(str, synth._noisy_list(ids(own + similar, CANDIDATES + 1), label.poi, rng, CANDIDATES, 0.55,
                                                    context.max_poi_id)))
    if (role_id, step) == ("agent2", "pattern"):
        return synth._mobility(traj.checkins, rng, world)
    if (role_id, step) == ("agent2", "candidates"):
        return ", ".join(map(str, synth._noisy_list(ids(similar + own, CANDIDATES + 1), label.poi, rng, CANDIDATES, 0.6,
                                                    context.max_poi_id)))
    if (role_id, step) == ("agent3", "negatives"):
        listed = set(upstream.get("agent1", {}).get("candidates", [])[:10]) | set(upstream.get("agent2", {}).get("candidates", [])[:10])
        pool = [p for p in similar[::-1] if p not in listed and p != label.poi]  # the retrieved list's tail
        return ", ".join(map(str, pool[:NEGATIVES])) or None
    return None


class TemplateSession(EngineSession):
    def __init__(self, spec: EngineSpec):
        self.asks: Any = spec.extra.get("teacher_asks")
        if self.asks is None:
            raise UsageError("The template engine answers only 'comapoi data build' (--teacher template); "
                             "the chain needs a model: --engine transformers or openai.")
        self.description = "template (no model: data synth's answers)"

    def generate(self, adapter: str, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int,
                 temperature: float = 0.0) -> list[Generation]:
        out = []
        for prompt in prompts:
            ask = self.asks(prompt)
            text = template_answer(ask) if ask is not None else None
            out.append(Generation(text) if text is not None else Generation(None, "the template teacher has no answer for this step"))
        return out


class TemplateEngine(Engine):
    name = "template"
    description = "No model: data build's teacher with data synth's template answers (seeded)."

    def open(self, spec: EngineSpec, reporter: Reporter) -> EngineSession:
        return TemplateSession(spec)


@hookimpl
def register_engines(register):
    register(TemplateEngine())
