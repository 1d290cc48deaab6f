"""Reading one JSONL line into a clean chat record, and the checks that judge it.

This module is what the clean step's worker processes import: it is kept free of Rich, Typer,
torch and transformers. :class:`RecordChecker` turns a block of raw lines into per-line results;
the clean service (``comapoi_cli/data/clean.py``) adds what needs the whole file (duplicates,
the rejects file, the summary).
"""

from __future__ import annotations

import base64
import json
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from comapoi_cli.data.policies import DROP, FAIL, KEEP, WARN, default_policies
from comapoi_cli.data.tokens import LazyTokenCounter
from comapoi_cli.leaks import find_label_leak, find_leak_in_messages
from comapoi_cli.roles import AgentRole, RoleContext

if TYPE_CHECKING:  # typing only
    from comapoi_cli.data.tokens import TokenCounter

from comapoi_cli.fileio import fast_loads  # orjson's loads, or None without it; json is the reference and the fallback

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant",
}
KNOWN_ROLES = ("system", "user", "assistant")
_KNOWN_SET = frozenset(KNOWN_ROLES)
_TEXT_PART_TYPES = {"text", "input_text", "output_text"}

def conversation_key(messages: list[dict[str, str]]) -> int:
    """A key of a conversation (roles and contents): equal keys mean the same conversation.

    Python's string hash (cached on the strings, no copy): keys are comparable within one
    process, or across processes started with the same ``PYTHONHASHSEED`` (the clean step's
    workers are).
    """
    return hash(tuple([(m["role"], m["content"]) for m in messages]))


class KeyTable:
    """Conversation keys seen so far, each with a value (the line it was first seen on).

    An open-addressing hash table in two flat arrays of 64-bit integers: 16 bytes a slot, kept
    between 1/3 and 2/3 full, so 24 to 48 bytes a key (a dict of int objects takes ~100). Keys
    are the 64-bit ints of :func:`conversation_key`; 0 marks an empty slot, so key 0 is held
    apart.
    """

    def __init__(self, capacity: int = 1 << 12):
        size = 1 << max(4, (capacity - 1).bit_length())
        self._keys = array("q", bytes(8 * size))
        self._values = array("q", bytes(8 * size))
        self._mask = size - 1
        self._limit = size * 2 // 3
        self._used = 0
        self._zero: int | None = None  # the value of key 0, if seen

    def __len__(self) -> int:
        return self._used + (self._zero is not None)

    def setdefault(self, key: int, value: int) -> int | None:
        """The value first stored for ``key``, or None after storing ``value`` for it."""
        if key == 0:
            if self._zero is None:
                self._zero = value
                return None
            return self._zero
        keys, mask = self._keys, self._mask
        slot = key & mask
        stored = keys[slot]
        while stored:
            if stored == key:
                return self._values[slot]
            slot = (slot + 1) & mask
            stored = keys[slot]
        keys[slot] = key
        self._values[slot] = value
        self._used += 1
        if self._used > self._limit:
            self._grow()
        return None

    def add_block(self, keys: array, offsets: array, base: int) -> list[tuple[int, int]]:
        """``setdefault(keys[i], base + offsets[i])`` for each i in order; returns ``(i, first value)``
        for the keys already present (one loop for a whole block: the clean step's hot path)."""
        found: list[tuple[int, int]] = []
        table, values, mask = self._keys, self._values, self._mask
        for index, key in enumerate(keys):
            if key == 0:
                first = self.setdefault(0, base + offsets[index])
                if first is not None:
                    found.append((index, first))
                continue
            slot = key & mask
            stored = table[slot]
            while stored:
                if stored == key:
                    found.append((index, values[slot]))
                    break
                slot = (slot + 1) & mask
                stored = table[slot]
            else:
                table[slot] = key
                values[slot] = base + offsets[index]
                self._used += 1
                if self._used > self._limit:
                    self._grow()
                    table, values, mask = self._keys, self._values, self._mask
        return found

    def _grow(self) -> None:
        old_keys, old_values = self._keys, self._values
        size = 2 * len(old_keys)
        keys = array("q", bytes(8 * size))
        values = array("q", bytes(8 * size))
        mask = size - 1
        for key, value in zip(old_keys, old_values):
            if key:
                slot = key & mask
                while keys[slot]:
                    slot = (slot + 1) & mask
                keys[slot] = key
                values[slot] = value
        self._keys, self._values, self._mask, self._limit = keys, values, mask, size * 2 // 3


