"""The checks ``comapoi data clean`` runs, and what it does when one fails (its policy).

Every input line ends in exactly one place: the cleaned output, or the rejects file with the
*reason* (one of the check names below). A check's policy says what happens to a record that
fails it:

- ``drop``: the record goes to the rejects file (the default for most checks);
- ``warn``: the record is kept and counted as a warning (line numbers in the summary);
- ``keep``: the record is kept silently;
- ``fail``: cleaning stops with an error naming the line; no output is written.

Structural problems (a line that is not JSON, a record without a user turn, ...) cannot be
kept: their policy is ``drop`` or ``fail``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from comapoi_cli.errors import UsageError

DROP, WARN, KEEP, FAIL = "drop", "warn", "keep", "fail"
POLICIES = (DROP, WARN, KEEP, FAIL)


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    default: str = DROP
    keepable: bool = False  # can the record be kept (warn/keep) when it fails?
    original: bool = False  # one of the original script's rules


#: Every reason a line can be rejected for, in the order the clean step tests them.
CHECKS: tuple[Check, ...] = (
    Check("blank_line", "the line is empty or only whitespace"),
    Check("invalid_utf8", "the line is not valid UTF-8 (the raw bytes are kept, base64, in the rejects file)"),
    Check("bad_json", "the line is not valid JSON", original=True),
    Check("truncated_line", "the last line has no newline and is not valid JSON (a cut-off write)", original=True),
    Check("no_messages", "the record is not an object with a 'messages' list (ShareGPT 'conversations' is converted)", original=True),
    Check("bad_message", "a message is not an object with a role and a content"),
    Check("unknown_role", "a message role other than system/user/assistant (ShareGPT human/gpt are converted)", keepable=True),
    Check("content_type", "a content that is not text (null, an object, an image part, ...); numbers are coerced to text", keepable=True),
    Check("no_user", "no user turn", original=True),
    Check("no_assistant", "no assistant turn", original=True),
    Check("assistant_not_last", "the last turn is not the assistant's (nothing to learn after it)", keepable=True),
    Check("empty_answer", "the last assistant answer is empty", original=True),
    Check("wrong_answer", "the answer does not fit the record's role (e.g. a candidate list without 25 unique ids in range)", keepable=True),
    Check("wrong_target", "an agent3 record whose target is a candidate list instead of the final prediction", keepable=True),
    Check("label_leak", "the prompt states the true next POI (the original agent1/agent2 prompts do)", keepable=True),
    Check("duplicate", "the same conversation already appeared earlier in the file (the first is kept)", keepable=True),
    Check("too_long", "longer than --seq-length tokens with the tokenizer's chat template", keepable=True),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)
_BY_NAME = {c.name: c for c in CHECKS}


def check(name: str) -> Check:
    return _BY_NAME[name]


def default_policies() -> dict[str, str]:
    return {c.name: c.default for c in CHECKS}


def resolve_policies(overrides: Mapping[str, str] | None = None, *, strict: bool = False) -> dict[str, str]:
    """The full policy table: defaults, then ``strict`` (every drop becomes fail), then ``overrides``.

    Raises UsageError for an unknown check or policy, or a ``warn``/``keep`` on a check whose
    records cannot be kept.
    """
    table = default_policies()
    if strict:
        table = {name: (FAIL if policy == DROP else policy) for name, policy in table.items()}
    for name, policy in (overrides or {}).items():
        name = name.strip().replace("-", "_")
        policy = policy.strip().lower()
        if name == "all":
            targets = list(CHECK_NAMES)
        elif name in _BY_NAME:
            targets = [name]
        else:
            raise UsageError(f"Unknown check '{name}'; checks: {', '.join(CHECK_NAMES)}.")
        if policy not in POLICIES:
            raise UsageError(f"Unknown policy '{policy}' for '{name}'; use one of {', '.join(POLICIES)}.")
        for target in targets:
            if policy in (WARN, KEEP) and not _BY_NAME[target].keepable:
                if name == "all":
                    continue  # 'all=warn' applies where it can
                raise UsageError(f"Records failing '{target}' cannot be kept; its policy is drop or fail.")
            table[target] = policy
    return table


def parse_policy_options(values: Iterable[str] | None) -> dict[str, str]:
    """Parse ``--on CHECK=POLICY`` values (also comma lists: ``--on label_leak=warn,duplicate=keep``)."""
    out: dict[str, str] = {}
    for value in values or ():
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            if "=" not in item:
                raise UsageError(f"Expected CHECK=POLICY, got '{item}' (e.g. --on label_leak=warn).")
            name, policy = item.split("=", 1)
            out[name.strip()] = policy.strip()
    return out
