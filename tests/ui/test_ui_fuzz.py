"""Bad and unexpected input to the web UI's event handlers, called in-process as the page calls them: cleared
(None) and non-finite number boxes, blank fields, hand-edited run folders, files where folders belong, clicks
out of order, two Starts into one out_dir, and the language switch. Each answer is one error line naming the
field or file; nothing a user made is written over or deleted."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from peft_rwkv7.errors import UserError  # noqa: E402
from peft_rwkv7.train.recipe import BUNDLED  # noqa: E402
from peft_rwkv7.train.runlock import run_lock  # noqa: E402
from peft_rwkv7.ui import data_tab, eval_tab, form, runs_tab, train_tab  # noqa: E402
from peft_rwkv7.ui.app import Ui, build_app  # noqa: E402
from peft_rwkv7.ui.runs import Trainers, delete_run, list_runs, run_info  # noqa: E402
from peft_rwkv7.ui.texts import text  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STATE = str(BUNDLED / "state_tune.yaml")
DEMO = ROOT / "data" / "demo" / "ship_log.jsonl"


@pytest.fixture(autouse=True)
def _in_checkout(monkeypatch):
    monkeypatch.chdir(ROOT)  # the bundled recipes and the page's defaults read data/demo/... from here


def make_run(root: Path, name: str, recipe: str = "train: {max_steps: 4}\n", log: str | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe, encoding="utf-8")
    if log is not None:
        (run / "log.jsonl").write_text(log, encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The whole page over a runs folder holding one hand-made, stopped run ("r")."""
    runs = tmp_path_factory.mktemp("fuzz_runs") / "runs"
    make_run(runs, "r")
    import os

    old = os.getcwd()
    os.chdir(ROOT)
    try:
        return build_app(runs)
    finally:
        os.chdir(old)


def page_ui(demo) -> Ui:
    """The page's Ui (the language chooser's handler is its bound relabel)."""
    return next(f.fn.__self__ for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "relabel")


def handler(demo, elem_id: str | None = None, name: str | None = None, event: str = "click"):
    for f in demo.fns.values():
        if name is not None and getattr(f.fn, "__name__", "") == name:
            return f
        if elem_id is not None and any(getattr(demo.blocks[i], "elem_id", None) == elem_id and e == event
                                       for i, e in f.targets):
            return f
    raise KeyError(elem_id or name)


def fire(demo, elem_id: str | None = None, given: dict | None = None, lang: str = "en", name: str | None = None):
    """Run an event's handler as the page would: inputs by elem_id from `given`, every text that follows the
    language as the page shows it in `lang` (after the switch), the rest as built. The last yield of a stream."""
    f = handler(demo, elem_id, name)
    given = given or {}
    shown = {id(c): text(lang, key) for c, key, prop in page_ui(demo).labelled if prop == "value"}
    args = []
    for c in f.inputs:
        eid = getattr(c, "elem_id", None)
        args.append(given[eid] if eid in given else shown.get(id(c), getattr(c, "value", None)))
    out = f.fn(*args)
    return list(out)[-1] if inspect.isgenerator(out) else out


def html_of(out) -> str:
    return out[0] if isinstance(out, list | tuple) else out


# --- Train tab -------------------------------------------------------------------------------------------------


def raw_form(**changed):
    specs = form.fields()
    values = form.recipe_values(STATE)
    raw = [form.shown(s, values[s.key]) for s in specs]
    keys = [s.key for s in specs]
    for key, v in changed.items():
        raw[keys.index(key.replace("__", "."))] = v
    return specs, raw


@pytest.mark.parametrize(("key", "value"), [(k, v) for k in ("train.max_steps", "data.ctx_len")
                                              for v in (math.nan, math.inf, -math.inf, "many")]
                         + [("train.lr", "many")])
def test_non_finite_number_names_its_field(key, value):
    """An integer box holding NaN or inf, or any number box holding text (through the API), used to raise."""
    specs, raw = raw_form(**{key: value})
    extra, err, bad = form.check(STATE, specs, raw)
    assert extra == [] and bad == key and err.startswith(f"{key}: expected ") and "\n" not in err


@pytest.mark.parametrize("value", [None, "", "   "])
def test_blank_out_dir_is_refused(value):
    """out_dir "" would train into the working directory."""
    specs, raw = raw_form(out_dir=value)
    extra, err, bad = form.check(STATE, specs, raw)
    assert (extra, bad) == ([], "out_dir") and err == "out_dir: expected the run directory, e.g. runs/my_run, got " \
                                                       "nothing"


