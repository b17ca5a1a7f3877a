"""A notice while a native kernel compiles: the first use on a machine takes a minute or more, which
would otherwise look like a hang. Loading from torch's extension cache is quick and stays silent."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def build_notice(what: str, after_s: float = 3.0) -> Iterator[None]:
    """Print one line to stderr if the body is still running after `after_s` seconds."""

    def say() -> None:
        print(f"peft_rwkv7: compiling {what} (first use on this machine; cached afterwards)...",
              file=sys.stderr, flush=True)

    timer = threading.Timer(after_s, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
