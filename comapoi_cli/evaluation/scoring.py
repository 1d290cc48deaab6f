"""Turning a model output and a label into a scored record, the same way for every source.

``comapoi eval`` (generation) and ``comapoi eval score`` (a predictions file) both go through a
:class:`Scorer`, so the same output and label always give the same numbers. A scorer binds a
role (its parser, target and ``answer_kind``) to a dataset (its POI id range). Without a role
it scores POI ids with CoMaPOI's lenient parser (``comapoi_cli.poi_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from comapoi_cli.metrics import RecordOutcome, compute_metrics, outcome
from comapoi_cli.poi_ids import clean_ids, read_ids
from comapoi_cli.roles import AgentRole, RoleContext

if TYPE_CHECKING:  # typing only
    from comapoi_cli.plugins import Registry

TEXT, POI_IDS, CANDIDATES = "text", "poi_ids", "candidates"
KINDS = (TEXT, POI_IDS, CANDIDATES)
#: The name under which records scored without a role are reported.
GENERIC = "poi_ids"
#: The parse problems: an output with no text at all, and one the role could not read a prediction from.
EMPTY_OUTPUT = "empty output"
UNPARSABLE = "unparsable"
_HUGE = "a number in it has more than 4,300 digits, so it is no POI id"


class LabelError(ValueError):
    """A label that cannot be scored (the message says why, in a phrase)."""


@dataclass
class Parsed:
    """A parsed output: the ranked predictions (None = unparsable) and, if unparsable, why."""

    predictions: list[Any] | None
    problem: str | None = None


@dataclass
class Scorer:
    role: AgentRole | None
    context: RoleContext = field(default_factory=RoleContext)
    #: Who supplied the role, for messages about its methods: e.g. "the plugin comapoi-critic" (:func:`role_origin`).
    origin: str | None = None

    @property
    def name(self) -> str:
        return self.role.id if self.role is not None else GENERIC

    @property
    def kind(self) -> str:
        if self.role is None:
            return POI_IDS
        kind = getattr(self.role, "answer_kind", TEXT)
        return kind if kind in KINDS else TEXT

    @property
    def scores_ids(self) -> bool:
        return self.kind in (POI_IDS, CANDIDATES)

    @property
    def max_id(self) -> int | None:
        return self.context.max_poi_id

    # -- labels -------------------------------------------------------------------------------
    def label(self, value: Any) -> int | str:
        """The label in canonical form (an int id, or a stripped string for text roles)."""
        if value is None:
            raise LabelError("no label")
        if not self.scores_ids:
            text = str(value).strip()
            if not text:
                raise LabelError("the label is empty")
            return text
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise LabelError(f"label {_short(value)} is not a POI id (an integer)")
        if isinstance(value, float):
            if not value.is_integer():
                raise LabelError(f"label {value!r} is not a POI id (an integer)")
            value = int(value)
        if isinstance(value, str):
            text = value.strip()
            if not text.lstrip("-").isdigit():
                raise LabelError(f"label {_short(value)} is not a POI id (an integer)")
            value = int(text)
        if value < 0 or (self.max_id is not None and value > self.max_id):
            where = f"{self.context.dataset}'s ids 0..{self.max_id}" if self.max_id is not None else "the ids 0.."
            raise LabelError(f"label {value} is outside {where}")
        return value

    def target(self, record: dict[str, Any]) -> int | str:
        """The label of a data record, from its role's ``target()`` (CoMaPOI's answer id without a role)."""
        value: Any
        if self.role is not None:
            try:
                value = self.role.target(record)
            except Exception as exc:  # a third-party role's bug must not end the run
                raise LabelError(f"{self._method('target')} raised {type(exc).__name__}: {exc}") from None
        else:
            answer = _last_answer(record)
            ids = read_ids(answer).found if answer else []
            value = ids[0] if ids else None
        if value is None:
            if self.kind == CANDIDATES:
                raise LabelError("no true next POI id beside the conversation (a profile text, or a candidate "
                                 "list without a next_poi_id field)")
            raise LabelError("the record has no label for this role")
        return self.label(value)

    # -- predictions ---------------------------------------------------------------------------
    def parse_output(self, text: Any) -> Parsed:
        """Parse a raw model output into ranked predictions."""
        if text is None:
            text = ""
        if not isinstance(text, str):
            return Parsed(None, "the output is not text")
        if not text.strip():
            return Parsed(None, EMPTY_OUTPUT)
        if self.role is None:
            try:
                got = read_ids(text, self.max_id)
            except ValueError:  # an integer past Python's conversion limit (4,300 digits): no POI id
                return Parsed(None, f"{UNPARSABLE}: {_HUGE}")
            return Parsed(got.ids or None, got.problem and f"{UNPARSABLE}: {got.problem}")
        try:
            raw = self.role.parse_prediction(text, self.context)
        except Exception as exc:  # a third-party parser's bug: count the output as unparsable
            return Parsed(None, f"{UNPARSABLE}: {self._method('parse_prediction')} raised {type(exc).__name__}: {exc}")
        if not raw:
            problem = None
            if self.scores_ids:
                try:
                    problem = read_ids(text, self.max_id).problem
                except ValueError:
                    problem = _HUGE
            return Parsed(None, f"{UNPARSABLE}: {problem or 'the role found no prediction in it'}")
        if not self.scores_ids:
            return Parsed(_dedup([str(item).strip() for item in raw]))
        try:
            got = clean_ids(list(raw), self.max_id)
        except (TypeError, ValueError) as exc:
            return Parsed(None, f"{UNPARSABLE}: {self._method('parse_prediction')} returned a non-id: {_short(str(exc), 120)}")
        return Parsed(got.ids or None, got.problem and f"{UNPARSABLE}: {got.problem}")

    def _method(self, name: str) -> str:
        """``"agent9's parse_prediction() (the plugin my-roles)"``: names a role method in a message."""
        role_id = self.role.id if self.role is not None else GENERIC
        return f"{role_id}'s {name}()" + (f" ({self.origin})" if self.origin else "")

    def ready_list(self, values: Any) -> Parsed:
        """Normalise a ready prediction list (``predicted_poi_ids``); raises ValueError if malformed."""
        if values is None:
            return Parsed(None, "no prediction (predicted_poi_ids is null)")
        if isinstance(values, (int, str)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list):
            raise ValueError(f"'predicted_poi_ids' must be a list of ids, got {type(values).__name__}")
        if not self.scores_ids:
            items = _dedup([str(item).strip() for item in values if str(item).strip()])
            return Parsed(items or None, None if items else "empty prediction list")
        got = clean_ids(values, self.max_id)
        return Parsed(got.ids or None, got.problem if values else "empty prediction list")

    def outcome(self, label: Any, predictions: list[Any] | None) -> RecordOutcome:
        return outcome(label, predictions, candidate_list=self.kind == CANDIDATES, text=self.kind == TEXT)


def role_origin(registry: Registry, role_id: str | None) -> str | None:
    """Who registered ``role_id``: "the plugin NAME" for a third-party plugin, None for a built-in role."""
    if role_id is None:
        return None
    for info in getattr(registry, "plugins", None) or []:
        if f"role {role_id}" in (getattr(info, "registered", None) or []):
            source = str(getattr(info, "source", ""))
            return None if source == "built-in" else f"the plugin {info.name}"
    return None


def summarize(scored: Iterable[tuple[str, RecordOutcome]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Overall metrics, and per-role metrics when more than one role was scored."""
    items = list(scored)
    overall = compute_metrics(o for _, o in items)
    roles: dict[str, list[RecordOutcome]] = {}
    for name, item in items:
        roles.setdefault(name, []).append(item)
    by_role = {name: compute_metrics(group) for name, group in roles.items()} if len(roles) > 1 else {}
    return overall, by_role


def _dedup(items: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _last_answer(record: dict[str, Any]) -> str:
    for message in reversed(record.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return str(message.get("content", ""))
    return ""


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
