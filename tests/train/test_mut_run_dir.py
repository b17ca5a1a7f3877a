"""run_dir.py's rules one by one (found by mutation testing, scripts/mutation.sh run_dir): which names are
checkpoints, when a run's end counts as cut short, which temp files a taken-up run removes, and which log lines
are records."""

from __future__ import annotations

import os

from peft_rwkv7 import run_dir as rd


def test_checkpoints_are_step_files_and_step_folders_of_six_or_more_digits_in_step_order(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step_000010.pt", "step_0000100.pt", "step_000002.pt", "step_12.pt", "step_000003.pt.tmp",
                 "xstep_000004.pt", "step_000005", ".step_000006.pt.abc12345.tmp"):
        (folder / name).write_bytes(b"")  # a file named like a DeepSpeed folder is no checkpoint
    for name in ("step_000007", "step_000008.pt", "step_000009.tmp"):
        (folder / name).mkdir()  # a folder named like a one-process file is none either
    assert rd.list_checkpoints(tmp_path) == [(2, folder / "step_000002.pt"), (7, folder / "step_000007"),
                                             (10, folder / "step_000010.pt"), (100, folder / "step_0000100.pt")]
    assert rd.list_checkpoints(tmp_path / "absent") == []
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "checkpoints").write_text("a file, not a folder")
    assert rd.list_checkpoints(tmp_path / "plain") == []


def test_an_end_is_cut_short_while_the_marker_is_there_and_for_a_full_run_without_its_newer_model(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "step_000002.pt").write_bytes(b"")
    saved = rd.list_checkpoints(tmp_path)
    assert not rd.end_cut_short(tmp_path, "lora", saved)
    assert not rd.end_cut_short(tmp_path, "full", [])  # no checkpoint: nothing to finish
    assert rd.end_cut_short(tmp_path, "full", saved)  # no model.pth
    model = tmp_path / "model.pth"
    model.write_bytes(b"")
    t = (ck / "step_000002.pt").stat().st_mtime
    os.utime(model, (t + 5, t + 5))
    assert not rd.end_cut_short(tmp_path, "full", saved)
    os.utime(model, (t, t))  # written in the checkpoint's clock tick (a coarse file system's): after it, so whole
    assert not rd.end_cut_short(tmp_path, "full", saved)
    os.utime(model, (t - 5, t - 5))  # from before the run was extended
    assert rd.end_cut_short(tmp_path, "full", saved)
    os.utime(model, (t + 5, t + 5))
    rd.mark_ending(tmp_path, True)
    assert (tmp_path / rd.ENDING).exists()
    assert rd.end_cut_short(tmp_path, "lora", saved) and rd.end_cut_short(tmp_path, "full", saved)
    assert not rd.end_cut_short(tmp_path, "lora", [])
    rd.mark_ending(tmp_path, False)
    rd.mark_ending(tmp_path, False)  # cleared twice: no error
    assert not (tmp_path / rd.ENDING).exists() and not rd.end_cut_short(tmp_path, "lora", saved)
    assert rd.end_parts("lora") == "final eval, loss plot"
    assert rd.end_parts("full") == "final eval, loss plot, model.pth"


