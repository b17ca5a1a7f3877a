"""Chat at inference: the training rendering, the RNN state carried between turns (each turn reads only
its new tokens, and the state equals a fresh run over the rendered conversation), the CLI loop."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from peft_rwkv7.data import DataConfig, make_dataset
from peft_rwkv7.infer.chat import ChatSession, run_chat
from tests.conftest import make_model
from tests.fp_oracle import U32, forward_rounding

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data/demo/rwkv7-demo.pth"
SYSTEM = "You keep the ship's log. " * 12  # a long first turn: later turns must not read it again


@pytest.fixture(scope="module")
def base():
    return make_model(seed=7, n_embd=64, vocab_size=65536).eval()


class Spy(nn.Module):
    """The model, counting the tokens its forward reads; `script` pushes its logits so that after
    token t the next one is script[t] (a reply chosen by the test), the state staying the model's."""

    def __init__(self, model: nn.Module, script: dict[int, int] | None = None, stop_after: int | None = None):
        super().__init__()
        self.model, self.script, self.read, self.calls, self.stop_after = model, script or {}, 0, 0, stop_after

    def forward(self, idx, state=None, return_state=False):
        self.read += idx.shape[1]
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise KeyboardInterrupt  # a person pressing Ctrl-C in the middle of a reply
        logits, state = self.model(idx, state, return_state=True)
        logits = logits.clone()
        for t, token in enumerate(idx[0].tolist()):
            if token in self.script:
                logits[0, t, self.script[token]] += 1e4
        return (logits, state) if return_state else logits


def scripted(base, world, reply: str, **kw) -> Spy:
    """A Spy whose greedy reply after `Assistant:` is exactly the tokens of `reply`."""
    ids = world.encode(reply)
    trigger = world.encode("Assistant:")[-1]
    assert len(set(ids)) == len(ids) and trigger not in ids
    return Spy(base, dict(zip([trigger, *ids[:-1]], ids, strict=True)), **kw)


def ask(session: ChatSession, text: str) -> str:
    return "".join(session.ask(text))


def one_pass_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0, -1].float()


def assert_same_state(got: torch.Tensor, model, tokens: list[int], base) -> None:
    """got (the session's last logits) against one pass of `model` over the tokens: two fp32 forwards of one
    network, within twice the forward's bound of the base's largest logit, plus the two roundings of a
    scripted +1e4 push (2u of the largest logit)."""
    want = one_pass_logits(model, tokens)
    scale = one_pass_logits(base, tokens).abs().max().item()
    tol = 2 * forward_rounding(base.config, len(tokens)) * scale + 2 * U32 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol


def test_render_is_the_training_rendering(tmp_path, world, base):
    msgs = [{"role": "user", "content": "Hi\n\n\nthere"}, {"role": "assistant", "content": " Hello "},
            {"role": "user", "content": "Wind?"}, {"role": "assistant", "content": "North, 20 knots."}]
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"messages": msgs}) + "\n")
    ds = make_dataset(DataConfig(path=str(src), ctx_len=64, system="Sys"), world, seed=0,
                      cache_dir=tmp_path / "cache", workers=1, progress=False)
    x, _ = ds.sample(0)  # [0] + the document's tokens (its end-of-text is the last target)
    session = ChatSession(base, world, system="Sys")
    rendered = session.render(msgs)
    assert rendered == x[: len(rendered)].tolist() and x[len(rendered)] == 0
    prompt = session.render(msgs[:3], reply_next=True)
    assert world.decode(prompt) == "System: Sys\n\nUser: Hi\nthere\n\nAssistant: Hello\n\nUser: Wind?\n\nAssistant:"
    assert prompt == rendered[: len(prompt)]


