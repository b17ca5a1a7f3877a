"""`rwkv-peft export --format st|hf|runner-state` and `rwkv-peft convert`, through the CLI.

web-rwkv's LoRA blend (`src/runtime/loader.rs`, `load_matrix_f16`) adds
`(alpha / rank) * lora.1 @ lora.0^T` to `{name}.weight`, reading `{name}.lora.0` / `{name}.lora.1`
and rank = `lora.0`'s second dimension; RWKV-Runner (`backend-python/utils/rwkv.py`,
`load_rwkv_state`) takes a `.pth` state only when it has one tensor per layer and the first one's
`shape[0] * shape[1]` equals n_embd, and uses RWKV-7 states as stored (no transpose).
"""

from __future__ import annotations

import safetensors
import safetensors.torch
import torch

from peft_rwkv7.adapters import MethodConfig, attach, merge, save_adapter, trainable_parameters
from peft_rwkv7.adapters.disha import bone_delta
from peft_rwkv7.adapters.files import read_adapter
from peft_rwkv7.adapters.pth_merge import merged_state_dict
from peft_rwkv7.cli import main
from peft_rwkv7.model import load_model, read_state_dict
from tests.fp_oracle import U16, forward_rounding, gamma, stored_rounding

X = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def _run(load_base, train, tmp_path, base_path, name, **method):
    adapted = attach(load_base(), MethodConfig(**method))
    train(adapted)
    save_adapter(adapted, tmp_path / name, base_path=str(base_path))
    return adapted


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def fp16_bounds(model, want: torch.Tensor) -> tuple[float, torch.Tensor, float]:
    """(two fp32 forwards' bound on max |logit difference|; proj, bound on the projection of the logit
    difference after storing every weight in fp16): the fp16 roundings (2^-11 relative) to first order
    through the weights' gradients, plus two fp32 forwards weighted by the projection."""
    fp32 = 2 * forward_rounding(model.config, X.shape[1]) * want.abs().max().item()
    proj, bound = stored_rounding(model, X, U16)
    return fp32, proj, bound + fp32 * proj.abs().sum().item()


def test_merged_lora_and_state_export_to_hf_and_st(base_path, load_base, train, tmp_path, capsys):
    adapted = _run(load_base, train, tmp_path, base_path, "run", kind="lora", r=4, alpha=8, state=True)
    with torch.no_grad():
        want = merge(adapted)(X)
    rc, out, err = _cli(capsys, "export", "--base", base_path, "--adapter", tmp_path / "run", "--format", "hf",
                        "--out", tmp_path / "hf", "--dtype", "fp32")
    assert rc == 0 and "HF fla-hub layout, fp32" in out and "state.pth" in out, err
    rc, out, err = _cli(capsys, "export", "--model", base_path, "--adapter", tmp_path / "run", "--format", "st",
                        "--out", tmp_path / "m.st")
    assert rc == 0 and "web-rwkv/Ai00 .st, fp16" in out, err
    with torch.no_grad():
        hf_err = (load_model(tmp_path / "hf")(X) - want).abs().max().item()
        st = load_model(tmp_path / "m.st")(X)
    assert hf_err <= fp16_bounds(merge(adapted), want)[0]  # the same fp32 weights: two fp32 forwards
    proj, st_bound = fp16_bounds(merge(adapted), want)[1:]
    assert ((st.double() - want.double()) * proj).sum().abs().item() <= st_bound
    rc, out, _ = _cli(capsys, "inspect", tmp_path / "m.st")
    assert rc == 0 and "format: web-rwkv/Ai00 safetensors .st" in out and "tuned initial state" in out
    rc, out, _ = _cli(capsys, "inspect", tmp_path / "hf")
    assert rc == 0 and "format: Hugging Face directory (fla-hub layout)" in out


