"""Conversations to training rows: the chat template, which tokens carry loss, truncation.

comapoi tokenises the data itself (TRL then receives ``input_ids`` + ``labels`` and only pads,
packs and batches them). This gives the same masks on every TRL version and lets the run report,
before step 1, how many records ``--seq-length`` truncates and how many tokens carry loss.

Which tokens carry loss (``--loss assistant``): the characters of each assistant turn as the chat
template renders it, found in one of two ways, then mapped to tokens with the tokenizer's offsets
(a token carries loss when it overlaps an answer span, the rule transformers uses):

- ``generation-markers``: the template wraps answers in ``{% generation %}`` ...
  ``{% endgeneration %}`` (the tiny model's template does); the spans are what transformers'
  ``return_assistant_tokens_mask`` uses.
- ``prefix-diff``: for templates without markers (Qwen2.5, Llama-3.1, ...), the answer of turn i
  is what ``render(messages[:i+1])`` adds to ``render(messages[:i], add_generation_prompt=True)``:
  the answer text and the template's end-of-turn tokens (``<|im_end|>\\n``, ``<|eot_id|>``), which
  the model must learn to stop. comapoi checks that each rendering is a prefix of the next and
  refuses (with the record's number) a template that rewrites earlier turns.

``--loss all`` trains on every token, prompts included (the original's behaviour).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from comapoi_cli.errors import TrainingError
from comapoi_cli.fileio import iter_jsonl
from comapoi_cli.training.errors import TrainingDataError

MASK_MARKERS = "generation-markers"
MASK_PREFIX = "prefix-diff"
MASK_ALL = "all-tokens"
IGNORE = -100
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_BATCH = 256


@dataclass
class ChatFormat:
    """The chat template a run uses and how it finds the answers."""

    template: str
    source: str  #: ``tokenizer`` or ``file:<path>``
    generation_markers: bool
    mask_method: str  #: generation-markers, prefix-diff or all-tokens

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "generation_markers": self.generation_markers,
                "mask_method": self.mask_method, "template": self.template}


def resolve_chat_format(tokenizer: Any, loss: str, template_file: str | None = None, model_name: str = "the model") -> ChatFormat:
    """Pick the template (``--chat-template FILE`` or the tokenizer's), install it on ``tokenizer``."""
    if template_file:
        path = Path(template_file).expanduser()
        if not path.is_file():
            raise TrainingError(f"Chat template file {path} does not exist.")
        template, source = path.read_text(encoding="utf-8"), f"file:{path.resolve()}"
    else:
        template, source = getattr(tokenizer, "chat_template", None), "tokenizer"
        if isinstance(template, dict):  # several named templates: the default one trains
            template = template.get("default") or next(iter(template.values()), None)
        if not template:
            raise TrainingError(f"The tokenizer of {model_name} has no chat template.",
                                hint="Pass --chat-template FILE (a Jinja chat template), or use an instruct model.")
    tokenizer.chat_template = template  # saved with the adapter: what it was trained with
    markers = bool(_GENERATION_RE.search(template))
    if loss == "all":
        method = MASK_ALL
    else:
        method = MASK_MARKERS if markers else MASK_PREFIX
    return ChatFormat(template, source, markers, method)


def ensure_pad_token(tokenizer: Any, model_config: Any = None) -> str:
    """Give ``tokenizer`` a pad token distinct from eos where possible; say what was done.

    Llama-3.1 has none (the original lost its setting on reload). Padding is masked out of the
    loss, but a pad equal to eos would also hide the end-of-turn token when TRL masks padding, so
    a reserved/unused special token is preferred. The choice is saved with the adapter's tokenizer.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return "kept"
    vocab = tokenizer.get_vocab()
    for candidate in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<|endoftext|>", "<pad>", "[PAD]", "<unk>"):
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            break
    else:
        if tokenizer.eos_token is None:
            raise TrainingError("The tokenizer has neither a pad token nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
        return f"set to the eos token {tokenizer.eos_token}"
    if model_config is not None:
        model_config.pad_token_id = tokenizer.pad_token_id
    return f"set to {tokenizer.pad_token}"


# -- answer spans -------------------------------------------------------------------------------
def _render(tokenizer: Any, fmt: ChatFormat, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), chat_template=fmt.template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _marker_spans(tokenizer: Any, fmt: ChatFormat, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, indices = render_jinja_template(conversations=[list(messages)], chat_template=fmt.template,
                                              return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    return rendered[0], [tuple(span) for span in indices[0]]


def _prefix_spans(tokenizer: Any, fmt: ChatFormat, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    full = _render(tokenizer, fmt, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, fmt, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, fmt, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError("prefix")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def render_with_spans(tokenizer: Any, fmt: ChatFormat, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its answers (empty with ``--loss all``)."""
    if fmt.mask_method == MASK_ALL:
        return _render(tokenizer, fmt, messages), []
    if fmt.mask_method == MASK_MARKERS:
        return _marker_spans(tokenizer, fmt, messages)
    return _prefix_spans(tokenizer, fmt, messages)


def token_mask(offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token that overlaps an answer span (offsets and spans in order), else 0."""
    mask = [0] * len(offsets)
    index = 0
    for t, (start, end) in enumerate(offsets):
        while index < len(spans) and start >= spans[index][1]:
            index += 1
        if index == len(spans):
            break
        if end > spans[index][0] and end > start:
            mask[t] = 1
    return mask


# -- the training rows -----------------------------------------------------------------------------
@dataclass
class TokenStats:
    """What tokenisation found; printed before training and stored in run.json (``data``)."""

    records: int = 0
    truncated: int = 0  #: records longer than --seq-length (cut to it, start kept)
    truncated_lost_answer: int = 0  #: of those, records left without any loss token (dropped)
    no_answer_tokens: int = 0  #: records whose answers render to nothing (dropped)
    used: int = 0
    tokens: int = 0  #: tokens of the used records after truncation
    loss_tokens: int = 0
    longest: int = 0  #: longest record before truncation
    per_role: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return self.truncated_lost_answer + self.no_answer_tokens

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dropped"] = self.dropped
        return data


def read_records(path: str | Path, limit: int = 0) -> list[dict[str, Any]]:
    """The conversations of a prepared (cleaned) JSONL file; ``limit`` > 0 keeps the first ones."""
    records: list[dict[str, Any]] = []
    for number, _raw, record, error in iter_jsonl(path):
        if error is not None or not isinstance(record, dict) or "messages" not in record:
            raise TrainingDataError(f"{path} line {number} is not a chat record; prepare the data with comapoi data clean.")
        records.append({"messages": record["messages"], "agent": record.get("agent")})
        if limit and len(records) >= limit:
            break
    return records


def tokenize_records(tokenizer: Any, fmt: ChatFormat, records: Sequence[dict[str, Any]], seq_length: int,
                     ) -> tuple[list[dict[str, list[int]]], TokenStats]:
    """``[{"input_ids", "labels"}]`` (labels -100 where no loss), truncated to ``seq_length`` (start kept).

    Records left without a loss token are dropped and counted. Raises ``TrainingError`` when the
    template cannot be split into prompt and answer.
    """
    stats = TokenStats(records=len(records))
    rows: list[dict[str, list[int]]] = []
    for first in range(0, len(records), _BATCH):
        chunk = records[first:first + _BATCH]
        texts, spans = [], []
        for offset, record in enumerate(chunk):
            try:
                text, answer_spans = render_with_spans(tokenizer, fmt, record["messages"])
            except ValueError:
                raise TrainingError(
                    f"The chat template does not render record {first + offset + 1} as prompt then answer "
                    "(an earlier turn changes when a later one is added), so the answers cannot be found.",
                    hint="Pass --chat-template FILE with {% generation %} markers around the answers, or use --loss all.",
                ) from None
            texts.append(text)
            spans.append(answer_spans)
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fmt.mask_method != MASK_ALL,
                            return_attention_mask=False, return_token_type_ids=False)
        for index, ids in enumerate(encoded["input_ids"]):
            record = chunk[index]
            role = record.get("agent") or "all"
            per_role = stats.per_role.setdefault(role, {"records": 0, "truncated": 0, "dropped": 0})
            per_role["records"] += 1
            if fmt.mask_method == MASK_ALL:
                mask = [1] * len(ids)
            else:
                mask = token_mask(encoded["offset_mapping"][index], spans[index])
            stats.longest = max(stats.longest, len(ids))
            had_loss = any(mask)
            if len(ids) > seq_length:
                stats.truncated += 1
                per_role["truncated"] += 1
                ids, mask = ids[:seq_length], mask[:seq_length]
            if not any(mask):
                per_role["dropped"] += 1
                if had_loss:
                    stats.truncated_lost_answer += 1
                else:
                    stats.no_answer_tokens += 1
                continue
            labels = [token if keep else IGNORE for token, keep in zip(ids, mask)]
            rows.append({"input_ids": list(ids), "labels": labels})
            stats.used += 1
            stats.tokens += len(ids)
            stats.loss_tokens += sum(mask)
    return rows, stats


def describe_stats(stats: TokenStats, seq_length: int) -> list[str]:
    """Plain sentences about truncation and loss tokens, for the console."""
    lines = [f"{stats.used:,} of {stats.records:,} records train: {stats.tokens:,} tokens, "
             f"{stats.loss_tokens:,} carry loss ({100 * stats.loss_tokens / max(stats.tokens, 1):.1f}%); "
             f"longest record {stats.longest:,} tokens."]
    if stats.truncated:
        lines.append(f"{stats.truncated:,} records are longer than --seq-length {seq_length} and are cut to it"
                     + (f"; {stats.truncated_lost_answer:,} of them lose their whole answer and are skipped." if stats.truncated_lost_answer else "."))
    if stats.no_answer_tokens:
        lines.append(f"{stats.no_answer_tokens:,} records have no answer tokens and are skipped.")
    return lines


def label_segments(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], keep: int = 80) -> list[tuple[str, bool]]:
    """``(text, carries_loss)`` runs of one row for ``--show-labels``; long loss-free runs are shortened
    to their first and last ``keep`` tokens around a ``[... N tokens ...]`` note."""
    segments: list[tuple[str, bool]] = []
    start = 0
    n = len(input_ids)
    while start < n:
        loss = labels[start] != IGNORE
        end = start
        while end < n and (labels[end] != IGNORE) == loss:
            end += 1
        run = list(input_ids[start:end])
        if not loss and len(run) > 2 * keep + 1:
            segments.append((tokenizer.decode(run[:keep]), False))
            segments.append((f" [... {len(run) - 2 * keep:,} tokens without loss ...] ", False))
            segments.append((tokenizer.decode(run[-keep:]), False))
        else:
            segments.append((tokenizer.decode(run), loss))
        start = end
    return segments


def iter_loss_texts(tokenizer: Any, row: dict[str, list[int]]) -> Iterable[str]:
    """The decoded loss-carrying runs of one row (for tests and debugging)."""
    current: list[int] = []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            current.append(token)
        elif current:
            yield tokenizer.decode(current)
            current = []
    if current:
        yield tokenizer.decode(current)
