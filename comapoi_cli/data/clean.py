"""``clean_file``: stream a JSONL file into a cleaned file and a rejects file, losing nothing.

The input is read in blocks of whole lines (``blocks.py``); each block is judged by a
:class:`RecordChecker` (in worker processes for large files, so every core works) and the
results come back in order. The parent process keeps what needs the whole file: duplicate
detection (a :class:`KeyTable`: the 8-byte key and the first line number of each kept
conversation, 24 to 48 bytes a record), the two output files, and the counts. Kept lines that
need no change are copied from the input as they are, a run of them in one write. Memory does
not grow with the file's size apart from the duplicate keys.

Every input line ends in exactly one place: the output (possibly converted, e.g. ShareGPT keys
or CRLF) or the rejects file, as one JSON object per line::

    {"line": 12, "reason": "bad_json", "detail": "Expecting ',' delimiter: ...", "text": "<the line>"}

(``raw_base64`` is added when the line is not valid UTF-8). Both files are written atomically:
a failed run leaves any previous outputs untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

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
from comapoi_cli.data.policies import CHECK_NAMES, FAIL, KEEP, WARN, resolve_policies
from comapoi_cli.data.records import BlockResult, KeyTable, RecordChecker, make_context, raw_fields
from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import atomic_writer, fs_error, jsonl_line, read_jsonl, remove_stale_temps, temp_prefix
from comapoi_cli.reporting import SILENT, Reporter
from comapoi_cli.roles import AgentRole, RoleContext

PARALLEL_MIN_BYTES = 16 << 20
PROGRESS_MIN_BYTES = 32 << 20  # larger inputs show progress on a terminal (about 2 s of cleaning)   # smaller files are cleaned in-process (no worker start-up cost)
WARNING_EXAMPLES = 5


class NothingKeptError(DataError):
    """No record survived cleaning; ``summary`` is the report of the run (what was rejected and why)."""

    def __init__(self, message: str, hint: str | None = None, *, summary: "CleanSummary"):
        super().__init__(message, hint=hint)
        self.summary = summary


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


def default_rejects_path(output: Path) -> Path:
    """``x_all.jsonl`` -> ``x_all.rejects.jsonl`` beside it."""
    name = output.name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else output.stem
    return output.with_name(f"{stem}.rejects.jsonl")


def _work(start: int, end: int, size: int) -> BlockResult:
    """Judge the lines in bytes ``start:end`` of the input (read here: no data crosses the pipe)."""
    checker, block = worker_block(start, end)
    return checker.process_block(block, end >= size, start == 0)


def _resolve_role(role: AgentRole | str | None, registry) -> AgentRole | None:
    if role is None or isinstance(role, AgentRole):
        return role
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
    registry,
    reporter: Reporter = SILENT,
    require_records: bool = False,
    trust_remote_code: bool = False,
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
        registry: the plugin registry (its roles judge the records).
        reporter: receives progress (unit ``"bytes"``) for large files and tokenizer runs.
        require_records: an empty input, or one of which no record survives, is an error and
            the previous output is left in place (the rejects file of the failed run says why).
        trust_remote_code: let ``tokenizer``'s own code (``tokenization_*.py``) run; off by default,
            and comapoi never asks (transformers' prompt is never reached).

    A pipe, FIFO or ``/dev/stdin`` is read like a file. Filesystem errors (a read-only folder,
    a full disk) are one-sentence ``DataError``s.

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
    for what, path in (("output", target), ("rejects file", rejects_path)):
        if path.is_dir():
            raise UsageError(f"The {what} {path} is a folder; name a file (e.g. {path / (source.stem + '_clean.jsonl')}).")
        if path.exists() and not path.is_file():
            raise UsageError(f"The {what} {path} is not a regular file (a device or a pipe); name a file to write.")
    if rejects_path.resolve() in (target.resolve(), source.resolve()):
        raise UsageError(f"The rejects file {rejects_path} must differ from the input and the output.")
    if (tokenizer is None) != (seq_length is None) and seq_length is not None:
        raise UsageError("--seq-length needs --tokenizer (token counts come from the tokenizer's chat template).")
    if seq_length is not None and seq_length <= 0:
        raise UsageError("--seq-length must be a positive number of tokens.")
    if max_poi_id is not None and max_poi_id < 0:
        raise UsageError(f"--max-poi-id must be 0 or more, got {max_poi_id}.")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be 1 or more, got {workers}.")
    table = resolve_policies(policies, strict=strict)
    if tokenizer is not None and seq_length is not None:
        from comapoi_cli.data.tokens import resolve_tokenizer

        tokenizer = resolve_tokenizer(tokenizer, [source], dataset)  # "tiny": the tiny model's tokenizer of this data
    role_obj = _resolve_role(role, registry)
    ctx = context or make_context(dataset, max_poi_id)
    checker = RecordChecker(role=role_obj, roles=registry.roles, context=ctx, policies=table,
                            tokenizer=str(tokenizer) if tokenizer is not None and seq_length is not None else None,
                            seq_length=seq_length, trust_remote_code=trust_remote_code)
    if checker.tokenizer_path:
        checker.counter()  # load once here: a bad folder fails before any work
    with sigterm_as_interrupt(), _readable(source, target) as readable:
        try:
            summary = _clean(source, readable, target, rejects_path, checker, table, workers, seq_length,
                             require_records, reporter)
        except OSError as exc:
            reading = exc.filename is not None and Path(exc.filename) in (source, readable)
            raise fs_error(exc, source if reading else target, "read" if reading else "write") from None
    summary.seconds = time.perf_counter() - started
    return summary


@contextlib.contextmanager
def _readable(source: Path, target: Path):
    """``source`` itself when it is a regular file with a size; a pipe, a FIFO, ``/dev/stdin`` or a
    procfs file (size 0 until read) is first copied into a temporary file beside the output, so
    that it can be read in byte ranges."""
    try:
        info = source.stat()
    except OSError as exc:
        raise fs_error(exc, source, "read") from None
    if stat.S_ISREG(info.st_mode) and info.st_size > 0:
        yield source
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent)
    try:
        try:
            with open(source, "rb") as reader, os.fdopen(fd, "wb") as spool:
                shutil.copyfileobj(reader, spool, 1 << 20)
        except OSError as exc:
            raise fs_error(exc, source, "read") from None
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _clean(source: Path, readable: Path, target: Path, rejects_path: Path, checker: RecordChecker, table: dict[str, str],
           workers: int | None, seq_length: int | None, require_records: bool, reporter: Reporter) -> CleanSummary:
    size = readable.stat().st_size
    n_workers = workers if workers is not None else default_workers()
    parallel = n_workers > 1 and size >= PARALLEL_MIN_BYTES and pool_start_method() is not None
    summary = CleanSummary(str(source), str(target), str(rejects_path), policies=table,
                           bytes_in=size, workers=n_workers if parallel else 1)
    counter = checker.counter()
    if counter is not None:
        summary.tokens = {"tokenizer": checker.tokenizer_path, "template": counter.template,
                          "seq_length": seq_length, "total": 0, "max": 0}

    merge = _Merger(source, summary, table["duplicate"])
    show = size >= PROGRESS_MIN_BYTES or checker.tokenizer_path is not None
    if show:
        reporter.progress_start(size, description=f"cleaning {source.name}", unit="bytes")
    try:
        with atomic_writer(target, "wb") as out:
            with atomic_writer(rejects_path, "wb") as rej:
                if not parallel:
                    for start, end, block in read_blocks(readable, size, BLOCK_SIZE):
                        merge.add(block, checker.process_block(block, end >= size, start == 0), out, rej)
                        if show:
                            reporter.progress_update(end)
                else:
                    with open(readable, "rb") as reader, contextlib.closing(
                            map_ranges(readable, size, n_workers, init_block_worker, (checker, str(readable)), _work,
                                       BLOCK_SIZE)) as results:
                        for start, end, result in results:
                            reader.seek(start)  # the worker judged these bytes; read them again to copy the kept lines
                            merge.add(reader.read(end - start), result, out, rej)
                            if show:
                                reporter.progress_update(end)
                if require_records and summary.lines_in == 0:
                    raise DataError(f"{source} is empty: there is nothing to clean; "
                                    f"{'the previous output is left as it was' if target.exists() else 'nothing was written'}.")
            if require_records and summary.kept == 0:  # the rejects file says why; the previous output stays
                summary.rejected = {name: summary.rejected[name] for name in CHECK_NAMES if name in summary.rejected}
                raise NothingKeptError(
                    f"No record of {source} survived cleaning; "
                    f"{'the previous output ' + str(target) + ' is left as it was' if target.exists() else 'no output was written'}.",
                    hint=f"See why in {rejects_path}.", summary=summary)
    finally:
        if show:
            reporter.progress_stop()
    summary.rejected = {name: summary.rejected[name] for name in CHECK_NAMES if name in summary.rejected}
    assert summary.lines_in == summary.kept + summary.rejected_total
    return summary


class _Merger:
    """Adds the blocks' results, in input order, to the outputs and the summary: duplicates
    across the whole file, line numbers, the rejects file, warnings, counts."""

    def __init__(self, source: Path, summary: CleanSummary, dup_policy: str):
        self.source = source
        self.summary = summary
        self.dup_policy = dup_policy
        self.seen = KeyTable()
        self.next_line = 1  # the line number of the next block's first line

    def add(self, block: bytes, result: BlockResult, out, rej) -> None:
        summary = self.summary
        base = self.next_line
        self.next_line += result.lines
        for name, n in result.conversions.items():
            summary.converted[name] = summary.converted.get(name, 0) + n
        for name, n in result.over_length.items():
            summary.over_length[name] = summary.over_length.get(name, 0) + n

        duplicates = self.seen.add_block(result.keys, result.offsets, base)
        failed = next((r for r in result.rejected if r[5]), None)
        if duplicates and self.dup_policy == FAIL:
            index, first = duplicates[0]
            line = base + result.offsets[index]
            if failed is None or line < base + failed[0]:
                raise DataError(f"Line {line} of {self.source} repeats line {first} (check 'duplicate' is set to fail).")
        if failed is not None:
            offset, reason, detail = failed[:3]
            raise DataError(f"Line {base + offset} of {self.source} fails check '{reason}' ({detail}); "
                            f"its policy is 'fail', so nothing was written.")

        dropped: set[int] = set()
        extra_warnings: dict[int, tuple] = {}
        rejects = [(base + offset, _reject_line(base + offset, reason, detail, block[start:end]))
                   for offset, reason, detail, start, end, _fail in result.rejected]
        for _offset, reason, *_rest in result.rejected:
            summary.rejected[reason] = summary.rejected.get(reason, 0) + 1
        if self.dup_policy != KEEP:
            for index, first in duplicates:
                detail = f"same conversation as line {first}"
                if self.dup_policy == WARN:
                    extra_warnings[index] = (("duplicate", detail),)
                    continue
                dropped.add(index)
                line = base + result.offsets[index]
                raw = block[result.spans[2 * index]: result.spans[2 * index + 1]]
                rejects.append((line, _reject_line(line, "duplicate", detail, raw)))
                summary.rejected["duplicate"] = summary.rejected.get("duplicate", 0) + 1
        if rejects:
            if dropped and result.rejected:
                rejects.sort(key=lambda item: item[0])  # the rejects file is in input order
            rej.write(b"".join(entry for _line, entry in rejects))

        summary.lines_in += result.lines
        summary.kept += len(result.keys) - len(dropped)
        roles = summary.roles
        if dropped:
            for index, name in enumerate(result.roles):
                if index not in dropped:
                    roles[name] = roles.get(name, 0) + 1
        else:
            for name, n in result.role_counts.items():
                roles[name] = roles.get(name, 0) + n
        if result.warnings or extra_warnings:
            self._warnings(result, extra_warnings, dropped, base)
        if result.tokens is not None and summary.tokens is not None:
            tokens = [t for i, t in enumerate(result.tokens) if i not in dropped]
            if tokens:
                summary.tokens["total"] += sum(tokens)
                summary.tokens["max"] = max(summary.tokens["max"], max(tokens))
        _write_kept(block, result, dropped, out)

    def _warnings(self, result: BlockResult, extra: dict[int, tuple], dropped: set[int], base: int) -> None:
        summary = self.summary
        for index in sorted(set(result.warnings) | set(extra)):
            if index in dropped:
                continue
            line = base + result.offsets[index]
            for name, _detail in result.warnings.get(index, ()) + extra.get(index, ()):
                summary.warnings[name] = summary.warnings.get(name, 0) + 1
                examples = summary.warning_lines.setdefault(name, [])
                if len(examples) < WARNING_EXAMPLES:
                    examples.append(line)


def _write_kept(block: bytes, result: BlockResult, dropped: set[int], out) -> None:
    """Write the kept lines: runs of unchanged lines as slices of ``block`` (with their newlines),
    re-serialised records as they are; the kept indexes in ``dropped`` are left out."""
    view = memoryview(block)
    spans, changed = result.spans, result.changed
    size = len(block)
    write = out.write
    for first, stop in _without(result.runs, dropped) if dropped else result.runs:
        new = changed.get(first) if changed else None
        if new is not None:
            write(new + b"\n")
            continue
        start, end = spans[2 * first], spans[2 * stop - 1]
        if end < size and block[end] == 10:
            write(view[start:end + 1])
        else:  # the last line without its newline, or a CRLF line: add a plain newline
            write(view[start:end])
            write(b"\n")


def _without(runs: list[tuple[int, int]], dropped: set[int]):
    """``runs`` with the kept indexes in ``dropped`` cut out."""
    for first, stop in runs:
        piece = first
        for index in range(first, stop):
            if index in dropped:
                if piece < index:
                    yield piece, index
                piece = index + 1
        if piece < stop:
            yield piece, stop


def _reject_line(line: int, reason: str, detail: str, raw: bytes) -> bytes:
    entry: dict[str, Any] = {"line": line, "reason": reason, "detail": detail}
    entry.update(raw_fields(raw))
    return jsonl_line(entry).encode("utf-8")


def read_rejects(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The entries of a rejects file (for tests and tools)."""
    return read_jsonl(path)