def test_each_turn_reads_only_its_new_tokens(world, base):
    spy = scripted(base, world, " Hello there.\n\n")
    session = ChatSession(spy, world, system=SYSTEM, temperature=0)
    assert ask(session, "Wind today") == "Hello there."
    first = session.render(session.messages)
    assert session.tokens == first and spy.read == len(first)
    assert ask(session, "And the sea") == "Hello there."
    whole = session.render(session.messages)
    assert session.tokens == whole
    assert spy.read - len(first) == len(whole) - len(first) < 20  # turn 2: its own tokens, not the system's 100+
    assert not session.last.rewound and session.last.read + session.last.generated == len(whole) - len(first) + 1
    # the state equals a fresh run over the whole rendered conversation
    assert_same_state(session._logits, spy, whole, base)
    assert session.messages[-1] == {"role": "assistant", "content": "Hello there."}


@pytest.mark.parametrize("reply", ["  Hi\n\n", " Hi  \n\n"])
def test_reply_tokenized_otherwise_is_reread_as_training_tokenizes_it(world, base, reply):
    spy = scripted(base, world, reply)
    session = ChatSession(spy, world, temperature=0)
    assert ask(session, "Hello").strip() == "Hi"
    assert session.last.rewound and session.messages[-1]["content"] == "Hi"
    assert session.tokens == session.render(session.messages) == [0, *world.encode("User: Hello\n\nAssistant:"),
                                                                  *world.encode(" Hi\n\n")]
    assert_same_state(session._logits, spy, session.tokens, base)
    before = spy.read
    ask(session, "Again")
    assert spy.read - before == len(session.render(session.messages)) - len(session.render(session.messages[:2])) \
        + (len(world.encode(reply)) - 1 if session.last.rewound else 0)


def test_real_model_turns_equal_a_fresh_run(world, base):
    spy = Spy(base)
    session = ChatSession(spy, world, system=SYSTEM, temperature=0, max_tokens=8)
    ask(session, "Where are we")
    after_first, read_first = session.render(session.messages), spy.read
    second = ask(session, "How is the wind")
    whole = session.render(session.messages)
    assert session.tokens == whole
    reply_tokens = len(whole) - len(session.render(session.messages[:-1], reply_next=True))
    assert spy.read - read_first <= len(whole) - len(after_first) + reply_tokens  # a re-read costs one reply
    assert spy.read - read_first < len(after_first) / 2
    fresh = ChatSession(Spy(base), world, system=SYSTEM, temperature=0, max_tokens=8, messages=session.messages[:2])
    assert ask(fresh, "How is the wind") == second
    assert fresh.messages == session.messages and fresh.tokens == whole
    assert_same_state(session._logits, base, whole, base)
    assert_same_state(fresh._logits, base, whole, base)


def test_reply_ends_at_blank_line_end_of_text_or_max_tokens(world, base):
    session = ChatSession(scripted(base, world, " Aye.\n\nUser more"), world, temperature=0)
    pieces = list(session.ask("Report"))
    assert "".join(pieces) == "Aye." and "\n" not in "".join(pieces)
    eot = Spy(base, {world.encode("Assistant:")[-1]: 0})
    session = ChatSession(eot, world, temperature=0)
    assert ask(session, "Report") == "" and session.messages[-1]["content"] == ""
    session = ChatSession(Spy(base), world, temperature=0, max_tokens=3)
    ask(session, "Report")
    assert session.last.generated <= 3 and (session.last.cut or session.last.generated < 3)


def test_abandoned_reply_leaves_the_conversation_as_it_was(world, base):
    spy = scripted(base, world, " Hello there.\n\n")
    session = ChatSession(spy, world, temperature=0)
    ask(session, "One")
    messages = list(session.messages)
    stream = session.ask("Two")
    next(stream)
    stream.close()
    assert session.messages == messages
    assert ask(session, "Three") == "Hello there."
    assert session.tokens == session.render(session.messages)
    assert_same_state(session._logits, spy, session.tokens, base)


