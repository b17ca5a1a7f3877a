"""lm-eval and `rwkv-peft eval --lambada` on a model whose greedy answer is known, with no ../shared/data:
the demo model with one head row set so that after "Wind:" it always says " north". On ship-log
documents that end "Wind: <direction>" its LAMBADA accuracy is exactly the share of "north" documents
(strictly between 0 and 1), and both paths must give that number and the same perplexity. README.md's
lm-eval command runs as written (no --device) where CUDA is absent: the CPU, with one line saying so."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from peft_rwkv7.integrations.lm_eval import RWKVPeftLM  # noqa: E402
from tests.integrations.lmeval_tasks import LAMBADA_TASKS, write_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data/demo/rwkv7-demo.pth"
N_DOCS = 12
FALLBACK = "no CUDA device is available; evaluating on the CPU"


@pytest.fixture(scope="module")
def wind(tmp_path_factory, world):
    """(folder, model file, data file, tasks folder, expected accuracy)."""
    from peft_rwkv7.model import load_model, save_model

    tmp = tmp_path_factory.mktemp("wind")
    logs = [json.loads(line)["text"] for line in (ROOT / "data/demo/ship_log_eval.jsonl").read_text().splitlines()]
    docs = []  # the previous entry, then this entry up to its (one-word, one-token) wind direction
    for prev, text in zip(logs, logs[1:]):
        m = re.match(r"(Ship's log, day \d+\. Wind: )(north|south|east|west),", text)
        if m:
            docs.append(f"{prev} {m.group(1)}{m.group(2)}")
    docs = docs[:N_DOCS]
    north = sum(d.endswith(" north") for d in docs)
    assert 0 < north < len(docs), docs

    net = load_model(DEMO).eval()
    hidden: list[torch.Tensor] = []
    hook = net.ln_out.register_forward_hook(lambda mod, inp, out: hidden.append(out[0]))
    with torch.no_grad():
        for d in docs:
            net(torch.tensor([[0, *world.encode(d)]]))
    hook.remove()
    at_wind = torch.stack([h[-2] for h in hidden])  # the input before the last word: "...Wind:"
    u = at_wind.mean(0) - torch.cat(hidden).mean(0)  # what sets "Wind:" apart from the other positions
    u = u / u.norm()
    (tok,) = world.encode(" north")
    with torch.no_grad():
        proj = at_wind @ u
        others = net.head(at_wind).index_fill(1, torch.tensor([tok]), -math.inf).amax(1)
        assert bool((proj > 0).all()), proj
        # The row u * scale gives " north" the logit proj * scale after every "Wind:": 4 above any other
        # token's there, far beyond fp32 rounding, so it is the greedy answer on both paths.
        net.head.weight[tok] = u * float(((others + 4) / proj).max())
    model = tmp / "north.pth"
    save_model(net, model, dtype=torch.float32)  # fp32: the file is exactly this model
    data = tmp / "wind.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return tmp, model, data, write_tasks(tmp, data), north / len(docs)


@pytest.mark.slow
def test_lambada_accuracy_strictly_between_0_and_1_is_the_same_both_ways(wind):
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, model, data, tasks, expected = wind
    ours = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", "eval", "--model", str(model), "--data", str(data),
                           "--lambada", "--json", "--device", "cpu", "--dtype", "fp32"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert ours.returncode == 0, ours.stderr[-2000:]
    ours = json.loads(ours.stdout)
    assert 0 < expected < 1 and ours["acc"] == expected  # right exactly on the "north" documents
    lm = RWKVPeftLM(model=str(model), device="cpu", dtype="fp32")
    res = lm_eval.simple_evaluate(model=lm, tasks=list(LAMBADA_TASKS), task_manager=TaskManager(
        include_path=str(tasks)), num_fewshot=0, bootstrap_iters=0, log_samples=False)["results"]
    assert res["rwkv_lambada_acc"]["acc,none"] == ours["acc"]
    # Same tokens and fp64 log-softmax both ways; only the batch (padded batches of 8 vs one document)
    # may reorder fp32 sums: <= 64 terms x 6e-8 x |logit| < 30 ~ 1e-4 per logit, so 1e-3 nats/token.
    ppl = res["rwkv_lambada_ppl"]["token_perplexity,none"]
    assert math.isfinite(ppl) and abs(math.log(ppl) - ours["loss"]) < 1e-3


def _readme_commands() -> list[list[str]]:
    """The lm-eval command lines of README.md's lm-evaluation-harness section, backslash-joined and split."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### lm-evaluation-harness"):]
    block = section[section.index("```bash") + len("```bash"): section.index("```", section.index("```bash") + 7)]
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _localize(cmd: list[str], files: dict[str, str], task: str, include: Path, out: Path) -> list[str]:
    """The README command with its placeholder paths (model_args) and task replaced by local ones, and
    --include_path / --limit / --output_path added; nothing else changes (no --device is added)."""
    cmd = list(cmd)
    args = cmd.index("--model_args") + 1
    pairs = dict(kv.split("=", 1) for kv in cmd[args].split(","))
    assert set(pairs) <= set(files), f"README model_args {sorted(pairs)}: this test knows {sorted(files)}"
    cmd[args] = ",".join(f"{k}={files[k]}" for k in pairs)
    cmd[cmd.index("--tasks") + 1] = task
    return [*cmd, "--include_path", str(include), "--limit", str(N_DOCS), "--output_path", str(out)]


