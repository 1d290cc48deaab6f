"""Reading a JSONL file in blocks of whole lines, in this process or in worker processes.

``clean`` and ``stats`` both cut the file into byte ranges of about :data:`BLOCK_SIZE` that end
just after a newline (:func:`block_ranges`), so that a block never splits a line and block
boundaries do not depend on the number of processes. :func:`map_ranges` runs a function over
the ranges in worker processes, each reading its own ranges from the file (no data crosses the
pipe on the way in), and yields the results in input order with at most ``2 * workers`` ranges
in flight, so memory stays bounded.

Workers are forked when this process has a single thread (the CLI: instant start, and the
workers share this process's string hashes); otherwise they are spawned (forking a process
that holds threads, e.g. torch's, can deadlock) with one fixed ``PYTHONHASHSEED`` so that their
string hashes agree with each other.

Workers die with their parent: on Linux each asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), and a watch thread in each worker exits it when its parent
process is gone (also where prctl is not available), so a ``kill -9`` of the command leaves no
worker holding temporary files or the caller's stdout. :func:`sigterm_as_interrupt` makes
SIGTERM behave like Ctrl-C (a ``KeyboardInterrupt``: the outputs are left as they were).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections import deque
from typing import IO, Any, Callable, Generator, Iterator

BLOCK_SIZE = 4 << 20  # bytes judged at a time (and sent to a worker as one task)


def default_workers() -> int:
    """Processes for large files: env ``COMAPOI_DATA_WORKERS``, else the usable cores (at most 8)."""
    env = os.environ.get("COMAPOI_DATA_WORKERS")
    if env and env.strip().isdigit():
        return max(1, int(env))
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(os.cpu_count() or 1, 8))


def block_ranges(handle, size: int, block_size: int = BLOCK_SIZE) -> Iterator[tuple[int, int]]:
    """Byte ranges ``(start, end)`` of about ``block_size`` that end just after a newline
    (the last one at ``size``, newline or not). ``handle``: the file, opened in binary mode."""
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


def read_blocks(path, size: int, block_size: int = BLOCK_SIZE) -> Iterator[tuple[int, int, bytes]]:
    """``(start, end, bytes)`` of each range of :func:`block_ranges`, read in this process."""
    with open(path, "rb") as scanner, open(path, "rb") as reader:
        for start, end in block_ranges(scanner, size, block_size):
            reader.seek(start)
            yield start, end, reader.read(end - start)


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # not Linux: cannot tell, so assume threads
        return False


def _main_importable() -> bool:
    """Spawned workers re-import ``__main__`` from its file: impossible for code read from stdin."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


def pool_start_method() -> str | None:
    """``"fork"``, ``"spawn"``, or None when worker processes cannot be started here."""
    import multiprocessing

    if "fork" in multiprocessing.get_all_start_methods() and _single_threaded():
        return "fork"
    return "spawn" if _main_importable() else None


PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 0.5


def die_with_parent(parent: int) -> None:
    """Make this (worker) process end when process ``parent`` ends: prctl on Linux, and a watch
    thread everywhere (it also covers a parent that died before prctl took effect)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the thread still watches
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        import time

        while True:
            time.sleep(WATCH_INTERVAL_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="comapoi-parent-watch", daemon=True).start()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises ``KeyboardInterrupt`` in the main thread, as Ctrl-C does
    (elsewhere, e.g. in a worker thread, this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _init_worker_process(parent: int, initializer: Callable[..., None], initargs: tuple) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker must not inherit the parent's handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: the parent handles it
    # the processes are the parallelism: a tokenizer in a worker tokenizes on one core
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    initializer(*initargs)


_worker: Any = None
_worker_file: IO[bytes] | None = None


def init_block_worker(worker: Any, path: str) -> None:
    """Set up a worker process of :func:`map_ranges` (its ``initializer``): the object that judges the
    blocks, and the input file opened once (each block is read here: no data crosses the pipe)."""
    global _worker, _worker_file
    _worker = worker
    _worker_file = open(path, "rb")


def worker_block(start: int, end: int) -> tuple[Any, bytes]:
    """In a worker process: the object given to :func:`init_block_worker` and bytes ``start:end`` of its file."""
    assert _worker is not None and _worker_file is not None
    _worker_file.seek(start)
    return _worker, _worker_file.read(end - start)


def map_ranges(path, size: int, workers: int, initializer: Callable[..., None], initargs: tuple,
               work: Callable[[int, int, int], Any], block_size: int = BLOCK_SIZE,
               method: str | None = None) -> Generator[tuple[int, int, Any], None, None]:
    """Yield ``(start, end, work(start, end, size))`` for each range of :func:`block_ranges`, in
    order, computed in ``workers`` processes set up by ``initializer(*initargs)``.

    ``work`` and ``initializer`` must be module-level functions; ``method`` is the start method
    (default :func:`pool_start_method`).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = method or pool_start_method() or "spawn"
    context = multiprocessing.get_context(method)
    pending: deque = deque()
    saved = os.environ.get("PYTHONHASHSEED")
    if method != "fork":
        os.environ["PYTHONHASHSEED"] = "0"
    try:
        with open(path, "rb") as scanner, ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                              initializer=_init_worker_process,
                                                              initargs=(os.getpid(), initializer, initargs)) as pool:
            try:
                for start, end in block_ranges(scanner, size, block_size):
                    pending.append((start, end, pool.submit(work, start, end, size)))
                    if len(pending) >= 2 * workers:
                        start, end, future = pending.popleft()
                        yield start, end, future.result()
                while pending:
                    start, end, future = pending.popleft()
                    yield start, end, future.result()
            except BaseException:
                for _start, _end, future in pending:
                    future.cancel()
                raise
    finally:
        if method != "fork":
            if saved is None:
                os.environ.pop("PYTHONHASHSEED", None)
            else:
                os.environ["PYTHONHASHSEED"] = saved