def test_only_the_runs_own_temp_files_are_removed(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    stale = [tmp_path / n for n in (".adapter.safetensors.k3_9zq1a.tmp", ".adapter.json.abcdefgh.tmp",
                                    ".state.pth.x.tmp", ".recipe.yaml.12345678.tmp", ".log.jsonl.aaaaaaaa.tmp",
                                    ".model.pth.bbbbbbbb.tmp", ".loss.png.tmp.png")]
    stale += [ck / n for n in (".step_000002.pt.q1w2e3r4.tmp", ".step_0000100.pt.z.tmp")]
    kept = [tmp_path / n for n in (".notes.tmp", "adapter.safetensors.abcdefgh.tmp", ".adapter.safetensors.tmp",
                                   ".adapter.safetensors.abcdefgh.tmpx", ".merged.pth.abcdefgh.tmp",
                                   ".loss.png.tmp.pngx", "x.loss.png.tmp.png", ".xadapter.json.abcdefgh.tmp")]
    kept += [ck / n for n in (".step_12.pt.abcdefgh.tmp", "step_000002.pt", ".step_000002.ptx.abc.tmp",
                              ".adapter.json.abcdefgh.tmp")]
    for p in stale + kept:
        p.write_bytes(b"x")
    folder_like = tmp_path / ".state.pth.folder.tmp"
    folder_like.mkdir()
    # a DeepSpeed save killed before its commit (train/checkpoint.save_engine_checkpoint): step_N.tmp/, shards
    engine_tmp = ck / "step_000004.tmp"
    (engine_tmp / "ds").mkdir(parents=True)
    (engine_tmp / "ds" / "shard.pt").write_bytes(b"x")
    pruned = ck / "step_000001.old"  # a pruned checkpoint folder being deleted (train/checkpoint._prune)
    (pruned / "ds").mkdir(parents=True)
    committed, short, not_dir = ck / "step_000002", ck / "step_4.tmp", ck / "step_000005.tmp"
    committed.mkdir(), short.mkdir(), not_dir.write_bytes(b"x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")
    (ck / "step_000006.tmp").symlink_to(outside, target_is_directory=True)
    rd.remove_stale_temps(tmp_path)
    assert [p.name for p in stale if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []
    assert folder_like.is_dir()
    assert not engine_tmp.exists() and not pruned.exists()
    assert committed.is_dir() and short.is_dir() and not_dir.is_file() and (outside / "keep").is_file()
    rd.remove_stale_temps(tmp_path / "absent")  # no run there: nothing to do


def test_log_records_are_whole_json_objects_with_an_integer_step_and_numeric_figures(tmp_path):
    assert rd.read_log(tmp_path) == []
    lines = [
        b'{"step": 1, "loss": 2.5, "lr": 0.1, "time": 10}',
        b'{"step": 2, "loss": "2.5"}',  # a figure that is not a number
        b'{"step": true, "loss": 1.0}',  # a bool is no step
        b'{"step": 2.0, "loss": 1.0}',  # nor a float
        b'{"loss": 1.0}',  # no step
        b'[1, 2]',  # not an object
        b'{"step": 3, "eval_loss": false}',
        b'{"step": 3, "time": "noon"}',
        b'{"step": 3, "loss": true}',
        b'not json',
        b'{"step": 4, "eval_loss": 1.5, "note": "x"}',
        b'{"step": 5, "loss": 1.25, "\xff": 1}',  # a broken byte inside a key: read as U+FFFD, still a record
        b'{"step": 6, "loss": 1.0}',  # no newline: being written
    ]
    (tmp_path / "log.jsonl").write_bytes(b"\n".join(lines))
    assert rd.read_log(tmp_path) == [{"step": 1, "loss": 2.5, "lr": 0.1, "time": 10},
                                     {"step": 4, "eval_loss": 1.5, "note": "x"},
                                     {"step": 5, "loss": 1.25, "\ufffd": 1}]


def test_a_leftover_that_cannot_be_removed_does_not_stop_the_run(tmp_path, monkeypatch):
    """The cleanup is best effort: a killed write's temp file or a file of a killed DeepSpeed save that cannot be
    removed (another user's, a read-only mount) is left, and the run that takes the directory up goes on."""
    import os

    engine_tmp = tmp_path / "checkpoints" / "step_000004.tmp"
    engine_tmp.mkdir(parents=True)
    (engine_tmp / "stuck.pt").write_bytes(b"x")
    (engine_tmp / "other.pt").write_bytes(b"x")
    stuck_temp = tmp_path / ".adapter.json.abcdefgh.tmp"
    stuck_temp.write_bytes(b"x")
    real = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).endswith(("stuck.pt", stuck_temp.name)):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    rd.remove_stale_temps(tmp_path)  # no error
    assert sorted(p.name for p in engine_tmp.iterdir()) == ["stuck.pt"] and stuck_temp.is_file()
