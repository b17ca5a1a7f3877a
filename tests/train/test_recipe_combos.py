"""Combinations of recipe settings end to end (single bad values: test_schema_values.py, test_cli_flags_fuzz.py).

Pairwise over method.kind (every `rwkv-peft methods` kind, quantized bases, train_parts, + state), train.objective
(sft, dpo, orpo, simpo, grpo), train.chunk_len, train.grad_cp, train.precision bf16, data.sampling pad/get,
data.group_by_length, train.grad_accum and train.micro_bsz. The oracle for each combination: it trains 2 steps with
finite losses, moves the model, its run cut after step 1 and resumed ends bit for bit as the uninterrupted one, `merge`
writes a model whose fp32 logits are the adapted model's to fp32 rounding, and `export --format rwkv-peft` works where
`rwkv-peft methods` says so and is otherwise refused in one line (exit 2). A combination that cannot work is refused
before training, in one line naming the key, with exit code 2 and no run written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_rwkv7.cli import main as cli_main
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")
EXPORTS = {"lora", "pissa", "disha", "state"}  # `rwkv-peft methods`: the rwkv-peft column (DoRA: no)


@pytest.fixture(scope="module")
def combo_data(tmp_path_factory) -> dict[str, dict]:
    """Per objective, the data keys: preference pairs (dpo, orpo, simpo), prompts + a reward that differs between
    completions (grpo: a tiny random model's completions all miss the usual numeric answers, which teaches nothing)."""
    d = tmp_path_factory.mktemp("combo_data")
    pairs = (ROOT / "data/demo/ship_log_prefs.jsonl").read_text().splitlines()
    (d / "prefs.jsonl").write_text("\n".join(pairs[:16]) + "\n")
    (d / "prefs_eval.jsonl").write_text("\n".join(pairs[-4:]) + "\n")
    rows = [{"prompt": f"Write the log of day {n}.", "answer": n} for n in (3, 17, 42, 8, 99, 5, 61, 23)]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "r.py").write_text("def vowels(prompts, completions, **kw):\n"
                            "    return [float(sum(c in 'aeiou' for c in x)) for x in completions]\n")
    prefs = {"data.path": d / "prefs.jsonl", "data.eval_path": d / "prefs_eval.jsonl", "data.kind": "preference",
             "data.ctx_len": 48}
    return {
        "sft": {},
        **{o: {**prefs, "train.objective": o} for o in ("dpo", "orpo", "simpo")},
        "grpo": {"data.path": d / "prompts.jsonl", "data.kind": "prompts", "data.eval_path": "null",
                 "data.eval_split": 0.25, "data.ctx_len": 40, "train.objective": "grpo",
                 "train.grpo.num_generations": 4, "train.grpo.max_new_tokens": 8,
                 "train.grpo.rewards": f"[{{fn: '{d / 'r.py'}:vowels'}}]"},
    }


