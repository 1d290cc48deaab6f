"""``comapoi data build``: the agents' training records written by a teacher, as CoMaPOI's inverse pass does.

Per training trajectory (label known), each role of the chain runs its teacher steps
(``AgentRole.teacher_steps``): the role builds the teacher's prompt (its inference prompt + the
"True Next POI Information" block, ``build_teacher_prompt``), the teacher engine answers it, the
role accepts the answer or says why not (``parse_teacher_answer``; a rejected answer is asked again
with the reason, up to ``retries`` times, then the trajectory goes to the rejects file with the
reason and every raw answer). An accepted answer becomes a student record whose prompt is exactly
the role's inference prompt (``build_inference_prompt``): the student never sees the label.

The teacher is an engine of the ``register_engines`` hook (``pipeline run``'s): ``template`` (no
model: ``data synth``'s answers), ``transformers`` (a local model) or ``openai`` (a server), and
the 100 "similar POIs" come from the chain's retriever, prepared on the other folds of the
training trajectories (a trajectory never retrieves from its own label).

Outputs, in ``output_dir``: ``{role.data_file}`` per role (``agent{1,2,3}_train_samples.jsonl``),
``build.json`` (teacher, settings, prompt hashes, counts), ``build.rejects.jsonl``,
``build.samples.jsonl`` (per trajectory: label, ranks, per-record notes such as ``padded``; also
the journal that ``resume`` continues), and with ``pairs`` ``{role}_dpo_pairs.jsonl`` (TRL's
``prompt``/``chosen``/``rejected``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comapoi_cli.chain import ChainContext, ChainItem
from comapoi_cli.data import synth
from comapoi_cli.engines import EngineSpec, Generation
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import (
    append_journal,
    iter_jsonl,
    now_iso,
    read_journal,
    read_jsonl,
    read_recorded_settings,
    sha256_file,
    write_json_atomic,
    write_jsonl,
)
from comapoi_cli.presets import require_preset
from comapoi_cli.reporting import SILENT, Reporter
from comapoi_cli.retrievers import SIMILAR, RetrievalIndex
from comapoi_cli.roles import TeacherAnswer, TeacherLabel

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry

RECORD = "build.json"
REJECTS = "build.rejects.jsonl"
SAMPLES = "build.samples.jsonl"
PAIRS = "{id}_dpo_pairs.jsonl"
BUILTIN_ROLES = ("agent1", "agent2", "agent3")
#: ``--label-rank sampled``: P(rank r) proportional to 1/r over 1..10 (label first about a third of the time).
RANK_WEIGHTS = {r: 1.0 / r for r in range(1, 11)}
#: The retriever is prepared on the other folds of the training trajectories (cross-fitting).
FOLDS = 5


@dataclass
class BuildRequest:
    dataset: str
    train: Path
    teacher: str = "template"
    output_dir: Path | None = None              # default: the folder of ``train``
    poi_info: Path | None = None                # default: {train folder}/{dataset}_poi_info.csv if it exists
    model: str | None = None
    url: str | None = None
    api_key: str | None = None
    served_names: dict[str, str] = field(default_factory=dict)   # "teacher" -> served model name
    device: str = "auto"
    quant: str = "auto"
    dtype: str | None = None
    batch_size: int = 8
    concurrency: int = 64                       # a server teacher (openai): asks in flight at most
    max_new_tokens: int | None = None           # a cap on every ask's own limit
    retriever: str = "transitions"
    label_rank: str = "sampled"
    retries: int = 2
    pairs: bool = False
    limit: int = 0
    resume: bool = False
    overwrite: bool = False
    seed: int = 42
    roles: tuple[str, ...] = BUILTIN_ROLES
    trust_remote_code: bool = False


@dataclass
class BuildResult:
    output_dir: Path
    files: dict[str, int]                        # file name -> records
    rejects: Path
    record: Path
    trajectories: int
    built: int
    rejected: int
    done_before: int
    processed: int
    seconds: float
    teacher: str
    teacher_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"output_dir": str(self.output_dir), "files": self.files, "rejects": str(self.rejects),
                "record": str(self.record), "trajectories": self.trajectories, "built": self.built,
                "rejected": self.rejected, "done_before": self.done_before, "processed": self.processed,
                "seconds": round(self.seconds, 3), "teacher_seconds": round(self.teacher_seconds, 3), "teacher": self.teacher, "notes": self.notes}


@dataclass
class _Item:
    chain: ChainItem
    label: int


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _fold(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % FOLDS


def draw_rank(mode: str, seed: int, key: str, role_id: str) -> int:
    if mode == "first":
        return 1
    rng = random.Random(f"{seed}:{key}:{role_id}:rank")
    ranks = list(RANK_WEIGHTS)
    return rng.choices(ranks, weights=[RANK_WEIGHTS[r] for r in ranks])[0]


def _read_train(request: BuildRequest, world: Any, max_id: int) -> tuple[list[_Item], list[Any], list[dict[str, Any]]]:
    """The trajectories (with each user's history of the earlier ones), all of them for retrieval, and the rejects."""
    items: list[_Item] = []
    trains: list[Any] = []
    rejects: list[dict[str, Any]] = []
    histories: dict[int, Any] = {}
    seen: set[str] = set()
    try:
        open(request.train, "rb").close()
    except OSError as exc:
        raise DataError(f"Cannot read the training trajectories {request.train} ({exc.strerror}).") from None
    for number, raw, value, error in iter_jsonl(request.train):
        if isinstance(error, UnicodeDecodeError):
            raise DataError(f"The training trajectories {request.train} are not UTF-8 text.")
        text = raw.decode("utf-8").rstrip("\r\n")
        if error is not None:
            rejects.append({"line": number, "reason": f"not JSON ({getattr(error, 'msg', error)})", "text": text})
            continue
        traj = synth.trajectory_from_record(value, world)
        if isinstance(traj, str):
            rejects.append({"line": number, "reason": traj, "text": text})
            continue
        if not 0 <= traj.next_poi <= max_id:
            rejects.append({"line": number, "reason": f"the label {traj.next_poi} is outside 0..{max_id}",
                            "text": text})
            continue
        key = f"user_{traj.user}_subtrajectory_{traj.sub}"
        if key in seen:
            rejects.append({"line": number, "reason": f"a second trajectory {key} (the first is kept)",
                            "text": text})
            continue
        seen.add(key)
        trains.append(traj)
        earlier = histories.get(traj.user)
        hidden = synth.Trajectory(traj.user, traj.sub, traj.checkins, None)  # type: ignore[arg-type]
        items.append(_Item(ChainItem(key=key, line=number, trajectory=hidden,
                                     history=earlier.copy() if earlier is not None else None), traj.next_poi))
        histories.setdefault(traj.user, synth._Stats()).add(traj.checkins, world)
    return items, trains, rejects


def _retrieve(retriever: Any, items: list[_Item], trains: list[Any], world: Any, max_id: int, seed: int) -> None:
    """The similar POIs of each trajectory from a retriever prepared on the other folds (never its own label)."""
    folds = {key: _fold(seed, key) for key in (f"user_{t.user}_subtrajectory_{t.sub}" for t in trains)}
    for fold in range(FOLDS):
        mine = [item for item in items if folds[item.chain.key] == fold]
        if not mine:
            continue
        others = [t for t in trains if folds[f"user_{t.user}_subtrajectory_{t.sub}"] != fold]
        histories: dict[int, Any] = {}
        for t in others:
            histories.setdefault(t.user, synth._Stats()).add(t.checkins, world)
        retriever.prepare(RetrievalIndex(world=world, train=others, histories=histories, max_poi_id=max_id))
        for item in mine:
            item.chain.similar = list(retriever.retrieve(item.chain, SIMILAR))[:SIMILAR]


def _settings(request: BuildRequest, roles: list[Any], poi: Path | None, teacher_name: str | None) -> dict[str, Any]:
    requests = {f"{role.id}.{step}": role.teacher_request(step) for role in roles for step in role.teacher_steps()}
    if request.max_new_tokens:
        for value in requests.values():
            value["max_new_tokens"] = min(int(value["max_new_tokens"]), request.max_new_tokens)
    return {
        "dataset": request.dataset,
        "train": str(Path(request.train).resolve()), "train_sha256": sha256_file(request.train),
        "poi_info": str(poi.resolve()) if poi else None, "poi_info_sha256": sha256_file(poi) if poi else None,
        "teacher": request.teacher, "model": request.model, "url": request.url, "served_name": teacher_name,
        "roles": [role.id for role in roles],
        "steps": [f"{role.id}.{step}" for role in roles for step in role.teacher_steps()],
        "requests": requests,
        "retriever": request.retriever, "retrieval_folds": FOLDS,
        "label_rank": request.label_rank,
        "rank_distribution": ({"1": 1.0} if request.label_rank == "first" else
                              {str(r): round(w / sum(RANK_WEIGHTS.values()), 4) for r, w in RANK_WEIGHTS.items()}),
        "retries": request.retries, "pairs": request.pairs, "limit": request.limit, "seed": request.seed,
        "batch_size": request.batch_size,
    }


@dataclass
class TeacherAsk:
    """One teacher ask as the build knows it: what an engine without a model (``template``) answers from.

    Engines find it by the prompt through ``EngineSpec.extra["teacher_asks"]`` (a callable:
    messages -> ``TeacherAsk`` or None); a model engine ignores it.
    """

    role_id: str
    step: str
    item: ChainItem
    upstream: dict[str, Any]
    context: ChainContext
    label: TeacherLabel
    seed: int


class _Asks:
    """The asks in flight, looked up by their prompt (its first two turns: system + user, retries included)."""

    def __init__(self) -> None:
        self.asks: dict[str, TeacherAsk] = {}

    def register(self, messages: list[dict[str, str]], ask: TeacherAsk) -> None:
        self.asks[_sha(messages[:2])] = ask

    def forget(self, messages: list[dict[str, str]]) -> None:
        self.asks.pop(_sha(messages[:2]), None)

    def __call__(self, messages: list[dict[str, str]]) -> TeacherAsk | None:
        return self.asks.get(_sha(messages[:2]))


def _takes_temperature(method: Any) -> bool:
    """Whether an engine session's ``generate`` / ``agenerate`` takes a ``temperature`` keyword."""
    try:
        return "temperature" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _generate(session: Any, adapter: Any, prompts: list[list[dict[str, str]]], tokens: int, temperature: float,
              takes_temperature: bool) -> list[Generation]:
    if takes_temperature:
        return session.generate(adapter, prompts, tokens, temperature=temperature)
    return session.generate(adapter, prompts, tokens)


# -- one trajectory's steps (shared by the lockstep batches and the concurrent path) ------------------------


def _new_state(item: _Item) -> dict[str, Any]:
    return {"key": item.chain.key, "line": item.chain.line, "label": item.label, "similar": item.chain.similar,
            "ranks": {}, "records": {}, "steps": {}, "upstream": {}, "rejected": None, "asks": 0}


def _draw_label(role: Any, item: _Item, st: dict[str, Any], context: ChainContext, request: BuildRequest) -> TeacherLabel:
    """The label block the teacher sees for ``role`` (its rank drawn from the seed), recorded in the state."""
    info = context.world.info.get(item.label)
    rank = draw_rank(request.label_rank, request.seed, item.chain.key, role.id)
    st["ranks"][role.id] = rank
    return TeacherLabel(item.label, rank, info[0] if info else None, info[3] if info else None, info[4] if info else None)


def _open_step(role: Any, step: str, item: _Item, st: dict[str, Any], context: ChainContext, label: TeacherLabel,
               request: BuildRequest, in_flight: _Asks) -> list[dict[str, str]] | None:
    """The teacher's prompt of this step, or None when the role derives the answer itself (already accepted)."""
    derived = role.derive_teacher_answer(step, item.chain, st["upstream"], context, label)
    if derived is not None:
        _accept(role, step, item, st, derived, context, None, [], label)
        return None
    prompt = role.build_teacher_prompt(item.chain, st["upstream"], context, step, label)
    in_flight.register(prompt, TeacherAsk(role.id, step, item.chain, st["upstream"], context, label, request.seed))
    return prompt


def _ask_messages(prompt: list[dict[str, str]], tries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The prompt, followed by each earlier unusable answer and the reason it was refused."""
    messages = list(prompt)
    for earlier in tries:
        messages += [{"role": "assistant", "content": earlier["raw"] or ""},
                     {"role": "user", "content": f"That answer cannot be used: {earlier['reason']}. "
                                                 "Answer again, following the instructions exactly."}]
    return messages


def _take_answer(role: Any, step: str, item: _Item, st: dict[str, Any], answer: Generation, context: ChainContext,
                 label: TeacherLabel, prompt: list[dict[str, str]], tries: list[dict[str, Any]]) -> bool:
    """Accept the teacher's answer (True), or add it to ``tries`` with the reason it cannot be used (False)."""
    if answer.problem or answer.text is None:
        outcome: TeacherAnswer | str = answer.problem or "no answer"
    else:
        outcome = role.parse_teacher_answer(step, answer.text, item.chain, st["upstream"], context, label)
    if isinstance(outcome, str):
        tries.append({"reason": outcome, "raw": answer.text})
        return False
    _accept(role, step, item, st, outcome, context, answer.text, tries, label, _sha(prompt))
    return True


def _reject(role: Any, step: str, st: dict[str, Any], tries: list[dict[str, Any]]) -> None:
    last = tries[-1]
    st["rejected"] = {"role": role.id, "step": step, "reason": last["reason"], "raw": last["raw"],
                      "attempts": len(tries), "tries": tries}


def _finish_row(st: dict[str, Any], roles: list[Any], request: BuildRequest) -> dict[str, Any]:
    st.pop("upstream")
    if st["rejected"] is not None:
        st.pop("records")
    elif request.pairs:
        st["pairs"] = _pairs(roles, st)
    return st


def _run_batch(batch: list[_Item], roles: list[Any], session: Any, adapter: Any, context: ChainContext,
               settings: dict[str, Any], request: BuildRequest, in_flight: _Asks, takes_temperature: bool) -> list[dict[str, Any]]:
    """A batch session (a local model): each step of the chain on the whole batch at once, its retries before the next step."""
    state = {item.chain.key: _new_state(item) for item in batch}
    for role in roles:
        labels = {item.chain.key: _draw_label(role, item, state[item.chain.key], context, request) for item in batch}
        for step in role.teacher_steps():
            ask = settings["requests"][f"{role.id}.{step}"]
            pending: list[tuple[_Item, list[dict[str, str]]]] = []
            for item in batch:
                st = state[item.chain.key]
                if st["rejected"] is None:
                    prompt = _open_step(role, step, item, st, context, labels[item.chain.key], request, in_flight)
                    if prompt is not None:
                        pending.append((item, prompt))
            tries: dict[str, list[dict[str, Any]]] = {item.chain.key: [] for item, _ in pending}
            attempt = 0
            while pending:
                prompts = [_ask_messages(prompt, tries[item.chain.key]) for item, prompt in pending]
                for item, _prompt in pending:
                    state[item.chain.key]["asks"] += 1
                answers = _generate(session, adapter, prompts, int(ask["max_new_tokens"]), float(ask["temperature"]),
                                    takes_temperature)
                failed = [(item, prompt) for (item, prompt), answer in zip(pending, answers)
                          if not _take_answer(role, step, item, state[item.chain.key], answer, context,
                                              labels[item.chain.key], prompt, tries[item.chain.key])]
                attempt += 1
                if attempt > request.retries:
                    for item, _prompt in failed:
                        _reject(role, step, state[item.chain.key], tries[item.chain.key])
                    failed = []
                pending = failed
    in_flight.asks.clear()
    return [_finish_row(state[item.chain.key], roles, request) for item in batch]


async def _build_one(item: _Item, roles: list[Any], ask: Any, adapter: Any, context: ChainContext,
                     settings: dict[str, Any], request: BuildRequest, in_flight: _Asks) -> dict[str, Any]:
    """A concurrent session (a server): one trajectory's steps one after another, each ask as soon as the
    one before has its answer (``ask`` bounds the requests in flight over all trajectories)."""
    st = _new_state(item)
    for role in roles:
        label = _draw_label(role, item, st, context, request)
        for step in role.teacher_steps():
            if st["rejected"] is not None:
                break
            prompt = _open_step(role, step, item, st, context, label, request, in_flight)
            if prompt is None:
                continue
            tries: list[dict[str, Any]] = []
            limits = settings["requests"][f"{role.id}.{step}"]
            while True:
                st["asks"] += 1
                answer = await ask(adapter, _ask_messages(prompt, tries), int(limits["max_new_tokens"]),
                                   float(limits["temperature"]))
                if _take_answer(role, step, item, st, answer, context, label, prompt, tries):
                    break
                if len(tries) > request.retries:
                    _reject(role, step, st, tries)
                    break
            in_flight.forget(prompt)
    return _finish_row(st, roles, request)


def _build_concurrently(todo: list[_Item], roles: list[Any], session: Any, adapter: Any, context: ChainContext,
                        settings: dict[str, Any], request: BuildRequest, in_flight: _Asks,
                        emit: Any, takes_temperature: bool) -> None:
    """Every trajectory on its own, ``request.concurrency`` asks in flight over all of them, rows emitted in
    input order (the chain's scheduler: :func:`comapoi_cli.models.answering.ordered`); each step's
    temperature is passed when the session takes one."""
    import asyncio

    from comapoi_cli.models.answering import Throttle, frozen_heap, ordered

    async def main() -> None:
        throttle = Throttle(session, request.concurrency)

        def ask_for(index: int) -> Any:
            async def ask(adapter: Any, messages: list[dict[str, str]], tokens: int, temperature: float) -> Generation:
                options = {"temperature": temperature} if takes_temperature else {}
                return await throttle(adapter, messages, tokens, priority=index, **options)
            return ask

        try:
            await ordered(len(todo), lambda i: _build_one(todo[i], roles, ask_for(i), adapter, context, settings,
                                                          request, in_flight),
                          window=max(16 * request.concurrency, 256), emit=emit)
        finally:
            await session.aclose()

    with frozen_heap():
        asyncio.run(main())


def _accept(role: Any, step: str, item: _Item, st: dict[str, Any], answer: TeacherAnswer, context: ChainContext,
            raw: str | None, tries: list[dict[str, Any]], label: TeacherLabel, teacher_sha: str | None = None) -> None:
    entry: dict[str, Any] = {"raw": raw, "retries": len(tries), **({"notes": answer.notes} if answer.notes else {})}
    if tries:
        entry["rejected_tries"] = tries
    if teacher_sha:
        entry["teacher_prompt_sha256"] = teacher_sha
    if answer.target is not None:
        # the student's prompt: exactly the inference prompt (built before this step's answer joins upstream)
        prompt = role.build_inference_prompt(item.chain, st["upstream"], context, step)
        record = {"messages": [*prompt, {"role": "assistant", "content": answer.target}]}
        st["records"].setdefault(role.id, []).append(record)
        entry["student_prompt_sha256"] = _sha(prompt)
    st["upstream"].setdefault(role.id, {}).update(answer.fields)
    entry["fields"] = answer.fields
    st["steps"][f"{role.id}.{step}"] = entry


def _pairs(roles: list[Any], st: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """TRL DPO pairs: chosen = the teacher's list with the label, rejected = its negatives (label removed)."""
    negatives: list[int] = []
    for entry in st["steps"].values():
        negatives = negatives or list(entry.get("fields", {}).get("negatives", []))
    out: dict[str, list[dict[str, Any]]] = {}
    if not negatives:
        return out
    for role in roles:
        if not role.teacher_pairs():
            continue
        for record in st["records"].get(role.id, []):
            prompt, chosen = record["messages"][:-1], record["messages"][-1]["content"]
            try:
                value = json.loads(chosen)
            except ValueError:
                value = None
            if isinstance(value, dict) and isinstance(value.get("next_poi_id"), list):
                rejected = json.dumps({"next_poi_id": negatives[: len(value["next_poi_id"])]})
            elif synth_is_list(chosen):
                rejected = ", ".join(map(str, negatives))
            else:
                continue
            out.setdefault(role.id, []).append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                                                "rejected": [{"role": "assistant", "content": rejected}]})
    return out


def synth_is_list(text: str) -> bool:
    from comapoi_cli.poi_ids import is_id_list

    return is_id_list(text)


def build_dataset(request: BuildRequest, registry: Any, reporter: Reporter = SILENT) -> BuildResult:
    """Run the teacher pass (see the module doc)."""
    from comapoi_cli.chain import chain_order

    started = time.monotonic()
    preset = require_preset(request.dataset, "the build")
    if request.label_rank not in ("first", "sampled"):
        raise UsageError(f"--label-rank must be first or sampled, not '{request.label_rank}'.")
    if request.retries < 0 or request.batch_size < 1 or request.limit < 0 or request.concurrency < 1:
        raise UsageError("--retries and --limit must be 0 or more, --batch-size and --concurrency at least 1.")
    if request.resume and request.overwrite:
        raise UsageError("--resume and --overwrite exclude each other.")
    train = Path(request.train)
    if not train.is_file():
        raise DataError(f"Cannot find the training trajectories {train}.",
                        hint="Pass CoMaPOI's plain next-POI file, e.g. --train data/nyc/nyc_train.jsonl.")
    roles = chain_order(registry, list(request.roles))
    engine = registry.engine(request.teacher)
    retriever = registry.retriever(request.retriever)
    teacher_name = request.served_names.get("teacher")
    unknown = sorted(set(request.served_names) - {"teacher"})
    if unknown:
        raise UsageError(f"--served-name takes teacher=NAME, not {', '.join(unknown)}=...")
    if request.teacher == "transformers" and not request.model:
        raise UsageError("The transformers teacher needs a model: --model DIR.")

    max_id = preset.max_poi_id
    world = synth.PoiWorld(max_id, preset.coord_decimals)
    poi = Path(request.poi_info) if request.poi_info else train.parent / f"{request.dataset}_poi_info.csv"
    notes: list[str] = []
    if poi.exists() or request.poi_info:
        from comapoi_cli.data.chain_inputs import read_poi_table

        _rows, bad = read_poi_table(poi, world)
        if bad:
            notes.append(f"{bad} row{'s' if bad != 1 else ''} of {poi} are not POIs (skipped)")
    else:
        poi = None  # type: ignore[assignment]
        notes.append(f"no POI table ({train.parent / (request.dataset + '_poi_info.csv')}): POIs come from the trajectories only")
    items, trains, input_rejects = _read_train(request, world, max_id)
    if not items:
        raise DataError(f"{train} holds no CoMaPOI trajectories ({len(input_rejects)} lines rejected, see why with "
                        "comapoi data build); each line needs a user turn '<historical trajectory of user_U_subtrajectory_S>' "
                        "with check-ins and an answer {\"next_poi_id\": N}.")
    if request.limit:
        items = items[: request.limit]
    out = Path(request.output_dir) if request.output_dir else train.parent
    out.mkdir(parents=True, exist_ok=True)
    journal, record_path, rejects_path = out / SAMPLES, out / RECORD, out / REJECTS
    settings = _settings(request, roles, poi, teacher_name)

    done_rows: list[dict[str, Any]] = []
    outputs = [out / role.data_file_name() for role in roles]
    if journal.exists() and journal.stat().st_size and not request.overwrite:
        if not request.resume:
            raise UsageError(f"{out} holds a build ({SAMPLES}); continue it with --resume, or start over with --overwrite.")
        previous = read_recorded_settings(record_path)
        changed = [key for key in settings if previous.get(key) != settings[key]]
        if changed:
            raise UsageError(f"--resume: {out} was built with other settings ({', '.join(changed)}); "
                             "use the same ones, another --output-dir, or --overwrite.")
        done_rows = read_journal(journal)
    else:
        if not request.overwrite and not request.resume:
            existing = [p for p in outputs if p.exists() and p.stat().st_size]
            if existing:
                raise UsageError(f"{existing[0]} already exists; replace it with --overwrite, or choose another --output-dir.")
        if journal.exists():
            journal.unlink()
    for note in notes:
        reporter.info(note)
    record: dict[str, Any] = {"settings": settings, "started": now_iso()}
    write_json_atomic(record_path, record)

    done = {row["key"] for row in done_rows}
    todo = [item for item in items if item.chain.key not in done]
    context = ChainContext(dataset=request.dataset, max_poi_id=max_id, world=world)
    processed = 0
    loop_seconds = 0.0
    description = ""
    if todo:
        _retrieve(retriever, todo, trains, world, max_id, request.seed)
        in_flight = _Asks()
        if request.teacher == "openai" or teacher_name:
            name = teacher_name or "teacher"
            adapters, adapter = {name: Path(".")}, name
        else:
            adapters, adapter = {}, None
        spec = EngineSpec(base_model=request.model, adapters=adapters, role_adapters={"teacher": adapter or ""},
                          tokenizer=request.model, device=request.device, quant=request.quant, dtype=request.dtype,
                          batch_size=request.batch_size, concurrency=request.concurrency,
                          trust_remote_code=request.trust_remote_code, url=request.url,
                          api_key=request.api_key, extra={"teacher_asks": in_flight})
        session = engine.open(spec, reporter)
        description = session.description or request.teacher
        takes_temperature = _takes_temperature(session.agenerate if session.concurrent else session.generate)
        record["temperature_applied"] = takes_temperature
        reporter.info(f"teacher {description}: {len(items)} trajectories ({len(done)} done before), "
                      f"steps {', '.join(settings['steps'])}")
        reporter.progress_start(len(items), len(items) - len(todo), description="build", unit="samples")
        loop_started = time.monotonic()

        def emit(rows: list[dict[str, Any]]) -> None:
            nonlocal processed, loop_seconds
            append_journal(journal, rows)
            done_rows.extend(rows)
            processed += len(rows)
            elapsed = loop_seconds = time.monotonic() - loop_started
            rate = processed / elapsed if elapsed > 0 else None
            remaining = len(todo) - processed
            reporter.progress_update(len(items) - remaining, rate=rate, eta_s=(remaining / rate) if rate else None)

        try:
            if session.concurrent:
                _build_concurrently(todo, roles, session, adapter, context, settings, request, in_flight, emit,
                                    takes_temperature)
            else:
                for start in range(0, len(todo), request.batch_size):
                    batch = todo[start:start + request.batch_size]
                    emit(_run_batch(batch, roles, session, adapter, context, settings, request, in_flight, takes_temperature))
        finally:
            reporter.progress_stop()
            session.close()
    counts = _write_outputs(out, roles, items, done_rows, input_rejects, request.pairs)
    seconds = time.monotonic() - started
    by_key = {row["key"]: row for row in done_rows}
    rows_now = [by_key[item.chain.key] for item in items if item.chain.key in by_key]
    rejected = [row for row in rows_now if row.get("rejected")]
    reasons = Counter(row["rejected"]["reason"] for row in rejected)
    record.update({
        "finished": now_iso(), "teacher": description or record.get("teacher"),
        "prompt_sha256": _prompt_hashes(rows_now, settings["steps"]),
        "counts": {"trajectories": len(items), "built": len(rows_now) - len(rejected), "rejected": len(rejected),
                   "input_rejects": len(input_rejects), "files": counts, "reject_reasons": dict(reasons.most_common()),
                   "padded_ids": _sum_note(rows_now, "padded"), "asks": sum(int(row.get("asks") or 0) for row in rows_now), "retries": _sum_retries(rows_now),
                   "label_ranks": _label_ranks(rows_now)},
        "seconds_this_run": round(seconds, 3), "processed_this_run": processed,
        "teacher_seconds_this_run": round(loop_seconds, 3),
        # samples = trajectories (5 records each); the teacher pass alone, loading and writing excluded
        "samples_per_s_this_run": round(processed / loop_seconds, 4) if processed and loop_seconds else None,
        "asks_per_s_this_run": (round(sum(int(by_key[item.chain.key].get("asks") or 0) for item in todo) / loop_seconds, 4)
                                if processed and loop_seconds else None),
    })
    write_json_atomic(record_path, record)
    if rejected:
        notes.append(f"{len(rejected)} trajectory(ies) rejected after {request.retries} retries, with reasons and raw answers, in {rejects_path}")
    return BuildResult(output_dir=out, files=counts, rejects=rejects_path, record=record_path, trajectories=len(items),
                       built=len(rows_now) - len(rejected), rejected=len(rejected), done_before=len(items) - len(todo),
                       processed=processed, seconds=seconds, teacher=description or request.teacher,
                       teacher_seconds=loop_seconds, notes=notes)


def _write_outputs(out: Path, roles: list[Any], items: list[_Item], rows: list[dict[str, Any]],
                   input_rejects: list[dict[str, Any]], pairs: bool) -> dict[str, int]:
    by_key = {row["key"]: row for row in rows}
    ordered = [by_key[item.chain.key] for item in items if item.chain.key in by_key]
    counts: dict[str, int] = {}
    for role in roles:
        name = role.data_file_name()
        counts[name] = write_jsonl(out / name, (rec for row in ordered for rec in (row.get("records") or {}).get(role.id, [])))
        if pairs and role.teacher_pairs():
            pname = PAIRS.format(id=role.id)
            counts[pname] = write_jsonl(out / pname, (pair for row in ordered for pair in (row.get("pairs") or {}).get(role.id, [])))
    write_jsonl(out / REJECTS, [*input_rejects, *({"key": row["key"], "line": row["line"], **row["rejected"]}
                                                  for row in ordered if row.get("rejected"))])
    return counts


def _prompt_hashes(rows: list[dict[str, Any]], steps: list[str]) -> dict[str, dict[str, str]]:
    """Per step, a hash over every teacher prompt and every student prompt (in input order)."""
    out = {}
    for step in steps:
        teacher = [(row.get("steps") or {}).get(step, {}).get("teacher_prompt_sha256") for row in rows]
        student = [(row.get("steps") or {}).get(step, {}).get("student_prompt_sha256") for row in rows]
        out[step] = {"teacher": _sha(teacher), "student": _sha(student)}
    return out


def _sum_note(rows: list[dict[str, Any]], name: str) -> int:
    return sum(int((entry.get("notes") or {}).get(name) or 0) for row in rows for entry in (row.get("steps") or {}).values())


def _sum_retries(rows: list[dict[str, Any]]) -> int:
    return sum(int(entry.get("retries") or 0) for row in rows for entry in (row.get("steps") or {}).values())


def _label_ranks(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for row in rows:
        for step, entry in (row.get("steps") or {}).items():
            rank = (entry.get("notes") or {}).get("label_rank")
            if rank is not None:
                out.setdefault(step, Counter())[str(rank)] += 1
    return {step: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for step, c in out.items()}


def synthesise(dataset: str, out: Any = None, *, registry: Registry, reporter: Reporter = SILENT,
               **options: Any) -> Any:
    """The ``data synth`` service: :func:`comapoi_cli.data.synth.synth_dataset`, with a preset city's real
    trajectories (``source=``) written by data build's template teacher (:func:`synth_with_template`)."""
    from functools import partial

    return synth.synth_dataset(dataset, out, registry=registry, reporter=reporter,
                               real_writer=partial(synth_with_template, registry=registry), **options)


def synth_with_template(summary: Any, source: Path, poi_info: Any, trajectories: int | None, reporter: Reporter,
                        started: float, *, registry: Registry) -> Any:
    """``data synth --source FILE`` of a preset city: ``data build --teacher template --label-rank first``
    (the true id first in every target, as ``data synth`` always wrote them), so synth and build share
    one record builder. Fills and returns synth's ``summary``."""
    folder = Path(summary.folder)
    request = BuildRequest(dataset=summary.dataset, train=source, teacher="template", output_dir=folder,
                           poi_info=Path(poi_info) if poi_info is not None else None, label_rank="first", retries=0,
                           limit=trajectories or 0, overwrite=True, seed=summary.seed)
    result = build_dataset(request, registry, reporter)
    keys = [row["key"] for row in read_journal(folder / SAMPLES)]
    summary.trajectories = result.built
    summary.users = len({key.split("_subtrajectory_")[0] for key in keys})
    summary.records = {name: n for name, n in result.files.items() if name.endswith("_train_samples.jsonl")}
    summary.files = [str(folder / name) for name in summary.records]
    summary.skipped_lines = sum(1 for line in _read_journal_rejects(folder / REJECTS) if "key" not in line)
    summary.bytes_written = sum((folder / name).stat().st_size for name in summary.records)
    summary.seconds = time.perf_counter() - started
    return summary


def _read_journal_rejects(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if path.exists() else []
