"""Commands import what their job uses: peft pulls in transformers (~5 s on a 2-core machine, before the first
step of every command), so state tuning, the README's main job, must never import it (nor transformers,
bitsandbytes or deepspeed). LoRA and the other peft methods import peft where they attach (their own tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("peft", "transformers", "bitsandbytes", "deepspeed")

SCRIPT = """
import sys
from peft_rwkv7.cli import main
code = main(["train", "recipes/state_tune.yaml", "out_dir=" + sys.argv[1], "train.max_steps=2",
             "train.save_every=2", "train.micro_bsz=1", "data.ctx_len=16", "data.eval_path=null"])
print("rc", code)
print("loaded", *[m for m in sys.argv[2:] if m in sys.modules])
"""


def test_state_tuning_imports_no_peft_transformers_bitsandbytes_or_deepspeed(tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run"), *HEAVY], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and "rc 0" in lines, res.stderr[-2000:]
    assert any((tmp_path / "run").iterdir())  # it trained and saved
    assert lines[-1] == "loaded", f"state tuning imported {lines[-1].split()[1:]}"