def test_recipe_file_not_text_is_one_line(tmp_path):
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00 not yaml")
    with pytest.raises(UserError, match="bin.yaml: not UTF-8 text"):
        form.recipe_values(str(bad))
    specs, raw = raw_form()
    assert form.check(str(bad), specs, raw)[1].startswith(f"{bad}: not UTF-8 text")


def test_save_as_a_directory_says_so(tmp_path):
    folder = tmp_path / "saved.yaml"
    folder.mkdir()
    with pytest.raises(UserError, match="is a directory, expected a file name"):
        train_tab.save_yaml(STATE, [], str(folder))
    assert folder.is_dir() and not any(folder.iterdir())


def test_hand_edited_log_does_not_stop_the_progress_line(tmp_path):
    run = make_run(tmp_path, "r", log='garbage\n{"step": 1, "loss": 2.0, "time": 1}\n'
                                       '{"step": 2, "loss": 1.5, "tokens_per_s": "fast", "time": 1e309}\n[1]\n')
    with run_lock(run):  # running: the ETA is shown, from times of 1 and inf
        line = train_tab.progress_html(Ui(tmp_path), str(run))
    assert "step 2 of 4" in line and "- tokens/s" in line and "loss 1.5000" in line
    assert train_tab.fmt_eta(math.inf) == "" and train_tab.fmt_eta(math.nan) == ""


def test_negative_max_steps_is_not_finished(tmp_path):
    run = make_run(tmp_path, "neg", "train: {max_steps: -5}\n")
    info = run_info(run)
    assert (info.status, info.max_steps) == ("stopped", 0)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_stop_without_out_dir_names_the_field(page, value):
    msg = fire(page, "train-stop", {"field-out_dir": value})
    assert "ui-error" in msg and "out_dir: give the run directory" in msg


def test_stop_before_start_names_the_run(page, tmp_path):
    msg = fire(page, "train-stop", {"field-out_dir": str(tmp_path / "never")})
    assert "ui-error" in msg and f"no run is training in {tmp_path / 'never'}" in msg


@pytest.fixture
def sleepers(monkeypatch):
    """Trainers whose processes sleep in place of training (a trainer that has not taken its lock yet)."""
    real = subprocess.Popen
    started = []

    def popen(cmd, **kw):
        started.append(real([sys.executable, "-c", "import time; time.sleep(60)"], **kw))
        return started[-1]

    monkeypatch.setattr("peft_rwkv7.ui.runs.subprocess.Popen", popen)
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_two_starts_into_one_out_dir(tmp_path, sleepers):
    trainers = Trainers()
    out = tmp_path / "run"
    trainers.start(STATE, [f"out_dir={out}"], out)
    with pytest.raises(UserError, match="in use by another rwkv-peft train"):
        trainers.start(STATE, [f"out_dir={out}"], out, resume=True)
    assert len(sleepers) == 1
    # Stop reaches the trainer this page started even before it holds the run lock
    assert trainers.stop(out)
    assert sleepers[0].wait(timeout=30) != 0  # its Ctrl-C (KeyboardInterrupt) ended it


def test_a_trainer_that_let_go_of_its_lock_is_not_starting(tmp_path, sleepers):
    """A trainer releases the run lock before its process ends (summary line, loss.png): Resume at once is fine."""
    trainers = Trainers()
    out = tmp_path / "run"
    trainers.start(STATE, [f"out_dir={out}"], out)
    (out / ".lock").write_text(f"pid {sleepers[0].pid} on here, started now")  # held once, released
    assert not trainers.stop(out)  # nothing trains there now
    trainers.start(STATE, [f"out_dir={out}"], out, resume=True)
    assert len(sleepers) == 2 and sleepers[0].poll() is None


def test_out_dir_that_is_a_file(tmp_path, sleepers):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(UserError, match="notes.txt: is a file, expected the run directory"):
        Trainers().start(STATE, [f"out_dir={notes}"], notes)
    assert notes.read_text() == "mine" and not sleepers


def test_train_messages_follow_the_language_switch(page, tmp_path):
    msg = fire(page, "train-check", lang="zh")[0]
    assert text("zh", "train.ok") in msg
    assert text("zh", "train.no_run", run=str(tmp_path)) in fire(page, "train-stop", {"field-out_dir": str(tmp_path)},
                                                                 lang="zh")
    run = make_run(tmp_path, "zh")
    progress = fire(page, name="on_tick", given={"field-out_dir": str(run)}, lang="zh")[0]
    assert text("zh", "status.stopped") in progress


# --- Runs tab --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["model: just-a-string\ntrain: {max_steps: 4}\n",
                                    "model: [1, 2]\ntrain: {max_steps: 4}\n",
                                    "model: {path: [a]}\ntrain: {max_steps: 4}\n"])
