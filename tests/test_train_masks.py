"""Which tokens carry loss: assistant-only masks cover exactly the answers, on any chat template.

The tiny model's template has ``{% generation %}`` markers; Qwen2.5's and Llama-3.1's real templates
do not, so comapoi finds their answers by rendering prefixes (``prefix-diff``). Both are checked on
real CoMaPOI conversations (``../shared/data/real``) and on multi-turn chats; truncation and
``--loss all`` too. In-process, with the session's tiny tokenizer.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from comapoi_cli.errors import TrainingError  # noqa: E402
from comapoi_cli.models.tiny import TINY_CHAT_TEMPLATE  # noqa: E402
from comapoi_cli.training import chat  # noqa: E402

#: Qwen2.5-Instruct's chat template, trimmed of its tool-calling branches (no generation markers).
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: Llama-3.1-Instruct's chat template, trimmed of its tool-calling branches (no generation markers).
LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

#: A template that rewrites earlier turns once a later one exists (the answer cannot be located).
REWRITING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.last or message['role'] != 'assistant' %}{{- message['role'] + ': ' + message['content'] + '\\n' }}"
    "{%- else %}{{- 'assistant: [earlier answer]\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
)


@pytest.fixture
def tokenizer(tiny_model_dir):
    """A fresh tiny tokenizer per test (``resolve_chat_format`` installs the template it picks)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def multi_turn(records):
    first, second = records[0]["messages"], records[1]["messages"]
    return {"messages": [first[0], first[1], first[2], second[1], second[2]]}


def loss_texts(tokenizer, fmt, records, seq_length=100_000):
    rows, stats = chat.tokenize_records(tokenizer, fmt, records, seq_length)
    return [list(chat.iter_loss_texts(tokenizer, row)) for row in rows], rows, stats


def test_tiny_template_has_generation_markers(tokenizer):
    fmt = chat.resolve_chat_format(tokenizer, "assistant")
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert fmt.generation_markers and fmt.mask_method == chat.MASK_MARKERS


def test_masks_cover_exactly_the_answers_on_the_tiny_template(tokenizer, real_nyc_records):
    records = [*real_nyc_records[:6], multi_turn(real_nyc_records)]
    fmt = chat.resolve_chat_format(tokenizer, "assistant")
    texts, rows, stats = loss_texts(tokenizer, fmt, records)
    for record, spans in zip(records, texts):
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert spans == [answer + "<|im_end|>\n" for answer in answers]
    assert stats.used == len(records) and stats.loss_tokens == sum(sum(l != -100 for l in r["labels"]) for r in rows)
    # the same masks when the answers are found by rendering prefixes instead of by the markers
    prefix = chat.ChatFormat(fmt.template, "test", False, chat.MASK_PREFIX)
    rows_prefix, _ = chat.tokenize_records(tokenizer, prefix, records, 100_000)
    assert rows_prefix == rows
    # and the same as transformers' own assistant mask for templates with markers
    for record, row in zip(records, rows):
        hf = tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert hf["input_ids"] == row["input_ids"]
        assert [int(m) for m in hf["assistant_masks"]] == [int(l != -100) for l in row["labels"]]


