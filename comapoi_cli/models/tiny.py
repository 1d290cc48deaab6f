"""``--model tiny``: a small randomly initialised Qwen2 model with a tokenizer trained on the data.

One tiny base per dataset: :func:`tiny_corpus` names every role's training file of the dataset
(``{data_dir}/{dataset}/agent{1,2,3}_train_samples.jsonl`` and any plugin role's), and the
tokenizer is trained on all of them, so the per-role runs (``--type agent1``, ``agent2``,
``agent3``) and the merged run of a dataset share one base model, and ``comapoi adapters export
RUN1 RUN2 RUN3`` serves their adapters on it. A base is labelled ``tiny:<dataset>:<key>``
(:func:`tiny_label`; run.json's ``base_model.name``), so that bases built from different data are
told apart. Built offline in a few seconds and cached: ``$COMAPOI_CACHE/tiny/<key>/`` (default
``~/.cache/comapoi``), where the key hashes the recipe (``TINY_RECIPE``) and the SHA-256 of the
corpus files, so the same data always gives the same model (also after the cache is cleared:
weights are seeded from the key and the BPE training is deterministic). The folder is an ordinary
Hugging Face model folder (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` with the chat template, ``generation_config.json``): PEFT, TRL and vLLM
load it like any other, and LoRA adapters trained on it name it as their base model.

The tokenizer is a byte-level BPE (any text encodes, no unknown token) that splits digits one by
one (so every POI id, coordinate and time is spelled from ten digit tokens), with Qwen's special
tokens: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (end of turn, eos). Its chat
template is Qwen-style ChatML with ``{% generation %}`` markers around each answer, so
``return_assistant_tokens_mask`` (and TRL's ``assistant_only_loss``) work with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from comapoi_cli.fileio import iter_jsonl, read_json_object, sha256_file, write_json_atomic
from comapoi_cli.reporting import Reporter

ENV_CACHE = "COMAPOI_CACHE"

#: Everything that decides the tiny model besides its corpus; change ``version`` when the code that
#: builds it changes, so that old cache entries are not reused.
TINY_RECIPE: dict[str, Any] = {
    "version": 2,  # 2: one base per dataset (every role's data), labelled tiny:<dataset>:<key>
    "architecture": "Qwen2ForCausalLM",
    "vocab_size": 2048,  # BPE target; the model's vocabulary is the trained size rounded up to 64
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.25,  # large enough for the frozen (tied) head to express confident predictions
    "tie_word_embeddings": True,
    "max_corpus_chars": 20_000_000,  # the tokenizer trains on at most this much text of the corpus
}

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

#: Qwen-style ChatML; each answer and its end-of-turn marker sit inside ``{% generation %}``.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MARKER_FILE = "comapoi_tiny.json"
LABEL_KEY_CHARS = 10  #: the key's characters in the label ``tiny:<dataset>:<key>``


def cache_root() -> Path:
    """``$COMAPOI_CACHE`` or ``~/.cache/comapoi``."""
    value = os.environ.get(ENV_CACHE)
    return (Path(value).expanduser() if value else Path.home() / ".cache" / "comapoi").absolute()  # recorded in run.json: absolute


def tiny_key(corpus_files: Iterable[str | os.PathLike[str]]) -> str:
    """The cache key: the recipe and the corpus files' contents (not their names)."""
    digest = hashlib.sha256(json.dumps(TINY_RECIPE, sort_keys=True).encode())
    for path in corpus_files:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:20]


def _corpus_texts(corpus_files: Iterable[Path], max_chars: int) -> Iterator[str]:
    """Every message content (and role name) of the JSONL conversations, up to ``max_chars``."""
    used = 0
    for path in corpus_files:
        for _number, _raw, record, _error in iter_jsonl(path, errors="replace"):  # a broken line has no record
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list):
                continue
            for message in messages:
                if not isinstance(message, dict):
                    continue
                text = f"{message.get('role', '')}\n{message.get('content', '')}"
                yield text
                used += len(text)
                if used >= max_chars:
                    return