def last_answer(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return str(message.get("content", ""))
    return ""


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """Everything before the last assistant answer that is not an assistant turn."""
    return "\n".join(str(m.get("content", "")) for m in messages if m.get("role") in ("system", "user"))


def raw_fields(raw: bytes) -> dict[str, Any]:
    """How a rejected line is stored: its text, plus its bytes in base64 when they are not UTF-8."""
    try:
        return {"text": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"text": raw.decode("utf-8", "replace"), "raw_base64": base64.b64encode(raw).decode("ascii")}


class Reject(Exception):
    """Raised inside record processing: the line goes to the rejects file with this reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class BlockResult:
    """What ``RecordChecker.process_block`` found in a block of lines: compact, cheap to send
    between processes (arrays, not one object per line).

    Line numbers are 0-based offsets in the block (the caller adds the block's first line).
    ``start:end`` spans are byte offsets in the block, newline excluded (and, for a kept line
    copied as it is, CR and BOM excluded).
    """

    lines: int = 0                                                   # physical lines in the block
    keys: array = field(default_factory=lambda: array("q"))          # conversation key of each kept line
    offsets: array = field(default_factory=lambda: array("q"))       # line offset of each kept line
    spans: array = field(default_factory=lambda: array("q"))         # start, end of each kept line
    runs: list[tuple[int, int]] = field(default_factory=list)        # kept lines [i, j) written as one piece
    changed: dict[int, bytes] = field(default_factory=dict)          # kept index -> re-serialised record
    roles: list[str] = field(default_factory=list)                   # role of each kept line ("-": none)
    role_counts: dict[str, int] = field(default_factory=dict)
    warnings: dict[int, tuple] = field(default_factory=dict)         # kept index -> ((check, detail), ...)
    tokens: array | None = None                                      # tokens of each kept line (too_long)
    rejected: list[tuple] = field(default_factory=list)              # (offset, reason, detail, start, end, fail)
    conversions: dict[str, int] = field(default_factory=dict)
    over_length: dict[str, int] = field(default_factory=dict)        # answer_lost / answer_cut counts


def is_clean_record(obj: Any) -> bool:
    """Already a cleaned record: ``{"messages": [{"role": known, "content": str}, ...], "agent"?: str}``
    and nothing else (the common case, kept byte for byte)."""
    if type(obj) is not dict:
        return False
    messages = obj.get("messages")
    if type(messages) is not list or not messages:
        return False
    if len(obj) != 1 and not (len(obj) == 2 and type(obj.get("agent")) is str and obj["agent"]):
        return False
    for m in messages:
        if type(m) is not dict or len(m) != 2 or type(m.get("content")) is not str or m.get("role") not in _KNOWN_SET:
            return False
    return True


class _PoiContext(RoleContext):
    """A RoleContext whose POI id range can be set explicitly (``--max-poi-id``)."""

    _max_poi_id: int | None

    def __init__(self, dataset: str | None, max_poi_id: int | None):
        object.__setattr__(self, "dataset", dataset)
        object.__setattr__(self, "_max_poi_id", max_poi_id)

    @property
    def max_poi_id(self) -> int | None:  # type: ignore[override]
        if self._max_poi_id is not None:
            return self._max_poi_id
        preset = self.preset
        return preset.max_poi_id if preset else None

    def __reduce__(self):
        return (_PoiContext, (self.dataset, self._max_poi_id))


def make_context(dataset: str | None = None, max_poi_id: int | None = None) -> RoleContext:
    return _PoiContext(dataset, max_poi_id) if max_poi_id is not None else RoleContext(dataset=dataset)


class RecordChecker:
    """Judges lines one by one. Picklable, so that worker processes can run it.

    ``role`` fixes the role of every record (cleaning ``agent1_train_samples.jsonl``); without it
    a record's ``agent`` field picks its role from ``roles`` (a merged file), and a record
    without one only gets the generic checks.
    """

    def __init__(
        self,
        *,
        role: AgentRole | None = None,
        roles: Mapping[str, AgentRole] | None = None,
        context: RoleContext | None = None,
        policies: Mapping[str, str] | None = None,
        tokenizer: str | None = None,
        seq_length: int | None = None,
        trust_remote_code: bool = False,
    ):
        self.role = role
        self.roles = dict(roles or {})
        self.context = context or RoleContext()
        self.policies = dict(default_policies())
        self.policies.update(policies or {})
        self.tokenizer_path = tokenizer
        self.seq_length = seq_length
        self.trust_remote_code = trust_remote_code
        self._tokens = LazyTokenCounter(tokenizer, trust_remote_code)

    # -- helpers -------------------------------------------------------------------------
    def _issue(self, name: str, detail: str, warnings: list[tuple[str, str]]) -> None:
        """A keepable check failed: reject, or remember the warning, as its policy says."""
        policy = self.policies.get(name, DROP)
        if policy == DROP or policy == FAIL:
            raise Reject(name, detail)
        if policy == WARN:
            warnings.append((name, detail))

    def _fatal(self, name: str, detail: str) -> Reject:
        return Reject(name, detail)

    def counter(self) -> TokenCounter | None:
        return self._tokens.get()

    # -- one record ----------------------------------------------------------------------
    def normalise(self, obj: Any, conversions: dict[str, int], warnings: list[tuple[str, str]]) -> tuple[dict[str, Any], bool]:
        """The record as ``{"messages": [...], "agent"?: str}`` and whether it differs from ``obj``."""
        if is_clean_record(obj):  # the common case
            return obj, False
        if not isinstance(obj, dict):
            raise Reject("no_messages", f"the line is a JSON {type(obj).__name__}, not an object")
        changed = False
        messages = obj.get("messages")
        if messages is None:
            for key in ("conversations", "conversation"):
                if isinstance(obj.get(key), list):
                    messages = obj[key]
                    conversions["sharegpt"] = conversions.get("sharegpt", 0) + 1
                    changed = True
                    break
        if not isinstance(messages, list):
            if messages is None:
                raise Reject("no_messages", "no 'messages' list")
            raise Reject("no_messages", f"'messages' is a {type(messages).__name__}, not a list")
        if not messages:
            raise Reject("no_messages", "'messages' is empty")
        extra = set(obj) - {"messages", "agent"}
        if extra:
            changed = True  # other top-level fields are not carried into the cleaned file
        out: list[dict[str, str]] = []
        system = obj.get("system")
        if changed and isinstance(system, str) and system.strip() and not (
                isinstance(messages[0], dict) and messages[0].get("role", messages[0].get("from")) == "system"):
            out.append({"role": "system", "content": system})  # ShareGPT's top-level system prompt
        for index, message in enumerate(messages, 1):
            if not isinstance(message, dict):
                raise Reject("bad_message", f"message {index} is a {type(message).__name__}, not an object")
            if "role" in message:
                role = message["role"]
            elif "from" in message:
                role = message["from"]
                changed = True
            else:
                raise Reject("bad_message", f"message {index} has no 'role'")
            if "content" in message:
                content = message["content"]
            elif "value" in message:
                content = message["value"]
                changed = True
            elif "text" in message:
                content = message["text"]
                changed = True
            else:
                raise Reject("bad_message", f"message {index} has no 'content'")
            if len(message) != 2:
                changed = True
            if not isinstance(role, str):
                raise Reject("bad_message", f"message {index} has a {type(role).__name__} role")
            canonical = ROLE_ALIASES.get(role) or ROLE_ALIASES.get(role.strip().lower())
            if canonical is None:
                self._issue("unknown_role", f"message {index} has role '{role[:40]}'", warnings)
                canonical = role
            elif canonical != role:
                changed = True
                conversions["role_names"] = conversions.get("role_names", 0) + 1
            if type(content) is not str:
                changed = True
                content = self._content_text(content, index, canonical, conversions, warnings)
            out.append({"role": canonical, "content": content})
        record: dict[str, Any] = {"messages": out}
        agent = obj.get("agent")
        if isinstance(agent, str) and agent:
            record["agent"] = agent
        elif "agent" in obj:
            changed = True
        return record, changed

    def _content_text(self, content: Any, index: int, role: str, conversions: dict[str, int],
                      warnings: list[tuple[str, str]]) -> str:
        if isinstance(content, bool):
            pass
        elif isinstance(content, (int, float)):
            conversions["numbers_to_text"] = conversions.get("numbers_to_text", 0) + 1
            return str(content)
        elif isinstance(content, list) and content and all(
                isinstance(p, dict) and p.get("type") in _TEXT_PART_TYPES and isinstance(p.get("text"), str) for p in content):
            conversions["content_parts"] = conversions.get("content_parts", 0) + 1
            return "".join(p["text"] for p in content)
        elif content is None and role == "assistant":
            return ""  # an empty answer; judged by the empty_answer / assistant checks
        if isinstance(content, list):
            kinds = sorted({str(p.get("type")) if isinstance(p, dict) else type(p).__name__ for p in content})
            what = f"a list of {', '.join(kinds) or 'nothing'}"
        else:
            what = "null" if content is None else f"a {type(content).__name__}"
        self._issue("content_type", f"message {index} content is {what}", warnings)
        try:
            return json.dumps(content, ensure_ascii=False)
        except RecursionError:  # kept as text only if it can be written back
            raise Reject("content_type", f"message {index} content is {what}, nested too deeply to keep as text") from None

    def judge(self, record: dict[str, Any], warnings: list[tuple[str, str]]) -> AgentRole | None:
        messages = record["messages"]
        has_user = has_assistant = False
        for m in messages:
            r = m["role"]
            if r == "user":
                has_user = True
            elif r == "assistant":
                has_assistant = True
        if not has_user:
            raise Reject("no_user", "no user turn")
        if not has_assistant:
            raise Reject("no_assistant", "no assistant turn")
        if messages[-1]["role"] != "assistant":
            self._issue("assistant_not_last", f"the last turn is '{messages[-1]['role']}', not 'assistant'", warnings)
        answer = last_answer(messages)
        if not answer.strip():
            raise Reject("empty_answer", "the last assistant answer is empty")
        role = self.role
        if role is None and "agent" in record:
            role = self.roles.get(record["agent"])
        if role is not None:
            reason = role.check_target(answer, record, self.context)
            if reason:
                self._issue("wrong_target", reason, warnings)
            else:
                reason = role.check_answer(answer, record, self.context)
                if reason:
                    self._issue("wrong_answer", reason, warnings)
            leak = role.check_leak(record, self.context)
        else:
            leak = find_leak_in_messages(messages)
        if leak:
            self._issue("label_leak", leak, warnings)
        return role

    def read_record(self, line: bytes, conversions: dict[str, int], warnings: list[tuple[str, str]],
                    cut_off: bool = False) -> tuple[dict[str, Any], bool]:
        """One line (bytes, newline, CR and BOM removed) as a normalised record and whether it changed.

        ``cut_off``: this is the file's last line and it has no newline. Raises :class:`Reject`.

        A clean record (:func:`is_clean_record`) parsed by orjson is returned as it is; anything
        else, including every line orjson refuses, is read again with :mod:`json`, the reference:
        results, reasons and details are the same with or without orjson (orjson differs from
        json on NaN, integers beyond 64 bits, unpaired surrogate escapes and deep nesting, none of
        which a clean record holds).
        """
        if fast_loads is not None:
            try:
                obj = fast_loads(line)
            except ValueError:
                pass
            else:
                if is_clean_record(obj):
                    return obj, False
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Reject("invalid_utf8", f"invalid UTF-8 at byte {exc.start}") from None
        if not text.strip():
            raise Reject("blank_line", "empty line")
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            if cut_off:
                raise Reject("truncated_line", f"the last line has no newline and is cut off ({exc})") from None
            raise Reject("bad_json", str(exc)) from None
        return self.normalise(obj, conversions, warnings)

    def process_block(self, block: bytes, final: bool, bom: bool = False) -> BlockResult:
        """Judge every line of ``block``: whole lines, the last possibly without its newline when
        ``final`` (the end of the file); ``bom``: the block starts the file."""
        result = BlockResult()
        conversions = result.conversions
        keys, offsets, spans, runs, roles = result.keys, result.offsets, result.spans, result.runs, result.roles
        role_counts, changed_lines, rejected = result.role_counts, result.changed, result.rejected
        lines = block.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
            unterminated = False
        else:
            unterminated = True
        result.lines = len(lines)
        last_index = len(lines) - 1
        counter = self.counter() if self.seq_length else None
        if counter is not None:
            result.tokens = array("q")
        policies = self.policies
        read_record, judge = self.read_record, self.judge
        position = 0
        run_first = -1   # first kept index of the current run of unchanged, adjacent lines
        run_end = -2     # byte end of that run
        for offset, line in enumerate(lines):
            start = position
            end = position + len(line)
            position = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
                end -= 1
                conversions["crlf"] = conversions.get("crlf", 0) + 1
            if bom and offset == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
                start += 3
                conversions["bom"] = conversions.get("bom", 0) + 1
            warnings: list[tuple[str, str]] = []
            try:
                record, changed = read_record(line, conversions, warnings, final and unterminated and offset == last_index)
                role = judge(record, warnings)
                tokens = None
                if counter is not None:
                    tokens, prompt_tokens = counter.count(record["messages"])
                    if self.seq_length is not None and tokens > self.seq_length:
                        where = "answer_lost" if prompt_tokens >= self.seq_length else "answer_cut"
                        result.over_length[where] = result.over_length.get(where, 0) + 1
                        what = ("truncation would remove the whole answer" if where == "answer_lost"
                                else "truncation would cut the end of the answer")
                        self._issue("too_long", f"{tokens} tokens > {self.seq_length} ({what})", warnings)
                key = conversation_key(record["messages"])
            except Reject as rej:
                rejected.append((offset, rej.reason, rej.detail, start, position - 1,
                                 policies.get(rej.reason, DROP) == FAIL))
                continue
            index = len(keys)
            keys.append(key)
            offsets.append(offset)
            spans.append(start)
            spans.append(end)
            if changed:
                changed_lines[index] = serialise_record(record)
                runs.append((index, index + 1))
                run_end = -2
            elif start == run_end + 1:
                runs[-1] = (run_first, index + 1)
                run_end = end
            else:
                runs.append((index, index + 1))
                run_first, run_end = index, end
            name = (record.get("agent") or "-") if role is None else role.id
            roles.append(name)
            role_counts[name] = role_counts.get(name, 0) + 1
            if warnings:
                result.warnings[index] = tuple(warnings)
            if counter is not None and result.tokens is not None:
                result.tokens.append(tokens)
        return result


def serialise_record(record: dict[str, Any]) -> bytes:
    """A normalised record as one JSON line (newline excluded), UTF-8 as it is; a string holding
    an unpaired surrogate (only a ``\\udXXX`` escape can make one) keeps the escape, as in the input."""
    try:
        return json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record).encode("ascii")


# keep KEEP importable from here for callers that build policy tables
__all__ = ["RecordChecker", "BlockResult", "find_label_leak", "is_clean_record", "serialise_record", "find_leak_in_messages", "conversation_key",
           "make_context", "raw_fields", "KEEP", "WARN", "DROP", "FAIL"]
