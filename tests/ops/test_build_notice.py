"""The compile notice: shown while a slow build runs, silent when the kernel loads quickly."""

from __future__ import annotations

import time

from peft_rwkv7.ops.build import build_notice


def test_slow_build_is_announced_once(capsys):
    with build_notice("the test kernel", after_s=0.05):
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiling the test kernel" in err


def test_quick_load_is_silent(capsys):
    with build_notice("the test kernel", after_s=0.5):
        pass
    time.sleep(0.7)  # past the deadline: the cancelled timer must not fire late
    assert capsys.readouterr().err == ""
