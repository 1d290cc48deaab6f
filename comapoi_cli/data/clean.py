"""``clean_file``: stream a JSONL file into a cleaned file and a rejects file, losing nothing.

The input is read in blocks of whole lines; each block is judged by a :class:`RecordChecker`
(in worker processes for large files, so both cores work) and the results come back in order.
The parent process keeps what needs the whole file: duplicate detection (an 8-byte key and
the first line number per kept conversation), the two output files, and the counts. Memory
does not grow with the file's size apart from those keys (about 100 bytes per kept record).

Every input line ends in exactly one place: the output (possibly converted, e.g. ShareGPT keys
or CRLF) or the rejects file, as one JSON object per line::

    {"line": 12, "reason": "bad_json", "detail": "Expecting ',' delimiter: ...", "text": "<the line>"}

(``raw_base64`` is added when the line is not valid UTF-8). Both files are written atomically:
a failed run leaves any previous outputs untouched.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from comapoi_cli.data.policies import CHECK_NAMES, FAIL, KEEP, WARN, resolve_policies
from comapoi_cli.data.records import KEPT, BlockResult, RecordChecker, make_context, raw_fields
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import atomic_writer
from comapoi_cli.roles import AgentRole, RoleContext

BLOCK_SIZE = 4 << 20            # bytes read (and sent to a worker) at a time
PARALLEL_MIN_BYTES = 16 << 20   # smaller files are cleaned in-process (no worker start-up cost)
WARNING_EXAMPLES = 5


@dataclass
class CleanSummary:
    """What ``clean_file`` did. ``lines_in == kept + rejected_total`` always holds."""

    input: str
    output: str
    rejects: str
    lines_in: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    warning_lines: dict[str, list[int]] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    roles: dict[str, int] = field(default_factory=dict)
    over_length: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, Any] | None = None
    policies: dict[str, str] = field(default_factory=dict)
    bytes_in: int = 0
    seconds: float = 0.0
    workers: int = 1

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rejected_total"] = self.rejected_total
        data["mb_per_s"] = round(self.bytes_in / 1e6 / self.seconds, 1) if self.seconds > 0 else None
        return data


def _default_workers() -> int:
    env = os.environ.get("COMAPOI_DATA_WORKERS")
    if env and env.strip().isdigit():
        return max(1, int(env))
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(os.cpu_count() or 1, 8))


def default_rejects_path(output: Path) -> Path:
    """``x_all.jsonl`` -> ``x_all.rejects.jsonl`` beside it."""
    name = output.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else output.stem
    return output.with_name(f"{stem}.rejects.jsonl")


def _blocks(handle, block_size: int):
    """Yield ``(block, first_line, final)``: whole lines, the last block possibly unterminated."""
    carry = b""
    line = 1
    while True:
        chunk = handle.read(block_size)
        if not chunk:
            if carry:
                yield carry, line, True
            return
        data = carry + chunk if carry else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            carry = data
            continue
        block, carry = data[: cut + 1], data[cut + 1:]
        yield block, line, False
        line += block.count(b"\n")


_worker_checker: RecordChecker | None = None
_worker_file = None


def _can_spawn() -> bool:
    """Spawned workers re-import ``__main__`` from its file: impossible for code read from stdin."""
    import sys

    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


def _init_worker(checker: RecordChecker, path: str) -> None:
    global _worker_checker, _worker_file
    _worker_checker = checker
    _worker_file = open(path, "rb")


def _work(start: int, end: int, final: bool, bom: bool) -> tuple[int, BlockResult]:
    """Judge the lines in bytes ``start:end`` of the input (read here: no data crosses the pipe)."""
    assert _worker_checker is not None and _worker_file is not None
    _worker_file.seek(start)
    block = _worker_file.read(end - start)
    return block.count(b"\n") + (0 if block.endswith(b"\n") or not block else 1), \
        _worker_checker.process_block(block, 0, final, bom)


def _block_ranges(handle, size: int, block_size: int):
    """Byte ranges ``(start, end)`` of about ``block_size`` that end just after a newline."""
    start = 0
    while start < size:
        target = start + block_size
        if target >= size:
            yield start, size
            return
        handle.seek(target)
        end = None
        position = target
        while end is None:
            piece = handle.read(1 << 16)
            if not piece:
                end = size
                break
            cut = piece.find(b"\n")
            if cut >= 0:
                end = position + cut + 1
            position += len(piece)
        yield start, end
        start = end


def _resolve_role(role: AgentRole | str | None, registry) -> AgentRole | None:
    if role is None or isinstance(role, AgentRole):
        return role
    if registry is None:
        from comapoi_cli.plugins import get_registry

        registry = get_registry()
    return registry.role(role)


def clean_file(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    rejects: str | os.PathLike[str] | None = None,
    *,
    role: AgentRole | str | None = None,
    dataset: str | None = None,
    context: RoleContext | None = None,
    max_poi_id: int | None = None,
    policies: Mapping[str, str] | None = None,
    strict: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_length: int | None = None,
    workers: int | None = None,
    registry=None,
) -> CleanSummary:
    """Clean ``input`` into ``output``; every rejected line goes to ``rejects`` with its reason.

    Args:
        role: the role of every record (an ``AgentRole`` or a role id such as ``"agent1"``);
            None reads each record's ``agent`` field (merged files) and applies that role's checks.
        dataset / context / max_poi_id: what the role checks know (the POI id range of a preset,
            or ``max_poi_id`` explicitly).
        policies: ``{check: drop|warn|keep|fail}`` overrides (see ``policies.CHECKS``);
            ``strict`` turns every default ``drop`` into ``fail``.
        tokenizer / seq_length: with both, records longer than ``seq_length`` tokens (the
            tokenizer's chat template) are handled by the ``too_long`` policy.
        workers: processes for large files (default: the usable cores, env ``COMAPOI_DATA_WORKERS``).

    Raises:
        DataError: missing input, or a check whose policy is ``fail`` failed.
    """
    started = time.perf_counter()
    source = Path(input)
    target = Path(output)
    rejects_path = Path(rejects) if rejects is not None else default_rejects_path(target)
    if not source.exists():
        raise DataError(f"Input file {source} does not exist.")
    if source.is_dir():
        raise DataError(f"Input {source} is a folder, not a JSONL file.")
    if rejects_path.resolve() in (target.resolve(), source.resolve()):
        raise UsageError(f"The rejects file {rejects_path} must differ from the input and the output.")
    if (tokenizer is None) != (seq_length is None) and seq_length is not None:
        raise UsageError("--seq-length needs --tokenizer (token counts come from the tokenizer's chat template).")
    if seq_length is not None and seq_length <= 0:
        raise UsageError("--seq-length must be a positive number of tokens.")
    table = resolve_policies(policies, strict=strict)
    if registry is None:
        from comapoi_cli.plugins import get_registry

        registry = get_registry()
    role_obj = _resolve_role(role, registry)
    ctx = context or make_context(dataset, max_poi_id)
    checker = RecordChecker(role=role_obj, roles=registry.roles, context=ctx, policies=table,
                            tokenizer=str(tokenizer) if tokenizer is not None and seq_length is not None else None,
                            seq_length=seq_length)
    size = source.stat().st_size
    n_workers = workers if workers is not None else _default_workers()
    parallel = n_workers > 1 and size >= PARALLEL_MIN_BYTES and _can_spawn()
    summary = CleanSummary(str(source), str(target), str(rejects_path), policies=table,
                           bytes_in=size, workers=n_workers if parallel else 1)
    if checker.tokenizer_path:
        checker.counter()  # load once here: a bad folder fails before any work
        summary.tokens = {"tokenizer": checker.tokenizer_path, "template": checker.counter().template,
                          "seq_length": seq_length, "total": 0, "max": 0}

    seen: dict[int, int] = {}
    dup_policy = table["duplicate"]

    def handle(block: bytes, result: BlockResult, out, rej, base: int = 0) -> None:
        for name, n in result.conversions.items():
            summary.converted[name] = summary.converted.get(name, 0) + n
        for name, n in result.over_length.items():
            summary.over_length[name] = summary.over_length.get(name, 0) + n
        out_parts: list[bytes] = []
        rej_parts: list[bytes] = []
        roles = summary.roles
        kept = 0
        run_start = run_end = -1  # a run of unchanged kept lines, copied from the block in one slice
        for item in result.items:
            if item[0] == KEPT:
                _, line, key, start, end, new, role_name, warnings, tokens = item
                line += base
                first = seen.get(key)
                if first is not None:
                    detail = f"same conversation as line {first}"
                    if dup_policy == FAIL:
                        raise DataError(f"Line {line} of {source} repeats line {first} (check 'duplicate' is set to fail).")
                    if dup_policy not in (WARN, KEEP):
                        rej_parts.append(_reject_line(line, "duplicate", detail, block[start:end]))
                        summary.rejected["duplicate"] = summary.rejected.get("duplicate", 0) + 1
                        continue
                    if dup_policy == WARN:
                        warnings = (warnings or ()) + (("duplicate", detail),)
                else:
                    seen[key] = line
                if new is None and run_end >= 0 and start == run_end + 1:
                    run_end = end
                else:
                    if run_end >= 0:
                        out_parts.append(block[run_start:run_end])
                        run_start = run_end = -1
                    if new is None:
                        run_start, run_end = start, end
                    else:
                        out_parts.append(new)
                kept += 1
                role_name = role_name or "-"
                roles[role_name] = roles.get(role_name, 0) + 1
                if warnings:
                    for name, _detail in warnings:
                        summary.warnings[name] = summary.warnings.get(name, 0) + 1
                        examples = summary.warning_lines.setdefault(name, [])
                        if len(examples) < WARNING_EXAMPLES:
                            examples.append(line)
                if tokens is not None and summary.tokens is not None:
                    summary.tokens["total"] += tokens
                    summary.tokens["max"] = max(summary.tokens["max"], tokens)
            else:
                _, line, reason, detail, start, end, fail = item
                line += base
                if fail:
                    raise DataError(f"Line {line} of {source} fails check '{reason}' ({detail}); "
                                    f"its policy is 'fail', so nothing was written.")
                rej_parts.append(_reject_line(line, reason, detail, block[start:end]))
                summary.rejected[reason] = summary.rejected.get(reason, 0) + 1
        if run_end >= 0:
            out_parts.append(block[run_start:run_end])
        summary.lines_in += len(result.items)
        summary.kept += kept
        if out_parts:
            out_parts.append(b"")
            out.write(b"\n".join(out_parts))
        if rej_parts:
            rej.write(b"".join(rej_parts))

    with open(source, "rb") as handle_in, atomic_writer(target, "wb") as out, atomic_writer(rejects_path, "wb") as rej:
        if not parallel:
            first_block = True
            for block, first_line, final in _blocks(handle_in, BLOCK_SIZE):
                handle(block, checker.process_block(block, first_line, final, first_block), out, rej)
                first_block = False
        else:
            _clean_parallel(source, size, checker, n_workers, lambda b, r, base: handle(b, r, out, rej, base))
    summary.rejected = {name: summary.rejected[name] for name in CHECK_NAMES if name in summary.rejected}
    summary.seconds = time.perf_counter() - started
    assert summary.lines_in == summary.kept + summary.rejected_total
    return summary


def _clean_parallel(source: Path, size: int, checker: RecordChecker, n_workers: int, consume) -> None:
    """Judge byte ranges of ``source`` in ``n_workers`` processes; results are consumed in input order.

    Workers read their ranges themselves, and only the compact per-line results come back; the
    parent re-reads a range (from the page cache) to copy the kept lines. At most
    ``2 * n_workers`` ranges are in flight, so memory stays bounded. Workers are spawned (never
    forked: the caller may hold threads, e.g. torch's) with one fixed ``PYTHONHASHSEED`` so that
    their conversation keys agree.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    window = n_workers * 2
    pending: deque = deque()
    saved = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"
    base = 1
    try:
        with open(source, "rb") as reader, open(source, "rb") as scanner, \
                ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker,
                                    initargs=(checker, str(source))) as pool:

            def finish() -> None:
                nonlocal base
                start, end, future = pending.popleft()
                lines, result = future.result()
                reader.seek(start)
                consume(reader.read(end - start), result, base)
                base += lines

            try:
                for start, end in _block_ranges(scanner, size, BLOCK_SIZE):
                    pending.append((start, end, pool.submit(_work, start, end, end >= size, start == 0)))
                    if len(pending) >= window:
                        finish()
                while pending:
                    finish()
            except BaseException:
                for _start, _end, future in pending:
                    future.cancel()
                raise
    finally:
        if saved is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = saved


def _reject_line(line: int, reason: str, detail: str, raw: bytes) -> bytes:
    entry: dict[str, Any] = {"line": line, "reason": reason, "detail": detail}
    entry.update(raw_fields(raw))
    return json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n"


def read_rejects(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The entries of a rejects file (for tests and tools)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