def test_run_chat_reads_lines_as_a_person_types_them(world, base):
    spy = scripted(base, world, " Hello there.\n\n")
    session = ChatSession(spy, world, system="Be brief.", temperature=0)
    out, err = io.StringIO(), io.StringIO()
    lines = ["hello\n", "\n", "two \\\n", "lines\n", "/what\n", "/reset\n", "again\n"]
    assert run_chat(session, iter(lines), out, err, show_stats=True) == 0
    assert out.getvalue() == ("System: Be brief.\n\nUser: hello\nAssistant: Hello there.\n\n"
                              "User: two \\\n... lines\nAssistant: Hello there.\n\n"
                              "User: /what\nUser: /reset\nUser: again\nAssistant: Hello there.\n\n")
    assert session.messages[0]["content"] == "again"  # /reset started over
    stats = [x for x in err.getvalue().splitlines() if x.startswith("[read")]
    assert len(stats) == 3 and "unknown command /what" in err.getvalue() and "(new conversation)" in err.getvalue()


def test_ctrl_c_during_a_reply_drops_only_that_turn(world, base):
    spy = scripted(base, world, " Hello there.\n\n", stop_after=3)
    session = ChatSession(spy, world, temperature=0)
    out, err = io.StringIO(), io.StringIO()
    run_chat(session, iter(["first\n", "second\n"]), out, err)
    assert "(reply stopped: this turn is dropped)" in err.getvalue() and session.messages == []


def test_bad_sampling_settings_fail_at_once(world, base):
    from peft_rwkv7.errors import UserError

    with pytest.raises(UserError, match="--temperature"):
        ChatSession(base, world, temperature=float("nan"))


def _cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow  # 15-30 s on a 2-core machine: CI runs it
def test_cli_chat_piped_and_generate_chat(tmp_path, base, world):
    from peft_rwkv7.model import load_model, save_model

    save_model(base, tmp_path / "m.pth", dtype=torch.float32)
    # fp32 as the in-process session below (--dtype auto is bf16 on a CPU measured fast at it)
    common = ["--model", tmp_path / "m.pth", "--temperature", "0", "--max-tokens", "12", "--system", "Be brief.",
              "--dtype", "fp32"]
    one = _cli("generate", "--chat", "--prompt", "Where are we", *common)
    chat = _cli("chat", *common, "--stats", stdin="Where are we\nHow is the wind\n")
    assert one.returncode == 0 and chat.returncode == 0, one.stderr + chat.stderr
    reply = one.stdout.rstrip("\n")
    assert f"User: Where are we\nAssistant: {reply}\n\nUser: How is the wind\nAssistant: " in chat.stdout
    session = ChatSession(load_model(tmp_path / "m.pth"), world, "Be brief.", temperature=0, max_tokens=12)
    assert ask(session, "Where are we") == reply
    second = ask(session, "How is the wind")
    assert chat.stdout.endswith(f"Assistant: {second}\n\n")
    assert chat.stderr.count("[read ") == 2
    bad = _cli("generate", "--prompt", "x", "--system", "s", "--model", tmp_path / "m.pth")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --system is for chat turns: add --chat (or put the text into --prompt)"]


def _read_until(fd: int, text: bytes, buf: bytearray, timeout: float = 180) -> bytearray:
    end = time.monotonic() + timeout
    while text not in buf:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {text!r} on the terminal after {timeout} s: {bytes(buf)!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"terminal closed before {text!r}: {bytes(buf)!r}")
        buf += chunk
    return buf


def test_chat_at_a_terminal_on_the_demo_model():
    """A person at a terminal: the prompt, a reply, a second turn, Ctrl-D to leave."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "peft_rwkv7.cli", "chat", "--model", str(DEMO), "--temperature",
                             "0", "--max-tokens", "24", "--stats"], stdin=slave, stdout=slave, stderr=slave,
                            cwd=ROOT, close_fds=True)
    os.close(slave)
    try:
        # type only once the prompt is shown (readline switches the terminal's mode per line)
        assert b"Chat in the RWKV World format" in _read_until(master, b"User: ", bytearray())
        os.write(master, b"Ship's log, day 12. Wind?\n")
        turn = _read_until(master, b"User: ", bytearray())
        assert b"Assistant:" in turn and b"[read " in turn
        os.write(master, b"/reset\n")
        assert b"(new conversation)" in _read_until(master, b"User: ", bytearray())
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