def test_open_run_with_a_hand_edited_model_section(tmp_path, recipe):
    make_run(tmp_path, "odd", recipe)
    summary, _, base, out, err = runs_tab.open_run(Ui(tmp_path), "odd", "merge")
    assert base == "" and err == "" and "run directory" in summary and out == str(tmp_path / "odd" / "merged.pth")


def test_damaged_loss_png_falls_back_to_the_log(tmp_path):
    run = make_run(tmp_path, "png", log='{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    (run / "loss.png").write_bytes(b"not a png")
    summary, image, *_, err = runs_tab.open_run(Ui(tmp_path), "png", "merge")
    assert err == "" and image is not None and (run / "loss.png").read_bytes() == b"not a png"
    (run / "log.jsonl").unlink()
    assert runs_tab.curve(run) is None


def test_deleting_a_linked_run_deletes_nothing(tmp_path):
    elsewhere = make_run(tmp_path / "elsewhere", "kept")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "link").symlink_to(elsewhere)
    assert [r.name for r in list_runs(runs)] == ["link"]
    msg = runs_tab.delete(Ui(runs), "link", True)
    assert "ui-error" in msg and "a link to" in msg and "nothing deleted" in msg
    assert (elsewhere / "recipe.yaml").is_file() and (runs / "link").is_symlink()
    with pytest.raises(UserError, match="nothing deleted"):
        delete_run(runs / "link")


def test_run_with_a_recipe_that_is_not_text(tmp_path):
    """One damaged recipe.yaml used to stop the runs table (every refresh) and the page from building at all."""
    make_run(tmp_path, "ok")
    (make_run(tmp_path, "bin") / "recipe.yaml").write_bytes(b"\xff\xfe\x00train")
    rows, _ = runs_tab.refresh(Ui(tmp_path))
    assert sorted(r[0] for r in rows) == ["bin", "ok"]
    assert "not a readable YAML file" in runs_tab.open_run(Ui(tmp_path), "bin", "merge")[4]
    assert "not started" not in train_tab.progress_html(Ui(tmp_path), str(tmp_path / "bin"))
    build_app(tmp_path)


def test_unreadable_runs_folder_shows_no_runs(tmp_path, monkeypatch):
    make_run(tmp_path, "r")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    assert runs_tab.refresh(Ui(tmp_path)) == ([], {"choices": [], "value": None})


def test_delete_that_fails_midway_is_one_line(tmp_path, monkeypatch):
    make_run(tmp_path, "r")

    def rmtree(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(Path(path) / "checkpoints"))

    monkeypatch.setattr("peft_rwkv7.ui.runs.shutil.rmtree", rmtree)
    msg = runs_tab.delete(Ui(tmp_path), "r", True)
    assert msg == f'<div class="ui-error">error: {tmp_path / "r"}: cannot be deleted (Permission denied); what is ' \
                  'left is still there</div>'


@pytest.mark.parametrize(("fmt", "out"), [("rwkv-peft", "adapter.safetensors"), ("merge", "recipe.yaml"),
                                          ("st-adapter", "adapter.json"), ("hf", "."), ("runner-state", "checkpoints"),
                                          ("merge", "BASE")])
def test_write_never_over_the_run_or_the_base(tmp_path, monkeypatch, fmt, out):
    """`export --format rwkv-peft --out RUN/adapter.safetensors` wrote the export over the run's own adapter."""
    run = make_run(tmp_path / "runs", "r")
    for name in ("adapter.safetensors", "adapter.json", "checkpoints/step_000004.pt"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_bytes(b"mine")
    base = tmp_path / "base.pth"
    base.write_bytes(b"model")
    monkeypatch.setattr(runs_tab, "run_cli", lambda args: pytest.fail(f"ran {args}"))
    target = base if out == "BASE" else run / out
    msg = runs_tab.write(Ui(tmp_path / "runs"), fmt, "r", str(base), str(target))
    assert "ui-error" in msg and "nothing is overwritten" in msg
    assert base.read_bytes() == b"model" and all((run / n).read_bytes() == b"mine" for n in ("adapter.safetensors",
                                                                                           "adapter.json"))


def test_write_again_over_its_own_output(tmp_path, monkeypatch):
    run = make_run(tmp_path, "r")
    (run / "merged.pth").write_bytes(b"written by Write before")
    monkeypatch.setattr(runs_tab, "run_cli", lambda args: (0, f"merged into {args[-1]}"))
    assert "ui-ok" in runs_tab.write(Ui(tmp_path), "merge", "r", "base.pth", str(run / "merged.pth"))


def test_write_with_no_format_names_the_field(tmp_path):
    make_run(tmp_path, "r")
    msg = runs_tab.write(Ui(tmp_path), None, "r", "", "")
    assert "ui-error" in msg and "Write as: expected one of merge" in msg


def test_runs_table_follows_the_language_switch(page):
    table, _ = fire(page, "runs-refresh", lang="zh")
    rows = table["data"] if isinstance(table, dict) else table
    assert [r[2] for r in rows] == [text("zh", "status.stopped")]
    assert table["headers"][0] == text("zh", "runs.col.run")
    by_id = {getattr(b, "elem_id", None): b for b in page.blocks.values()}
    shown = by_id["runs-table"].postprocess(table)  # what the page draws: the Chinese column names
    assert [h for h in shown.headers] == [text("zh", f"runs.col.{c}") for c in runs_tab.COLUMNS]
    msg = fire(page, "runs-delete", {"runs-pick": "r", "runs-confirm": False}, lang="zh")[0]
    assert text("zh", "runs.need_confirm") in msg


# --- Chat tab --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("elem_id", "value", "flag"), [
    ("chat-max-tokens", None, "--max-tokens"), ("chat-max-tokens", math.nan, "--max-tokens"),
    ("chat-max-tokens", 2.5, "--max-tokens"), ("chat-seed", None, "--seed"), ("chat-seed", math.inf, "--seed"),
    ("chat-seed", 2.0**70, "--seed"), ("chat-temperature", None, "--temperature"), ("chat-top-p", None, "--top-p")])
