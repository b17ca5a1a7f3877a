"""The web UI in a real browser: Debian's chromium driven by playwright, against `rwkv-peft ui` served by the CLI
in its own process (as a user starts it), in a scratch working directory whose data/ is the checkout's.

Skipped with the reason where chromium, playwright or gradio is missing; `.ci/run` installs chromium so CI runs
them. `--ui-screenshots docs/ui` keeps the screenshots of every tab for the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peft_rwkv7.run_dir import read_log
from peft_rwkv7.train.runlock import held, holder_pid

pytest.importorskip("gradio", reason="the web UI needs the [ui] extra (gradio)")
playwright = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package")

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")]
CLI = [sys.executable, "-m", "peft_rwkv7.cli"]
TIMEOUT = 600_000  # ms: the demo run on a loaded 2-core machine (1.5 s a step seen under load)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch working directory with the checkout's data/ (the bundled recipes read data/demo/...)."""
    d = tmp_path_factory.mktemp("ui")
    (d / "data").symlink_to(ROOT / "data")
    return d


@pytest.fixture(scope="module")
def server(workdir):
    """`rwkv-peft ui` as a user runs it; yields (url, seconds to the first page served)."""
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([*CLI, "ui", "--port", str(port), "--runs", "runs"], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    import urllib.request

    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
        assert time.monotonic() - t0 < 120, "rwkv-peft ui did not serve its page within 120 s"
    started = time.monotonic() - t0
    print(f"rwkv-peft ui: first page served after {started:.1f} s")
    yield url, started
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser, server, request):
    url, _ = server
    pg = browser.new_page(viewport={"width": 1400, "height": 1100})
    pg.set_default_timeout(TIMEOUT)
    pg.goto(url)
    pg.wait_for_selector("#train-start")
    yield pg
    pg.close()


def shot(request, pg, name: str) -> None:
    folder = request.config.getoption("--ui-screenshots")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=False)


def progress(pg) -> dict:
    """The status line's data, read in one go (the page redraws it every second)."""
    d = pg.evaluate("(() => { const e = document.querySelector('#train-progress-text');"
                    " return e ? {...e.dataset} : {}; })()")
    return {"status": d.get("status"), "step": int(d.get("step") or 0), "points": int(d.get("points") or 0)}


def wait_progress(pg, ok, what: str, timeout: float = TIMEOUT / 1000) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = progress(pg)
        if p["status"] and ok(p):
            return p
        time.sleep(0.3)
    raise AssertionError(f"the page never showed {what}; last: {pg.inner_text('#train-progress')!r}")


def set_field(pg, key: str, value: str) -> None:
    box = pg.locator(f"#field-{key.replace('.', '-')}").locator("input, textarea").first
    box.fill(value)
    box.press("Tab")


