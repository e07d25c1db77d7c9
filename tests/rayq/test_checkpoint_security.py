"""No checkpoint file runs code: a poisoned DCP `.metadata`, a poisoned byte item inside a shard,
or a torch.save'd object in model.pt / trainer.pt / optim.pt is refused in one line (exit 2 at the
CLI) naming the file, and the payload never runs; a real sharded checkpoint still loads."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayq import checkpoint as ckpt_io
from rayq import config as config_io
from rayq.errors import UserError
from rayq.train import LocalReporter, run

RAYQ = str(Path(sys.executable).with_name("rayq"))
STEPS, FIRST = 4, 2


class SystemCall:
    """Unpickling this runs a shell command (what an attacker would put in a checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecWrite:
    """Unpickling this runs Python source that writes a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


PAYLOADS = {"os.system": SystemCall, "exec": ExecWrite}


def _cfg(base):
    return config_io.with_values(base, {"recipe.steps": STEPS, "recipe.batch_size": 4, "recipe.precision": "fp32",
                                        "train.checkpoint_every": FIRST, "train.eval_every": STEPS,
                                        "train.log_every": 1})


def _to_sharded(cfg, step_dir: Path, out: Path, store: Path, *, lr=None) -> dict:
    """Rewrite the full checkpoint `step_dir` as a sharded one in `out` through rayq's FSDP strategy
    (1-process gloo group); `lr` replaces the optimizer's lr (a byte item of the DCP shard).
    Returns the model state FSDP.load reads back from `out`."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from rayq.parallel import FSDP
    from rayq.train import build_model, build_optimizer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        strategy = FSDP(cfg, torch.device("cpu"), 0, 1)
        model = strategy.shard(build_model(cfg, torch.device("cpu")))
        optimizer = build_optimizer(model, cfg.recipe)
        trainer = strategy.load(step_dir, model, optimizer)  # a full checkpoint, sharded on load
        if lr is not None:
            optimizer.param_groups[0]["lr"] = lr
        strategy.save(out, model, optimizer, trainer_state=trainer)
        if lr is not None:
            return {}
        model = strategy.shard(build_model(cfg, torch.device("cpu")))
        optimizer = build_optimizer(model, cfg.recipe)
        strategy.load(out, model, optimizer)  # the resume path: dcp.load through SafeFileSystemReader
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_setup, tmp_path_factory):
    """A run stopped at step 2 whose newest checkpoint is sharded (DCP), and its config file."""
    base, data = tiny_setup
    cfg = _cfg(base)
    root = tmp_path_factory.mktemp("security")
    full_run = root / "full"
    run(cfg, LocalReporter(full_run, cfg, echo=False), data=data, stop_at=FIRST)
    full_step = full_run / "checkpoints" / f"step_{FIRST}"
    sharded_run = root / "sharded"
    shutil.copytree(full_run, sharded_run)
    step = sharded_run / "checkpoints" / f"step_{FIRST}"
    shutil.rmtree(step)
    reloaded = _to_sharded(cfg, full_step, step, root / "store1")
    config_io.save(cfg, root / "run.yaml")
    return {"cfg": cfg, "root": root, "full": full_run, "sharded": sharded_run, "reloaded": reloaded}


def _copy_run(runs, tmp_path: Path, kind: str = "sharded") -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    shutil.copytree(runs[kind], run_dir)
    return run_dir, run_dir / "checkpoints" / f"step_{FIRST}"


def _rayq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAYQ, *args], capture_output=True, text=True, timeout=600, check=False)


def _assert_refused(proc: subprocess.CompletedProcess, names: str, marker: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if names in line]
    assert len(lines) == 1 and "refused" in lines[0], proc.stderr[-2000:]
    assert not marker.exists(), "the checkpoint's payload ran"


# ----------------------------------------------------------------------------- real checkpoints load


def test_a_real_sharded_checkpoint_still_loads(runs):
    step = runs["sharded"] / "checkpoints" / f"step_{FIRST}"
    assert ckpt_io.is_sharded(step) and not (step / "model.pt").exists()
    full = ckpt_io.load(runs["full"] / "checkpoints" / f"step_{FIRST}")
    sharded = ckpt_io.load(step)  # what eval / analyze / the evaluator read: a full state dict
    assert sharded["model"].keys() == full["model"].keys()
    for k, v in full["model"].items():
        assert torch.equal(sharded["model"][k], v), k
        assert torch.equal(runs["reloaded"][k], v), k  # FSDP.load (the resume path) read the same
    assert sharded["optim"]["param_groups"][0]["lr"] == full["optim"]["param_groups"][0]["lr"]
    for i, s in full["optim"]["state"].items():
        for name, value in s.items():
            assert torch.equal(sharded["optim"]["state"][i][name], value), (i, name)
    assert sharded["trainer"]["step"] == FIRST


