"""``--model tiny``: built offline from the data, cached by content, deterministic, a normal HF folder."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from comapoi_cli.fileio import sha256_file  # noqa: E402
from comapoi_cli.models import tiny  # noqa: E402


def test_tiny_folder_is_a_qwen2_model_with_a_trained_tokenizer(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 2 and config.hidden_size == 64
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert "{% generation %}" in tokenizer.chat_template
    assert config.vocab_size >= len(tokenizer) and config.vocab_size % 64 == 0
    # trained on the data: CoMaPOI words are single tokens, digits are split one by one
    assert len(tokenizer.tokenize(" visit")) == 1
    assert tokenizer.tokenize("5091") == ["5", "0", "9", "1"]
    text = "At 2012-04-04 15:36:09, Wednesday, user 0 visit POI ID 0 (Café, 40.75,-73.97)."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    marker = json.loads((tiny_model_dir / tiny.MARKER_FILE).read_text())
    assert marker["recipe"] == tiny.TINY_RECIPE and marker["corpus"][0]["sha256"]


def test_same_corpus_same_model_even_after_the_cache_is_cleared(tiny_model_dir, tmp_path):
    corpus = [json.loads((tiny_model_dir / tiny.MARKER_FILE).read_text())["corpus"][0]["file"]]
    again = tiny.ensure_tiny_model(corpus)
    assert again == tiny_model_dir  # cached: the key is the recipe + the corpus content
    rebuilt = tiny.ensure_tiny_model(corpus, cache=tmp_path)
    assert rebuilt != tiny_model_dir and rebuilt.name == tiny_model_dir.name
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256_file(rebuilt / name) == sha256_file(tiny_model_dir / name), name


def test_other_data_gives_another_model(tmp_path, real_nyc_records):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in real_nyc_records[:5]) + "\n")
    first = tiny.ensure_tiny_model([corpus], cache=tmp_path / "cache")
    corpus.write_text("\n".join(json.dumps(r) for r in real_nyc_records[5:10]) + "\n")
    second = tiny.ensure_tiny_model([corpus], cache=tmp_path / "cache")
    assert first != second and (second / "model.safetensors").is_file()
    assert not list((tmp_path / "cache" / "tiny").glob(".*"))  # no temporary build folders left behind
