"""`precision: auto` on a CPU whose bf16 products are really slow, measured, not injected (issue 23's trap: an
AVX2-only CPU runs torch's bf16 products on a scalar path, 0.01-0.2x fp32's speed).

This project's machines change from session to session; most have native bf16. oneDNN's own instruction cap
(ONEDNN_MAX_CPU_ISA=AVX2, set for a child process only) gives any x86 CPU the AVX2-only CPU's bf16 products:
on an AVX512-BF16 EPYC, F.linear ~40 and g @ W ~2.6 GFLOP/s in bf16 against ~195 in fp32 (issue 23, round 28).
Under it the real check must answer "slow", auto must train in fp32, forced bf16 must warn, and a verdict cached
without the cap (where bf16 may well be fast) must not be read under it: the cap is part of the cache key."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_rwkv7.ops import precision
from tests.train.conftest import tiny_overrides, tiny_world  # noqa: F401 (tiny_world: a fixture)

ROOT = Path(__file__).resolve().parents[2]

# A child process: the checks' cache in argv[1] (never the user's), then the runs in argv[2] (a JSON list of
# [recipe, overrides]) one after another; exits with the first non-zero status.
CHILD = """
import json, sys
from pathlib import Path
from peft_rwkv7.ops import precision
precision.default_cache_dir = lambda: Path(sys.argv[1])
from peft_rwkv7.train.runner import train_from_cli
for i, (recipe, over) in enumerate(json.loads(sys.argv[2])):
    print(f"=== run {i}", file=sys.stderr, flush=True)
    rc = train_from_cli(recipe, over)
    if rc:
        sys.exit(rc)
"""


# the settings the libraries document for capping their instructions: oneDNN's (and its former name DNNL's) cap
# and hints, MKL's, and torch's own kernels' (its CPU capability is in the key anyway)
@pytest.mark.parametrize("var", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_CPU_ISA_HINTS", "DNNL_CPU_ISA_HINTS",
                                 "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "ATEN_CPU_CAPABILITY"])
def test_a_library_isa_cap_is_part_of_the_cache_key(tmp_path, monkeypatch, var):
    for name in precision.LIBRARY_ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    taken = []

    def measure():
        taken.append(1)
        return {"fast": True, "ratio": 3.0, "seconds": 0.5, "gflops": {"op": {"fp32": 60.0, "bf16": 180.0}}}

    uncapped = precision.cache_file(tmp_path, precision.machine_fields())
    assert not precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure).cached
    monkeypatch.setenv(var, "AVX2")
    assert precision.cache_file(tmp_path, precision.machine_fields()) != uncapped
    assert not precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure).cached  # not the uncapped verdict
    monkeypatch.setenv(var, "AVX512_CORE")
    assert not precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure).cached  # nor another cap's
    monkeypatch.setenv(var, "")  # set but empty: the library's default, as if unset
    assert precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure).cached
    assert len(taken) == 3


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available(),
                    reason="oneDNN's AVX2 cap needs an x86 CPU and torch built with oneDNN")
def test_auto_trains_in_fp32_where_bf16_products_are_measured_slow(tiny_world, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    # This process's real verdict, cached first: on a CPU with native bf16 it says fast, and the child must not
    # take it for its own.
    here = precision.cpu_bf16_check(cache_dir=cache)
    runs = [[str(ROOT / "recipes/state_tune.yaml"),
             tiny_overrides(tiny_world, tmp_path / name, steps=1, **{"train.device": "cpu", "train.precision": prec})]
            for name, prec in (("auto", "auto"), ("forced", "bf16"))]
    env = {k: v for k, v in os.environ.items() if k not in precision.LIBRARY_ISA_CAPS}
    env.update(ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", CHILD, str(cache), json.dumps(runs)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    auto, forced = err.split("=== run 1")
    chose = [line for line in auto.splitlines() if "train.precision: auto chose" in line]
    assert len(chose) == 1, auto[-3000:]
    assert chose[0].startswith("train.precision: auto chose fp32: bf16 matmuls run at ") and "measured now" in chose[0]
    ratio = float(chose[0].split("run at ")[1].split("x fp32")[0])
    assert ratio < precision.FAST_MARGIN
    warned = [line for line in forced.splitlines() if "bf16 matmuls run at" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: train.precision: bf16: bf16 matmuls run at"), forced
    assert "(cached measurement)" in warned[0]  # the child's own verdict, from its first run
    # two verdicts side by side in the cache: this process's and the capped child's
    assert len(list(cache.glob("bf16-check-*.json"))) == 2, (here, list(cache.iterdir()))