def _train_tokenizer(corpus_files: list[Path]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        # Qwen2's split rule (words, single digits, punctuation runs, newlines, spaces), then bytes
        pre_tokenizers.Split(Regex(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_RECIPE["vocab_size"], min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_texts(corpus_files, TINY_RECIPE["max_corpus_chars"]), trainer=trainer)
    return tokenizer


def tiny_corpus(dataset_folder: str | os.PathLike[str], data_file_names: Iterable[str]) -> list[Path]:
    """The tiny base's corpus for a dataset: each role's training file (``data_file_names``) that exists in ``dataset_folder``.

    Pass every registered role's ``data_file_name()``; the order is sorted by name, so that the
    key does not depend on the order roles were registered in.
    """
    folder = Path(dataset_folder)
    return [folder / name for name in sorted(set(data_file_names)) if (folder / name).is_file()]


def tiny_label(folder: str | os.PathLike[str]) -> str:
    """``tiny:<dataset>:<key>`` of a tiny model folder (from its marker file), else ``tiny``."""
    marker = read_json_object(Path(folder) / MARKER_FILE)
    label = marker.get("label") if marker is not None else None
    return label if isinstance(label, str) and label else "tiny"


def tiny_description(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What run.json records of a tiny base besides its path: ``name`` (the label), ``dataset``, ``key``, ``corpus``.

    ``corpus`` (``[{file, sha256}]``) lets ``comapoi eval`` and ``adapters merge`` rebuild the base
    when the cache is cleared.
    """
    marker = read_json_object(Path(folder) / MARKER_FILE)
    if marker is None:
        return {}
    return {"name": tiny_label(folder), "dataset": marker.get("dataset"), "key": marker.get("key"),
            "corpus": marker.get("corpus") or []}


def _write_model(folder: Path, corpus_files: list[Path], key: str, dataset: str | None, say: Reporter) -> None:
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from comapoi_cli.models.loading import quiet_libraries

    quiet_libraries(datasets=False)  # no "Writing model shards" bar: the reporter shows the build
    say.progress_start(3, description="building the tiny model", unit="steps")
    raw = _train_tokenizer(corpus_files)
    say.progress_update(1)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token=IM_END, pad_token=PAD_TOKEN, bos_token=None, unk_token=None,
        model_max_length=TINY_RECIPE["max_position_embeddings"], padding_side="right",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    vocab = -(-len(tokenizer) // 64) * 64
    recipe: dict[str, Any] = {k: v for k, v in TINY_RECIPE.items()
                              if k not in {"version", "architecture", "vocab_size", "max_corpus_chars"}}
    recipe["eos_token_id"] = tokenizer.convert_tokens_to_ids(IM_END)
    recipe["pad_token_id"] = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(vocab_size=vocab, bos_token_id=None, use_cache=True, **recipe)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(key[:8], 16))
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    say.progress_update(2)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_json_atomic(folder / MARKER_FILE, {
        "built_by": "comapoi --model tiny", "label": _label(dataset, key), "dataset": dataset, "key": key,
        "recipe": TINY_RECIPE, "tokenizer_vocab": len(tokenizer),
        "corpus": [{"file": str(p.absolute()), "sha256": sha256_file(p)} for p in corpus_files],
        "parameters": sum(p.numel() for p in model.parameters()),
    })
    say.progress_update(3)


def _label(dataset: str | None, key: str) -> str:
    return f"tiny:{(dataset or 'data').lower()}:{key[:LABEL_KEY_CHARS]}"


def ensure_tiny_model(corpus_files: Iterable[str | os.PathLike[str]], cache: Path | None = None, *,
                      dataset: str | None = None, reporter: Reporter | None = None) -> Path:
    """The tiny model folder for this corpus: reused from the cache, or built now (a few seconds).

    ``corpus_files``: for a dataset, :func:`tiny_corpus` (every role's file), so that all its runs
    share the base. ``dataset`` names it in the label. ``reporter`` shows the build's progress.
    Safe against concurrent builders: each builds into a temporary folder and renames it into place;
    the first rename wins and the others use its result.
    """
    files = [Path(p) for p in corpus_files]
    key = tiny_key(files)
    root = (cache or cache_root()) / "tiny"
    folder = root / key
    if (folder / MARKER_FILE).is_file():
        return folder
    say = reporter if reporter is not None else Reporter()
    say.info(f"building the tiny base model {_label(dataset, key)} from {len(files)} data file{'s' if len(files) != 1 else ''}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        _write_model(tmp, files, key, dataset, say)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / MARKER_FILE).is_file():  # an incomplete folder left by a killed build: replace it
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
    finally:
        say.progress_stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
