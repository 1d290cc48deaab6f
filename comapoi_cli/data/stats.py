"""``compute_stats``: per-role statistics of CoMaPOI training files.

Per role (a record's ``agent`` field, else the role its file belongs to): records; characters
and tokens (p50 / p90 / p99 / max); how many records exceed ``seq_length``; the share of tokens
that carry loss under assistant-only training (the last answer's tokens over all tokens); exact
duplicates; label-leak, wrong-target and wrong-answer flags (the clean step's checks); distinct
target POIs; and a length histogram.

Tokens come from a local tokenizer's chat template (``tokenizer=PATH``: what training sees);
without one they are estimated from characters (``chars_per_token``) and marked as estimates.
Large files are read in byte ranges by worker processes (both cores), as in the clean step.
"""

from __future__ import annotations

import contextlib
import os
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from comapoi_cli.data.blocks import (
    BLOCK_SIZE,
    default_workers,
    init_block_worker,
    map_ranges,
    pool_start_method,
    read_blocks,
    sigterm_as_interrupt,
    worker_block,
)
from comapoi_cli.data.policies import KEEP, resolve_policies
from comapoi_cli.data.records import (
    KeyTable,
    RecordChecker,
    Reject,
    conversation_key,
    find_leak_in_messages,
    make_context,
)
from comapoi_cli.data.tokens import DEFAULT_CHARS_PER_TOKEN, LazyTokenCounter
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.poi_ids import answer_id_list, to_id
from comapoi_cli.reporting import SILENT, Reporter

if TYPE_CHECKING:  # typing only
    from comapoi_cli.data.tokens import TokenCounter

PARALLEL_MIN_BYTES = 8 << 20
PROGRESS_MIN_BYTES = 64 << 20  # larger files (or any tokenizer run) show progress on a terminal
TOKEN_BATCH = 1024  # conversations per tokenizer call: large batches keep its threads busy
HISTOGRAM_BINS = 12
LEAK, WRONG_TARGET, WRONG_ANSWER = 1, 2, 4


@dataclass
class RoleStats:
    role: str
    records: int = 0
    chars: dict[str, int] = field(default_factory=dict)     # p50 / p90 / p99 / max / mean
    tokens: dict[str, int] = field(default_factory=dict)
    tokens_estimated: bool = True
    total_tokens: int = 0
    loss_tokens: int = 0
    loss_share: float = 0.0          # loss_tokens / total_tokens (assistant-only training)
    over_seq_length: int | None = None
    answer_lost: int | None = None   # of those, how many would lose the whole answer if truncated
    duplicates: int = 0
    label_leaks: int = 0
    wrong_targets: int = 0
    wrong_answers: int = 0
    distinct_targets: int = 0        # distinct target POI ids (roles whose target is an id)
    histogram: dict[str, list[int]] = field(default_factory=dict)  # edges (tokens) and counts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StatsReport:
    files: dict[str, str]                     # file -> role it was read as ("-" = per-record agent field)
    roles: dict[str, RoleStats] = field(default_factory=dict)
    unusable: dict[str, int] = field(default_factory=dict)  # lines the clean step would reject, by reason
    lines: int = 0
    tokenizer: str | None = None
    template: str | None = None
    chars_per_token: float | None = None
    seq_length: int | None = None
    seconds: float = 0.0
    bytes: int = 0
    workers: int = 1

    @property
    def tokens_per_second(self) -> float | None:
        if not self.tokenizer or self.seconds <= 0:
            return None
        return sum(r.total_tokens for r in self.roles.values()) / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "roles": {name: stats.to_dict() for name, stats in self.roles.items()},
            "unusable": self.unusable,
            "lines": self.lines,
            "tokenizer": self.tokenizer,
            "template": self.template,
            "chars_per_token": self.chars_per_token,
            "seq_length": self.seq_length,
            "seconds": round(self.seconds, 3),
            "bytes": self.bytes,
            "workers": self.workers,
            "tokens_per_second": round(self.tokens_per_second) if self.tokens_per_second else None,
        }


