"""Chat in the RWKV World format, rendered by the training code so inference reads what training taught.

A conversation is rendered by `data.formats.ChatFormat` (the class `data.kind: chat` trains with):
`[System: s\\n\\n]User: u\\n\\nAssistant: a\\n\\nUser: ...`, runs of equal loss flag tokenized on their
own, after end-of-text (0) as every training document starts. Before each reply the model reads
the rendered conversation plus `Assistant:` and samples until the turn separator `\\n\\n` (a reply
cannot contain a blank line), end-of-text, or `max_tokens`.

The RNN state is carried from turn to turn: a turn reads only the tokens the state has not read yet
(the new user message and the prompt, then the reply as it is sampled), so it costs its own tokens
whatever the conversation's length. After a reply the conversation is rendered again and the state
is brought to exactly those tokens: where the sampled tokens differ from how training tokenizes the
stored reply (extra spaces, a token that runs past the separator), it rewinds to the end of the
prompt and reads the reply's tokens again. So the state always equals a fresh run over the rendered
conversation.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from ..data.formats import ASSISTANT_PROMPT, ChatFormat, clean_turn, encode_segments
from .generate import check_sampling, in_vocab, sample_next

TURN_END = "\n\n"  # the World format's turn separator
CHUNK = 256  # tokens per forward pass while reading (bounds the [T, V] logits held at once)
HELP = ("/reset starts a new conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply; "
        "end a line with \\ to continue the message on the next line")

Message = dict[str, str]


@dataclass
class TurnStats:
    """What one turn cost: `read` tokens in forward passes (prompt, reply tail, any re-read) plus
    `generated` tokens sampled and read one RNN step each."""

    read: int = 0
    generated: int = 0
    rewound: bool = False  # tokens read that training would not read (a reply tokenized otherwise) were undone
    cut: bool = False  # the reply reached max_tokens before it ended
    seconds: float = 0.0

    def describe(self) -> str:
        rate = f" ({self.generated / self.seconds:.1f} tokens/s)" if self.seconds > 0 else ""
        text = f"read {self.read} new tokens, generated {self.generated} in {self.seconds:.2f} s{rate}"
        if self.rewound:
            text += "; rewound to read the conversation as training renders it"
        if self.cut:
            text += "; reply cut at --max-tokens"
        return text


@dataclass
class _Mark:
    """The state after reading `n` tokens (kept to rewind to)."""

    n: int
    state: Any
    logits: torch.Tensor | None


@dataclass(eq=False)
class ChatSession:
    """A conversation with `model` (an RWKV7 or adapted model: forward(idx, state, return_state=True)).

    ```python
    chat = ChatSession(model, tokenizer, system="You are terse.", temperature=0)
    reply = "".join(chat.ask("Hello"))  # streamed piece by piece; joined: the reply
    chat.messages                       # [{"role": "user", ...}, {"role": "assistant", ...}]
    ```
    `messages` may start with an earlier conversation (`{"role", "content"}` dicts); the first
    `ask` reads it. `system` is rendered first unless the messages have a system message.
    """

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    max_tokens: int = 500
    temperature: float = 1.0
    top_p: float = 0.85
    seed: int = 0

    def __post_init__(self) -> None:
        check_sampling(self.max_tokens, self.temperature, self.top_p)
        self.format = ChatFormat(system=self.system)
        self.messages = list(self.messages)
        self.last = TurnStats()
        self._generator = torch.Generator().manual_seed(self.seed)
        self._device = next(self.model.parameters()).device
        self.model.eval()
        self._clear_state()

    def reset(self) -> None:
        """Start a new conversation (the system message stays)."""
        self.messages = []
        self._clear_state()

    @property
    def tokens(self) -> list[int]:
        """The token ids the state has read, in order."""
        return list(self._tokens)

    def render(self, messages: list[Message], reply_next: bool = False) -> list[int]:
        """The tokens training reads for `messages` ([0] + the rendered runs, no end-of-text after);
        reply_next: followed by the `Assistant:` prompt of the next reply."""
        segs = self.format.segments({self.format.messages_field: messages}, "conversation")
        if reply_next:
            segs.append((ASSISTANT_PROMPT, False))
        return [0] + encode_segments(self.tokenizer, segs)[0]

    def ask(self, text: str) -> Iterator[str]:
        """Send a user message and yield the reply as it is sampled. When the reply is complete the
        turn joins `messages` (content stored stripped, as training renders it) and `last` holds its
        TurnStats; a reply abandoned midway leaves the conversation as it was."""
        user = {"role": "user", "content": text}
        stats = self.last = TurnStats()
        start = time.perf_counter()
        self._sync(self.render(self.messages + [user], reply_next=True), stats)
        out: list[int] = []
        shown, reply = "", None
        for _ in range(self.max_tokens):
            assert self._logits is not None
            token = sample_next(in_vocab(self._logits, self.tokenizer), self.temperature, self.top_p, self._generator)
            if token == 0:  # end-of-text: the model ends the conversation here
                break
            out.append(token)
            stats.generated += 1
            decoded = self.tokenizer.decode(out)
            if TURN_END in decoded:
                reply = decoded[: decoded.index(TURN_END)].lstrip()
                break
            visible = decoded.lstrip()
            visible = visible[:-1] if visible.endswith("\n") else visible  # may start the separator
            if not visible.endswith("\ufffd") and len(visible) > len(shown):  # whole characters only
                yield visible[len(shown):]
                shown = visible
            self._feed([token])
        else:
            stats.cut = True
        if reply is None:
            reply = self.tokenizer.decode(out).strip()
        if len(reply) > len(shown) and reply.startswith(shown):
            yield reply[len(shown):]
        self.messages += [user, {"role": "assistant", "content": clean_turn(reply)}]
        self._sync(self.render(self.messages), stats)
        stats.seconds = time.perf_counter() - start

    def _clear_state(self) -> None:
        self._tokens: list[int] = []
        self._state: Any = None  # None: the model's initial state (a tuned one when it has it)
        self._logits: torch.Tensor | None = None
        self._marks: list[_Mark] = []

    def _feed(self, ids: list[int]) -> None:
        with torch.no_grad():
            for a in range(0, len(ids), CHUNK):
                chunk = ids[a : a + CHUNK]
                idx = torch.tensor([chunk], dtype=torch.long, device=self._device)
                logits, self._state = self.model(idx, self._state, return_state=True)
                self._logits = logits[0, -1].float().cpu()
                self._tokens += chunk

    def _sync(self, target: list[int], stats: TurnStats) -> None:
        """Bring the state to having read exactly `target`, reading only what it lacks."""
        p = 0
        for a, b in zip(self._tokens, target):
            if a != b:
                break
            p += 1
        if p < len(self._tokens):  # the state read something else: back to the last mark before it
            marks = [m for m in self._marks if m.n <= p]
            stats.rewound = True
            self._clear_state()
            if marks:
                m = marks[-1]
                self._tokens, self._state, self._logits, self._marks = target[: m.n], m.state, m.logits, marks
        new = target[len(self._tokens):]
        stats.read += len(new)
        self._feed(new)
        self._marks = [*self._marks, _Mark(len(self._tokens), self._state, self._logits)][-2:]


def _continued(read: Callable[[str], str], prompt: str) -> str:
    """One message: lines ending in a backslash continue on the next line."""
    lines = [read(prompt)]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read("... "))
    return "\n".join(lines)


def run_chat(session: ChatSession, lines: Iterator[str] | None = None, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr, show_stats: bool = False) -> int:
    """The `rwkv-peft chat` loop. lines None: a person at a terminal (prompt `User: `, line editing);
    else each line is read as typed input and echoed after `User: `, so the output is a transcript."""
    if lines is None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        read: Callable[[str], str] = input
        print(f"Chat in the RWKV World format. {HELP}.", file=err)
    else:
        feed = iter(lines)

        def read(prompt: str) -> str:
            for line in feed:
                line = line.rstrip("\r\n")
                if line.strip() or prompt != "User: ":  # blank lines between messages are skipped
                    out.write(f"{prompt}{line}\n")
                    return line
            raise EOFError

    if session.system:
        out.write(f"System: {clean_turn(session.system)}\n\n")
    while True:
        try:
            text = _continued(read, "User: ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n" if lines is None else "")
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=err)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}: {HELP}", file=err)
            continue
        out.write("Assistant: ")
        out.flush()
        try:
            for piece in session.ask(text):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write("\n")
            print("(reply stopped: this turn is dropped)", file=err)
            continue
        out.write("\n\n")
        out.flush()
        if show_stats:
            print(f"[{session.last.describe()}]", file=err)