def test_the_allowlist_is_what_dcp_metadata_pickles(runs):
    """Every global the real `.metadata` names is allowed; one more (builtins.eval) is not."""
    from rayq.safe_dcp import MetadataUnpickler, load_metadata

    meta = runs["sharded"] / "checkpoints" / f"step_{FIRST}" / ".metadata"
    named = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    with open(meta, "rb") as fh:
        reference = Recorder(fh).load()
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in named and ("torch", "Size") in named
    for module, name in named:
        assert MetadataUnpickler(io.BytesIO()).find_class(module, name) is not None, (module, name)
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        MetadataUnpickler(io.BytesIO()).find_class("builtins", "eval")
    assert load_metadata(meta).state_dict_metadata.keys() == reference.state_dict_metadata.keys()


# ----------------------------------------------------------------------------- poisoned .metadata


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_poisoned_metadata_is_refused_by_eval(runs, tmp_path, payload):
    _, step = _copy_run(runs, tmp_path)
    marker = tmp_path / "MARKER"
    (step / ".metadata").write_bytes(pickle.dumps(PAYLOADS[payload](marker)))
    _assert_refused(_rayq("eval", str(step), "--tasks", "", "--schemes", ""), ".metadata", marker)


def test_poisoned_newest_checkpoint_is_refused_when_train_resumes(runs, tmp_path):
    run_dir, step = _copy_run(runs, tmp_path)
    marker = tmp_path / "MARKER"
    (step / ".metadata").write_bytes(pickle.dumps(SystemCall(marker)))
    proc = _rayq("train", "--config", str(runs["root"] / "run.yaml"), "--out", str(run_dir), "--no-evaluate")
    _assert_refused(proc, ".metadata", marker)
    assert ckpt_io.latest(run_dir / "checkpoints") == step  # nothing trained past the refused checkpoint


def test_poisoned_metadata_is_refused_by_analyze(runs, tmp_path):
    run_dir, step = _copy_run(runs, tmp_path)
    marker = tmp_path / "MARKER"
    (step / ".metadata").write_bytes(pickle.dumps(ExecWrite(marker)))
    proc = _rayq("analyze", str(run_dir), "--out", str(tmp_path / "diag"), "--no-plots")
    _assert_refused(proc, ".metadata", marker)
    assert not (tmp_path / "diag" / "diagnostics.json").exists()


def test_metadata_pointing_outside_its_directory_is_refused(runs, tmp_path):
    from rayq.safe_dcp import UnsafeCheckpointError, load_metadata

    _, step = _copy_run(runs, tmp_path)
    meta = load_metadata(step / ".metadata")
    for info in meta.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (step / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused: it points outside its directory"):
        ckpt_io.load(step)


def test_damaged_metadata_is_a_clear_error(runs, tmp_path):
    _, step = _copy_run(runs, tmp_path)
    meta = step / ".metadata"
    meta.write_bytes(meta.read_bytes()[:50])
    with pytest.raises(UserError, match=r"\.metadata: corrupted or truncated DCP metadata"):
        ckpt_io.load(step)


# ----------------------------------------------------------------------------- poisoned shard items


def test_poisoned_byte_item_in_a_shard_is_refused(runs, tmp_path):
    """DCP's default planner reads non-tensor values (here the optimizer's lr) with
    torch.load(weights_only=False); the metadata is genuine, the payload sits in __0_0.distcp."""
    marker = tmp_path / "MARKER"
    run_dir, step = _copy_run(runs, tmp_path, kind="full")
    shutil.rmtree(step)
    _to_sharded(runs["cfg"], runs["full"] / "checkpoints" / f"step_{FIRST}", step, tmp_path / "store",
                lr=SystemCall(marker))
    assert not marker.exists()  # saving pickles the payload, it does not run it
    for with_optimizer in (True, False):  # refused even when the poisoned item is not asked for
        with pytest.raises(UserError, match=r"__0_0\.distcp: item optim\.param_groups\.0\.lr: refused: "
                                             r"not a tensor file \(it names posix\.system\)"):
            ckpt_io.load(step, with_optimizer=with_optimizer)
    proc = _rayq("train", "--config", str(runs["root"] / "run.yaml"), "--out", str(run_dir), "--no-evaluate")
    _assert_refused(proc, "__0_0.distcp", marker)


# ----------------------------------------------------------------------------- full checkpoints


@pytest.mark.parametrize("name", ["model.pt", "trainer.pt", "optim.pt"])
def test_torch_saved_payload_in_a_full_checkpoint_is_refused(runs, tmp_path, name):
    _, step = _copy_run(runs, tmp_path, kind="full")
    marker = tmp_path / "MARKER"
    torch.save({"weight": SystemCall(marker)}, step / name)
    with pytest.raises(UserError, match=rf"{name}: refused: not a tensor file \(it names posix\.system\)$"):
        ckpt_io.load(step)
    assert not marker.exists()
