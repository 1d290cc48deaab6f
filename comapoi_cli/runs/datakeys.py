"""The data a run trained on and held out, by conversation key: written at training, checked by eval.

A record's conversation key is the first 16 hex digits of the SHA-256 of its prompt (the turns
before its last assistant turn, as canonical JSON of ``{"role", "content"}``: the prompt hash
``comapoi eval`` writes as ``prompt_sha256``). Two records with the same key ask the same
question, so a held-out record whose key is among the training keys was seen in training.

Exact keys miss a copy that differs only in form, so two more keys are recorded and checked:

- the *content key* (:func:`content_key`): the same hash over the prompt without its system turns,
  each turn's text Unicode-normalised (NFKC) with runs of white space made one space and the ends
  stripped: a training record without its system turn, or with a trailing space, has the key of
  the original;
- the *trajectory key* (:func:`trajectory_key`): ``ROLE:KIND:user_U_subtrajectory_S``, the
  trajectory the prompt is about (its first ``user_U_subtrajectory_S``, ``user_id: U,
  subtrajectory_id: S`` or ``User_id: U, Subtrajectory_id: S``), the role that answers it (the
  record's ``agent``, else the run's role; ``-`` for a plain next-POI record) and the kind of its
  reference answer (``ids``: a JSON value or a comma list of ids; ``text``): the same question
  about the same trajectory, however its prompt was built. The kind tells a role's steps apart
  (CoMaPOI's Profiler answers a profile text and, in another record, a candidate list).

``data_keys.json`` in the run folder: ``{"schema", "key", "train_file", "train_sha256",
"holdout_file", "holdout_sha256", "train": [keys], "holdout": [keys], "train_content": [keys],
"train_trajectories": [keys]}`` (schema 2; schema 1 lacks the last two, and eval then computes them
from the recorded training file when it is unchanged). Nothing here imports torch.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from comapoi_cli.errors import DataError
from comapoi_cli.fileio import iter_jsonl, sha256_file, write_json_atomic
from comapoi_cli.models.generation import prompt_hash, record_messages
from comapoi_cli.poi_ids import is_id_list
from comapoi_cli.runs.info import RunInfo, read_json_file
from comapoi_cli.runs.layout import DATA_KEYS, RUN_JSON

KEY_KIND = "sha256-16 of the prompt turns (canonical JSON)"
DATA_KEYS_MAX_BYTES = 512 * 1024 * 1024
_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.S)
_TRAJECTORY = (re.compile(r"\buser_(\d+)_subtrajectory_(\d+)", re.I),
               re.compile(r"\buser_id:\s*(\d+)\s*,\s*subtrajectory_id:\s*(\d+)", re.I))


def prompt_key(prompt: Sequence[dict[str, str]]) -> str:
    """The conversation key of a prompt (``[{"role", "content"}]`` without the answer): the first 16 hex
    digits of its :func:`~comapoi_cli.models.generation.prompt_hash`."""
    return prompt_hash(prompt)[:16]


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def content_key(prompt: Sequence[dict[str, str]]) -> str:
    """The key of a prompt's content: no system turns, white space and Unicode forms normalised."""
    turns = [{"role": m["role"], "content": _normal(m["content"])} for m in prompt if m["role"] != "system"]
    return prompt_key(turns)


def answer_kind(answer: str | None) -> str:
    """``ids`` for an answer that is a JSON value or a bare comma list of ids, else ``text``."""
    text = (answer or "").strip()
    fenced = _FENCE.match(text)
    text = fenced.group(1).strip() if fenced else text
    if is_id_list(text):
        return "ids"
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return "text"
    return "ids"


def trajectory_key(prompt: Sequence[dict[str, str]], role: str | None, answer: str | None = None) -> str | None:
    """``ROLE:KIND:user_U_subtrajectory_S`` of the trajectory a prompt is about (its first user turn naming one)."""
    for message in prompt:
        if message["role"] != "user":
            continue
        found = [m for m in (p.search(message["content"]) for p in _TRAJECTORY) if m]
        if found:
            match = min(found, key=lambda m: m.start())
            return f"{role or '-'}:{answer_kind(answer)}:user_{int(match.group(1))}_subtrajectory_{int(match.group(2))}"
    return None