class Trainer:
    """The run's trainer process as the test holds it: paused (SIGSTOP) and let go for a few steps at a time, so
    each phase below happens at a step the test chose, however fast the machine trains (a fast one finished all 60
    steps while the page was still catching up). A paused trainer still holds the run lock, so the page shows it
    running; a Stop sent while it is paused is taken when it goes on."""

    def __init__(self, run: Path):
        self.run, self.pid = run, None

    def logged(self) -> int:
        return max((r["step"] for r in read_log(self.run) if "loss" in r), default=0)

    def until(self, step: int, then: signal.Signals | None = signal.SIGSTOP, timeout: float = TIMEOUT / 1000) -> int:
        """Let the trainer (the run lock's holder) train until log.jsonl holds `step`, then send it `then`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = holder_pid(self.run) if held(self.run) else None  # a stopped run's lock names a dead pid
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGCONT)
                    self.pid = pid
                    if self.logged() >= step:
                        if then is not None:
                            os.kill(pid, then)
                        return self.logged()
                except ProcessLookupError:  # a trainer that ended, or one not yet written into the lock
                    pass
            time.sleep(0.005)
        raise AssertionError(f"the trainer never logged step {step}; last {self.logged()}")

    def go_on(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_start_stop_kill_resume_finish_from_the_form(page, workdir, request, browser, server):
    """A state-tuning run of the demo recipe started from the form with two keys changed: the loss plot gains
    points, Stop (Ctrl-C) keeps a checkpoint, Resume continues; the trainer killed with SIGKILL shows as stopped
    with its last checkpoint and Resume finishes it: log.jsonl then holds every step once, as one run."""
    pg = page
    run = workdir / "runs" / "state_tune"
    trainer = Trainer(run)
    request.addfinalizer(trainer.go_on)  # never leave a paused trainer behind a failed test
    set_field(pg, "train.max_steps", "60")
    set_field(pg, "train.save_every", "10")
    pg.click("#train-check")
    pg.wait_for_function("document.querySelector('#train-command textarea, #train-command input').value"
                         ".includes('train.max_steps=60')")
    command = pg.locator("#train-command").locator("textarea, input").first.input_value()
    assert command == "rwkv-peft train state_tune train.max_steps=60 train.save_every=10", command
    pg.click("#train-start")
    at = trainer.until(3)  # paused at step 3 (or the one after)
    first = wait_progress(pg, lambda p: p["status"] == "running" and p["points"] >= 3, "a running run with points")
    assert first["step"] == at, (first, at)
    trainer.until(at + 2)
    later = wait_progress(pg, lambda p: p["points"] > first["points"], "the loss plot gaining points")
    assert later["step"] > first["step"]
    other = browser.new_page()  # a tab opened later (the first one could be closed) finds the run training
    other.set_default_timeout(TIMEOUT)
    other.goto(server[0])
    other.wait_for_selector("#train-start")
    assert wait_progress(other, lambda p: p["status"] == "running", "the run in a new tab")["step"] >= later["step"]
    other.close()
    # the loss line is drawn in its colour (a plot first drawn from an empty frame has stroke-less paths)
    pg.wait_for_selector("#train-plot .mark-line path[stroke]")
    pg.click("#train-stop")
    trainer.go_on()  # the Stop waiting for it is taken at once
    stopped = wait_progress(pg, lambda p: p["status"] == "stopped", "the stopped run")
    ckpts = sorted(int(re.match(r"step_(\d+)", p.name).group(1)) for p in (run / "checkpoints").iterdir()
                   if re.match(r"step_\d+\.pt$", p.name))
    assert ckpts and ckpts[-1] == stopped["step"], (ckpts, stopped)  # Ctrl-C saved the last step
    assert stopped["step"] < 20  # paused near step 5 when Stop was sent

    pg.click("#train-resume")
    trainer.until(21, then=signal.SIGKILL)  # a periodic checkpoint (step 20) after the stop exists by then
    killed = wait_progress(pg, lambda p: p["status"] == "stopped", "the killed run as stopped")
    last = max(int(re.match(r"step_(\d+)", p.name).group(1)) for p in (run / "checkpoints").iterdir()
               if re.match(r"step_\d+\.pt$", p.name))
    assert last % 10 == 0 and stopped["step"] < last <= killed["step"] < 60, (last, killed)

    pg.click("#train-resume")
    done = wait_progress(pg, lambda p: p["status"] == "finished", "the finished run")
    assert done["step"] == 60
    steps = [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 61)), steps
    pg.wait_for_timeout(1500)
    shot(request, pg, "train")


def test_invalid_value_is_marked_on_its_field_with_the_cli_message(page, workdir, request):
    cli = subprocess.run([*CLI, "train", "state_tune", "train.lr=-1"], cwd=workdir, capture_output=True, text=True)
    expected = cli.stderr.strip().removeprefix("error: ")
    assert cli.returncode != 0 and "train.lr" in expected
    set_field(page, "train.lr", "-1")
    page.click("#train-check")
    page.wait_for_selector("#field-train-lr.field-error")
    assert expected in page.inner_text("#field-train-lr")
    assert expected in page.inner_text("#train-message")
    assert page.locator(".field-error").count() == 1
    page.locator("#field-train-lr").scroll_into_view_if_needed()
    shot(request, page, "train_error")


def test_chinese_interface(page, request):
    page.locator("#lang").locator("input").first.click()
    page.get_by_role("option", name="中文").click()
    page.get_by_role("tab", name="训练").wait_for()
    for zh in ("数据", "对话", "评测", "运行记录"):
        assert page.get_by_role("tab", name=zh).count() == 1, zh
    assert page.locator("#train-start").inner_text().strip() == "开始"
    assert "训练参数" in page.inner_text("#sec-train")
    shot(request, page, "train_zh")


def cli_chat(workdir, adapter: str | None) -> str:
    """The reply `rwkv-peft generate --chat` gives to the same message with the same sampling and seed."""
    model = ["--model", "data/demo/rwkv7-demo.pth", *(["--adapter", adapter] if adapter else [])]
    out = subprocess.run([*CLI, "generate", "--chat", "--prompt", "Where are we?", *model, "--max-tokens", "24",
                          "--temperature", "1.0", "--top-p", "0.85", "--seed", "0", "--dtype", "auto"],
                         cwd=workdir, capture_output=True, text=True, check=True)
    return " ".join(out.stdout.split())


def test_chat_ab_answers_as_the_cli_does(page, workdir, request):
    run = "runs/chat_state"
    subprocess.run([*CLI, "train", "state_tune", "train.max_steps=20", f"out_dir={run}"], cwd=workdir, check=True,
                   capture_output=True)
    page.get_by_role("tab", name="Chat").click()
    for sel, value in (("#chat-adapter", run), ("#chat-max-tokens", "24"), ("#chat-seed", "0")):
        box = page.locator(sel).locator("input, textarea").first
        box.fill(value)
        box.press("Tab")
    msg = page.locator("#chat-message").locator("textarea, input").first
    msg.fill("Where are we?")
    page.click("#chat-send")
    page.wait_for_function("document.querySelectorAll('#chat-tuned .message, #chat-tuned [data-testid=bot]').length"
                           " > 0 && document.querySelectorAll('#chat-base [data-testid=bot]').length > 0")
    page.wait_for_selector("#chat-status:has-text('tokens')")
    tuned = " ".join(page.locator("#chat-tuned [data-testid=bot]").last.inner_text().split())
    base = " ".join(page.locator("#chat-base [data-testid=bot]").last.inner_text().split())
    assert tuned and tuned == cli_chat(workdir, run)
    # the demo base model is no chat model: it ends its turn at once, which the page says instead of an empty bubble
    assert base == (cli_chat(workdir, None) or "(no reply: the model ended its turn at once)")
    assert tuned != base
    shot(request, page, "chat")


def wait_value(pg, elem: str, part: str) -> str:
    """The value of the text box inside #elem once it contains `part` (a text box's value is not its text)."""
    js = (f"document.querySelector('#{elem} textarea, #{elem} input') && document.querySelector('#{elem} textarea, "
          f"#{elem} input').value.includes({json.dumps(part)})")
    pg.wait_for_function(js)
    return pg.locator(f"#{elem}").locator("textarea, input").first.input_value()


