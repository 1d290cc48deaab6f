"""File helpers shared by every service: atomic writes and content hashes.

Every file comapoi writes goes through ``atomic_writer`` (or the helpers built on it): the
content goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed over
the target, so a reader never sees a half-written output and an interrupted run leaves the old
file (or none) in place. ``atomic_folder`` does the same for a whole folder (a merged model, an
exported adapter).

Temporary names carry the writer's process id (``.{name}.{pid}-XXXX.tmp``): a run killed with
``kill -9`` cannot delete its temporary file, so the next write of the same target removes the
temporaries of writers that no longer run on this machine (:func:`remove_stale_temps`).

JSON lines (one home): :func:`loads` parses with orjson where it is installed and reads again with
:mod:`json` whatever orjson refuses, so values and error messages are json's; :func:`jsonl_line`
writes one line with :mod:`json` only (stable bytes across runs and versions, orjson or not);
:func:`write_jsonl` writes a whole file atomically; :func:`iter_jsonl` yields every non-blank line
of a file with its number and value, or the reason it cannot be read (the caller words the reject);
:func:`read_jsonl` reads a file comapoi wrote (a rejects file), a broken line being one sentence.

``fs_error`` turns an ``OSError`` (read-only folder, full disk, a procfs path, a folder where a
file was expected) into the one-sentence ``DataError`` the CLI prints.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

fast_loads: Callable[[bytes | str], Any] | None
fast_dumps: Callable[[Any], bytes] | None
try:  # a C JSON parser, 2-3x faster than json's; json stays the reference and the fallback
    from orjson import dumps as fast_dumps
    from orjson import loads as fast_loads
except ImportError:  # pragma: no cover - orjson is a dependency, but every reader works without it
    fast_loads = fast_dumps = None

_HASH_CHUNK = 1 << 20
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^.]*\.(?:tmp|clean\.jsonl)$")


def now_iso() -> str:
    """The current time, ISO 8601 with the UTC offset, to the second (the stamp of every file comapoi writes)."""
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporary files for the target ``name``."""
    return f".{name}.{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files and folders left beside ``target`` by writers of it that were
    killed (their process is gone); return what was removed."""
    path = Path(target)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry.name)
        if not match or match.group("name") != path.name or _alive(int(match.group("pid"))):
            continue
        stale = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(stale)
            else:
                stale.unlink()
            removed.append(stale)
        except OSError:
            pass
    return removed


def fs_error(exc: OSError, path: str | os.PathLike[str] | None = None, action: str = "write"):
    """The one-sentence ``DataError`` for a filesystem error while reading or writing ``path``."""
    from comapoi_cli.errors import DataError

    where = exc.filename or path
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return DataError(f"Cannot {action} {where}: {reason[:1].lower() + reason[1:]}.")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it over ``path``, on error delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    binary = "b" in mode
    remove_stale_temps(target)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask like open()
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else "") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success it replaces ``path`` (a folder or
    file, moved aside first and put back if the swap fails), on error it is deleted."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the folder follows the umask like mkdir
        yield tmp
        old = None
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_writer(path) as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing or unreadable, not JSON or not an object."""
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- journals: JSONL files written a batch of whole lines at a time, read back by --resume ----------------------
def read_journal(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The whole lines of a journal (``pipeline run``'s predictions, ``data build``'s samples); a partial last
    line (a killed write) is cut off the file. A line that is not JSON is one sentence (``DataError``)."""
    from comapoi_cli.errors import DataError

    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    rows = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(loads(line))
        except ValueError:
            raise DataError(f"Line {number} of {path} is not JSON; --resume cannot continue it (use --overwrite).") from None
    return rows


def append_journal(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Append whole JSON lines in one write, fsync'ed (a kill leaves at most a partial last line)."""
    payload = "".join(jsonl_line(row) for row in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_recorded_settings(record_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``settings`` a resumable command recorded in its JSON record (``pipeline.json``, ``build.json``),
    for ``--resume`` to compare; a missing or unreadable record is one sentence (``DataError``)."""
    from comapoi_cli.errors import DataError

    path = Path(record_path)
    try:
        previous = read_json(path).get("settings") if path.is_file() else None
    except (ValueError, AttributeError):
        previous = None
    if not isinstance(previous, dict):
        raise DataError(f"{path} is missing or unreadable: --resume cannot check the settings (use --overwrite).")
    return previous


def iter_raw_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of each non-blank line of a file, a UTF-8 BOM on the first line removed."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.strip():
                yield number, raw


# -- JSON lines ----------------------------------------------------------------------------------------------
_LONG_DIGITS = re.compile(r"\d{19}")
_LONG_DIGITS_BYTES = re.compile(rb"\d{19}")


def loads(data: bytes | str) -> Any:
    """``json.loads(data)``, the same value or the same error (``ValueError``, ``RecursionError``), parsed by
    orjson where it is installed. orjson refuses NaN, unpaired surrogate escapes, nesting past 1024 and text
    that is not UTF-8: those are read again by :mod:`json`, the reference. orjson reads an integer beyond 64
    bits as a float, so a line with a run of 19 digits (anywhere) is read by :mod:`json` only."""
    long_digits = _LONG_DIGITS_BYTES.search(data) if isinstance(data, bytes) else _LONG_DIGITS.search(data)
    if fast_loads is not None and not long_digits:
        try:
            return fast_loads(data)
        except ValueError:  # orjson.JSONDecodeError is a ValueError
            pass
    return json.loads(data)


def wire_json(value: Any) -> bytes:
    """``value`` as JSON bytes for the wire (an HTTP request body), with orjson where it is installed and
    :mod:`json` for what orjson refuses (e.g. a lone surrogate from a ``"\\ud800"`` in an input file). Not
    for files: their bytes come from :func:`jsonl_line`, the same on every machine."""
    if fast_dumps is not None:
        try:
            return fast_dumps(value)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            pass
    return json.dumps(value).encode("utf-8")


def jsonl_line(value: Any) -> str:
    """``value`` as one JSON line with its newline: UTF-8 text as it is (``ensure_ascii=False``), json's
    separators. Always :mod:`json` (orjson writes other bytes), so an output is the same on every machine."""
    return json.dumps(value, ensure_ascii=False) + "\n"


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Any]) -> int:
    """Write ``rows`` as JSON lines (:func:`jsonl_line`), atomically; return how many were written."""
    count = 0
    with atomic_writer(path) as handle:
        for row in rows:
            handle.write(jsonl_line(row))
            count += 1
    return count


def iter_jsonl(path: str | os.PathLike[str], errors: str = "strict",
               ) -> Iterator[tuple[int, bytes, Any, ValueError | RecursionError | None]]:
    """``(line number, raw bytes, value, error)`` of each non-blank line (:func:`iter_raw_lines`: a UTF-8 BOM
    removed, only ``\\n`` ends a line). ``error`` is None, or why the line has no value: a
    ``UnicodeDecodeError`` (with ``errors="strict"``; ``"replace"`` reads bad bytes as U+FFFD), a
    ``json.JSONDecodeError``, another ``ValueError`` (an integer of more than 4,300 digits) or a
    ``RecursionError`` (nested too deeply). ``raw`` keeps its line end; the caller words the reject."""
    for number, raw in iter_raw_lines(path):
        try:
            value = loads(raw.decode("utf-8", errors))
        except (ValueError, RecursionError) as exc:
            yield number, raw, None, exc
        else:
            yield number, raw, value, None


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """The values of a JSON lines file comapoi wrote (a rejects file); a line that is not UTF-8 JSON is one
    sentence (``DataError``)."""
    from comapoi_cli.errors import DataError

    values = []
    for number, _raw, value, error in iter_jsonl(path):
        if error is not None:
            reason = getattr(error, "msg", None) or getattr(error, "reason", None) or type(error).__name__
            raise DataError(f"Line {number} of {path} is not JSON ({reason}).")
        values.append(value)
    return values
