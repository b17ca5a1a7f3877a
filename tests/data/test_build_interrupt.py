"""`data build`'s worker pool and signals: a Ctrl-C while the pool starts (found by the kill-point sweep in CI: a
SIGINT 25 ms after the output appeared ended with "error: cannot join thread before it is started", status 1), and
workers whose parent was killed outright (they waited forever for the next job)."""

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


_WORKERS_THAT_WAIT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from peft_rwkv7.data import build

    def wait(job):
        Path(sys.argv[1], str(os.getpid())).touch()
        time.sleep(120)

    list(build.ordered_map(wait, [((i,), 1) for i in range(4)], workers=2))
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended (its reaper may be slow)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_workers_end_with_a_parent_killed_outright(tmp_path):
    import os
    import time

    proc = subprocess.Popen([sys.executable, "-c", _WORKERS_THAT_WAIT, str(tmp_path)])
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = [int(p.name) for p in tmp_path.iterdir()]
            time.sleep(0.02)
        assert len(workers) == 2, workers
        proc.kill()  # SIGKILL: the parent can stop nothing
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [w for w in workers if _alive(w)] == [], "workers outlived their killed parent"
    finally:
        proc.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
