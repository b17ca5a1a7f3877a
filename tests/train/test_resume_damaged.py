"""A resume whose newest one-process checkpoint is damaged or holds something else than what save_checkpoint writes
(found by fuzzing `rwkv-peft train RECIPE --resume`): with an older good checkpoint the run goes on from it and
says so, one warning line per file passed over; with none, one error line naming the newest file and why. Never a
traceback, never a silent step back, and the damaged file is left as it was.

Expected lines are written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_rwkv7.errors import UserError
from peft_rwkv7.train import checkpoint as ckpt
from peft_rwkv7.train.checkpoint_payload import payload_problem
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")
NONE_LEFT = "no readable checkpoint to resume from (train into a new out_dir=... to start over)"


def _save(run: Path, step: int, value: float) -> Path:
    p = torch.nn.Parameter(torch.full((3,), value))
    opt = torch.optim.AdamW([p])
    p.sum().backward()
    opt.step()
    with torch.no_grad():
        p.fill_(value)
    return ckpt.save_checkpoint(run, step, [("p", p)], opt, keep=0)


def _payload(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _without(key):
    def damage(path: Path) -> None:
        payload = _payload(path)
        del payload[key]
        torch.save(payload, path)
    return damage


def _with(key, value):
    def damage(path: Path) -> None:
        torch.save({**_payload(path), key: value}, path)
    return damage


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])  # torch.load: a RuntimeError (no zip central directory)


def _rng_without_torch(path: Path) -> None:
    payload = _payload(path)
    del payload["rng"]["torch"]
    torch.save(payload, path)


DAMAGES = {  # how the newest checkpoint (step 4) is damaged: the reason the lines give
    "a list": (lambda path: torch.save([1, 2], path), "not a dict (a list)"),
    "no params": (_without("params"), 'no "params"'),
    "no optimizer": (_without("optimizer"), 'no "optimizer"'),
    "no rng": (_without("rng"), 'no "rng"'),
    "no step": (_without("step"), 'no "step"'),
    "optimizer a str": (_with("optimizer", "adamw"), '"optimizer" is a str, not a dict'),
    "optimizer without groups": (_with("optimizer", {"state": {}}),
                                 '"optimizer" lacks an optimizer\'s "state" and "param_groups"'),
    "params a list": (_with("params", [torch.zeros(3)]), '"params" is a list, not a dict'),
    "params not tensors": (_with("params", {"p": [0.0, 0.0, 0.0]}), '"params" \'p\' is a list, not a tensor'),
    "rng a str": (_with("rng", "seed"), '"rng" is a str, not a dict'),
    "rng without torch": (_rng_without_torch, '"rng" holds no torch generator state'),
    "step another": (_with("step", 3), '"step" is 3, the file name says 4'),
    "step a str": (_with("step", "4"), '"step" is a str, not an int'),
    "extra a list": (_with("extra", []), '"extra" is a list, not a dict'),
    "precision a number": (_with("precision", 16), '"precision" is a int, not a str'),
    "truncated": (_truncated, "truncated or corrupt: RuntimeError"),
    "empty": (lambda path: path.write_bytes(b""), "empty file"),
    "text": (lambda path: path.write_text("not a checkpoint\n"), "truncated or corrupt: UnpicklingError"),
}


@pytest.mark.parametrize("damage, reason", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_newest_checkpoint_is_passed_over_with_a_warning(tmp_path, capsys, damage, reason):
    _save(tmp_path, 2, 1.0)
    newest = _save(tmp_path, 4, 2.0)
    damage(newest)
    left = newest.read_bytes()
    p = torch.nn.Parameter(torch.zeros(3))
    assert ckpt.resume(tmp_path, [("p", p)], torch.optim.AdamW([p])) == 2
    assert p.tolist() == [1.0, 1.0, 1.0]  # step 2's tensors
    warning = f"warning: {tmp_path}/checkpoints/step_000004.pt: cannot be read ({reason}); resuming from step 2\n"
    assert capsys.readouterr() == ("", warning)
    assert newest.read_bytes() == left  # left as it was
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 2
    assert capsys.readouterr().err == warning


@pytest.mark.parametrize("damage, reason", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_only_checkpoint_is_one_error_line(tmp_path, capsys, damage, reason):
    damage(_save(tmp_path, 4, 2.0))
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(UserError) as e:
        ckpt.resume(tmp_path, [("p", p)], torch.optim.AdamW([p]))
    assert str(e.value) == f"{tmp_path}/checkpoints/step_000004.pt: cannot be read ({reason}); {NONE_LEFT}"
    assert p.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(UserError) as e:
        ckpt.load_latest_checkpoint(tmp_path)
    assert str(e.value) == f"{tmp_path}/checkpoints/step_000004.pt: cannot be read ({reason}); {NONE_LEFT}"
    assert ckpt.resumable_step(tmp_path) is None and ckpt.saved_choices(tmp_path) == (None, None)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("damage, reason", DAMAGES.values(), ids=DAMAGES.keys())
def test_the_step_and_choices_a_resume_goes_on_with_are_the_readable_checkpoints(tmp_path, damage, reason):
    """What --resume checks before it trains (runner.check_resume: is the run finished?) and the precision and kernel
    choices it goes on with come from the checkpoint it resumes from, not from a damaged newer one."""
    p = torch.nn.Parameter(torch.zeros(3))
    ckpt.save_checkpoint(tmp_path, 2, [("p", p)], torch.optim.AdamW([p]), precision="bf16", routes={"r": 2})
    newest = ckpt.save_checkpoint(tmp_path, 4, [("p", p)], torch.optim.AdamW([p]), precision="fp32", routes=None)
    assert (ckpt.resumable_step(tmp_path), ckpt.saved_choices(tmp_path)) == (4, ("fp32", None))
    damage(newest)
    assert (ckpt.resumable_step(tmp_path), ckpt.saved_choices(tmp_path)) == (2, ("bf16", {"r": 2}))


def test_every_file_passed_over_gets_its_line_and_the_error_names_the_newest(tmp_path, capsys):
    _save(tmp_path, 1, 1.0)
    d = tmp_path / "checkpoints"
    _save(tmp_path, 3, 3.0).write_bytes(b"")
    torch.save([1, 2], _save(tmp_path, 5, 5.0))
    p = torch.nn.Parameter(torch.zeros(3))
    assert ckpt.resume(tmp_path, [("p", p)], torch.optim.AdamW([p])) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {d}/step_000005.pt: cannot be read (not a dict (a list)); resuming from step 1",
        f"warning: {d}/step_000003.pt: cannot be read (empty file); resuming from step 1",
    ]
    (d / "step_000001.pt").write_text("x")
    with pytest.raises(UserError) as e:
        ckpt.resume(tmp_path, [("p", p)], torch.optim.AdamW([p]))
    assert str(e.value) == f"{d}/step_000005.pt: cannot be read (not a dict (a list)); {NONE_LEFT}"


def test_good_checkpoints_resume_without_a_word(tmp_path, capsys):
    """What save_checkpoint writes passes the check whole: extra state, precision, routes, a GPU's RNG state."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])

    class Extra:
        def state_dict(self):
            return {"n": 1}

        def load_state_dict(self, state):
            self.state = state

    ckpt.save_checkpoint(tmp_path, 7, [("p", p)], opt, extra={"x": Extra()}, precision="bf16", routes={"r": [1]})
    path = tmp_path / "checkpoints" / "step_000007.pt"
    payload = _payload(path)
    payload["rng"]["cuda"] = torch.zeros(4, dtype=torch.uint8)
    assert payload_problem(payload, 7) is None
    extra = Extra()
    assert ckpt.resume(tmp_path, [("p", p)], opt, extra={"x": extra}) == 7 and extra.state == {"n": 1}
    assert capsys.readouterr() == ("", "")


