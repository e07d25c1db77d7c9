"""The train loop and the INT8 path on torch-xla (XLA:CPU, `PJRT_DEVICE=CPU`): the xla lane.

Run by `make test-xla` (cluster/xla_lane.sh) in its own venv with torch 2.9.0 + torch-xla 2.9.0;
skipped wherever torch-xla does not import (beside the project's torch 2.13 it cannot). The
backend's pure environment logic is tested in the main venv too (no torch-xla needed).

XLA:CPU compiles each new graph in seconds on a small machine, so the expensive runs happen once
per module (fixtures) and later runs in the same process reuse the compiled graphs.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from rayq import checkpoint as ckpt_io
from rayq import config as config_io

os.environ.setdefault("PJRT_DEVICE", "CPU")
# XLA:CPU's LLVM back-end dominates the lane's time; -O0 keeps the numbers and halves compile time
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

ray_xla = pytest.importorskip("ray.train")
from rayq.cluster import xla as rxla  # noqa: E402  (imports ray, not torch_xla)

needs_xla = pytest.mark.skipif(not rxla.available(), reason="torch-xla not importable here (make test-xla)")
STEPS = 6


# ----------------------------------------------------------------------------- pure logic (any venv)


def test_layout_follows_devices_per_worker():
    cfg = rxla.XLAConfig(pjrt_device="TPU")
    assert rxla.resolve_layout(cfg, 1, 4) == "single"
    assert rxla.resolve_layout(cfg, 16, 1) == "multiprocess"
    assert rxla.resolve_layout(cfg, 16, 4) == "spmd"
    assert rxla.resolve_layout(rxla.XLAConfig(layout="spmd"), 1, 4) == "spmd"
    assert rxla.resolve_layout(rxla.XLAConfig(layout="multiprocess"), 4, 4) == "multiprocess"


def test_worker_env_for_the_torchrun_style_rendezvous():
    cfg = rxla.XLAConfig(pjrt_device="TPU")
    env = rxla.worker_env(cfg, "multiprocess", rank=5, world_size=16, local_rank=1, local_world_size=4,
                          node_rank=1, master_addr="10.0.0.2", master_port=29500, run_id="r1")
    assert env["PJRT_DEVICE"] == "TPU" and env["TORCHELASTIC_RUN_ID"] == "r1"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "16", "1", "4")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.2", "29500")
    spmd = rxla.worker_env(cfg, "spmd", rank=0, world_size=4, local_rank=0, local_world_size=1, node_rank=0,
                           master_addr="h", master_port=1, run_id="r")
    assert "TORCHELASTIC_RUN_ID" not in spmd and "XLA_USE_SPMD" not in spmd  # deprecated: use_spmd() instead


def test_xla_config_is_a_torch_config_that_keeps_tpu_dist_away():
    from ray.train.torch import TorchConfig

    cfg = rxla.XLAConfig(pjrt_device="CPU")
    assert isinstance(cfg, TorchConfig) and cfg.backend == "xla"  # TorchTrainer only fills a None backend
    assert cfg.backend_cls is rxla._XLABackend
    assert cfg.to_dict()["pjrt_device"] == "CPU"
    from rayq.schema import ClusterConfig

    tpu = ClusterConfig(device="tpu", workers=16, topology="4x4x4", accelerator_type="TPU-V4", sharding="fsdp")
    assert rxla.XLAConfig.for_cluster(tpu).layout == "spmd"
    assert rxla.XLAConfig.for_cluster(ClusterConfig(device="tpu", workers=64, topology="4x4x4",
                                                    accelerator_type="TPU-V4")).layout == "auto"


# ----------------------------------------------------------------------------- on XLA:CPU


@pytest.fixture(scope="module")
def xla_device():
    if not rxla.available():
        pytest.skip("torch-xla not importable here (make test-xla)")
    # before any backward in this process: the autograd engine sizes its device queues once
    return rxla.setup_worker()


@pytest.fixture(scope="module")
def runs(xla_device, tiny_setup, tmp_path_factory):
    """The tiny preset, fp32, STEPS steps with checkpoints/evals at 3 and 6: eager CPU and XLA."""
    from rayq.train import LocalReporter, run

    base, data = tiny_setup
    cfg = config_io.with_values(base, {"recipe.steps": STEPS, "train.log_every": 1, "recipe.precision": "fp32",
                                       "train.checkpoint_every": 3, "train.eval_every": 3, "recipe.dropout": 0.0})
    root = tmp_path_factory.mktemp("xla-runs")
    cpu = run(cfg, LocalReporter(root / "cpu", cfg, echo=False), data=data, device="cpu")
    xla = run(cfg, LocalReporter(root / "xla", cfg, echo=False), data=data, device=xla_device)
    return cfg, data, root, cpu, xla


@pytest.mark.xla
@needs_xla
def test_tiny_training_on_xla_matches_eager_cpu(runs):
    cfg, _, _, cpu, xla = runs
    assert xla.step == cpu.step == STEPS and not xla.diverged
    lc = [m["train/loss"] for m in cpu.history]
    lx = [m["train/loss"] for m in xla.history]
    assert len(lx) == STEPS
    assert lx == pytest.approx(lc, rel=1e-4, abs=1e-5), (lc, lx)
    assert lx[-1] < lx[0]
    ec = [m["eval/loss"] for m in cpu.history if "eval/loss" in m]
    ex = [m["eval/loss"] for m in xla.history if "eval/loss" in m]
    assert len(ex) == 2 and ex == pytest.approx(ec, rel=1e-4)
    gc = [m["train/grad_norm"] for m in cpu.history]
    gx = [m["train/grad_norm"] for m in xla.history]
    assert gx == pytest.approx(gc, rel=1e-3)


@pytest.mark.xla
@needs_xla
def test_checkpoint_from_xla_is_portable_and_resumes_on_xla(runs, xla_device, tmp_path):
    from rayq.train import LocalReporter, run

    cfg, data, root, cpu, xla = runs
    saved = ckpt_io.load(xla.checkpoint)
    assert saved["trainer"]["step"] == STEPS and saved["config"] == cfg
    assert all(t.device.type == "cpu" for t in saved["model"].values())  # loads without torch-xla's device
    ref = ckpt_io.load(cpu.checkpoint)["model"]
    for k, v in saved["model"].items():
        torch.testing.assert_close(v, ref[k], rtol=1e-3, atol=1e-5)
    # interrupt at 3, resume to 6 on XLA: the same losses as the uninterrupted XLA run
    first = run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data, device=xla_device, stop_at=3)
    assert first.step == 3
    second = run(cfg, LocalReporter(tmp_path, cfg, echo=False), data=data, device=xla_device)
    assert second.step == STEPS and len(second.history) == STEPS - 3
    full = [m["train/loss"] for m in xla.history[3:]]
    assert [m["train/loss"] for m in second.history] == pytest.approx(full, rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


@pytest.mark.xla
@needs_xla
def test_bf16_autocast_on_xla_tracks_cpu(xla_device, tiny_setup, tmp_path):
    """bf16 native autocast on XLA (what TPUs run) against bf16 autocast on CPU: same trajectory,
    within bf16's resolution."""
    from rayq.train import LocalReporter, run

    base, data = tiny_setup
    cfg = config_io.with_values(base, {"recipe.steps": 3, "train.log_every": 1, "recipe.precision": "bf16",
                                       "recipe.precision_mode": "native", "train.checkpoint_every": 0,
                                       "train.eval_every": 0})
    cpu = run(cfg, LocalReporter(tmp_path / "cpu", cfg, echo=False), data=data, device="cpu")
    xla = run(cfg, LocalReporter(tmp_path / "xla", cfg, echo=False), data=data, device=xla_device)
    lc = [m["train/loss"] for m in cpu.history]
    lx = [m["train/loss"] for m in xla.history]
    assert lx == pytest.approx(lc, rel=2e-2), (lc, lx)


