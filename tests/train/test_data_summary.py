"""The data summary line at the start of training, and its warnings."""

from __future__ import annotations

import json

from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import ROOT, tiny_overrides


def test_summary_counts_documents_epochs_and_warns_on_repeats(tiny_world, tmp_path, capsys):
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Ship's log, day one.", "", "Fair winds.")))
    over = tiny_overrides(tiny_world, tmp_path / "r", steps=1, **{"data.path": data, "data.sampling": "pad",
                                                                  "train.micro_bsz": 8, "data.eval_path": "null"})
    assert train_from_cli(str(ROOT / "recipes/lora.yaml"), over) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("data: "))
    assert line.startswith("data: 3 documents, ") and "1 empty documents" in line, line
    assert "1 steps x 8 samples" in line
    assert "warning: one step takes 8 samples but" in err and "samples repeat within a step" in err