def test_the_cli_resumes_past_a_damaged_newest_checkpoint(tiny_world, tmp_path, capsys):
    from peft_rwkv7.cli import main

    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_world, out, steps=6, **{"train.save_every": 2})
    assert main(["train", LORA, *overrides, "train.stop_after=4"]) == 0
    newest = out / "checkpoints" / "step_000004.pt"
    assert newest.exists()
    torch.save([1, 2], newest)
    capsys.readouterr()
    assert main(["train", LORA, *overrides, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {newest}: cannot be read (not a dict (a list)); resuming from step 2\n" in err
    assert "error" not in err and "Traceback" not in err
    steps = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps[-1] == 6
    assert ckpt.load_latest_checkpoint(out)["step"] == 6


def test_a_finished_run_whose_last_checkpoint_is_damaged_resumes_to_the_same_adapter(tiny_world, tmp_path, capsys):
    """Found by fuzzing: --resume read the damaged file's step from its name and said the run was finished; it goes
    on from the readable checkpoint before it, and the steps taken again give the adapter bit for bit (exact
    resume), so a damaged final checkpoint costs the steps since the one before, never the run."""
    from safetensors.torch import load_file

    from peft_rwkv7.cli import main

    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_world, out, steps=4, **{"train.save_every": 2})
    assert main(["train", LORA, *overrides]) == 0
    finished = load_file(out / "adapter.safetensors")
    final = out / "checkpoints" / "step_000004.pt"
    final.write_bytes(final.read_bytes()[:100])
    (out / "adapter.safetensors").unlink()
    capsys.readouterr()
    assert main(["train", LORA, *overrides, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {final}: cannot be read (truncated or corrupt: RuntimeError); resuming from step 2\n" in err
    assert "error" not in err and "Traceback" not in err
    again = load_file(out / "adapter.safetensors")
    assert set(again) == set(finished) and all(torch.equal(again[k], finished[k]) for k in finished)
    assert ckpt.resumable_step(out) == 4