# ----------------------------------------------------------------------------- INT8 on XLA


@pytest.fixture(scope="module")
def kernels():
    try:
        import rayq.kernels as k
    except ImportError as exc:
        pytest.skip(f"rayq.kernels not available yet ({exc})")
    return k


@pytest.mark.xla
@needs_xla
def test_int8_gemm_on_xla_is_exact(xla_device, kernels):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (16, 96), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (40, 96), dtype=torch.int8, generator=g)
    out = kernels.int8_mm(a.to(xla_device), w.to(xla_device))
    assert out.device.type == "xla" and out.dtype == torch.int32
    assert torch.equal(out.cpu().to(torch.int64), kernels.int_mm_reference(a, w))


@pytest.mark.xla
@needs_xla
def test_int8_quantized_trained_model_on_xla_matches_cpu(runs, xla_device, kernels):
    """The evaluator's INT8 path: quantize_ the trained tiny model on XLA. Weight codes and scales
    are identical to CPU's, and each quantized linear fed the same input gives CPU's output. The
    whole model agrees only up to rounding flips: fp32 ops upstream differ by ~1e-7 between XLA
    and eager CPU, which moves a few activations across a rounding boundary of their int8 code,
    so logits are compared against the size of the quantization error itself."""
    from rayq.batches import heldout_batches
    from rayq.model import BLOCK_LINEARS, GPT

    cfg, data, _, _, xla = runs
    model = GPT(cfg.model)
    model.load_state_dict(ckpt_io.load(xla.checkpoint)["model"])
    model.eval()
    x, _ = heldout_batches(data, 1, 4, cfg.model.seq_len)[0]
    scheme = kernels.W8A8Vectorwise()
    q_cpu = kernels.quantize_(copy.deepcopy(model), scheme, layers=BLOCK_LINEARS, inplace=False)
    m_xla = copy.deepcopy(model).to(xla_device)
    q_xla = kernels.quantize_(m_xla, scheme, layers=BLOCK_LINEARS, inplace=False)
    s_cpu, s_xla = q_cpu.state_dict(), {k: v.cpu() for k, v in q_xla.state_dict().items()}
    assert s_cpu.keys() == s_xla.keys()
    for k, v in s_cpu.items():
        if v.dtype == torch.int8:
            assert torch.equal(v, s_xla[k]), k
        else:
            torch.testing.assert_close(v, s_xla[k], rtol=1e-6, atol=1e-7)
    names = [n for n, lin in model.named_modules()
             if n.endswith(BLOCK_LINEARS) and lin.in_features == cfg.model.d_model]
    lin_cpu, lin_xla = dict(q_cpu.named_modules()), dict(q_xla.named_modules())
    h = torch.randn(64, cfg.model.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name in names:
            torch.testing.assert_close(lin_xla[name](h.to(xla_device)).cpu(), lin_cpu[name](h), rtol=1e-5, atol=1e-6)
        fp = model(x)
        lq_cpu = q_cpu(x)
        fp_xla = m_xla(x.to(xla_device))
        lq_xla = q_xla(x.to(xla_device)).cpu()
        kl = lambda p, q: torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True,  # noqa: E731
                                                     reduction="batchmean").item()
        kl_cpu, kl_xla = kl(fp, lq_cpu), kl(fp_xla.cpu(), lq_xla)
    gap = (lq_cpu - fp).abs().max().item()  # how far quantization itself moves the logits
    assert gap > 0
    assert (lq_xla - lq_cpu).abs().max().item() < 0.5 * gap
    assert kl_xla == pytest.approx(kl_cpu, rel=0.25)