def test_chat_number_boxes_cleared_or_not_finite(page, elem_id, value, flag):
    *_, status = fire(page, "chat-send", {"chat-message": "hello", elem_id: value, "chat-adapter": ""})
    assert "ui-error" in status and f"error: {flag}" in status and "\n" not in status


def test_chat_with_no_message_says_so(page):
    tuned, base, held, message, status = fire(page, "chat-send", {"chat-message": "   "}, lang="zh")
    assert text("zh", "chat.no_message") in status and "ui-error" in status


def test_chat_reply_failing_midway_keeps_what_was_shown(page, monkeypatch):
    from peft_rwkv7.infer.chat import ChatSession

    def ask(self, text):
        yield "Ahoy"
        raise RuntimeError("token 70000 is outside the model's vocabulary\n  (details)")

    monkeypatch.setattr(ChatSession, "ask", ask)
    tuned, base, held, message, status = fire(page, "chat-send", {"chat-message": "hi", "chat-adapter": "",
                                                                  "chat-compare": False, "chat-max-tokens": 4})
    assert status == '<div class="ui-error">error: token 70000 is outside the model&#x27;s vocabulary</div>'
    assert tuned[-1] == {"role": "assistant", "content": "Ahoy"} and held is None  # the next Send starts afresh


# --- Data tab --------------------------------------------------------------------------------------------------


def test_build_never_writes_over_an_existing_pair(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "Ship's log, day 1."}) + "\n")
    (tmp_path / "mine.bin").write_bytes(b"mine")
    msg = data_tab.on_build(str(src), str(tmp_path / "mine"), "world", "trained")
    assert "ui-error" in msg and "mine.bin exists" in msg
    assert (tmp_path / "mine.bin").read_bytes() == b"mine" and not (tmp_path / "mine.idx").exists()


@pytest.mark.parametrize(("path", "tok", "expected"), [
    (None, "world", "data.path: give the data file"), ("  ", "world", "data.path: give the data file"),
    (str(DEMO), None, "--tokenizer: give &#x27;world&#x27; or a tokenizer.json file, got nothing")])
def test_build_with_blank_fields_names_them(tmp_path, path, tok, expected):
    msg = data_tab.on_build(path, str(tmp_path / "out"), tok, "trained")
    assert "ui-error" in msg and expected in msg
    assert not (tmp_path / "out.bin").exists()


# --- Evaluate tab ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [None, "", "   "])
def test_evaluate_with_no_model_names_the_field(model):
    status, table, image = list(eval_tab.on_run("loss", model, "", str(DEMO), False, 2048, "Loss / perplexity"))[-1]
    assert status == '<div class="ui-error">error: --model: give a model file (.pth, .st or an HF directory)</div>'
    assert (table, image) == ("", None)


def test_evaluate_result_that_is_not_json(monkeypatch):
    def fake_cli(args, cwd=None):
        yield 0, "done, but no JSON\n", ""

    monkeypatch.setattr(eval_tab, "run_cli", fake_cli)
    last = list(eval_tab.evaluate("loss", "m.pth", "", "d.jsonl", False, 2048))[-1]
    assert last == {"error": "rwkv-peft eval ended without a loss result: done, but no JSON"}