def _split(record: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """A record's prompt (the turns before its last answer) and that answer."""
    messages = record_messages(record)
    if not messages:
        return None, None
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return (messages[:last], messages[last]["content"]) if last is not None else (messages, None)


def _record_role(record: Any, role: str | None) -> str | None:
    agent = record.get("agent") if isinstance(record, dict) else None
    if isinstance(agent, str) and agent:
        return agent
    return role if role and role != "merged" else None


def file_key_sets(path: Path, role: str | None) -> tuple[set[str], set[str], set[str]]:
    """The exact, content and trajectory keys of a JSONL file's records (``role``: the run's type)."""
    exact, content, trajectories = set(), set(), set()
    for _number, _raw, record, error in iter_jsonl(path, errors="replace"):
        if error is not None:
            continue
        prompt, answer = _split(record)
        if prompt is None:
            continue
        exact.add(prompt_key(prompt))
        content.add(content_key(prompt))
        key = trajectory_key(prompt, _record_role(record, role), answer)
        if key is not None:
            trajectories.add(key)
    return exact, content, trajectories


def record_key(record: Any) -> str | None:
    """The conversation key of a JSONL record (None when it holds no messages)."""
    messages = record_messages(record)
    if not messages:
        return None
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return prompt_key(messages[:last] if last is not None else messages)


def file_keys(path: Path) -> list[str]:
    """The conversation keys of a JSONL file's records, in order (unreadable lines have none)."""
    keys = []
    for _number, _raw, record, error in iter_jsonl(path, errors="replace"):
        key = record_key(record) if error is None else None
        if key is not None:
            keys.append(key)
    return keys


def write_data_keys(run_dir: Path, train_file: Path, train_sha256: str, holdout_file: Path | None,
                    holdout_sha256: str | None, role: str | None = None, *, train_keys: Sequence[str] | None = None,
                    inherited_keys: TrainKeys | None = None) -> Path:
    """``data_keys.json`` (schema 2); ``role``: the run's type (a record's own ``agent`` wins). ``train_keys``: the
    keys trained on when ``train_file`` holds no chat records (a preference pair file: the keys of its prompts);
    ``inherited_keys``: those of the runs the adapter started from (``--init-adapter``), which it has seen too."""
    path = run_dir / DATA_KEYS
    if train_keys is None:
        exact, content, trajectories = file_key_sets(train_file, role)
    else:
        exact, content, trajectories = set(train_keys), set(), set()
    write_json_atomic(path, {
        "schema": 2, "key": KEY_KIND, "role": role,
        "train_file": str(train_file), "train_sha256": train_sha256,
        "holdout_file": str(holdout_file) if holdout_file else None, "holdout_sha256": holdout_sha256,
        "train": sorted(set(exact) | (inherited_keys.exact if inherited_keys else set())),
        "holdout": sorted(set(file_keys(holdout_file))) if holdout_file else [],
        "train_content": sorted(set(content) | ((inherited_keys.content or set()) if inherited_keys else set())),
        "train_trajectories": sorted(set(trajectories) | ((inherited_keys.trajectories or set()) if inherited_keys else set())),
    })
    return path


@dataclass
class TrainKeys:
    """What a run trained on, by key (``content``/``trajectories`` None when they cannot be known)."""

    exact: set[str]
    content: set[str] | None = None
    trajectories: set[str] | None = None


def _strings(value: Any) -> set[str] | None:
    return {k for k in value if isinstance(k, str)} if isinstance(value, list) else None


def read_train_keys(run_dir: Path, role: str | None = None) -> TrainKeys | None:
    """The training keys the run recorded (None when it recorded none: a run made before this file).

    A schema-1 file has exact keys only: the content and trajectory keys are then computed from
    the training file it names, when that file still has the recorded SHA-256.
    """
    data, problem = read_json_file(run_dir / DATA_KEYS, DATA_KEYS_MAX_BYTES)
    if problem:
        raise DataError(f"{run_dir / DATA_KEYS}: {problem}; it says which records the run trained on.")
    if not isinstance(data, dict) or not isinstance(data.get("train"), list):
        return None
    keys = TrainKeys(exact=_strings(data["train"]) or set(), content=_strings(data.get("train_content")),
                     trajectories=_strings(data.get("train_trajectories")))
    if keys.content is None or keys.trajectories is None:
        train = Path(str(data.get("train_file") or ""))
        try:
            same = bool(data.get("train_file")) and train.is_file() and sha256_file(train) == data.get("train_sha256")
        except OSError:
            same = False
        if same:
            _, keys.content, keys.trajectories = file_key_sets(train, data.get("role") or role)
    return keys


@dataclass
class HoldoutCheck:
    """What ``comapoi eval`` learnt about its data: held-out records that were trained on, notes."""

    overlap: list[int] = field(default_factory=list)  #: indices (into the prompts) of trained-on records
    notes: list[str] = field(default_factory=list)
    checked: bool = False  #: the run recorded its training keys
    #: how the overlap was found: {"exact": n, "content": n, "trajectory": n} (a record counts once, first match)
    by: dict[str, int] = field(default_factory=dict)


def check_holdout(run: RunInfo, data_path: Path, data_sha256: str, prompts: Sequence[Sequence[dict[str, str]]], *,
                  allow_train_overlap: bool = False, explicit: bool = False,
                  roles: Sequence[str | None] | None = None,
                  answers: Sequence[str | None] | None = None) -> HoldoutCheck:
    """Refuse a changed holdout, and held-out records the run trained on (unless allowed).

    ``data_path`` is the file about to be scored and ``prompts`` its records' prompts;
    ``explicit``: the user named the file (``--data``), so only its records are checked, not
    whether it is still the holdout the run recorded. ``roles`` and ``answers``: each record's
    role and reference answer (for its trajectory key). A record overlaps when its exact, content or trajectory key was trained on.

    Raises:
        DataError: ``data_path`` is the run's recorded holdout but its content changed since
            training; or records of it were in the training data (without ``allow_train_overlap``).
    """
    result = HoldoutCheck()
    recorded, recorded_sha = run.holdout, run.holdout_sha256
    run_json = run.run_json or run.run_dir / RUN_JSON
    if (not explicit and recorded is not None and recorded_sha and _same_file(recorded, data_path)
            and data_sha256 != recorded_sha):
        raise DataError(
            f"The holdout {data_path} changed since the run trained (sha256 {data_sha256[:12]} now, "
            f"{recorded_sha[:12]} recorded in {run_json}), so it is no longer held out from this adapter; "
            f"restore it, re-split with the run's --seed {run.job_value('seed')} and --test-size {run.job_value('test_size')}, "
            "or name a file of records it never saw with --data FILE.")
    train_keys = read_train_keys(run.run_dir, run.type)
    if train_keys is None:
        result.notes.append(f"{run.run_dir} records no training keys ({DATA_KEYS}): not checked for records it trained on")
        return result
    result.checked = True
    if train_keys.content is None or train_keys.trajectories is None:
        result.notes.append(f"{run.run_dir / DATA_KEYS} holds exact keys only and the training file changed or is "
                            "gone: checked for exact copies of training records only")
    for i, prompt in enumerate(prompts):
        how = None
        if prompt_key(prompt) in train_keys.exact:
            how = "exact"
        elif train_keys.content is not None and content_key(prompt) in train_keys.content:
            how = "content"
        elif train_keys.trajectories is not None:
            role = roles[i] if roles is not None else (run.type if run.type != "merged" else None)
            if trajectory_key(prompt, role, answers[i] if answers is not None else None) in train_keys.trajectories:
                how = "trajectory"
        if how:
            result.overlap.append(i)
            result.by[how] = result.by.get(how, 0) + 1
    if result.overlap and not allow_train_overlap:
        n = len(result.overlap)
        how = ", ".join(f"{count} by {kind}" for kind, count in result.by.items())
        raise DataError(
            f"{n} of the {len(prompts)} records of {data_path} were in this adapter's training data "
            f"({how}: the same prompt, the same prompt up to white space and system turns, or the same "
            f"role and trajectory user_U_subtrajectory_S; {run.run_dir / DATA_KEYS}), so their scores would not "
            "be held out; evaluate on the run's own holdout, or pass --allow-train-overlap to score them anyway.")
    return result


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False
