"""A GRPO prompt field holding something that is no text (found by fuzzing): an object or a list among the joined
fields was rendered with str() (`{'a': 1}` became the prompt), and a null prompt was "needs 'prompt', 'messages'
or ShareGPT 'conversations'" though the key is there. Expectations written by hand."""

from __future__ import annotations

import pytest

from peft_rwkv7.data import DataConfig
from peft_rwkv7.data.prompts import render_prompt
from peft_rwkv7.errors import UserError

CFG = DataConfig(path="p.jsonl", kind="prompts")


@pytest.mark.parametrize("rec, want", [
    ({"prompt": {"a": 1}}, "field 'prompt' is a dict, expected text (got {\"a\": 1})"),
    ({"prompt": True}, "field 'prompt' is a bool, expected text (got true)"),
    ({"prompt": None}, "field 'prompt' is null, expected the prompt's text"),
])
def test_a_prompt_that_is_no_text_is_named(rec, want):
    with pytest.raises(UserError) as e:
        render_prompt(rec, CFG, "p.jsonl:3")
    assert str(e.value) == f"p.jsonl:3: {want}"


def test_a_second_field_that_is_a_list_is_named():
    cfg = DataConfig(path="p.jsonl", kind="prompts", prompt_fields=["q", "ctx"])
    with pytest.raises(UserError) as e:
        render_prompt({"q": "Sum?", "ctx": [1, 2]}, cfg, "p.jsonl:1")
    assert str(e.value) == "p.jsonl:1: field 'ctx' is a list, expected text (got [1, 2])"


def test_text_and_numbers_still_render():
    cfg = DataConfig(path="p.jsonl", kind="prompts", prompt_fields=["q", "n"], prompt_template="{prompt}")
    assert render_prompt({"q": "Double", "n": 21}, cfg, "p.jsonl:1") == "Double\n21"