@pytest.mark.xla
@needs_xla
def test_eval_hook_on_xla(runs, xla_device, kernels):
    from rayq.eval import make_eval_hook
    from rayq.model import GPT
    from rayq.precision import PrecisionPolicy

    cfg, data, _, _, xla = runs
    model = GPT(cfg.model)
    model.load_state_dict(ckpt_io.load(xla.checkpoint)["model"])
    hook = make_eval_hook(cfg, data)
    metrics = hook(model.to(xla_device), STEPS, PrecisionPolicy.from_recipe(cfg.recipe, "xla"))
    assert any(k.startswith("ptq/") for k in metrics)


# ----------------------------------------------------------------------------- through Ray Train


def _xla_train_fn(loop_config: dict) -> None:
    from rayq import data as data_io
    from rayq import train
    from rayq.cluster import xla as rx
    from rayq.cluster.trainer import RayTrainReporter
    from rayq.schema import Config

    cfg = config_io.build(Config, loop_config["config"])
    device = rx.setup_worker()
    assert device.type == "xla" and os.environ["PJRT_DEVICE"] == "CPU"
    train.run(cfg, RayTrainReporter(), data=data_io.prepare(cfg.data, cfg.model.vocab_size), device=device)


@pytest.mark.xla
@pytest.mark.ray
@needs_xla
def test_ray_train_worker_runs_the_loop_on_the_xla_backend(tiny_setup, tmp_path):
    """A 1-worker TorchTrainer with rayq's XLAConfig: PJRT env set by the backend, the one loop
    on device xla, a checkpoint committed to storage."""
    from xla_trainer import fit_one_worker

    base, _ = tiny_setup
    cfg = config_io.with_values(base, {"recipe.steps": 2, "train.log_every": 1, "recipe.precision": "fp32",
                                       "train.checkpoint_every": 2, "train.eval_every": 2})
    result = fit_one_worker(_xla_train_fn, cfg, str(tmp_path), rxla.XLAConfig(pjrt_device="CPU"), name="xla")
    assert result.error is None
    assert result.metrics["step"] == 2 and result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        assert ckpt_io.load(d)["trainer"]["step"] == 2