def test_data_evaluate_and_runs_tabs(page, workdir, request):
    """Data: the demo file's summary; Evaluate: the loss the CLI's `eval --json` gives; Runs: a run's row and its
    inspect summary."""
    pg = page
    pg.get_by_role("tab", name="Data").click()
    pg.click("#data-open")
    summary = wait_value(pg, "data-summary", "documents")
    lines = (ROOT / "data/demo/ship_log.jsonl").read_text().splitlines()
    assert "1960 documents" in summary, (summary, len(lines))  # 2000 records, 40 held out as the recipe's eval
    assert pg.locator("#data-masks").inner_text().strip()
    shot(request, pg, "data")

    cli = subprocess.run([*CLI, "eval", "--model", "data/demo/rwkv7-demo.pth", "--data",
                          "data/demo/ship_log_eval.jsonl", "--json"], cwd=workdir, capture_output=True, text=True,
                         check=True)
    loss = json.loads(cli.stdout)["loss"]
    pg.get_by_role("tab", name="Evaluate").click()
    pg.click("#eval-run")
    pg.wait_for_selector("#eval-result:has-text('ppl')")
    assert f"{loss:.4f}" in pg.inner_text("#eval-result")
    shot(request, pg, "eval")

    if not (workdir / "runs" / "tiny").is_dir():
        subprocess.run([*CLI, "train", "state_tune", "train.max_steps=4", "out_dir=runs/tiny"], cwd=workdir,
                       check=True, capture_output=True)
    pg.get_by_role("tab", name="Runs").click()
    pg.click("#runs-refresh")
    pg.wait_for_selector("#runs-table:has-text('tiny')")
    pg.locator("#runs-pick").locator("input").first.click()
    pg.get_by_role("option", name="tiny").click()
    wait_value(pg, "runs-inspect", "4 of 4")
    shot(request, pg, "runs")
