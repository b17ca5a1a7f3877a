"""`eval` on sft / chat / ShareGPT data scores exactly the tokens training takes loss on, as training does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_rwkv7.data import DataConfig, load_eval_docs, make_dataset
from peft_rwkv7.errors import UserError
from peft_rwkv7.infer.evaluate import evaluate, load_eval_data
from peft_rwkv7.train.loop import sequence_loss_sum
from tests.conftest import make_model
from tests.fp_oracle import forward_rounding, fp64_nll_rounding, loss_rounding


def max_logit(model, docs: list[list[int]]) -> float:
    with torch.no_grad():
        return max(model(torch.tensor([[0, *d[:-1]]])).abs().max().item() for d in docs if d)

ROOT = Path(__file__).resolve().parents[2]
CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Wind?"},
                  {"role": "assistant", "content": "North, 20 knots."}, {"role": "user", "content": "Sea?"},
                  {"role": "assistant", "content": "Heavy swell."}]},
    {"conversations": [{"from": "human", "value": "Position?"}, {"from": "gpt", "value": "43 N, 8 W."},
                       {"from": "human", "value": "Thanks"}]},  # ends with the user: no end-of-text scored
]
SFT = [{"instruction": "Log the weather.", "input": "day 12", "output": "Wind: east, 24 knots."},
       {"instruction": "Who cooked?", "output": "Mara."}]


@pytest.fixture(scope="module")
def model():
    return make_model(seed=11, n_embd=64, vocab_size=65536).eval()


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def training_loss(model, path: Path, world, tmp_path: Path, **cfg) -> tuple[float, int]:
    """Summed loss and loss tokens of every training sample (pad sampling: one document each)."""
    total, count = 0.0, 0
    for i, rec in enumerate(json.loads(x) for x in path.read_text().splitlines()):
        one = write(tmp_path / f"one{i}.jsonl", [rec])
        ds = make_dataset(DataConfig(path=str(one), ctx_len=128, **cfg), world, seed=0, cache_dir=tmp_path / "cache",
                          workers=1, progress=False)
        x, y = ds.sample(0)
        with torch.no_grad():
            total += float(sequence_loss_sum(model, x[None], y[None]))
        count += int((y != -100).sum())
    return total, count


@pytest.mark.parametrize("records,cfg", [(CHAT, {}), (SFT, {"kind": "sft"}), (SFT[:1], {"system": "Sys"})])
def test_eval_scores_what_training_trains(tmp_path, world, model, records, cfg):
    path = write(tmp_path / "d.jsonl", records)
    # the ShareGPT record is read as chat whatever the first record is
    data = load_eval_data(path, world, kind=cfg.get("kind", "auto"), system=cfg.get("system"))
    assert data.kind == ("chat" if records is CHAT else "sft") and data.masks is not None
    got = evaluate(model, data.docs, masks=data.masks, batch_size=2, chunk_len=8)
    total, count = training_loss(model, path, world, tmp_path, **cfg)
    assert got["tokens"] == count
    # two fp32 forwards (chunks of 8 in batches of 2; whole samples) and an fp32 cross-entropy
    tol = 2 * loss_rounding(model.config, 128, max_logit(model, data.docs), total / count, count)
    assert got["loss"] == pytest.approx(total / count, abs=tol)


def test_reply_tokens_only(tmp_path, world):
    data = load_eval_data(write(tmp_path / "c.jsonl", CHAT), world)
    scored = [[t for t, m in zip(d, ms, strict=True) if m] for d, ms in zip(data.docs, data.masks, strict=True)]
    assert world.decode(scored[0]) == " North, 20 knots.\n\n Heavy swell.\n\n" and scored[0][-1] == 0
    assert world.decode(scored[1]) == " 43 N, 8 W.\n\n" and scored[1][-1] != 0


def test_text_data_is_scored_as_before(tmp_path, world, model):
    path = write(tmp_path / "t.jsonl", [{"text": "Ship's log, day 3."}, {"text": "Wind: north."}])
    data = load_eval_data(path, world, limit=1)
    assert data.kind == "text" and data.masks is None and data.docs == load_eval_docs(path, world)[:1]


def test_chat_without_replies_and_lambada_on_chat_are_user_errors(tmp_path, world, model):
    data = load_eval_data(write(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]), world)
    with pytest.raises(UserError, match="no tokens to score .no document has a response or assistant reply"):
        evaluate(model, data.docs, masks=data.masks)
    with pytest.raises(UserError, match="--lambada"):
        evaluate(model, data.docs, masks=data.masks, lambada=True, tokenizer=world)
    with pytest.raises(UserError, match=r"u2\.jsonl:1: messages\[0\]: role 'bot' is not one of"):
        load_eval_data(write(tmp_path / "u2.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}]), world)


def test_cli_eval_on_sharegpt(tmp_path, world, model):
    from peft_rwkv7.model import save_model

    save_model(model, tmp_path / "m.pth", dtype=torch.float32)
    path = write(tmp_path / "share.jsonl", CHAT[1:] * 3)
    cmd = [sys.executable, "-m", "peft_rwkv7.cli", "eval", "--model", str(tmp_path / "m.pth"), "--data", str(path),
           "--dtype", "fp32"]  # the fp32 bound below (--dtype auto is bf16 on a CPU measured fast at it)
    res = subprocess.run([*cmd, "--json", "--limit", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    data = load_eval_data(path, world, limit=2)
    want = evaluate(model, data.docs, masks=data.masks)
    got = json.loads(res.stdout)
    assert got["tokens"] == want["tokens"] == 2 * len(world.encode(" 43 N, 8 W.\n\n"))
    # another process (its own thread count, so its own BLAS blocking): two fp32 forwards, the NLL moving by
    # at most twice the logits' difference, plus the fp64 log-softmax
    M = max_logit(model, data.docs)
    tol = 2 * 2 * forward_rounding(model.config, max(map(len, data.docs))) * M + fp64_nll_rounding(65536, M)
    assert got["loss"] == pytest.approx(want["loss"], abs=tol)
    res = subprocess.run([*cmd, "--lambada"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--lambada" in res.stderr