# (id, objective, keys): each axis value meets most others at least once; the heavier rows are slow.
FAST = [
    ("pissa-dpo-infctx", "dpo", {"method.kind": "pissa", "train.chunk_len": 16}),
    ("disha-orpo-gradcp-accum2", "orpo", {"method.kind": "disha", "train.grad_cp": "true", "train.grad_accum": 2}),
    ("bat-simpo-bf16-grouped-bsz3", "simpo", {"method.kind": "disha", "method.disha_mode": "bat",
                                              "train.precision": "bf16", "data.group_by_length": "true",
                                              "train.micro_bsz": 3}),
    ("state-dpo-gradcp-bsz1", "dpo", {"method.kind": "state", "train.grad_cp": "true", "train.micro_bsz": 1}),
    ("lora+state-grpo-gradcp-bsz1", "grpo", {"method.state": "true", "train.grad_cp": "true",
                                              "train.micro_bsz": 1}),
    # was: a base quantized from its bf16 copy in training, from its fp32 one by load_adapter on an fp32 model
    # (eval/generate --dtype fp32): the adapter computed another model than trained and merged
    ("nf4-sft-bf16-pad-grouped-infctx", "sft", {"method.quant": "nf4", "train.precision": "bf16",
                                                "data.sampling": "pad", "data.group_by_length": "true",
                                                "train.chunk_len": 16}),
    ("loha-sft-infctx-bf16", "sft", {"method.kind": "loha", "train.chunk_len": 16, "train.precision": "bf16"}),
]
SLOW = [
    ("full-simpo-infctx", "simpo", {"method.kind": "full", "train.chunk_len": 16}),
    ("lora+parts-dpo-infctx", "dpo", {"method.train_parts": "[ln,time,emb]", "train.chunk_len": 16}),
    ("disha+parts-sft-gradcp-bf16-pad-bsz3", "sft", {"method.kind": "disha", "method.train_parts": "[ffn,head]",
                                                     "train.grad_cp": "true", "train.precision": "bf16",
                                                     "data.sampling": "pad", "train.micro_bsz": 3}),
    ("state-sft-infctx-pad-grouped-accum2", "sft", {"method.kind": "state", "train.chunk_len": 16,
                                                    "data.sampling": "pad", "data.group_by_length": "true",
                                                    "train.grad_accum": 2}),
    ("state-grpo-bf16", "grpo", {"method.kind": "state", "train.precision": "bf16"}),
    ("full-grpo-accum2", "grpo", {"method.kind": "full", "train.grad_accum": 2}),
    ("full-sft-bf16-gradcp-get-bsz1", "sft", {"method.kind": "full", "train.precision": "bf16",
                                              "train.grad_cp": "true", "data.sampling": "get", "train.micro_bsz": 1}),
    ("nf4-dpo-gradcp", "dpo", {"method.quant": "nf4", "train.grad_cp": "true"}),
    ("pissa-int8-sft-bf16-bsz3", "sft", {"method.kind": "pissa", "method.quant": "int8", "train.precision": "bf16",
                                         "train.micro_bsz": 3}),
    ("bat-nf4-state-orpo-bf16", "orpo", {"method.kind": "disha", "method.disha_mode": "bat", "method.quant": "nf4",
                                         "method.state": "true", "train.precision": "bf16"}),
    ("lokr-dpo-grouped-accum2", "dpo", {"method.kind": "lokr", "data.group_by_length": "true",
                                        "train.grad_accum": 2}),
    ("oft-sft-gradcp-pad", "sft", {"method.kind": "oft", "method.r": 16, "train.grad_cp": "true",
                                   "data.sampling": "pad"}),
    ("boft-orpo-bsz1", "orpo", {"method.kind": "boft", "method.r": 16, "train.micro_bsz": 1}),
    ("ia3-grpo-bf16", "grpo", {"method.kind": "ia3", "train.precision": "bf16"}),
    ("vera-simpo-infctx-gradcp", "simpo", {"method.kind": "vera", "method.r": 8, "train.chunk_len": 16,
                                           "train.grad_cp": "true"}),
    ("adalora-sft-infctx-accum2", "sft", {"method.kind": "adalora", "train.chunk_len": 16, "train.grad_accum": 2}),
    ("adalora-dpo-bf16", "dpo", {"method.kind": "adalora", "train.precision": "bf16"}),
    ("dora-orpo-infctx", "orpo", {"method.use_dora": "true", "train.chunk_len": 16}),
    ("pissa+state+time-grpo", "grpo", {"method.kind": "pissa", "method.state": "true", "method.train_parts": "[time]"}),
    ("lora+state-sft-infctx-gradcp-bf16-accum2-bsz3", "sft", {"method.state": "true", "train.chunk_len": 16,
                                                              "train.grad_cp": "true", "train.precision": "bf16",
                                                              "train.grad_accum": 2, "train.micro_bsz": 3}),
]
CASES = [pytest.param(*c, id=c[0]) for c in FAST] + [pytest.param(*c, id=c[0], marks=pytest.mark.slow) for c in SLOW]


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _train(capsys, tiny_world, out: Path, keys: dict, *extra: str) -> None:
    rc, err = _cli(capsys, "train", LORA, *tiny_overrides(tiny_world, out, **{"train.lr": 3e-3, **keys}), *extra)
    assert rc == 0, err


