"""merge_into_pth's and export_rwkv_peft's refusals and summary lines (found by `scripts/mutation.sh pth_merge` run
on them, round 36): an output over an input refused through the API as on the CLI, the one-line errors word for
word, and the summary's parts kept together (the alpha to merge with, the quantized base's warning). Expectations:
the README's and the docstrings' words, and the alpha rule RWKV-PEFT merges by (alpha / rank)."""

from __future__ import annotations

import re

import pytest
import torch

from peft_rwkv7 import MethodConfig, attach, save_adapter
from peft_rwkv7.adapters.pth_merge import STATE_NOTE, export_rwkv_peft, merge_into_pth
from peft_rwkv7.errors import UserError
from peft_rwkv7.model import read_state_dict


def _files(d) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def test_merge_refuses_an_unknown_dtype_and_an_output_over_its_base(base_path, load_base, tmp_path):
    save_adapter(attach(load_base(), MethodConfig(kind="lora", r=4)), tmp_path / "run")
    with pytest.raises(UserError) as e:
        merge_into_pth(base_path, tmp_path / "run", tmp_path / "out.pth", dtype="bf15")
    assert str(e.value) == "--dtype: 'bf15' is not one of bf16, fp16, fp32"
    before = base_path.read_bytes()
    with pytest.raises(UserError) as e:
        merge_into_pth(base_path, tmp_path / "run", base_path)
    assert str(e.value) == (f"{base_path}: would write over --base {base_path}; write the output elsewhere "
                            "(nothing was written)")
    assert base_path.read_bytes() == before
    run_files = _files(tmp_path / "run")
    with pytest.raises(UserError) as e:  # nor over the adapter's own files
        merge_into_pth(base_path, tmp_path / "run", tmp_path / "run" / "adapter.safetensors")
    assert str(e.value).startswith(f"{tmp_path / 'run' / 'adapter.safetensors'}: would write over the run ")
    assert _files(tmp_path / "run") == run_files
    assert not (tmp_path / "out.pth").exists()


def test_export_refuses_an_output_over_the_runs_own_files(load_base, tmp_path):
    run = tmp_path / "run"
    save_adapter(attach(load_base(), MethodConfig(kind="lora", r=4)), run)
    before = _files(run)
    with pytest.raises(UserError) as e:
        export_rwkv_peft(run, run / "adapter.safetensors")
    assert str(e.value) == (f"{run / 'adapter.safetensors'}: would write over the run {run}'s own "
                            "adapter.safetensors; write the output elsewhere (nothing was written)")
    assert _files(run) == before


def test_export_refuses_what_rwkv_peft_cannot_hold_in_one_line(load_base, tmp_path):
    run = tmp_path / "run"
    save_adapter(attach(load_base(), MethodConfig(kind="state")), run)  # (a LoRA file would first want its alpha)
    export_rwkv_peft(run, tmp_path / "rwkv_peft.pth")
    with pytest.raises(UserError) as e:  # an RWKV-PEFT file is not a run directory
        export_rwkv_peft(tmp_path / "rwkv_peft.pth", tmp_path / "again.pth")
    assert str(e.value) == f"{tmp_path / 'rwkv_peft.pth'}: already an RWKV-PEFT file; export reads a run directory"
    head = tmp_path / "head"
    save_adapter(attach(load_base(), MethodConfig(kind="lora", r=4, target_modules=["att.receptance", "head"])), head)
    with pytest.raises(UserError) as e:
        export_rwkv_peft(head, tmp_path / "head.pth")
    assert str(e.value) == (f"{head}: RWKV-PEFT adapts no head; merge it into the base instead (rwkv-peft merge "
                            f"--base BASE --adapter {head} --out MERGED.pth)")
    assert not (tmp_path / "again.pth").exists() and not (tmp_path / "head.pth").exists()


def test_exports_summary_keeps_every_part(base_path, load_base, tmp_path):
    """The whole line: what was exported, the alpha RWKV-PEFT must merge with (its scale is alpha / rank, ours
    alpha / r: the same number at the saved rank), and for a quantized base the warning after it."""
    run = tmp_path / "q"
    save_adapter(attach(load_base(), MethodConfig(kind="lora", r=4, alpha=12, quant="nf4")), run,
                 base_path=str(base_path))
    out = tmp_path / "q.pth"
    line = export_rwkv_peft(run, out)
    assert line.startswith("exported lora r=4 alpha=12 (")
    assert line.endswith(f"to {out}; merge it with --lora-alpha 12; it was trained on a nf4-quantized base, which "
                         "this file does not record")


@pytest.mark.parametrize("method, described", [
    (dict(kind="lora", r=4, alpha=8), "lora r=4 alpha=8"),
    (dict(kind="lora", r=4, alpha=8, use_rslora=True), "rslora r=4 alpha=8"),
    (dict(kind="pissa", r=4, alpha=8), "pissa r=4 alpha=8"),
    (dict(kind="loha", r=4, alpha=8), "loha r=4 alpha=8"),
    (dict(kind="lokr", r=4, alpha=8), "lokr r=4 alpha=8"),
    (dict(kind="adalora", r=4, alpha=8), "adalora r=4 alpha=8"),
    (dict(kind="ia3"), "ia3"),
    (dict(kind="disha", disha_mode="bat", r=4, state=True, train_parts=["ln", "time"]),
     "bat r=4 + state + train_parts=ln,time"),
    (dict(kind="state"), "state"),
    (dict(kind="full"), "full"),
], ids=["lora", "rslora", "pissa", "loha", "lokr", "adalora", "ia3", "bat+state+ln,time", "state", "full"])
def test_merges_summary_names_the_method_its_rank_and_alpha(method, described, base_path, load_base, tmp_path):
    """What was merged, as `rwkv-peft methods` names it, with the rank, and the alpha where the method scales by one
    (the LoRA family); a trained state adds the note on where runtimes read it."""
    cfg = MethodConfig(**method)
    save_adapter(attach(load_base(), cfg), tmp_path / "run")
    out = tmp_path / "out.pth"
    line = merge_into_pth(base_path, tmp_path / "run", out, dtype="fp32")
    want = rf"merged {re.escape(described)} into {re.escape(str(out))} \(fp32, \d+ tensors changed\)"
    assert re.fullmatch(want + (re.escape(STATE_NOTE) if cfg.trains_state else ""), line), line


def test_a_bf16_merge_keeps_the_state_in_fp32_and_says_a_quantized_base_was_dequantized(base_path, load_base,
                                                                                        tmp_path):
    save_adapter(attach(load_base(), MethodConfig(kind="state")), tmp_path / "state")
    merge_into_pth(base_path, tmp_path / "state", tmp_path / "s.pth", dtype="bf16")
    merged = read_state_dict(tmp_path / "s.pth")
    assert {merged[k].dtype for k in merged if k.endswith(".att.time_state")} == {torch.float32}
    assert {merged[k].dtype for k in merged if not k.endswith(".att.time_state")} == {torch.bfloat16}
    save_adapter(attach(load_base(), MethodConfig(kind="lora", r=4, quant="nf4")), tmp_path / "q",
                 base_path=str(base_path))
    line = merge_into_pth(base_path, tmp_path / "q", tmp_path / "q.pth")
    assert line.startswith("merged lora r=4 alpha=32 into ")
    assert line.endswith("tensors changed); base was nf4-quantized in training, so the merged weights are the "
                         "dequantized base + delta (what was trained)")
