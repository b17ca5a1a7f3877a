"""Preference pairs whose chosen and rejected sides are the same (found by fuzzing dpo/orpo/simpo: they trained
silently, exit 0; DPO's margin is 0 on such a pair, so it teaches nothing). A file where every pair is so is one
line naming it; where some are, the run's data line counts them. Expectations written by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peft_rwkv7.data import DataConfig
from peft_rwkv7.data.preference import PreferenceData, Side, make_preference_data
from peft_rwkv7.errors import UserError
from tests.data.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def side(docs: list[tuple[list[int], list[int]]]) -> Side:
    sizes = np.array([len(t) for t, _ in docs], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return Side(np.array([t for d, _ in docs for t in d], np.uint16), np.array([m for _, d in docs for m in d],
                                                                              np.uint8), starts, sizes)


def test_identical_pairs_are_the_same_tokens_with_the_same_mask():
    chosen = [([5, 6, 7, 0], [0, 0, 1, 1]), ([9, 10, 0], [0, 1, 1]), ([3, 4, 0], [0, 1, 1]), ([8, 0], [0, 1]),
              ([2, 2, 0], [0, 1, 1])]
    rejected = [([5, 6, 8, 0], [0, 0, 1, 1]),  # another response
                ([9, 10, 0], [0, 1, 1]),        # the same: identical
                ([3, 4, 0], [0, 0, 1]),         # the same tokens, another prompt/response split
                ([8, 0, 0], [0, 1, 1]),         # longer
                ([2, 2, 0], [0, 1, 1])]         # the same: identical
    data = PreferenceData(side(chosen), side(rejected), 8, 0)
    assert data.identical_pairs() == [1, 4] and data.identical == 2


def test_a_file_of_identical_pairs_is_refused(tmp_path, world):
    same = {"prompt": "Q: 2+2?", "chosen": "4", "rejected": "4"}
    src = write_jsonl(tmp_path / "p.jsonl", [same, {**same, "prompt": "Q: 3+3?", "chosen": "6", "rejected": "6"}])
    with pytest.raises(UserError) as e:
        make_preference_data(DataConfig(path=str(src)), world, 0, cache_dir=tmp_path, progress=False)
    assert str(e.value) == (f"{src}: chosen and rejected are the same in every record (2); a pair teaches a "
                            "preference only where its two sides differ")
    src = write_jsonl(tmp_path / "q.jsonl", [same, {**same, "rejected": "5"}])
    assert make_preference_data(DataConfig(path=str(src)), world, 0, cache_dir=tmp_path, progress=False).identical == 1


def test_the_runs_data_line_counts_them(tmp_path, world):
    from peft_rwkv7.data import make_dataset
    from peft_rwkv7.train.loop import data_summary
    from peft_rwkv7.train.recipe import load_recipe

    rows = [{"prompt": f"Q{i}", "chosen": f"yes {i}", "rejected": f"no {i}" if i % 3 else f"yes {i}"}
            for i in range(6)]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    recipe = load_recipe(str(ROOT / "recipes/dpo.yaml"), [f"data.path={src}", "data.eval_split=0"])
    data = make_dataset(recipe.data, world, seed=0, progress=False, cache_dir=tmp_path)
    assert "; 2 pairs have chosen = rejected (they teach nothing)" in data_summary(recipe, data)
