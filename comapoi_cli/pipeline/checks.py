"""The checks ``comapoi pipeline run`` makes before it scores anything (docs/pipeline.md, "Checks before scoring").

Each refuses, in one sentence, what would make the scores a lie or lose a file:

- :func:`check_output_dir`: ``--output-dir`` is a folder (not a file, not under a file);
- :func:`check_outputs_not_inputs`: no output (predictions, rejects, pipeline.json, the lock) is an input;
- :func:`check_runs_not_locked`: no run folder is being written (``train --resume`` holds its lock);
- :func:`check_run_datasets`: every run was trained on the ``--dataset`` (the files' side of the dataset
  identity is checked while they are read: ``inputs.load_inputs``);
- :func:`train_overlap`: test trajectories that are in ``--train`` or in an agent's training data, by
  trajectory key ``user_U_subtrajectory_S`` and first check-in;
- :func:`adapter_digests`: the SHA-256 of each adapter's weights (a ``--resume`` refuses a changed one).

Services only: no printing. Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.fileio import sha256_file
from comapoi_cli.runs.layout import ADAPTER_WEIGHT_NAMES

#: A trajectory inside an agent's training record (raw JSON text: the newline is escaped): its key and first check-in.
_EMBEDDED = re.compile(r"<historical trajectory of user_(\d{1,12})_subtrajectory_(\d{1,12})>(?:\\n|\s)*"
                       r"At (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}), [A-Za-z]+, user \d+ visit POI ID (\d{1,12}) ")


def check_output_dir(out: Path) -> None:
    """``--output-dir`` must be a folder or a path that can become one (no file on the way)."""
    for folder in (out, *out.parents):
        if folder.is_symlink() and not folder.exists():
            raise UsageError(f"--output-dir {out}: {folder} is a broken symbolic link.")
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == out else f"lies under {folder}, which is a file"
                raise UsageError(f"--output-dir {out} {where}, not a folder: name a folder for the outputs.")
            return


def make_output_dir(out: Path) -> None:
    check_output_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"Cannot create the output folder {out} ({exc.strerror or type(exc).__name__}).") from None


def _same(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs_not_inputs(outputs: Iterable[Path], inputs: dict[str, Path]) -> None:
    """Refuse before anything is written when an output file is one of the inputs (it would be truncated)."""
    for output in outputs:
        for flag, path in inputs.items():
            if _same(output, path):
                raise UsageError(f"{flag} {path} is also an output of this run ({output.name} in --output-dir): "
                                 "it would be overwritten; move the input or choose another --output-dir.")


def check_runs_not_locked(runs: dict[str, Any]) -> None:
    """Refuse a run folder that another process (``train --resume``) is writing: its adapter may change under us."""
    from comapoi_cli.runs.lock import check_not_locked

    for run_dir in dict.fromkeys(Path(run.run_dir) for run in runs.values()):
        check_not_locked(run_dir)


def check_run_datasets(dataset: str, runs: dict[str, Any]) -> None:
    """Every run recorded the dataset it trained on: they must agree with each other and with ``--dataset``."""
    recorded = {role: str(run.dataset).lower() for role, run in runs.items() if run.dataset}
    if len(set(recorded.values())) > 1:
        detail = ", ".join(f"{role} on {name}" for role, name in recorded.items())
        raise UsageError(f"The runs were trained on different datasets ({detail}): agents of different datasets "
                         "do not make one chain, even on a shared base model.")
    other = sorted(set(recorded.values()) - {dataset})
    if other:
        raise UsageError(f"The runs were trained on {other[0]} data, not --dataset {dataset}: "
                         "run them on their own dataset's test trajectories.")


def agent_trajectories(path: Path) -> dict[str, set[tuple[str, int]]]:
    """The trajectories an agent's training file embeds: key -> {(first check-in time, POI)}."""
    found: dict[str, set[tuple[str, int]]] = {}
    with open(path, "rb") as handle:
        for raw in handle:
            text = raw.decode("utf-8", errors="replace")
            for match in _EMBEDDED.finditer(text):
                user, sub, stamp, poi = match.groups()
                found.setdefault(f"user_{int(user)}_subtrajectory_{int(sub)}", set()).add((stamp, int(poi)))
    return found


def train_overlap(items: list[Any], train_keys: dict[str, set[tuple[str, int]]], runs: dict[str, Any],
                  train_path: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The test trajectories that were training data: ``({source: [keys]}, notes)``.

    A test trajectory is in a source when the source holds a trajectory with its key
    ``user_U_subtrajectory_S`` and its first check-in (time and POI): the same trajectory, not
    merely a key a simulated dataset happens to reuse. Sources: ``--train`` (the histories and
    the retriever) and each run's recorded training file (run.json ``data.train_file``).
    """
    from comapoi_cli.data.chain_inputs import first_checkin

    test = {item.key: first_checkin(item.trajectory) for item in items}
    found: dict[str, list[str]] = {}
    notes: list[str] = []

    def compare(source: str, known: dict[str, set[tuple[str, int]]]) -> None:
        keys = [key for key, first in test.items() if first in known.get(key, ())]
        if keys:
            found[source] = keys

    compare(f"--train {train_path}", train_keys)
    seen: dict[Path, dict[str, set[tuple[str, int]]]] = {}
    for role, run in runs.items():
        recorded = run.train_file
        if recorded is None:
            notes.append(f"{role}'s run records no training file: not checked for test trajectories in its training data")
            continue
        path, _sha = recorded
        if not Path(path).is_file():
            notes.append(f"{role}'s training file {path} is gone: not checked for test trajectories in its training data")
            continue
        resolved = Path(path).resolve()
        if resolved not in seen:
            seen[resolved] = agent_trajectories(resolved)
        compare(f"{role}'s training data {path}", seen[resolved])
    return found, notes


def describe_overlap(found: dict[str, list[str]], total: int) -> str:
    parts = [f"{len(keys)} in {source} (e.g. {keys[0]})" for source, keys in found.items()]
    return f"of the {total} test trajectories, " + "; ".join(parts)


def adapter_digests(adapters: dict[str, Path]) -> dict[str, str]:
    """The SHA-256 of each adapter's weights file (what a ``--resume`` compares)."""
    digests: dict[str, str] = {}
    for name, folder in adapters.items():
        for weights in ADAPTER_WEIGHT_NAMES:
            path = Path(folder) / weights
            if path.is_file():
                digests[name] = sha256_file(path)
                break
    return digests
