"""Preference tuning against independent code: per-sequence log-probs from the `rwkv` pip package's RWKV-7
on texts tokenized by its own trie, and the papers' formulas evaluated on them in float64.

- DPO at step 0: the policy is its reference (the adapter off / the base's state / a frozen copy), so the
  loss is ln 2 for every method and every reward margin is exactly 0.
- ORPO and SimPO at step 0: the loss the run logs equals the formula on the independent log-probs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from peft_rwkv7.train.loop import train
from peft_rwkv7.train.recipe import load_recipe
from tests.fp_oracle import LOGGED, gamma, logp_rounding
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [
    {"prompt": "Write the ship's log for day 3.", "chosen": "Ship's log, day 3. Wind: north, 12 knots.",
     "rejected": "The wind blew from the north."},
    {"prompt": "Log today's watch, day 41.", "chosen": "Ship's log, day 41. Sea: calm. We sighted land.",
     "rejected": "day 41 - calm"},
    {"prompt": "Keep the log.", "chosen": "Ship's log, day 7. Sky: fog. Position: 40 N, 3 W.",
     "rejected": "In the morning the quiet garden was green, and the teacher opened the book."},
    {"prompt": "What goes in the log for day 9?", "chosen": "Ship's log, day 9. Anna and Tomas tarred the ropes.",
     "rejected": "Nothing much."},
]


def pairs_file(tmp_path: Path, pairs=PAIRS) -> Path:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def pref_overrides(tiny_world, tmp_path, out, objective="dpo", steps=1, **extra) -> list[str]:
    data = pairs_file(tmp_path)
    base = {"data.path": data, "data.eval_path": data, "data.kind": "preference", "data.ctx_len": 48,
            "train.objective": objective, "train.micro_bsz": len(PAIRS), "train.warmup_steps": 0,
            "train.schedule": "constant", "train.device": "cpu"}
    return tiny_overrides(tiny_world, out, steps=steps, **{**base, **extra})


@pytest.fixture(scope="module")
def oracle(tiny_world):
    """Per pair: (log pi(y_w|x), log pi(y_l|x), |y_w|, |y_l|) from the `rwkv` package on [0] + prompt +
    response + end-of-text, the prompt and response tokenized by the package's trie in World chat form."""
    rwkv = pytest.importorskip("rwkv")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from tests.adapters.conftest import rwkv_package

    trie = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    model = rwkv_package(tiny_world[0])
    out = []
    for p in PAIRS:
        prompt = trie.encode(f"User: {p['prompt']}\n\nAssistant:")
        row = []
        for side in ("chosen", "rejected"):
            response = trie.encode(f" {p[side]}\n\n") + [0]
            seq = [0] + prompt + response
            logits, _ = model.forward(seq[:-1], None, full_output=True)
            logp = torch.log_softmax(logits.double(), dim=-1)
            targets = torch.tensor(seq[1:])
            picked = logp[torch.arange(len(targets)), targets]
            row.append((picked[len(prompt):].sum().item(), len(response)))
        out.append((row[0][0], row[1][0], row[0][1], row[1][1]))
    return out


def test_sequence_logps_equal_the_rwkv_package(tiny_world, tmp_path, oracle):
    from peft_rwkv7.data import load_tokenizer, make_dataset
    from peft_rwkv7.model import load_model
    from peft_rwkv7.train.losses import sequence_logps

    recipe = load_recipe(str(ROOT / "recipes/dpo.yaml"), pref_overrides(tiny_world, tmp_path, tmp_path / "x"))
    data = make_dataset(recipe.data, load_tokenizer("world"), seed=0, cache_dir=tmp_path / "cache", progress=False)
    idx, labels = data.pairs_batch(list(range(len(PAIRS))))
    model = load_model(tiny_world[0], dtype=torch.float32)
    with torch.no_grad():
        logps, tokens = sequence_logps(model, idx, labels)
        max_logit = model(idx).abs().max().item()
    B, T = len(PAIRS), idx.shape[1]
    # Ours and the package's: two fp32 forwards (the package's log-softmax in fp64, ours fp32): twice the
    # per-sequence bound. Chunked against whole: the same.
    tol = [2 * logp_rounding(model.config, T, max_logit, int(n)) for n in tokens]
    for i, (w, l, nw, nl) in enumerate(oracle):
        assert abs(logps[i].item() - w) <= tol[i] and abs(logps[B + i].item() - l) <= tol[B + i], (i, logps, oracle)
        assert (tokens[i].item(), tokens[B + i].item()) == (nw, nl)
    # chunked (infctx-style) evaluation carries the state across chunks and gives the same numbers
    with torch.no_grad():
        chunked, _ = sequence_logps(model, idx, labels, chunk_len=8)
    assert ((chunked - logps).abs() <= torch.tensor(tol)).all()