def test_lora_st_is_what_web_rwkv_blends(base_path, load_base, train, tmp_path, capsys):
    _run(load_base, train, tmp_path, base_path, "run", kind="lora", r=4, alpha=8, state=True,
         target_modules=["att.key", "ffn.value"])
    rc, out, err = _cli(capsys, "export", "--adapter", tmp_path / "run", "--format", "st", "--out", tmp_path / "l.st")
    assert rc == 0 and "load it with alpha 8" in out and "l-state.st" in out, err
    with safetensors.safe_open(str(tmp_path / "l.st"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        lora = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(lora) == {f"blocks.{i}.{p}.lora.{j}" for i in (0, 1) for p in ("att.key", "ffn.value") for j in (0, 1)}
    assert lora["blocks.1.ffn.value.lora.0"].shape == (256, 4) and lora["blocks.1.ffn.value.lora.1"].shape == (64, 4)
    assert all(t.dtype == torch.float16 for t in lora.values())
    base = read_state_dict(base_path)
    merged, _ = merged_state_dict(base, read_adapter(tmp_path / "run"))
    tensors = read_adapter(tmp_path / "run").tensors
    for name in ("blocks.0.att.key", "blocks.1.ffn.value"):  # web-rwkv: W + alpha / rank * lora.1 @ lora.0^T
        x, y = lora[name + ".lora.0"].float(), lora[name + ".lora.1"].float()
        blended = base[name + ".weight"] + 8 / x.shape[1] * y @ x.t()
        # fp16 factors (each <= 2^-11 relative off) and two fp32 blends (r-term products + an add each)
        terms = 8 / x.shape[1] * tensors[name + ".lora_B"].abs() @ tensors[name + ".lora_A"].abs()
        bound = (2 * U16 + U16**2) * terms + 2 * gamma(x.shape[1] + 2) * (base[name + ".weight"].abs() + terms)
        assert ((blended - merged[name + ".weight"]).abs() <= bound * (1 + 2 * U16)).all()
    state = safetensors.torch.load_file(str(tmp_path / "l-state.st"))
    ts = torch.load(tmp_path / "run" / "state.pth", weights_only=True)
    assert set(state) == set(ts)
    assert torch.equal(state["blocks.1.att.time_state"], ts["blocks.1.att.time_state"].half().transpose(1, 2))


def test_bone_exports_as_an_exact_rank_r_lora(base_path, load_base, train, tmp_path, capsys):
    _run(load_base, train, tmp_path, base_path, "bone", kind="disha", r=8, target_modules=["ffn.value"])
    rc, out, err = _cli(capsys, "export", "--adapter", tmp_path / "bone", "--format", "st", "--out", tmp_path / "b.st")
    assert rc == 0 and "alpha 8" in out, err
    lora = safetensors.torch.load_file(str(tmp_path / "b.st"))
    d = read_adapter(tmp_path / "bone").tensors["blocks.0.ffn.value.disha"]
    x, y = lora["blocks.0.ffn.value.lora.0"].float(), lora["blocks.0.ffn.value.lora.1"].float()
    assert x.shape == (256, 8) and torch.equal(8 / 8 * y @ x.t(), bone_delta(d.half().float(), 256))
    _run(load_base, train, tmp_path, base_path, "bat", kind="disha", disha_mode="bat", r=8, target_modules=["att.key"])
    rc, _, err = _cli(capsys, "export", "--adapter", tmp_path / "bat", "--format", "st", "--out", tmp_path / "x.st")
    assert rc == 2 and "Bat update depends on the base weight" in err and err.count("\n") == 1


def test_runner_state_has_one_time_state_per_layer(base_path, load_base, train, tmp_path, capsys):
    adapted = _run(load_base, train, tmp_path, base_path, "state", kind="state")
    rc, out, err = _cli(capsys, "export", "--adapter", tmp_path / "state", "--format", "runner-state",
                        "--out", tmp_path / "s.pth")
    assert rc == 0 and "2 layers x time_state [4, 16, 16] fp32" in out, err
    sd = torch.load(tmp_path / "s.pth", weights_only=True)
    assert list(sd) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    shape = next(iter(sd.values())).shape
    assert len(sd) == 2 and shape[0] * shape[1] == 64 and all(t.dtype == torch.float32 for t in sd.values())
    trained = dict(trainable_parameters(adapted))["blocks.1.att.time_state"].detach()
    assert torch.equal(sd["blocks.1.att.time_state"], trained)  # value-major, as trained
    # the same file from a merged model that carries the state
    rc, _, err = _cli(capsys, "merge", "--base", base_path, "--adapter", tmp_path / "state",
                      "--out", tmp_path / "m.pth", "--dtype", "fp32")
    assert rc == 0, err
    rc, _, err = _cli(capsys, "export", "--model", tmp_path / "m.pth", "--format", "runner-state",
                      "--out", tmp_path / "s2.pth")
    assert rc == 0 and all(torch.equal(a, b) for a, b in zip(sd.values(), torch.load(tmp_path / "s2.pth").values()))
    for args, msg in (((tmp_path / "s.st",), "RWKV-Runner loads state files ending in .pth"),
                      ((tmp_path / "x.pth", "--model", base_path), "has no blocks.N.att.time_state")):
        rc, _, err = _cli(capsys, "export", "--format", "runner-state", "--out", *args)
        assert rc == 2 and msg in err and err.count("\n") == 1


def test_convert_between_all_formats_through_the_cli(base_path, load_base, tmp_path, capsys):
    with torch.no_grad():
        want = load_base()(X)
    a, hf, b = tmp_path / "a.st", tmp_path / "hf", tmp_path / "b.pth"
    for src, dst in ((base_path, a), (a, hf), (hf, b)):
        rc, out, err = _cli(capsys, "convert", src, dst)
        assert rc == 0 and out.startswith("converted "), err
    back = read_state_dict(tmp_path / "b.pth")
    assert back["emb.weight"].dtype == torch.float16  # the .st's dtype is kept unless --dtype says otherwise
    with torch.no_grad():
        got = load_model(tmp_path / "b.pth")(X)
    proj, bound = fp16_bounds(load_base(), want)[1:]  # every weight stored in fp16 on the way
    assert ((got.double() - want.double()) * proj).sum().abs().item() <= bound
    rc, _, err = _cli(capsys, "convert", base_path, tmp_path / "c.bin", "--format", "st", "--dtype", "bf16")
    assert rc == 2 and "fp16 only" in err
    # an existing adapter path (paths are checked first), but no base to merge it into
    rc, _, err = _cli(capsys, "export", "--adapter", tmp_path / "b.pth", "--format", "hf", "--out", tmp_path / "o")
    assert rc == 2 and "needs --model BASE" in err and err.count("\n") == 1
