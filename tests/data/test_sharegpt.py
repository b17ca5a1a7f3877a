"""ShareGPT `conversations` ({from, value}; human / gpt / system) train exactly as `messages` do."""

from __future__ import annotations

import json

import pytest

from peft_rwkv7.data import DataConfig, make_dataset
from peft_rwkv7.data.dataset import resolve_format
from peft_rwkv7.data.formats import ChatFormat
from peft_rwkv7.errors import UserError
from tests.data.conftest import write_jsonl
from tests.data.test_formats import MULTI_TURN_RENDERED, assert_sample, expected, one_sample

SHAREGPT = {"id": "x1", "conversations": [
    {"from": "system", "value": "You are helpful."},
    {"from": "human", "value": "Hi\r\n\r\nthere"},
    {"from": "gpt", "value": "Hello! 你好"},
    {"from": "human", "value": "2+2?"},
    {"from": "gpt", "value": " 4 "},
]}
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}
MESSAGES = {"messages": [{"role": ROLE[m["from"]], "content": m["value"]} for m in SHAREGPT["conversations"]]}


def test_sharegpt_renders_and_masks_as_messages(tmp_path, world, trie):
    got = one_sample(tmp_path / "s", [SHAREGPT], world)  # data.kind auto
    assert_sample(got, expected(trie, MULTI_TURN_RENDERED))
    assert_sample(got, one_sample(tmp_path / "m", [MESSAGES], world))
    assert_sample(got, one_sample(tmp_path / "c", [SHAREGPT], world, kind="chat"))


def test_auto_detects_sharegpt_as_chat(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT])
    kind, fmt = resolve_format(DataConfig(path=str(src)))
    assert kind == "chat" and fmt == ChatFormat("conversations", None)
    kind, fmt = resolve_format(DataConfig(path=str(src), kind="chat", system="S"))
    assert kind == "chat" and fmt == ChatFormat("conversations", "S")


def test_sharegpt_json_array_with_system_from_config(tmp_path, world, trie):
    """ShareGPT sets usually ship as one JSON array; data.system fills in a missing system turn."""
    src = tmp_path / "share.json"
    src.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]))
    ds = make_dataset(DataConfig(path=str(src), ctx_len=32, system="Sys"), world, seed=0,
                      cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert_sample(ds.sample(0), expected(trie, [("System: Sys\n\nUser: a\n\nAssistant:", False), (" b\n\n", True),
                                                (0, True)], ctx_len=32))


@pytest.mark.parametrize("conv,match", [
    ([{"from": "bot", "value": "x"}], r"d\.jsonl:1: conversations\[0\]: from 'bot' is not one of human, gpt, system"),
    ([{"from": "human", "value": "x"}, {"from": "gpt"}], r"d\.jsonl:1: conversations\[1\]: missing field 'value'"),
    ([{"from": "human", "value": 3}], r"d\.jsonl:1: conversations\[0\]: field 'value' must be a string, got number"),
    (["hi"], r"d\.jsonl:1: conversations\[0\] must be an object with 'role' and 'content' \(or ShareGPT"),
    ("hi", r"d\.jsonl:1: field 'conversations' must be an array, got string"),
    ([], r"d\.jsonl:1: field 'conversations' is empty"),
])
def test_bad_sharegpt_records_name_file_line_and_field(tmp_path, world, conv, match):
    src = write_jsonl(tmp_path / "d.jsonl", [{"conversations": conv}])
    with pytest.raises(UserError, match=match):
        make_dataset(DataConfig(path=str(src), ctx_len=16), world, seed=0, cache_dir=tmp_path / "c", workers=1,
                     progress=False)


def test_messages_field_wins_over_conversations(tmp_path, world):
    both = {"messages": [{"role": "user", "content": "m"}, {"role": "assistant", "content": "M"}],
            "conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "C"}]}
    x, _ = one_sample(tmp_path, [both], world)
    assert " M\n\n" in world.decode(x.tolist()) and " C" not in world.decode(x.tolist())
