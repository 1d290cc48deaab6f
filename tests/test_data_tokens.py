"""Token counting with a local tokenizer, and the helpers the other data tests share.

``build_tiny_tokenizer`` makes, offline and in milliseconds, a BPE tokenizer trained on a few
CoMaPOI-style texts, wrapped as a ``PreTrainedTokenizerFast`` with a chat template, and saves it
as a Hugging Face folder: what ``--tokenizer PATH`` loads with ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comapoi_cli.plugins import get_registry as _REGISTRY

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
if not REAL.is_dir():  # CI: ../shared beside the checkout
    REAL = Path(os.environ.get("COMAPOI_SHARED", "../shared")) / "data" / "real"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def real_lines(name: str = "nyc_train.jsonl") -> list[str]:
    return (REAL / name).read_text(encoding="utf-8").splitlines()


def build_tiny_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for name in ("nyc_train.jsonl", "tky_test.jsonl"):
        for line in real_lines(name)[:10]:
            corpus.extend(m["content"] for m in json.loads(line)["messages"])
    corpus += ["user_id: 1, subtrajectory_id: 2 Profiler Forecaster candidate list 22, 1, 12"]
    special = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|end|>",
                                   pad_token="<|end|>", additional_special_tokens=special[:3])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small simulated nyc dataset (60 trajectories), made once per session; treat as read-only."""
    from comapoi_cli.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("synth")
    synth_dataset("nyc", out, trajectories=60, seed=7, registry=_REGISTRY())
    return out


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "comapoi_cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=120)


# -- the tests of token counting ---------------------------------------------------------------
def test_token_counter_matches_the_chat_template(tiny_tokenizer):
    from transformers import AutoTokenizer

    from comapoi_cli.data.tokens import TokenCounter

    counter = TokenCounter.load(tiny_tokenizer)
    assert counter.template == "chat_template"
    hf = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    for line in real_lines()[:5]:
        messages = json.loads(line)["messages"]
        total, prompt = counter.count(messages)
        expected_total = len(hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        expected_prompt = len(hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                     return_dict=True)["input_ids"])
        assert total == expected_total
        assert prompt == expected_prompt
        assert 0 < total - prompt < 20  # the answer {"next_poi_id": N} plus the end marker


def test_batch_equals_single(tiny_tokenizer):
    from comapoi_cli.data.tokens import TokenCounter

    counter = TokenCounter.load(tiny_tokenizer)
    conversations = [json.loads(line)["messages"] for line in real_lines()[:6]]
    assert counter.count_batch(conversations) == [counter.count(c) for c in conversations]


def test_a_template_whose_prompt_is_no_prefix_is_counted_separately(tiny_tokenizer, tmp_path):
    """A template that renders the prompt differently once the answer follows (here: a message count
    up front) cannot split one rendering at the answer: the prompt is tokenized on its own."""
    from transformers import AutoTokenizer

    from comapoi_cli.data.tokens import TokenCounter

    hf = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    hf.chat_template = ("{{ messages|length }} turns\n{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hf.save_pretrained(tmp_path / "tok")
    counter = TokenCounter.load(tmp_path / "tok")
    conversations = [json.loads(line)["messages"] for line in real_lines()[:4]]
    assert all(counter.split_texts(c)[1] == -1 for c in conversations)  # the prompt is not a prefix here
    for conversation, (total, prompt) in zip(conversations, counter.count_batch(conversations)):
        assert total == len(hf.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
        assert prompt == len(hf.apply_chat_template(conversation[:-1], tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"])


def test_missing_tokenizer_is_one_sentence(tmp_path):
    from comapoi_cli.data.tokens import TokenCounter
    from comapoi_cli.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        TokenCounter.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Could not load a tokenizer"):
        TokenCounter.load(tmp_path / "empty")


def test_clean_too_long_counts_lost_answers(tmp_path, tiny_tokenizer):
    from comapoi_cli.data import clean_file, read_rejects
    from comapoi_cli.data.tokens import TokenCounter

    lines = real_lines()
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    counter = TokenCounter.load(tiny_tokenizer)
    counts = [counter.count(json.loads(line)["messages"]) for line in lines]
    limit = sorted(total for total, _ in counts)[len(counts) // 2]
    summary = clean_file(source, tmp_path / "out.jsonl", tokenizer=tiny_tokenizer, seq_length=limit, registry=_REGISTRY())
    too_long = [i + 1 for i, (total, _) in enumerate(counts) if total > limit]
    assert summary.rejected.get("too_long", 0) == len(too_long)
    assert [r["line"] for r in read_rejects(summary.rejects)] == too_long
    lost = sum(1 for total, prompt in counts if total > limit and prompt >= limit)
    assert summary.over_length.get("answer_lost", 0) == lost
    assert summary.over_length.get("answer_cut", 0) == len(too_long) - lost
    assert summary.tokens["max"] <= limit

    kept = clean_file(source, tmp_path / "out2.jsonl", tokenizer=tiny_tokenizer, seq_length=limit,
                      policies={"too_long": "warn"}, registry=_REGISTRY())
    assert kept.kept == len(lines) and kept.warnings["too_long"] == len(too_long)


def test_stats_with_tokenizer(tmp_path, tiny_tokenizer, synth_dir):
    from comapoi_cli.data.stats import compute_stats, dataset_files
    from comapoi_cli.data.tokens import TokenCounter

    files = dataset_files("nyc", synth_dir, registry=_REGISTRY())
    report = compute_stats(files, dataset="nyc", tokenizer=tiny_tokenizer, seq_length=2000, registry=_REGISTRY())
    assert set(report.roles) == {"agent1", "agent2", "agent3"}
    counter = TokenCounter.load(tiny_tokenizer)
    agent3 = [json.loads(line)["messages"] for line in
              (synth_dir / "nyc" / "agent3_train_samples.jsonl").read_text().splitlines()]
    counts = [counter.count(m) for m in agent3]
    stats = report.roles["agent3"]
    assert not stats.tokens_estimated
    assert stats.total_tokens == sum(t for t, _ in counts)
    assert stats.loss_tokens == sum(t - p for t, p in counts)
    assert stats.tokens["max"] == max(t for t, _ in counts)
    assert stats.over_seq_length == sum(1 for t, _ in counts if t > 2000)
    assert 0 < stats.loss_share < 0.2
    assert report.tokens_per_second and report.tokens_per_second > 0
