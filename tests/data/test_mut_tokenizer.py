"""The tokenizers' own code (data/tokenizer.py), pinned down where mutation testing found the tests silent.

A small tokenizer.json is built here with HF `tokenizers` (a word-level vocabulary, an added special token and a
post-processor that would put it first), so every expectation is written out by hand."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from peft_rwkv7.data import tokenizer as T
from peft_rwkv7.errors import UserError

tokenizers = pytest.importorskip("tokenizers")

VOCAB = {"<eot>": 0, "a": 1, "b": 2, "[UNK]": 3}


def small_json(path: Path) -> Path:
    """Word-level "a"=1, "b"=2, "[UNK]"=3, end-of-text 0; "<s>" added as id 4 and prepended by the post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 4)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_a_tokenizer_json_by_hand(tmp_path):
    p = small_json(tmp_path / "t" / "tokenizer.json")
    tok = T.load_tokenizer(p)
    assert isinstance(tok, T.JsonTokenizer) and tok.spec == str(p.resolve())
    assert tok.vocab_size == 5  # the added "<s>" counts
    assert tok.eot_id == 0
    assert tok.fingerprint == "json:" + hashlib.sha256(p.read_bytes()).hexdigest()[:20]
    assert tok.encode("a b zz a") == [1, 2, 3, 1]  # no "<s>" from the post-processor
    assert tok.encode_batch(["a", "b a", ""]) == [[1], [2, 1], []]
    assert tok.decode([0, 1, 4, 2, 0]) == "a <s> b"  # end-of-text gives nothing, a special token its text
    assert repr(tok) == f"JsonTokenizer({str(p.resolve())!r}, vocab_size=5)"


def test_a_folder_holding_tokenizer_json_and_a_home_path(tmp_path, monkeypatch):
    p = small_json(tmp_path / "home" / "tok" / "tokenizer.json")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert T.load_tokenizer(p.parent).spec == str(p.resolve())
    assert T.load_tokenizer("~/tok").spec == str(p.resolve())
    assert T.load_tokenizer("~/tok/tokenizer.json").spec == str(p.resolve())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        T.load_tokenizer(empty)
    assert str(e.value) == f"data.tokenizer: {str(empty)!r} is neither 'world' nor an existing tokenizer.json file"


@pytest.mark.parametrize("spec", ["world", " WORLD ", "World\n"])
def test_world_by_name_whatever_its_case_and_spaces(spec):
    pytest.importorskip("pyrwkv_tokenizer")
    tok = T.load_tokenizer(spec)
    assert isinstance(tok, T.WorldTokenizer)
    assert (tok.spec, tok.fingerprint, tok.vocab_size, tok.eot_id) == ("world", "world:rwkv_vocab_v20230424", 65530, 0)
    assert repr(tok) == "WorldTokenizer('world', vocab_size=65530)"


def test_a_file_named_world_is_still_a_path(tmp_path, monkeypatch):
    small_json(tmp_path / "worldly" / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    assert isinstance(T.load_tokenizer("worldly"), T.JsonTokenizer)


def test_the_world_vocabulary_missing_from_the_install(tmp_path, monkeypatch):
    pyrwkv_tokenizer = pytest.importorskip("pyrwkv_tokenizer")
    monkeypatch.setattr(pyrwkv_tokenizer, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(UserError) as e:
        T.WorldTokenizer()
    missing = tmp_path / T.WORLD_VOCAB_FILE
    assert str(e.value) == f"{missing}: World vocabulary missing from the pyrwkv-tokenizer install"


def test_an_unreadable_or_broken_tokenizer_json_is_one_line(tmp_path, monkeypatch):
    p = small_json(tmp_path / "tokenizer.json")
    real = Path.read_bytes

    def denied(self):
        if self == p.resolve():
            raise PermissionError(13, "Permission denied")
        return real(self)

    with monkeypatch.context() as m:
        m.setattr(Path, "read_bytes", denied)
        with pytest.raises(UserError) as e:
            T.JsonTokenizer(p)
    assert str(e.value) == f"{p.resolve()}: cannot read tokenizer file (Permission denied)"
    p.write_text('{"version": "1.0"}\n')
    with pytest.raises(UserError) as e:
        T.JsonTokenizer(p)
    assert str(e.value).startswith(f"{p.resolve()}: not a valid tokenizer.json (") and "\n" not in str(e.value)

    def silent(raw):
        raise ValueError("\n  \n")

    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", silent)
    small_json(p)
    with pytest.raises(UserError) as e:
        T.JsonTokenizer(p)
    assert str(e.value) == f"{p.resolve()}: not a valid tokenizer.json (ValueError)"


def test_the_base_interface():
    class Two(T.Tokenizer):
        spec, vocab_size = "two", 2

        def encode(self, text):
            return [len(text) % 2]

    tok = Two()
    assert tok.encode_batch(["a", "bb", ""]) == [[1], [0], [0]] and tok.eot_id == 0
    assert repr(tok) == "Two('two', vocab_size=2)"
    with pytest.raises(NotImplementedError):
        tok.decode([1])
    with pytest.raises(NotImplementedError):
        T.Tokenizer().encode("x")


def test_world_decodes_bytes_by_table(world, trie):
    ids = trie.encode("Hello 中文")
    assert world.decode_bytes(ids) == "Hello 中文".encode()
    assert world.decode_bytes([]) == b"" and world.decode([]) == ""
    assert world.decode_bytes([0, 0]) == b""
    assert world.id_to_bytes is world.id_to_bytes  # read once
    assert len(world.id_to_bytes) == 65530 and world.id_to_bytes[65529] == trie.idx2token[65529]