# -- per-block work (runs in worker processes for large files) -----------------------------
class _StatsWorker:
    def __init__(self, role, roles, context, tokenizer: str | None, trust_remote_code: bool = False):
        # every keepable check set to keep: stats describe the data, they do not clean it
        policies = {name: KEEP for name, value in resolve_policies().items()
                    if name in ("unknown_role", "content_type", "assistant_not_last", "wrong_answer",
                                "wrong_target", "label_leak", "duplicate")}
        self.checker = RecordChecker(role=role, roles=roles, context=context, policies=policies)
        self.role = role
        self.roles = dict(roles or {})
        self.context = context
        self.tokenizer = tokenizer
        self.trust_remote_code = trust_remote_code
        self._tokens = LazyTokenCounter(tokenizer, trust_remote_code)

    def counter(self) -> TokenCounter | None:
        return self._tokens.get()

    def process(self, block: bytes, bom: bool) -> tuple[list[tuple], dict[str, int]]:
        rows: list[tuple] = []
        unusable: dict[str, int] = {}
        pending: list[list[dict[str, str]]] = []
        pending_rows: list[int] = []
        counter = self.counter()
        read_record, judge = self.checker.read_record, self.checker.judge
        for index, raw in enumerate(block.split(b"\n")):
            if bom and index == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                record, _changed = read_record(raw, {}, [])
                judge(record, [])
            except Reject as rej:
                unusable[rej.reason] = unusable.get(rej.reason, 0) + 1
                continue
            messages = record["messages"]
            role = self.role
            if role is None and "agent" in record:
                role = self.roles.get(record["agent"])
            role_name = role.id if role is not None else record.get("agent") or "-"
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            answer = messages[last]["content"]
            chars = sum(len(m["content"]) for m in messages)
            flags = 0
            if (role.check_leak(record, self.context) if role is not None else find_leak_in_messages(messages)):
                flags |= LEAK
            target = None
            if role is not None:
                if role.check_target(answer, record, self.context):
                    flags |= WRONG_TARGET
                elif role.check_answer(answer, record, self.context):
                    flags |= WRONG_ANSWER
                try:
                    target = to_id(role.target(record) or "")
                except Exception:  # a plugin's target() that cannot read this record
                    target = None
                if target is None:  # an id answer ({"next_poi_id": 22}, a candidate list): its first id is the true next POI
                    ids = role.target_ids(record)
                    target = ids[0] if ids else None
            else:
                ids = answer_id_list(answer)
                target = ids[0] if ids else None
            key = conversation_key(messages)
            rows.append((role_name, chars, len(answer), None, None, key, flags, target))
            if counter is not None:
                pending.append(messages)
                pending_rows.append(len(rows) - 1)
        if counter is not None:
            for start in range(0, len(pending), TOKEN_BATCH):
                counts = counter.count_batch(pending[start:start + TOKEN_BATCH])
                for row_index, (total, prompt) in zip(pending_rows[start:start + TOKEN_BATCH], counts):
                    row = rows[row_index]
                    rows[row_index] = (row[0], row[1], row[2], total, prompt, row[5], row[6], row[7])
        return rows, unusable


def _init(worker: _StatsWorker, path: str) -> None:
    init_block_worker(worker, path)
    worker.counter()


def _work(start: int, end: int, size: int):
    worker, block = worker_block(start, end)
    return worker.process(block, start == 0)


# -- aggregation -------------------------------------------------------------------------
class _Acc:
    def __init__(self, role: str):
        self.role = role
        self.chars = array("q")
        self.tokens = array("q")
        self.prompt = array("q")
        self.answer_chars = 0
        self.total_chars = 0
        self.keys = KeyTable()
        self.duplicates = 0
        self.leaks = self.wrong_targets = self.wrong_answers = 0
        self.targets: set[int] = set()

    def add(self, row: tuple) -> None:
        _role, chars, answer_chars, tokens, prompt, key, flags, target = row
        self.chars.append(chars)
        self.total_chars += chars
        self.answer_chars += answer_chars
        if tokens is not None:
            self.tokens.append(tokens)
            self.prompt.append(prompt)
        if self.keys.setdefault(key, 0) is not None:
            self.duplicates += 1
        if flags & LEAK:
            self.leaks += 1
        if flags & WRONG_TARGET:
            self.wrong_targets += 1
        if flags & WRONG_ANSWER:
            self.wrong_answers += 1
        if target is not None:
            self.targets.add(target)