def _run_files(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = {p.name: load_file(p) for p in out.glob("*.safetensors")}
    if (out / "state.pth").exists():
        files["state.pth"] = torch.load(out / "state.pth", weights_only=True)
    return files


@pytest.mark.parametrize("name, objective, keys", CASES)
def test_a_combination_trains_resumes_and_merges_to_the_adapted_model(name, objective, keys, tiny_world, combo_data,
                                                                     tmp_path, capsys):
    from peft_rwkv7.adapters import load_adapter
    from peft_rwkv7.model import load_model

    keys = {**combo_data[objective], **keys}
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(capsys, tiny_world, full, keys)
    losses = [r["loss"] for r in map(json.loads, (full / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses), losses

    _train(capsys, tiny_world, cut, keys, "train.stop_after=1")
    _train(capsys, tiny_world, cut, keys, "--resume")
    a, b = _run_files(full), _run_files(cut)
    assert set(a) == set(b) and "adapter.safetensors" in a
    for f in a:
        assert set(a[f]) == set(b[f]), f
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)  # the resumed run ends bit for bit as the whole one

    merged = tmp_path / "merged.pth"
    rc, err = _cli(capsys, "merge", "--base", tiny_world[0], "--adapter", full, "--out", merged, "--dtype", "fp32")
    assert rc == 0, err
    idx = torch.randint(0, 65536, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = load_adapter(load_model(tiny_world[0], wkv_backend="reference"), full)(idx)
        from_merged = load_model(merged, wkv_backend="reference")(idx)
        base = load_model(tiny_world[0], wkv_backend="reference")(idx)
    tol = 1e-5 * adapted.abs().max()  # two fp32 forwards of one network
    assert (adapted - base).abs().max() > 10 * tol, "training did not move the model: the checks have no teeth"
    assert (adapted - from_merged).abs().max() <= tol

    method = json.loads((full / "adapter.json").read_text())["method"]
    rc, err = _cli(capsys, "export", "--adapter", full, "--format", "rwkv-peft", "--out", tmp_path / "export.pth")
    if method["kind"] in EXPORTS and not method.get("use_dora"):
        assert rc == 0, err
    else:  # refused in one line that says what to do instead
        assert rc == 2 and err.count("\n") == 1 and "merge it into the base instead" in err, err


def _refused(capsys, tiny_world, tmp_path, keys: dict, needle: str) -> None:
    out = tmp_path / "refused"
    rc, err = _cli(capsys, "train", LORA, *tiny_overrides(tiny_world, out, **keys))
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not (out / "adapter.safetensors").exists() and not (out / "log.jsonl").exists()


@pytest.mark.parametrize("objective, keys, needle", [
    # was: accepted and ignored (GRPO scores whole rows; the memory bound train.chunk_len promises did not hold)
    ("grpo", {"train.chunk_len": 8}, "train.chunk_len 8: grpo scores each prompt + completion"),
    ("dpo", {"data.sampling": "get"}, "data.sampling: get does not apply to preference pairs"),
    ("sft", {"data.group_by_length": "true"}, "data.group_by_length"),
    ("sft", {"data.sampling": "get", "data.group_by_length": "true"}, "data.group_by_length"),
    ("grpo", {"data.group_by_length": "true"}, "data.group_by_length"),
    ("sft", {"train.objective": "dpo"}, "train.objective: dpo trains on preference pairs"),
    ("dpo", {"train.objective": "sft"}, "data.kind: preference data need train.objective dpo, orpo or simpo"),
    ("dpo", {"train.chunk_len": 7}, "train.chunk_len 7 must divide data.ctx_len 48"),
    ("sft", {"method.kind": "full", "method.quant": "nf4"}, "method.quant: a quantized base cannot be trained in full"),
    ("sft", {"method.kind": "disha", "train.lora_plus_ratio": 16}, "train.lora_plus_ratio: method.kind disha has no"),
    ("dpo", {"method.kind": "state", "train.deepspeed.stage": 3}, "train.deepspeed.stage"),
    ("grpo", {"train.grpo.max_new_tokens": 40}, "train.grpo.max_new_tokens 40 leaves no room"),
    ("orpo", {"train.gamma": 2.0}, "train.gamma"),
    ("sft", {"train.grpo.num_generations": 4}, "train.grpo is read by objective grpo only"),
    ("sft", {"method.kind": "full", "method.use_rslora": "true"}, "method.use_rslora"),
])
def test_a_combination_that_cannot_work_is_refused_before_training(objective, keys, needle, tiny_world, combo_data,
                                                                    tmp_path, capsys):
    _refused(capsys, tiny_world, tmp_path, {**combo_data[objective], **keys}, needle)