def oracle_tol(tiny_world, oracle) -> list[float]:
    """Per pair (chosen, rejected, chosen, ...): how far our fp32 log-prob and the package's can be apart."""
    from peft_rwkv7.data import load_tokenizer
    from peft_rwkv7.model import load_model

    model, world = load_model(tiny_world[0], dtype=torch.float32), load_tokenizer("world")
    seqs = [[0, *world.encode(f"User: {p['prompt']}\n\nAssistant: {p[side]}\n\n")] for p in PAIRS
            for side in ("chosen", "rejected")]
    with torch.no_grad():  # the scale of the logits on these sequences
        max_logit = max(model(torch.tensor([s])).abs().max().item() for s in seqs)
    return [2 * logp_rounding(model.config, 48, max_logit, n) for o in oracle for n in o[2:]]


def first_step(recipe_name, overrides) -> tuple[dict, float]:
    summary = train(load_recipe(str(ROOT / f"recipes/{recipe_name}.yaml"), overrides))
    record = json.loads((Path(summary["out_dir"]) / "log.jsonl").read_text().splitlines()[0])
    return record, summary["first_loss"]


@pytest.mark.parametrize("method", ["lora", "state", "pissa", "disha", "full", "lora+ffn"])
def test_dpo_step0_is_ln2_and_logs_the_oracle_logps(tiny_world, tmp_path, oracle, method):
    extra = {"method.kind": method.split("+")[0], "train.nll_weight": 0.0}
    if method == "lora+ffn":  # train_parts have no "off": the reference is a frozen copy, as for full
        extra["method.train_parts"] = "[ffn]"
    record, loss = first_step("dpo", pref_overrides(tiny_world, tmp_path, tmp_path / method, **extra))
    n, tol = len(oracle), oracle_tol(tiny_world, oracle)
    if method == "full":
        # The policy's head is trained, so its log-probs take the fused loss's chunked path (the head's gradient
        # needs each chunk's softmax) and the frozen copy's the online one: two fp32 computations of the same
        # log-probs, each within tol of the other, so each pair's margin within beta (tol_w + tol_l) of 0, and
        # the loss -log sigmoid(margin) within half that of ln 2.
        beta = load_recipe(str(ROOT / "recipes/dpo.yaml")).train.beta
        margin_tol = beta * max(w + l for w, l in zip(tol[::2], tol[1::2]))
        assert abs(loss - math.log(2)) <= margin_tol / 2 + gamma(2) * math.log(2), loss
        assert abs(record["reward_margin"]) <= margin_tol + LOGGED
    else:  # one network, one path on both sides: the margin exactly 0, the loss ln 2 rounded <= twice
        assert abs(loss - math.log(2)) <= gamma(2) * math.log(2), loss
        assert record["reward_margin"] == 0.0 and record["reward_acc"] == 0.5
    assert abs(record["chosen_logp"] - sum(o[0] for o in oracle) / n) <= max(tol) + LOGGED
    assert abs(record["rejected_logp"] - sum(o[1] for o in oracle) / n) <= max(tol) + LOGGED


def test_orpo_and_simpo_step0_losses_are_the_formulas_on_the_oracle_logps(tiny_world, tmp_path, oracle):
    sig = lambda x: 1 / (1 + math.exp(-x))
    lam, beta, margin = 0.3, 2.5, 0.4

    def odds(a):
        return a - math.log(-math.expm1(a))

    n = len(oracle)
    want_orpo = sum(-w / nw - lam * math.log(sig(odds(w / nw) - odds(l / nl))) for w, l, nw, nl in oracle) / n
    want_simpo = sum(-math.log(sig(beta * w / nw - beta * l / nl - margin)) for w, l, nw, nl in oracle) / n
    # The log-probs' bounds through each formula's derivatives (log sigmoid is 1-Lipschitz; d odds(a)/da =
    # 1 / (1 - e^a)), averaged over the pairs; plus fp64 (objectives) and fp32 (the loss) roundings.
    tol = oracle_tol(tiny_world, oracle)
    err_orpo = sum(dw / nw + lam * (dw / nw / -math.expm1(w / nw) + dl / nl / -math.expm1(l / nl))
                   for (w, l, nw, nl), dw, dl in zip(oracle, tol[::2], tol[1::2])) / n
    err_simpo = sum(beta * (dw / nw + dl / nl) for (_, _, nw, nl), dw, dl in zip(oracle, tol[::2], tol[1::2])) / n
    _, got = first_step("orpo", pref_overrides(tiny_world, tmp_path, tmp_path / "orpo", "orpo",
                                               **{"train.lambda": lam}))
    assert abs(got - want_orpo) <= err_orpo + gamma(16) * abs(want_orpo), (got, want_orpo)
    _, got = first_step("orpo", pref_overrides(tiny_world, tmp_path, tmp_path / "simpo", "simpo", **{
        "train.beta": beta, "train.gamma": margin, "train.lambda": 0.1}))  # back to its default: SimPO has none
    assert abs(got - want_simpo) <= err_simpo + gamma(16) * abs(want_simpo), (got, want_simpo)