def _percentiles(values: Iterable[int]) -> dict[str, int]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0}
    n = len(ordered)

    def rank(q: float) -> int:  # nearest-rank percentile
        return ordered[min(n - 1, max(0, int(-(-q * n // 1)) - 1))]

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": ordered[-1],
            "mean": round(sum(ordered) / n)}


def _histogram(values: list[int], bins: int = HISTOGRAM_BINS, top: int | None = None) -> dict[str, list[int]]:
    """Equal-width bins from the shortest record to the longest (or ``top``, the seq_length)."""
    if not values:
        return {"edges": [], "counts": []}
    low = min(values)
    high = max(max(values), top or 0) + 1
    step = max(1, -(-(high - low) // bins))
    low = low // step * step if step > 1 else low
    bins = max(1, -(-(high - low) // step))
    edges = [low + i * step for i in range(bins + 1)]
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, (value - low) // step)] += 1
    return {"edges": edges, "counts": counts}


def _role_of_file(path: Path, registry) -> str | None:
    """The role whose data file this is (also its ``_all`` / ``_100`` / ``_clean`` outputs), else None."""
    name = path.name
    for role_id, role in registry.roles.items():
        stem = role.data_file_name()[: -len(".jsonl")] if role.data_file_name().endswith(".jsonl") else role.data_file_name()
        if name in (f"{stem}.jsonl", f"{stem}_all.jsonl", f"{stem}_100.jsonl", f"{stem}_clean.jsonl"):
            return role_id
    return None


role_of_file = _role_of_file  #: public name (``comapoi data clean FILE`` infers the role as stats does)


def compute_stats(
    files: Iterable[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str] | None],
    *,
    role: str | None = None,
    dataset: str | None = None,
    max_poi_id: int | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_length: int | None = None,
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
    workers: int | None = None,
    registry,
    reporter: Reporter = SILENT,
    trust_remote_code: bool = False,
) -> StatsReport:
    """Statistics of ``files`` per role.

    ``files`` is a list of paths, or ``{path: role}``; a file's role is, in order: the mapping's
    value, ``role``, the registered role whose data file it is, else each record's ``agent`` field.
    """
    started = time.perf_counter()
    if chars_per_token <= 0:
        raise UsageError("--chars-per-token must be positive.")
    if seq_length is not None and seq_length <= 0:
        raise UsageError("--seq-length must be a positive number of tokens.")
    items = list(files.items()) if isinstance(files, Mapping) else [(f, None) for f in files]
    if not items:
        raise UsageError("No file to describe.")
    context = make_context(dataset, max_poi_id)
    from comapoi_cli.data.tokens import resolve_tokenizer

    token_path = resolve_tokenizer(tokenizer, [f for f, _r in items], dataset) if tokenizer else None
    report = StatsReport(files={}, tokenizer=token_path, seq_length=seq_length,
                         chars_per_token=None if token_path else chars_per_token)
    if token_path:
        from comapoi_cli.data.tokens import TokenCounter

        report.template = TokenCounter.load(token_path, trust_remote_code=trust_remote_code).template  # fails early on a bad folder
    accs: dict[str, _Acc] = {}
    # With a tokenizer, one process by default: tokenizing is most of the work, and the Rust
    # tokenizer spreads each block's batch over every core itself (threads, no pickling of results).
    n_workers = workers if workers is not None else 1 if token_path else default_workers()

    def consume(rows: list[tuple], unusable: dict[str, int]) -> None:
        for reason, n in unusable.items():
            report.unusable[reason] = report.unusable.get(reason, 0) + n
        report.lines += len(rows) + sum(unusable.values())
        for row in rows:
            acc = accs.get(row[0])
            if acc is None:
                acc = accs[row[0]] = _Acc(row[0])
            acc.add(row)

    total_bytes = sum(Path(f).stat().st_size for f, _r in items if Path(f).is_file())
    show = bool(token_path) or total_bytes >= PROGRESS_MIN_BYTES
    done_bytes = 0
    if show:
        reporter.progress_start(total_bytes, description="tokenizing" if token_path else "reading", unit="bytes")
    try:
        for path_like, file_role in items:
            done_bytes += _describe_file(Path(path_like), file_role, role, registry, context, token_path, n_workers,
                                         report, consume, reporter if show else None, done_bytes,
                                         trust_remote_code)
    finally:
        if show:
            reporter.progress_stop()
    return _finish(report, accs, token_path, chars_per_token, seq_length, started)


def _describe_file(path: Path, file_role, role, registry, context, token_path, n_workers, report, consume,
                   reporter, done_before: int, trust_remote_code: bool = False) -> int:
    if not path.is_file():
        raise DataError(f"Cannot find {path}.", hint="Create sample data with: comapoi data synth --dataset nyc")
    role_id = file_role or role or _role_of_file(path, registry)
    role_obj = registry.role(role_id) if role_id else None
    report.files[str(path)] = role_id or "-"
    worker = _StatsWorker(role_obj, registry.roles, context, token_path, trust_remote_code)
    size = path.stat().st_size
    report.bytes += size
    with sigterm_as_interrupt():
        if n_workers > 1 and size >= PARALLEL_MIN_BYTES and pool_start_method() is not None:
            report.workers = n_workers
            with contextlib.closing(map_ranges(path, size, n_workers, _init, (worker, str(path)), _work, BLOCK_SIZE)) as results:
                for _start, end, result in results:
                    consume(*result)
                    if reporter is not None:
                        reporter.progress_update(done_before + end)
        else:
            for start, end, block in read_blocks(path, size, BLOCK_SIZE):
                consume(*worker.process(block, start == 0))
                if reporter is not None:
                    reporter.progress_update(done_before + end)
    return size


def _finish(report, accs, token_path, chars_per_token, seq_length, started) -> StatsReport:
    for name in sorted(accs, key=lambda r: (r == "-", r)):
        acc = accs[name]
        stats = RoleStats(name, records=len(acc.chars), tokens_estimated=not token_path)
        stats.chars = _percentiles(acc.chars)
        if token_path:
            tokens = list(acc.tokens)
            stats.total_tokens = sum(tokens)
            stats.loss_tokens = stats.total_tokens - sum(acc.prompt)
        else:
            tokens = [round(c / chars_per_token) for c in acc.chars]
            stats.total_tokens = sum(tokens)
            stats.loss_tokens = round(acc.answer_chars / chars_per_token)
        stats.tokens = _percentiles(tokens)
        stats.loss_share = round(stats.loss_tokens / stats.total_tokens, 4) if stats.total_tokens else 0.0
        if seq_length is not None:
            stats.over_seq_length = sum(1 for t in tokens if t > seq_length)
            if token_path:
                stats.answer_lost = sum(1 for p in acc.prompt if p >= seq_length)
        stats.duplicates = acc.duplicates
        stats.label_leaks = acc.leaks
        stats.wrong_targets = acc.wrong_targets
        stats.wrong_answers = acc.wrong_answers
        stats.distinct_targets = len(acc.targets)
        stats.histogram = _histogram(tokens, top=seq_length)
        report.roles[name] = stats
    report.seconds = time.perf_counter() - started
    return report


def dataset_files(dataset: str, data_dir, registry) -> dict[str, str]:
    """``{path: role}`` of the registered roles' training files that exist for ``dataset``."""
    from comapoi_cli.data.layout import dataset_dir, no_agent_files

    folder = dataset_dir(dataset, data_dir)
    found = {str(folder / r.data_file_name()): role_id for role_id, r in registry.roles.items()
             if (folder / r.data_file_name()).is_file()}
    if not found:
        raise no_agent_files(dataset, folder)
    return found


def plot_lengths(report: StatsReport, path: str | os.PathLike[str]) -> Path:
    """Write a PNG with the token-length distribution per role (matplotlib, imported here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("--plot needs matplotlib.", hint="pip install 'comapoi[plot]'") from None
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, stats in report.roles.items():
        hist = stats.histogram
        if not hist.get("counts"):
            continue
        edges = hist["edges"]
        ax.stairs(hist["counts"], edges, label=f"{name} ({stats.records} records)", linewidth=1.6)
    if report.seq_length:
        ax.axvline(report.seq_length, color="black", linestyle="--", linewidth=1, label=f"seq_length {report.seq_length}")
    what = "tokens" if report.tokenizer else f"tokens (estimated, {report.chars_per_token} chars/token)"
    ax.set_xlabel(what)
    ax.set_ylabel("records")
    ax.set_title("Length distribution per role")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return target
