"""The world every kill test runs in (built once per session)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.conftest import make_model
from tests.kill.support import (
    LORA,
    ROOT,
    _overrides,
)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """tiny.pth, train.jsonl, eval.jsonl, big.jsonl (two tokenizer chunks) and `ref/`, an uninterrupted LoRA + state
    run of _overrides (the adapter every killed run must end with)."""
    from peft_rwkv7.model import save_model
    from peft_rwkv7.train.runner import train_from_cli

    d = tmp_path_factory.mktemp("kill_world")
    save_model(make_model(seed=11, n_layer=2, n_embd=64, head_size=16, vocab_size=65536), d / "tiny.pth")
    lines = (ROOT / "data/demo/ship_log.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(itertools.islice(lines, 200)) + "\n")
    (d / "eval.jsonl").write_text("\n".join(lines[-8:]) + "\n")
    big, size = [], 0
    for line in itertools.cycle(lines):  # past data.records.CHUNK_BYTES (4 MiB): two tokenizer worker processes
        big.append(line)
        size += len(line) + 1
        if size > 5 << 20:
            break
    (d / "big.jsonl").write_text("\n".join(big) + "\n")
    assert train_from_cli(LORA, _overrides(d, d / "ref")) == 0
    return d


