"""Token counts as training sees them: the tokenizer's own chat template over the conversation.

``TokenCounter.load(path)`` loads any local Hugging Face tokenizer folder with
``transformers.AutoTokenizer`` (imported here, never at module level). For a conversation it
renders the chat template once, tokenizes the text with offsets, and splits the tokens into
the prompt (everything before the last assistant answer) and the answer (what carries loss under
assistant-only training). Without a chat template it falls back to ``role: content`` lines and
says so (``TokenCounter.template``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from comapoi_cli.errors import DataError, first_line

#: Estimated characters (of message content) per token without a tokenizer: measured 1.72-1.87
#: with the tiny tokenizer on the default ``data synth`` data (docs/data.md, "Token counts"). The
#: prompts are mostly ids, coordinates and timestamps; tokenizers that split numbers into single
#: digits, as Qwen2.5's does, spend a token per digit on them.
DEFAULT_CHARS_PER_TOKEN = 1.8


def _fallback_render(messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


#: ``--tokenizer tiny``: the tokenizer of comapoi's tiny model (``train --model tiny``), trained
#: on the data files at hand (built offline and cached, as ``train`` does).
TINY = "tiny"


def resolve_tokenizer(name: str | os.PathLike[str] | None, corpus_files, dataset: str | None = None) -> str | None:
    """A tokenizer folder for ``--tokenizer``: ``tiny`` builds (or reuses) the tiny model of
    ``corpus_files`` and gives its folder; anything else is a local folder, as given.

    The tiny base is labelled with ``dataset``, else with the known dataset every corpus file's
    folder is named after (``data/nyc/...``), so that it is ``tiny:nyc:KEY``, not ``tiny:data:KEY``.
    """
    if name is None or str(name) != TINY:
        return None if name is None else str(name)
    if Path(TINY).exists():  # a folder really named "tiny" in the current directory wins
        return TINY
    from comapoi_cli.models.tiny import ensure_tiny_model
    from comapoi_cli.presets import preset_for

    files = [str(f) for f in corpus_files]
    if dataset is None:
        folders = {Path(f).parent.name.lower() for f in files}
        dataset = folders.pop() if len(folders) == 1 and preset_for(next(iter(folders))) else None
    return str(ensure_tiny_model(files, dataset=dataset))


@dataclass
class TokenCounter:
    tokenizer: Any
    path: str
    template: str  # "chat_template" or "fallback (no chat template)"

    @classmethod
    def load(cls, path: str | os.PathLike[str], trust_remote_code: bool = False) -> "TokenCounter":
        """Load a local tokenizer folder; its own code runs only with ``trust_remote_code=True`` (never a prompt)."""
        folder = Path(path)
        if not folder.exists():
            raise DataError(f"Tokenizer folder {folder} does not exist.",
                            hint="Pass a local Hugging Face model or tokenizer folder (nothing is downloaded).")
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                      trust_remote_code=trust_remote_code)
        except Exception as exc:  # a broken folder is the user's to fix, not a traceback
            raise DataError(f"Could not load a tokenizer from {folder}: {first_line(exc)}") from None
        template = "chat_template" if getattr(tokenizer, "chat_template", None) else "fallback (no chat template)"
        return cls(tokenizer, str(folder), template)

    # -- rendering ----------------------------------------------------------------------
    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self.template == "chat_template":
            try:
                return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
            except Exception:
                pass  # templates that refuse a message order (e.g. system not first) fall back
        return _fallback_render(messages, add_generation_prompt)

    def split_texts(self, messages: Sequence[dict[str, str]]) -> tuple[str, int, str]:
        """The rendered conversation, the character offset where the last answer's part begins
        (-1 when the template does not render the prompt as a prefix of it), and the rendered prompt."""
        full = self.render(messages)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return full, len(full), full
        prefix = self.render(messages[:last], add_generation_prompt=True)
        return full, len(prefix) if full.startswith(prefix) else -1, prefix

    def _encode(self, texts: list[str]):
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)

    def count(self, messages: Sequence[dict[str, str]]) -> tuple[int, int]:
        """``(total tokens, prompt tokens)`` of one conversation."""
        return self.count_batch([messages])[0]

    def count_batch(self, conversations: Sequence[Sequence[dict[str, str]]]) -> list[tuple[int, int]]:
        """``(total, prompt)`` token counts of many conversations; one batched tokenizer call."""
        rendered = [self.split_texts(messages) for messages in conversations]
        out: list[tuple[int, int]] = []
        backend = getattr(self.tokenizer, "_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        if backend is not None:
            # The Rust tokenizer directly: its Encoding objects answer len() and char_to_token() without
            # building Python lists of ids and offsets (a third of the time through the wrapper).
            texts = [text for text, _, _ in rendered]
            for enc, (text, cut, prompt_text) in zip(backend.encode_batch(texts, add_special_tokens=False), rendered):
                total = len(enc)
                if cut < 0:  # the prompt is not a prefix: tokenize it on its own
                    prompt = len(backend.encode(prompt_text, add_special_tokens=False))
                elif cut >= len(text):
                    prompt = total
                else:
                    index = enc.char_to_token(cut)
                    if index is None:  # a character no token covers (e.g. dropped by the normaliser)
                        prompt = _tokens_before(enc.offsets, cut)
                    else:  # tokens that start before the cut: the one holding it counts if it starts earlier
                        prompt = index + (enc.token_to_chars(index)[0] < cut)
                out.append((total, min(prompt, total)))
            return out
        for text, cut, prompt_text in rendered:  # a slow (Python) tokenizer
            total = len(self._encode([text])["input_ids"][0])
            prompt = len(self._encode([text[:cut] if cut >= 0 else prompt_text])["input_ids"][0])
            out.append((total, min(prompt, total)))
        return out

def _tokens_before(offsets: Sequence[Sequence[int]], cut: int) -> int:
    """How many tokens start before character ``cut`` (binary search over the offsets)."""
    lo, hi = 0, len(offsets)
    while lo < hi:
        mid = (lo + hi) // 2
        if offsets[mid][0] < cut:
            lo = mid + 1
        else:
            hi = mid
    return lo


class LazyTokenCounter:
    """A :class:`TokenCounter` loaded from ``tokenizer`` on first use and left out when pickled: each worker
    process of ``data clean`` and ``data stats`` loads its own."""

    def __init__(self, tokenizer: str | os.PathLike[str] | None, trust_remote_code: bool = False):
        self.tokenizer = tokenizer
        self.trust_remote_code = trust_remote_code
        self._counter: TokenCounter | None = None

    def get(self) -> TokenCounter | None:
        """The counter (loaded now if not yet), or None without a tokenizer."""
        if self._counter is None and self.tokenizer:
            self._counter = TokenCounter.load(self.tokenizer, trust_remote_code=self.trust_remote_code)
        return self._counter

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_counter": None}
