"""FSDP through torch-xla SPMD (`rayq.parallel.SPMD`) on XLA:CPU with 4 virtual devices: the xla lane.

SPMD and the device count are fixed when torch-xla's PJRT client starts, and this pytest process
already has a 1-device client (test_xla.py), so the SPMD runs happen in fresh processes:
`spmd_script.py` (the loop in-process) and a Ray Train worker (the `spmd` layout of rayq's xla
backend). Their results are compared here against eager CPU runs of the same config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayq import checkpoint as ckpt_io
from rayq import config as config_io

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

pytest.importorskip("ray.train")
from rayq.cluster import xla as rxla  # noqa: E402

needs_xla = pytest.mark.skipif(not rxla.available(), reason="torch-xla not importable here (make test-xla)")
DEVICES = 4
STEPS = 6
# fp32 and no dropout: the sharded program must reproduce the eager CPU numbers, not just look alike
SETTINGS = {"recipe.steps": STEPS, "train.log_every": 1, "recipe.precision": "fp32", "recipe.dropout": 0.0,
            "train.checkpoint_every": 3, "train.eval_every": STEPS, "cluster.sharding": "fsdp"}
SCRIPT = Path(__file__).with_name("spmd_script.py")


def spmd_env() -> dict:
    return {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(DEVICES)}


@pytest.fixture(scope="module")
def spmd_runs(tmp_path_factory):
    """The SPMD run (full + interrupted/resumed) in a fresh process, and the eager CPU reference."""
    if not rxla.available():
        pytest.skip("torch-xla not importable here (make test-xla)")
    from corpus_fixture import tiny_config

    from rayq import data as data_io
    from rayq.train import LocalReporter, run

    work = tmp_path_factory.mktemp("spmd")
    out = work / "spmd.json"
    overrides = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), str(work), *overrides], env=spmd_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    sets = [f"{k}={v}" for k, v in SETTINGS.items() if k != "cluster.sharding"]
    cfg = tiny_config(work / "text", work / "cache", *sets)  # the same corpus files the script wrote
    cpu = run(cfg, LocalReporter(work / "cpu", cfg, echo=False), data=data_io.prepare(cfg.data, cfg.model.vocab_size), device="cpu")
    return result, cpu, cfg


@pytest.mark.xla
@needs_xla
def test_spmd_fsdp_shards_every_parameter_over_the_mesh(spmd_runs):
    result, _, _ = spmd_runs
    assert result["spmd"] and result["devices"] == DEVICES
    shardings = result["shardings"]
    assert shardings["blocks.0.attn.qkv.weight"] == "{devices=[4,1]0,1,2,3}"  # dim 0 split 4 ways
    assert shardings["blocks.1.ln_mlp.weight"] == "{devices=[4]0,1,2,3}"
    assert all(s.startswith("{devices=[4") for s in shardings.values()), shardings


@pytest.mark.xla
@needs_xla
def test_spmd_fsdp_training_matches_eager_cpu(spmd_runs):
    result, cpu, _ = spmd_runs
    full = result["full"]
    assert [m["step"] for m in full] == list(range(1, STEPS + 1)) and not any(m["diverged"] for m in full)
    lc = [m["train/loss"] for m in cpu.history]
    ls = [m["train/loss"] for m in full]
    assert ls == pytest.approx(lc, rel=1e-4, abs=1e-5), (lc, ls)
    assert ls[-1] < ls[0]
    assert [m["train/grad_norm"] for m in full] == pytest.approx([m["train/grad_norm"] for m in cpu.history],
                                                                  rel=1e-3)
    assert full[-1]["eval/loss"] == pytest.approx(cpu.history[-1]["eval/loss"], rel=1e-4)
    # the INT8 evaluator ran on the sharded model, inside the SPMD program
    assert "ptq/w8a8-vectorwise/kl" in full[-1] and full[-1]["fp/acc"] >= 0


@pytest.mark.xla
@needs_xla
def test_spmd_checkpoint_is_sharded_resumes_and_reads_back_full(spmd_runs):
    result, cpu, cfg = spmd_runs
    # interrupted at 3 and resumed from the sharded checkpoint: the same losses as the full run
    assert result["first_step"] == 3
    assert [m["step"] for m in result["resumed"]] == [4, 5, 6]
    full = [m["train/loss"] for m in result["full"][3:]]
    assert [m["train/loss"] for m in result["resumed"]] == pytest.approx(full, rel=1e-6)
    assert result["resumed"][0]["train/resumed_from"] == 3
    ckpt = Path(result["full_checkpoint"])
    assert (ckpt / ".metadata").is_file() and not (ckpt / "model.pt").exists()  # DCP, not a full state dict
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt)).read_metadata()
    chunks = meta.state_dict_metadata["model.blocks.0.attn.qkv.weight"].chunks
    assert len(chunks) == DEVICES  # one chunk per device shard
    # read back as full tensors with no process group and no XLA device (what rayq eval does)
    saved = ckpt_io.load(ckpt)
    assert saved["trainer"]["step"] == STEPS and saved["config"] == config_io.with_values(
        cfg, {"cluster.sharding": "fsdp"})
    ref = ckpt_io.load(cpu.checkpoint)["model"]
    assert saved["model"].keys() == ref.keys()
    for k, v in saved["model"].items():
        assert v.device.type == "cpu"
        torch.testing.assert_close(v, ref[k], rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- through Ray Train


def _spmd_train_fn(loop_config: dict) -> None:
    from rayq import data as data_io
    from rayq import parallel, train
    from rayq.cluster import xla as rx
    from rayq.cluster.trainer import RayTrainReporter
    from rayq.schema import Config

    cfg = config_io.build(Config, loop_config["config"])
    device = rx.setup_worker()
    import torch_xla.runtime as xr

    assert parallel.spmd_active(), "the spmd layout switches SPMD on before the loop starts"
    assert xr.global_runtime_device_count() == DEVICES  # the worker's PJRT client sees the 4 devices
    train.run(cfg, RayTrainReporter(), data=data_io.prepare(cfg.data, cfg.model.vocab_size), device=device)


@pytest.mark.xla
@pytest.mark.ray
@needs_xla
def test_ray_train_spmd_layout_trains_sharded(tiny_setup, tmp_path):
    """One Ray Train worker owning 4 XLA devices (a TPU host's layout): rayq's xla backend in the
    spmd layout, the loop's SPMD strategy with bf16 autocast, a sharded checkpoint of fp32
    master weights committed to storage."""
    from xla_trainer import fit_one_worker

    base, _ = tiny_setup
    # bf16 autocast over fp32 master weights, as on a TPU
    cfg = config_io.with_values(base, {**SETTINGS, "recipe.steps": 2, "train.checkpoint_every": 2,
                                       "train.eval_every": 2, "recipe.precision": "bf16",
                                       "recipe.precision_mode": "native"})
    result = fit_one_worker(_spmd_train_fn, cfg, str(tmp_path), rxla.XLAConfig(pjrt_device="CPU", layout="spmd"),
                            name="xla-spmd",
                            env_vars={"CPU_NUM_DEVICES": str(DEVICES), "XLA_FLAGS": os.environ["XLA_FLAGS"]})
    assert result.error is None
    assert result.metrics["step"] == 2 and result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        assert (Path(d) / ".metadata").is_file()
        saved = ckpt_io.load(d)
        assert saved["trainer"]["step"] == 2
        qkv = saved["model"]["blocks.0.attn.qkv.weight"]
        assert qkv.shape == (3 * cfg.model.d_model, cfg.model.d_model) and qkv.dtype == torch.float32  # master
    assert 0 < result.metrics["train/loss"] < 10
