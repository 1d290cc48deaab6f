"""Exclusive locks on run folders and other outputs: one writer at a time.

``hold_lock(path, what)`` takes an exclusive ``flock`` on ``path`` (a small file holding the
holder's pid, host and command as JSON) and releases and removes it on exit. A second writer is
refused with one sentence naming the holder. The kernel drops a ``flock`` when its process dies,
so the lock of a killed run is free at once; a lock file whose recorded pid is dead on this host
is taken over (and said so through ``on_stale``). Lock files are opened without following
symbolic links (``O_NOFOLLOW``): a link planted where a lock file goes is refused with one
sentence, and its target is never written. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from comapoi_cli.errors import UsageError
from comapoi_cli.runs.layout import LOCK_FILE


class LockedError(UsageError):
    """Another process holds the lock on a run folder (or a prepared-data file)."""


def process_alive(pid: Any, host: Any) -> bool | None:
    """True/False when it can be told (same host), None otherwise."""
    if not isinstance(pid, int) or isinstance(pid, bool) or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _refuse_link(path: Path, exc: OSError) -> None:
    """Raise one sentence when ``exc`` came from opening a symbolic link with O_NOFOLLOW."""
    if exc.errno == errno.ELOOP or path.is_symlink():
        raise UsageError(f"The lock file {path} is a symbolic link; comapoi never follows links for its lock "
                         "files (that would overwrite the link's target).",
                         hint=f"Remove the link {path} and run again.") from None


def read_holder(path: Path) -> dict[str, Any]:
    """What a lock file says about its holder (empty when unreadable or a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as handle:  # a regular file we created; small
            data = json.loads(handle.read(64 * 1024).decode("utf-8") or "{}")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    command = holder.get("command")
    command = " ".join(command) if isinstance(command, list) else str(command or "?")
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} ({command[:200]})"


class Lock:
    """A held lock (``release`` frees and removes it)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still held: a waiting writer re-checks the inode
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None


def acquire(path: Path, what: str, *, wait: float = 0.0, on_stale: Callable[[str], None] | None = None,
            command: list[str] | None = None) -> Lock:
    """Take the exclusive lock ``path`` on ``what`` (a run folder, a file); wait up to ``wait`` seconds.

    Raises:
        LockedError: another live process holds it.
        UsageError: ``path`` is a symbolic link (never followed).
    """
    deadline = time.monotonic() + wait
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        previous = read_holder(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as exc:
            _refuse_link(path, exc)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            holder = read_holder(path)
            raise LockedError(f"{what} is being written by {describe_holder(holder)}; wait until it ends or stop it.",
                              hint=f"If that process is gone, remove {path}.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our lock: try again
            os.close(fd)
            continue
        if previous and process_alive(previous.get("pid"), previous.get("host")) is False and on_stale:
            on_stale(f"Took over the stale lock of {describe_holder(previous)}, which is no longer running.")
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": command or ["comapoi", *sys.argv[1:]], "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        return Lock(path, fd)


@contextlib.contextmanager
def hold_lock(path: Path, what: str, *, wait: float = 0.0,
              on_stale: Callable[[str], None] | None = None) -> Iterator[Lock]:
    lock = acquire(path, what, wait=wait, on_stale=on_stale)
    try:
        yield lock
    finally:
        lock.release()


def run_lock_path(run_dir: Path) -> Path:
    return run_dir / LOCK_FILE


def lock_run(run_dir: Path, on_stale: Callable[[str], None] | None = None) -> Lock:
    """The run folder's lock (the folder must exist)."""
    return acquire(run_lock_path(run_dir), f"The run folder {run_dir}", on_stale=on_stale)


def output_lock_path(output: Path) -> Path:
    """The lock of an output folder that is replaced as a whole (a merged model): beside it."""
    return output.parent / f".{output.name}.comapoi.lock"


def check_not_locked(run_dir: Path) -> None:
    """Refuse when a live process holds ``run_dir``'s lock (e.g. export or eval of a run still training)."""
    path = run_lock_path(run_dir)
    if path.is_symlink() or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise LockedError(f"The run folder {run_dir} is being written by {describe_holder(read_holder(path))}; "
                          "wait until it ends.") from None
    finally:
        os.close(fd)
