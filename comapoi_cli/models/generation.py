"""Prompts and batched greedy generation.

:func:`record_messages` reads a conversation record (``messages`` or ShareGPT ``conversations``)
as ``[{"role", "content"}]``; :func:`render_prompts` turns prompts into token ids through the
tokenizer's chat template with the generation prompt; :func:`generate` decodes greedily in
left-padded batches, longest prompts first, with the active adapter of a
:class:`~comapoi_cli.models.loading.LoadedModel`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Sequence

from comapoi_cli.errors import ComapoiError
from comapoi_cli.reporting import Reporter

if TYPE_CHECKING:
    from comapoi_cli.models.loading import LoadedModel

_MESSAGE_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def prompt_hash(messages: Sequence[dict[str, str]]) -> str:
    """SHA-256 of the prompt turns as canonical JSON (``[{"role", "content"}]``, sorted keys, no spaces): the
    ``prompt_sha256`` that evaluation and the chain record per answer."""
    import hashlib

    canonical = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages],
                           ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def record_messages(record: Any) -> list[dict[str, str]] | None:
    """A record's conversation as ``[{"role", "content"}]`` (roles system/user/assistant), or None if it has none.

    Reads ``messages`` (``role``/``content``) or ShareGPT ``conversations`` (``from``/``value``,
    human/gpt); a content that is not text is written as JSON.
    """
    if not isinstance(record, dict):
        return None
    raw = record.get("messages", record.get("conversations"))
    if not isinstance(raw, list):
        return None
    out = []
    for message in raw:
        if not isinstance(message, dict):
            return None
        role = _MESSAGE_ROLES.get(str(message.get("role", message.get("from", ""))).lower())
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            return None
        out.append({"role": role, "content": content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)})
    return out


def render_prompts(tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each prompt through the tokenizer's chat template, with the generation prompt."""
    out = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def generate(loaded: LoadedModel, token_ids: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
             reporter: Reporter | None = None, description: str = "generating", unit: str = "records",
             on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy decoding in left-padded batches (longest prompts first); the decoded answers in input order.

    With ``reporter`` it shows progress (``progress_start(len(token_ids), description=..., unit=...)``,
    one ``progress_update`` per batch, ``progress_stop`` at the end or on an error) and warns when
    the batch is lowered; ``on_batch(n)`` is called after each batch of ``n`` prompts (a caller
    with its own progress, such as the pipeline, passes that instead). On CUDA out of memory the
    batch is halved and retried; at batch size 1 it becomes one sentence.
    """
    import torch
    from transformers import GenerationConfig

    tokenizer, model = loaded.tokenizer, loaded.model
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    outputs: list[str] = [""] * len(token_ids)
    start, done = 0, 0
    size = max(1, batch_size)
    if reporter is not None:
        reporter.progress_start(len(token_ids), description=description, unit=unit)
    try:
        while start < len(order):
            chunk = order[start:start + size]
            batch = tokenizer.pad({"input_ids": [list(token_ids[i]) for i in chunk]}, padding=True, return_tensors="pt")
            batch = {k: v.to(model.device) for k, v in batch.items()}
            try:
                with torch.inference_mode():
                    generated = model.generate(**batch, generation_config=config)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if size == 1:
                    raise ComapoiError(
                        "CUDA ran out of memory generating one answer.",
                        hint="Lower --max-new-tokens, use --quant 4bit, or use a GPU with more memory.") from None
                size = max(1, size // 2)
                if reporter is not None:
                    reporter.warn(f"CUDA out of memory: batch size lowered to {size}")
                continue
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for index, text in zip(chunk, texts):
                outputs[index] = text.strip()
            start += len(chunk)
            done += len(chunk)
            if reporter is not None:
                reporter.progress_update(done)
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        if reporter is not None:
            reporter.progress_stop()
    return outputs