def _lora_and_state(tmp: Path, model: Path) -> dict[str, str]:
    """A fresh LoRA run folder (B = 0) and an all-zero tuned state: both leave the model's answers as they are."""
    from peft_rwkv7.adapters import MethodConfig, attach, save_adapter
    from peft_rwkv7.model import load_model

    lora = attach(load_model(model), MethodConfig(kind="lora", r=2, alpha=4))
    save_adapter(lora, tmp / "lora")
    att = lora.model.blocks[0].att
    n = len(lora.model.blocks)
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(att.n_head, att.head_size, att.head_size) for i in range(n)},
               tmp / "state.pth")
    return {"model": str(model), "adapter": str(tmp / "lora"), "state": str(tmp / "state.pth")}


@pytest.mark.slow
def test_readme_command_as_written_runs_where_cuda_is_absent(wind):
    tmp, model, _, tasks, expected = wind
    (cmd, *_) = _readme_commands()
    assert cmd[:3] == ["python", "-m", "peft_rwkv7.integrations.lm_eval"], cmd
    out = tmp / "readme-out"
    cmd = _localize([sys.executable, *cmd[1:]], _lora_and_state(tmp, model), "rwkv_lambada_acc", tasks, out)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a machine without CUDA, also on a GPU machine
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count(FALLBACK) == 1, proc.stderr[-3000:]
    (result,) = out.rglob("results*.json")
    assert json.loads(result.read_text())["results"]["rwkv_lambada_acc"]["acc,none"] == expected


@pytest.mark.slow
def test_plugin_command_of_the_readme_where_lm_eval_discovers_plugins(wind):
    tmp, model, _, tasks, expected = wind
    probe = subprocess.run([sys.executable, "-c", "from lm_eval.api.registry import get_model; get_model('rwkv-peft')"],
                           capture_output=True, text=True, timeout=300)
    if "no model for this name" in probe.stderr:
        pytest.skip("this lm-eval release does not read the lm_eval.models entry points (README says so)")
    assert probe.returncode == 0, probe.stderr[-2000:]
    (cmd,) = [c for c in _readme_commands() if c[0] == "lm_eval"]
    out = tmp / "plugin-out"
    lm_eval_cli = str(Path(sys.executable).with_name("lm_eval"))
    cmd = _localize([lm_eval_cli, *cmd[1:]], _lora_and_state(tmp / "plugin", model), "rwkv_lambada_acc", tasks, out)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = out.rglob("results*.json")
    assert json.loads(result.read_text())["results"]["rwkv_lambada_acc"]["acc,none"] == expected


@pytest.mark.parametrize("asked", ["cuda:0", "cuda", "auto"])
def test_a_cuda_device_falls_back_to_the_cpu_with_one_line(wind, asked, monkeypatch, capsys):
    _, model, _, _, _ = wind
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = RWKVPeftLM(model=str(model), device=asked, dtype="fp32")  # auto may be bf16 on a CPU fast at it
    assert lm._device == torch.device("cpu") and next(lm.model.parameters()).dtype == torch.float32
    err = capsys.readouterr().err
    assert err.count(FALLBACK) == (0 if asked == "auto" else 1) and len(err.strip().splitlines()) <= 1, err


def test_a_device_that_is_not_one_is_a_one_line_error(wind):
    from peft_rwkv7.errors import UserError

    _, model, _, _, _ = wind
    with pytest.raises(UserError, match="device 'gpu0'"):
        RWKVPeftLM(model=str(model), device="gpu0")
