"""Fold one projection's peft adapter (DoRA, LoHa, LoKr, OFT, BOFT, IA3, VeRA, AdaLoRA) into its weight with
peft's own merge: a float Linear holding the weight (fp32) gets the same peft layer the training model had,
the saved tensors are copied in, and peft's `merge()` writes W' (DoRA's magnitude-normalised W + s B A,
OFT's rotated W, IA3's scaled W, ...). The in-memory merge (lifecycle.merge) and the file merge
(pth_merge) both call it, so a tuner's merge formula lives in peft only.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Adapter tensors in a file: `blocks.N.<att|ffn>.<projection>.<leaf>` or `head.<leaf>` (not the base weight).
ADAPTER_KEY = re.compile(r"(blocks\.\d+\.(?:att\.(?:receptance|key|value|output)|ffn\.(?:key|value))|head)\.(\w+)")


def adapter_module(key: str) -> str | None:
    """The projection module a file key adapts (None for base tensors and everything else)."""
    m = ADAPTER_KEY.fullmatch(key)
    return m[1] if m and m[2] != "weight" else None


def _holder(proj: str, weight: torch.Tensor) -> nn.Module:
    """A module tree in which the Linear holding `weight` sits at path `proj` (e.g. ffn.value), so the
    recipe's target names match it exactly as they match the model's."""
    root = nn.Module()
    parent, _, leaf = proj.rpartition(".")
    node = root
    for part in filter(None, parent.split(".")):
        child = nn.Module()
        node.add_module(part, child)
        node = child
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
    node.add_module(leaf, lin)
    return root


@torch.no_grad()
def merged_peft_weight(method, proj: str, weight: torch.Tensor, leaves: dict[str, torch.Tensor],
                       shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """W' [out, in] fp32 of projection `proj` (e.g. "att.key") after peft merges the adapter whose tensors
    are `leaves` (canonical leaf names: lora_A, hada_w1_a, oft_R, ...) into `weight`. shared: VeRA's
    vera_A/vera_B."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .kinds import boft_in_torch, peft_config
    from .methods import canonical_name, is_adapter_leaf

    root = _holder(proj, weight)
    if method.kind in ("lora", "pissa"):
        pc = peft.LoraConfig(r=method.r, lora_alpha=method.alpha, use_dora=method.use_dora,
                             use_rslora=method.use_rslora, target_modules=[proj])
    else:
        pc = peft_config(method, [proj])
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[pc.peft_type](root, pc, adapter_name="default")
    boft_in_torch(root)
    for k, t in (shared or {}).items():
        getattr(tuner, k)["default"] = t.float().clone()
    layer = root.get_submodule(proj)
    assert isinstance(layer, BaseTunerLayer)
    for name, p in layer.named_parameters():
        if not is_adapter_leaf(name):
            continue
        leaf = canonical_name(name)
        if leaf not in leaves:
            raise KeyError(f"adapter has no {leaf} for {proj}")
        p.data = leaves[leaf].float().reshape(p.shape).clone()
    layer.merge(adapter_names=["default"])
    return layer.get_base_layer().weight.detach().float()
