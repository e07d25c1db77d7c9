"""The one train loop on CUDA: fp32 matches CPU, native fp16 with a CUDA GradScaler skips
overflowing steps and backs off its scale, DDP over a 1-process NCCL group, and Ray Train's
NCCL backend with one GPU worker (the path `rayq train --workers 1` takes on a GPU cluster)."""

import copy
import math
import socket

import pytest
import torch

from rayq import config as config_io
from rayq.train import LocalReporter, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _tiny(cfg, **values):
    return config_io.with_values(cfg, {"recipe.steps": 6, "train.log_every": 1, "train.eval_every": 0,
                                       "train.checkpoint_every": 0, "recipe.dropout": 0.0, **values})


def test_cuda_fp32_loss_matches_cpu(tiny_setup, tmp_path):
    cfg, data = tiny_setup
    cfg = _tiny(cfg, **{"recipe.precision": "fp32"})
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is fp32 (torch's default, made explicit)
    cpu = run(cfg, LocalReporter(tmp_path / "cpu", cfg, echo=False), data=data, device="cpu").history
    gpu = run(cfg, LocalReporter(tmp_path / "gpu", cfg, echo=False), data=data, device="cuda").history
    cpu_loss, gpu_loss = [m["train/loss"] for m in cpu], [m["train/loss"] for m in gpu]
    assert len(gpu_loss) == 6
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-3)  # same init, same batches: float order only


def test_cuda_fp16_native_uses_a_cuda_grad_scaler_that_skips_overflow(tiny_setup, tmp_path):
    from rayq.precision import PrecisionPolicy

    cfg, data = tiny_setup
    # a start scale of 2**30 overflows fp16 gradients (~2**30 / 512 tokens per logit > 65504): the
    # scaler must skip those steps and halve the scale until it fits, then train
    cfg = _tiny(cfg, **{"recipe.precision": "fp16", "recipe.init_loss_scale": 2.0**30, "recipe.steps": 16})
    policy = PrecisionPolicy.from_recipe(cfg.recipe, "cuda")
    assert policy.mode == "native"
    scaler = policy.make_scaler()
    assert isinstance(scaler, torch.amp.GradScaler) and scaler._device == "cuda"

    history = run(cfg, LocalReporter(tmp_path / "run", cfg, echo=False), data=data, device="cuda").history
    last = history[-1]
    assert last["step"] == 16 and last["diverged"] == 0
    assert 1 <= last["train/skipped_steps"] < 16  # overflow was detected on the GPU and those steps skipped
    assert last["train/loss_scale"] < 2.0**30  # ... and the scale backed off
    assert math.log2(last["train/loss_scale"]).is_integer()
    assert all(math.isfinite(m["train/loss"]) for m in history)
    assert history[-1]["train/loss"] < history[0]["train/loss"] + 0.5  # it trained once the scale fit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_over_a_one_process_nccl_group_matches_the_plain_model():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    store = dist.TCPStore("127.0.0.1", _free_port(), world_size=1, is_master=True)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        assert dist.get_backend() == "nccl"
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
        ddp = DDP(copy.deepcopy(plain), device_ids=[0])
        x = torch.randn(16, 32, device="cuda")
        plain(x).square().mean().backward()
        ddp(x).square().mean().backward()  # gradients go through NCCL's all-reduce (world 1: the identity)
        for p, q in zip(plain.parameters(), ddp.module.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        t = torch.ones(3, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


@pytest.mark.ray
def test_ray_train_one_gpu_worker_over_nccl(tiny_setup, tmp_path):
    import json

    import ray

    from rayq.cluster.trainer import fit

    cfg, _ = tiny_setup
    cfg = _tiny(cfg, **{"cluster.device": "gpu", "cluster.workers": 1, "cluster.gpus_per_worker": 1.0,
                        "cluster.cpus_per_worker": 1.0, "train.device": "cuda", "recipe.steps": 4})
    started = not ray.is_initialized()
    try:
        fit(cfg, tmp_path / "run")
    finally:
        if started:
            ray.shutdown()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r][-1] == 4
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
