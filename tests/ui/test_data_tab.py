"""The Data tab's functions, without a browser: what it shows of a file is what training reads (kind, records,
loss mask, the trainer's summary line), checked against counts made here; errors are one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from peft_rwkv7.ui import data_tab  # noqa: E402
from peft_rwkv7.ui.app import error_html  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo" / "ship_log.jsonl"
TRAINED, CONTEXT = "trained", "context only"  # the English texts data.loss / data.context


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _open(path, kind="auto", ctx_len=512, tmp_path=None):
    return data_tab.open_data(str(path), kind, "world", ctx_len, cache_dir=tmp_path / "cache")


def _summary_numbers(line: str) -> dict:
    m = re.match(r"data: (\d+) documents, (\d+) tokens, (\d+) samples of (\d+) tokens per epoch; (\d+) steps x "
                 r"(\d+) samples = ([\d.]+) epochs", line)
    assert m, line
    keys = ("docs", "tokens", "samples", "ctx", "steps", "per_step", "epochs")
    return dict(zip(keys, (float(g) if k == "epochs" else int(g) for k, g in zip(keys, m.groups()))))


def _text(pieces, label) -> str:
    return "".join(t for t, lab in pieces if lab == label)


def test_demo_summary_matches_an_independent_count(world, tmp_path):
    texts = [json.loads(line)["text"] for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]
    counts = [len(world.encode(t)) + 1 for t in texts]  # each document ends with end-of-text
    opened = _open(DEMO, tmp_path=tmp_path)
    assert opened["kind"] == "text"
    n = _summary_numbers(opened["summary"])
    held = int(0.02 * len(texts))  # data.eval_split's default share, held out as training holds it out
    assert held == 40 and f"; {held} more documents held out for eval" in opened["summary"]
    assert n["docs"] == len(texts) - held == 1960
    # the held-out documents' tokens are missing from the count: between the 40 shortest and the 40 longest
    ranked = sorted(counts)
    assert sum(counts) - sum(ranked[-held:]) <= n["tokens"] <= sum(counts) - sum(ranked[:held])
    assert (n["ctx"], n["steps"], n["per_step"]) == (512, 200, 4)  # the recipe's defaults: 200 steps x 4
    assert n["epochs"] == pytest.approx(200 * 4 / n["samples"], rel=5e-3)
    assert opened["records"] == [json.loads(line) for line in DEMO.read_text().splitlines()[:5]]
    # text data: every token carries loss; the first document is its text and the end-of-text
    pieces = data_tab.highlighted(opened, "en")
    first = pieces[: pieces.index(("\n\n", None))]
    assert {lab for _, lab in first} == {TRAINED}
    assert "".join(t for t, _ in first) == texts[0] + data_tab.EOT_SHOWN
    assert data_tab.kind_line("auto", "text") == "data.kind: auto -> text"


def test_small_file_counts_exactly_with_an_empty_document(world, tmp_path):
    texts = ["Ship's log, day 1. Calm.", "", "Wind: north, 20 knots. 風"]
    path = _write(tmp_path / "three.jsonl", [{"text": t} for t in texts])
    opened = _open(path, ctx_len=8, tmp_path=tmp_path)
    n = _summary_numbers(opened["summary"])
    assert n["docs"] == 3  # 2% of 3 documents holds none out
    assert n["tokens"] == sum(len(world.encode(t)) + 1 for t in texts)
    assert "; 1 empty documents (no text) add nothing" in opened["summary"]


def test_sft_masks_train_the_response_only(tmp_path):
    path = _write(tmp_path / "sft.jsonl", [{"prompt": "Where is the ship?", "response": "At 43 N, 8 W. 𝄞"},
                                           {"prompt": "Wind today?", "response": "North, 20 knots."},
                                           {"prompt": "Third?", "response": "Not shown."}])
    opened = _open(path, ctx_len=64, tmp_path=tmp_path)
    assert opened["kind"] == "sft"
    pieces = data_tab.highlighted(opened, "en")
    cut = pieces.index(("\n\n", None))
    first, second = pieces[:cut], pieces[cut + 1 :]
    eot = data_tab.EOT_SHOWN
    # the World chat rendering of data.prompt_template / response_template: the prompt is context only
    assert _text(first, CONTEXT) == "User: Where is the ship?\n\nAssistant:"
    assert _text(first, TRAINED) == " At 43 N, 8 W. 𝄞\n\n" + eot  # 𝄞 is 3 tokens, shown once
    assert _text(second, CONTEXT) == "User: Wind today?\n\nAssistant:"
    assert _text(second, TRAINED) == " North, 20 knots.\n\n" + eot
    assert "Third" not in "".join(t for t, _ in pieces)  # two documents shown
    assert len(opened["records"]) == 3
    # the page's language: the labels come in Chinese for a zh page
    zh = data_tab.highlighted(opened, "zh")
    assert {lab for _, lab in zh if lab} == {"训练", "仅作上下文"}


def test_chat_masks_train_the_assistant_replies(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy."},
        {"role": "user", "content": "Where?"}, {"role": "assistant", "content": "North."}]}])
    opened = _open(path, ctx_len=64, tmp_path=tmp_path)
    assert opened["kind"] == "chat"
    pieces = data_tab.highlighted(opened, "en")
    assert _text(pieces, TRAINED) == " Ahoy.\n\n North.\n\n" + data_tab.EOT_SHOWN
    assert _text(pieces, CONTEXT) == "User: Hi\n\nAssistant:User: Where?\n\nAssistant:"


def test_data_too_short_for_one_sample_still_shows_its_records(world, tmp_path):
    text = "Ship's log, day 1. Calm."
    path = _write(tmp_path / "short.jsonl", [{"text": text}])
    status, line, records, pieces = data_tab.on_open(str(path), "auto", "world", 512, "trained")
    n = len(world.encode(text)) + 1
    assert status == error_html(f"{path}: {n} tokens cannot fill one sample of ctx_len+1 = 513; lower "
                                "data.ctx_len or use data.sampling: pad")  # as the trainer refuses it
    assert line == "data.kind: auto -> text"
    assert records == [{"text": text}]
    assert "".join(t for t, _ in pieces) == text + data_tab.EOT_SHOWN


def _one_line_error(html: str, expected: str) -> None:
    assert html == error_html(expected)
    assert "\n" not in html and "Traceback" not in html


def test_errors_are_one_line(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    out = data_tab.on_open(missing, "auto", "world", 512, "trained")
    _one_line_error(out[0], f"data.path {missing}: no such file (nor a binidx PREFIX.bin/.idx)")
    assert out[1:] == ("", None, None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    _one_line_error(data_tab.on_open(str(bad), "auto", "world", 512, "trained")[0],
                    f"{bad}:2: invalid JSON (Expecting value at column 10)")
    _one_line_error(data_tab.on_open(str(DEMO), "chat", "world", 512, "trained")[0],
                    f"{DEMO}:1: missing field 'messages' (keys: 'text')")
    _one_line_error(data_tab.on_open(str(DEMO), "auto", "world", 0, "trained")[0],
                    "data.ctx_len: must be a positive integer, got 0")
    _one_line_error(data_tab.on_build(str(DEMO), "", "world", "trained"),
                    "--out is required: the output prefix (writes PREFIX.bin and PREFIX.idx)")


def test_build_binidx_writes_what_the_cli_writes(tmp_path, capsys):
    from peft_rwkv7 import cli

    path = _write(tmp_path / "docs.jsonl", [{"text": "Ship's log, day 1."}, {"text": "Calm sea. 風"}])
    assert cli.main(["data", "build", str(path), "--out", str(tmp_path / "cli" / "docs")]) == 0
    cli_line = capsys.readouterr().out.strip()
    out = str(tmp_path / "ui" / "docs")
    shown = data_tab.on_build(str(path), out, "world", "trained")
    assert shown == "<div>" + cli_line.replace(str(tmp_path / "cli" / "docs"), out) + "</div>"
    for ext in (".bin", ".idx"):
        assert (tmp_path / "ui" / f"docs{ext}").read_bytes() == (tmp_path / "cli" / f"docs{ext}").read_bytes()
    # the pair opens as binidx data: its documents, every token trained
    opened = _open(out, ctx_len=8, tmp_path=tmp_path)
    assert opened["kind"] == "binidx"
    assert [r["text"] for r in opened["records"]] == ["Ship's log, day 1.", "Calm sea. 風"]


def test_session_language_from_the_probe():
    assert data_tab.session_lang("训练", "data.loss") == "zh"
    assert data_tab.session_lang("trained", "data.loss") == "en"
    assert data_tab.session_lang(None, "data.loss") == "en"


def test_language_switch_relabels_the_shown_tokens():
    shown = [{"token": "User:", "class_or_confidence": "仅作上下文"}, {"token": " Ahoy", "class_or_confidence": "训练"},
             {"token": "\n\n", "class_or_confidence": None}]  # as gr.HighlightedText hands its value back
    assert data_tab.relabel_pieces(shown, "en") == [("User:", CONTEXT), (" Ahoy", TRAINED), ("\n\n", None)]
    assert data_tab.relabel_pieces(None, "zh") is None
    assert data_tab.color_map("zh") == {"训练": data_tab.COLORS["loss"], "仅作上下文": data_tab.COLORS["context"]}


def test_the_page_builds_with_the_tabs(tmp_path):
    from peft_rwkv7.ui.app import build_app

    demo = build_app(tmp_path / "runs")
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"data-path", "data-open", "data-masks", "data-summary", "data-build", "eval-run", "eval-mode",
            "eval-plot"} <= ids
