"""`eval` and `generate` take every adapter form `merge` takes, RWKV-PEFT files with --lora-alpha included."""

from __future__ import annotations

import json

import torch

from peft_rwkv7.adapters import MethodConfig, attach, export_rwkv_peft, merge, save_adapter
from peft_rwkv7.cli import main
from peft_rwkv7.data import load_tokenizer
from tests.fp_oracle import logits64, loss_rounding


def test_eval_of_an_rwkv_peft_export_equals_the_run(base_path, load_base, train, tmp_path, capsys):
    torch.manual_seed(0)  # LoRA's A starts random: without a seed, how far training moves the loss (the
    # margin asserted below) would depend on which tests ran before in the process
    adapted = attach(load_base(), MethodConfig(kind="lora", r=8, alpha=16, state=True))
    train(adapted)
    save_adapter(adapted, tmp_path / "run", base_path=str(base_path))
    export_rwkv_peft(tmp_path / "run", tmp_path / "x.pth")
    data = tmp_path / "d.jsonl"
    # control characters are single-byte tokens (ids 2..32), inside the tiny model's 128-token vocabulary
    texts = ["".join(chr(c) for c in range(11, 32, step)) for step in (1, 2, 3)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = ["eval", "--model", str(base_path), "--data", str(data), "--json", "--tokenizer", "world",
              "--device", "cpu", "--dtype", "fp32"]

    def run(*extra) -> dict:
        assert main([*common, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    want = run("--adapter", str(tmp_path / "run"))
    got = run("--adapter", str(tmp_path / "x.pth"), "--lora-alpha", "16")
    base = run()
    # The same weights both ways: two fp32 computations of one loss, each within its rounding bound.
    docs = [load_tokenizer("world").encode(t) for t in texts]
    max_logit = max(logits64(merge(adapted), torch.tensor([[0] + d[:-1]])).abs().max().item() for d in docs)
    tol = 2 * loss_rounding(adapted.config, max(map(len, docs)), max_logit, want["loss"], sum(map(len, docs)))
    assert abs(got["loss"] - want["loss"]) <= tol and abs(base["loss"] - want["loss"]) > tol
    wrong = run("--adapter", str(tmp_path / "x.pth"), "--lora-alpha", "64")  # the alpha matters
    assert abs(wrong["loss"] - want["loss"]) > tol
    assert main(["generate", "--model", str(base_path), "--adapter", str(tmp_path / "x.pth"), "--lora-alpha", "16",
                 "--prompt", "\x01\x02", "--max-tokens", "3", "--temperature", "0", "--device", "cpu"]) == 0