@pytest.mark.parametrize("template, end_of_turn", [(QWEN25_TEMPLATE, "<|im_end|>\n"), (LLAMA31_TEMPLATE, "<|eot_id|>")])
def test_templates_without_markers_mask_exactly_the_answers(tokenizer, real_nyc_records, tmp_path, template, end_of_turn):
    template_file = tmp_path / "template.jinja"
    template_file.write_text(template)
    fmt = chat.resolve_chat_format(tokenizer, "assistant", str(template_file))
    assert not fmt.generation_markers and fmt.mask_method == chat.MASK_PREFIX
    records = [*real_nyc_records[:4], multi_turn(real_nyc_records)]
    texts, rows, _ = loss_texts(tokenizer, fmt, records)
    for record, spans, row in zip(records, texts, rows):
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert spans == [answer + end_of_turn for answer in answers]
        # nothing of the prompt carries loss: the unmasked tokens decode to the rendered prompt parts
        prompt = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == -100])
        assert record["messages"][-2]["content"] in prompt and answers[-1] not in prompt


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer, real_nyc_records, tmp_path):
    template_file = tmp_path / "rewriting.jinja"
    template_file.write_text(REWRITING_TEMPLATE)
    fmt = chat.resolve_chat_format(tokenizer, "assistant", str(template_file))
    with pytest.raises(TrainingError, match="record 2 as prompt then answer"):
        chat.tokenize_records(tokenizer, fmt, [real_nyc_records[0], multi_turn(real_nyc_records)], 10_000)
    # --loss all does not need to find the answers
    all_fmt = chat.resolve_chat_format(tokenizer, "all", str(template_file))
    rows, stats = chat.tokenize_records(tokenizer, all_fmt, [multi_turn(real_nyc_records)], 10_000)
    assert rows[0]["labels"] == rows[0]["input_ids"] and stats.loss_tokens == stats.tokens


def test_truncation_is_counted_and_answerless_records_are_dropped(tokenizer, real_nyc_records):
    fmt = chat.resolve_chat_format(tokenizer, "assistant")
    records = real_nyc_records[:8]
    full, _ = chat.tokenize_records(tokenizer, fmt, records, 100_000)
    lengths = sorted(len(r["input_ids"]) for r in full)
    cut = lengths[3] + 1  # the four shortest fit; the answers sit at the end of the others
    first_loss = [next(i for i, l in enumerate(r["labels"]) if l != -100) for r in full]
    lost = sum(start >= cut for start in first_loss)
    assert lost >= 3  # most cut records lose their whole (short) answer; one may keep a part of it
    rows, stats = chat.tokenize_records(tokenizer, fmt, records, cut)
    assert stats.records == 8 and stats.truncated == 4 and stats.truncated_lost_answer == lost
    assert stats.used == 8 - lost and len(rows) == 8 - lost and all(len(r["input_ids"]) <= cut for r in rows)
    assert all(any(l != -100 for l in r["labels"]) for r in rows)
    assert stats.longest == lengths[-1]
    assert any("lose their whole answer" in line for line in chat.describe_stats(stats, cut))
    # --loss all keeps the cut records: their prompt tokens still carry loss
    all_rows, all_stats = chat.tokenize_records(tokenizer, chat.resolve_chat_format(tokenizer, "all"), records, cut)
    assert all_stats.used == 8 and all_stats.truncated == 4 and all(len(r["input_ids"]) <= cut for r in all_rows)


def test_no_template_is_a_clear_error(tokenizer):
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        with pytest.raises(TrainingError, match="has no chat template"):
            chat.resolve_chat_format(tokenizer, "assistant", model_name="base-model")
    finally:
        tokenizer.chat_template = saved


def test_pad_token_is_set_for_tokenizers_without_one(tokenizer):
    saved = tokenizer.pad_token
    try:
        tokenizer.pad_token = None
        note = chat.ensure_pad_token(tokenizer)
        assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
        assert note == "set to <|endoftext|>"
        assert chat.ensure_pad_token(tokenizer) == "kept"
    finally:
        tokenizer.pad_token = saved


def test_label_segments_highlight_the_answer(tokenizer, real_nyc_records):
    fmt = chat.resolve_chat_format(tokenizer, "assistant")
    rows, _ = chat.tokenize_records(tokenizer, fmt, real_nyc_records[:1], 100_000)
    segments = chat.label_segments(tokenizer, **rows[0], keep=20)
    answer = real_nyc_records[0]["messages"][-1]["content"]
    assert [text for text, loss in segments if loss] == [answer + "<|im_end|>\n"]
    assert any("tokens without loss" in text for text, loss in segments if not loss)
