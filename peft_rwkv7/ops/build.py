"""Building the native kernels with torch's cpp_extension, and a notice while one compiles: the first
use on a machine takes a minute or more, which would otherwise look like a hang. Loading from torch's
extension cache is quick and stays silent."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType


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


def load_extension(name: str, sources: Sequence[Path], what: str, **load_kwargs) -> ModuleType:
    """torch.utils.cpp_extension.load of `sources` (all must exist), announced as `what` while it compiles.

    Raises on any failure; callers turn that into "not available"."""
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {', '.join(missing)}")
    from torch.utils.cpp_extension import load

    with build_notice(what):
        return load(name=name, sources=[str(p) for p in sources], verbose=False, **load_kwargs)
