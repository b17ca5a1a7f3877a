"""Ctrl-C while `data build` starts its worker pool (found by the kill-point sweep in CI: a SIGINT 25 ms after
the output appeared ended with "error: cannot join thread before it is started", status 1)."""

import signal
import subprocess
import sys
import textwrap

import pytest

from peft_rwkv7.data import build

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks on this platform")

# the signal lands at the worst moment: the pool's manager thread is created but not yet started
_CTRL_C_AS_THE_POOL_STARTS = textwrap.dedent("""
    import multiprocessing as mp, os, signal
    from concurrent.futures import process
    from peft_rwkv7.data import build

    start = process._ExecutorManagerThread.start
    def start_after_a_ctrl_c(self):
        os.kill(os.getpid(), signal.SIGINT)
        start(self)
    process._ExecutorManagerThread.start = start_after_a_ctrl_c

    def double(job):
        return job[0] * 2

    try:
        list(build.ordered_map(double, [((i,), 1) for i in range(6)], workers=2))
        print("no interrupt")
    except KeyboardInterrupt:
        print("interrupted", len(mp.active_children()), "workers left")
""")


def test_a_ctrl_c_while_the_pool_starts_is_a_keyboard_interrupt_and_leaves_no_worker():
    try:
        out = subprocess.run([sys.executable, "-c", _CTRL_C_AS_THE_POOL_STARTS], capture_output=True, text=True,
                             timeout=60)
    except subprocess.TimeoutExpired:  # the old pool: shutdown failed and the workers kept the process alive
        pytest.fail("the process hung after a Ctrl-C while the pool started")
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stdout.strip() == "interrupted 0 workers left", (out.stdout, out.stderr)
    assert out.returncode == 0


def _double(job):
    return job[0] * 2


def test_the_pool_still_maps_in_order_and_leaves_ctrl_c_unblocked():
    jobs = [((i,), i % 3) for i in range(9)]
    assert list(build.ordered_map(_double, jobs, workers=2)) == [(2 * i, i % 3) for i in range(9)]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
