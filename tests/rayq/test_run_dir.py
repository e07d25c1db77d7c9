"""Runs that never lose or mix anything: metrics.jsonl, run-dir reuse, checkpoints on a full or
damaged disk, permissions under the umask."""

import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from rayq import checkpoint as ckpt_io
from rayq import config as config_io
from rayq import fs
from rayq import run_dir as run_files
from rayq.errors import UserError
from rayq.train import LocalReporter, run


def _cfg(base, **values):
    return config_io.with_values(base, values)


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- metrics.jsonl


def test_metrics_are_strict_json_and_never_repeat_a_step(tmp_path):
    for step in (1, 2, 3, 4):
        run_files.append_metrics(tmp_path, {"step": step, "train/loss": float("nan") if step == 4 else 1.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text.splitlines()[-1], parse_constant=lambda c: pytest.fail(c))["train/loss"] is None
    # a resumed run re-reaches step 3: the lines from step 3 on are replaced, not repeated
    run_files.append_metrics(tmp_path, {"step": 3, "train/loss": 0.5})
    assert [(r["step"], r["train/loss"]) for r in _rows(tmp_path)] == [(1, 1.0), (2, 1.0), (3, 0.5)]


def test_metrics_after_a_resume_have_no_repeated_steps(tiny_setup, tmp_path):
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 8, "train.log_every": 1, "train.checkpoint_every": 4})
    run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data, stop_at=6)
    shutil.rmtree(tmp_path / "checkpoints" / "step_6")  # as if killed after reporting step 6, before its checkpoint
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5, 6]
    run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["train/resumed_from"] for r in rows] == [0] * 4 + [4] * 4  # the restart is marked


# ----------------------------------------------------------------------------- the run directory


def test_out_onto_or_under_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        run_files.make_run_dir(tmp_path / "f")
    with pytest.raises(UserError, match="a parent of this path is a file"):
        run_files.make_run_dir(tmp_path / "f" / "run")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 256 KiB tmpfs (needs root; skipped otherwise); unmounted afterwards."""
    mnt = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_out_on_a_read_only_filesystem_is_one_line(small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(UserError, match="read-only filesystem"):
        run_files.make_run_dir(small_tmpfs)
    with pytest.raises(UserError, match="read-only filesystem"):
        run_files.make_run_dir(small_tmpfs / "run")


def test_reuse_compares_against_the_checkpoints_own_config(tiny_setup, tmp_path):
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 4, "train.checkpoint_every": 4})
    run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data)
    assert run_files.check_reuse(tmp_path, cfg).kind == "finished"
    (tmp_path / "config.yaml").unlink()  # only the checkpoint says what was trained here
    other = _cfg(cfg, **{"recipe.weight_decay": 0.5})
    with pytest.raises(UserError, match=r"recipe\.weight_decay differ from .*step_4.config\.yaml"):
        run_files.check_reuse(tmp_path, other)
    longer = _cfg(cfg, **{"recipe.steps": 6})
    reuse = run_files.check_reuse(tmp_path, longer)
    assert (reuse.kind, reuse.step, reuse.previous_steps) == ("extend", 4, 4)
    with pytest.raises(UserError, match="different config"):  # fewer steps is not an extension
        run_files.check_reuse(tmp_path, _cfg(cfg, **{"recipe.steps": 3}))


# ----------------------------------------------------------------------------- checkpoints


def test_disk_full_during_a_checkpoint_cleans_up_and_says_so(tiny_setup, tmp_path, monkeypatch):
    """ENOSPC from the file write (injected: the logic under test is the cleanup and the message)."""
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 2, "train.checkpoint_every": 2})
    real_save = ckpt_io._save

    def full_disk(obj, path):
        if path.name == "optim.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path)

    monkeypatch.setattr(ckpt_io, "_save", full_disk)
    with pytest.raises(UserError, match=r"^no space left on device /\S* while writing checkpoint") as info:
        run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data)
    assert len(str(info.value).splitlines()) == 1
    assert list((tmp_path / "checkpoints").glob(".step_*")) == []  # no staging dir left behind
    monkeypatch.setattr(ckpt_io, "_save", real_save)
    assert run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data).step == 2  # the retry works


def test_disk_full_on_a_real_tiny_filesystem(tiny_setup, small_tmpfs):
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 2, "train.checkpoint_every": 2})
    with pytest.raises(UserError, match=f"no space left on device {small_tmpfs}"):
        run(cfg, LocalReporter(small_tmpfs, cfg, echo=False), data=data)
    assert list((small_tmpfs / "checkpoints").glob(".step_*")) == []


def test_corrupt_newest_checkpoint_falls_back_to_the_newest_valid_one(tiny_setup, tmp_path, capsys):
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 6, "train.checkpoint_every": 2, "train.keep_checkpoints": 0,
                        "train.log_every": 1})
    full = run(cfg, LocalReporter(tmp_path / "full", cfg, echo=False), data=data)
    run(cfg, LocalReporter(tmp_path / "run", cfg, echo=False), data=data, stop_at=4)
    newest = tmp_path / "run" / "checkpoints" / "step_4" / "model.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated by a disk error or a half copy
    capsys.readouterr()
    resumed = run(cfg, LocalReporter(tmp_path / "run", cfg, echo=False), data=data)
    err = capsys.readouterr().err
    assert "step_4 is damaged" in err and "falling back" in err
    assert resumed.history[0]["train/resumed_from"] == 2
    assert [m["train/loss"] for m in resumed.history] == [m["train/loss"] for m in full.history[2:]]
    assert ckpt_io.damage(tmp_path / "run" / "checkpoints" / "step_4") is None  # re-written whole


def test_files_and_dirs_respect_the_umask(tiny_setup, tmp_path):
    base, data = tiny_setup
    cfg = _cfg(base, **{"recipe.steps": 2, "train.checkpoint_every": 2})
    before = os.umask(0o002)
    try:
        assert fs.current_umask() == 0o002
        run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data)
    finally:
        os.umask(before)
    step = tmp_path / "checkpoints" / "step_2"
    assert step.stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o664
    assert (step / "model.pt").stat().st_mode & 0o777 == 0o664
    shutil.rmtree(tmp_path / "checkpoints")
