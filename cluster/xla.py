"""rayq's Ray Train backend for torch-xla PJRT (TPU, and XLA:CPU for tests).

Ray 2.60 places workers on TPU hosts (`ScalingConfig(use_tpu=True, topology, accelerator_type)`)
but its Torch backend for TPUs (`tpu_dist`) imports Google's `torch_tpu`, and
`ray.train.torch.xla.TorchXLAConfig` is for AWS Neuron (XRT, EFA). This module is the torch-xla
PJRT backend: a `TorchConfig` subclass, so `TorchTrainer(torch_config=XLAConfig(...))` accepts it
and never falls back to `tpu_dist`.

Two layouts, chosen by how many TPU chips one Ray Train worker owns:

* ``multiprocess`` (one worker per chip, `resources_per_worker={"TPU": 1}`): torch-xla's
  torchrun-style PJRT rendezvous. Every worker gets RANK / WORLD_SIZE / LOCAL_RANK /
  LOCAL_WORLD_SIZE from Ray's train context, MASTER_ADDR / MASTER_PORT of worker 0, and
  TORCHELASTIC_RUN_ID, so `init_process_group("xla", init_method="xla://")` configures the TPU
  topology (TPU_PROCESS_BOUNDS, TPU_PROCESS_ADDRESSES, ... from the TPU metadata, as torchrun
  does) and returns the `xla` process group. The train loop's DDP then all-reduces on the device.
* ``spmd`` (one worker per host, all its chips): `torch_xla.runtime.use_spmd()`; no `xla` process
  group (torch-xla forbids it under SPMD). With several hosts a gloo process group (env:// from
  the variables above) coordinates what is host-side only: sharded checkpoints (DCP), the
  run directory, RNG states. The train loop's `rayq.parallel.SPMD` strategy shards the model.

A single worker (world size 1) needs no process group at all: that is the XLA:CPU test lane
(`PJRT_DEVICE=CPU`, `cluster/xla_lane.sh`).

Worker side: `setup_worker()` returns `torch_xla.device()` and must run before the first
backward pass of the process: the autograd engine sizes its per-device queues once, at the
first backward, from the device count torch-xla reports, which is 0 until the PJRT client
exists (a CPU backward first, then an XLA one, fails with `device_ready_queues_` INTERNAL ASSERT).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Optional

from ray.train.backend import Backend
from ray.train.torch import TorchConfig

logger = logging.getLogger(__name__)

Layout = Literal["single", "multiprocess", "spmd"]

@dataclass
class XLAConfig(TorchConfig):
    """Ray Train backend config for torch-xla PJRT.

    pjrt_device: the PJRT plugin ("TPU" on TPU VMs, "CPU" for XLA:CPU, "CUDA" for XLA:GPU).
    layout: "multiprocess" (one worker per device, `xla` process group for DDP), "spmd" (one
        worker per host, torch-xla SPMD), or "auto": spmd when a worker owns more than one TPU
        chip, else multiprocess (world size 1 is always "single": no process group).
    compilation_cache: a directory for torch-xla's persistent compilation cache on each worker
        (e.g. on local disk of the TPU VM), or None.
    """

    pjrt_device: str = "TPU"
    layout: Literal["auto", "multiprocess", "spmd"] = "auto"
    compilation_cache: Optional[str] = None
    backend: Optional[str] = "xla"  # informational: the process group torch-xla creates

    @property
    def backend_cls(self):
        return _XLABackend

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "pjrt_device": self.pjrt_device, "layout": self.layout,
                "compilation_cache": self.compilation_cache}

    @classmethod
    def for_cluster(cls, cluster: Any) -> "XLAConfig":
        """The config of a `rayq.schema.ClusterConfig` with device tpu (the env var RAYQ_PJRT_DEVICE may override the TPU plugin, e.g. CPU)."""
        device = os.environ.get("RAYQ_PJRT_DEVICE") or "TPU"
        layout = "auto"
        if cluster.sharding == "fsdp":
            layout = "spmd"  # FSDP on TPU goes through torch-xla SPMD (one worker per host)
        return cls(pjrt_device=device, layout=layout)


def resolve_layout(config: XLAConfig, world_size: int, devices_per_worker: float) -> Layout:
    """Which layout a worker group of `world_size` workers owning `devices_per_worker` runs."""
    if world_size <= 1 and config.layout != "spmd":
        return "single"
    if config.layout != "auto":
        return config.layout
    return "spmd" if devices_per_worker > 1 else "multiprocess"


def worker_env(config: XLAConfig, layout: Layout, *, rank: int, world_size: int, local_rank: int,
               local_world_size: int, node_rank: int, master_addr: str, master_port: int,
               run_id: str) -> dict[str, str]:
    """The environment one worker needs before torch-xla initializes (pure; tested on CPU)."""
    env = {
        "PJRT_DEVICE": config.pjrt_device,
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "NODE_RANK": str(node_rank),
        "GROUP_RANK": str(node_rank),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }
    if layout == "multiprocess":
        # torch-xla's `xla://` rendezvous treats a torchelastic launch as "configure the PJRT
        # multiprocess topology from LOCAL_RANK / LOCAL_WORLD_SIZE" (what torchrun gives it)
        env["TORCHELASTIC_RUN_ID"] = run_id
    # spmd: no env switch (XLA_USE_SPMD is deprecated): `_init_runtime` calls `xr.use_spmd()`
    return env


# ----------------------------------------------------------------------------- worker functions
# (run inside Ray Train workers by the backend; module-level so Ray can pickle them by reference)


def _apply_env(env: dict[str, str]) -> None:
    os.environ.update(env)


def _init_runtime(layout: Layout, timeout_s: int, compilation_cache: Optional[str]) -> dict:
    import torch_xla
    import torch_xla.runtime as xr

    if compilation_cache:
        xr.initialize_cache(os.path.expanduser(compilation_cache), readonly=False)
    if layout == "spmd":
        xr.use_spmd()
        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            from datetime import timedelta

            dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=timeout_s))
    elif layout == "multiprocess":
        from datetime import timedelta

        import torch.distributed as dist
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

        if not dist.is_initialized():
            dist.init_process_group("xla", init_method="xla://", timeout=timedelta(seconds=timeout_s))
    device = torch_xla.device()  # creates the PJRT client now, before any backward pass
    return {"device": str(device), "device_type": xr.device_type(), "world_size": xr.world_size(),
            "global_ordinal": xr.global_ordinal(), "process_index": xr.process_index(),
            "spmd": xr.is_spmd()}


def _shutdown(layout: Layout) -> None:
    import torch.distributed as dist

    if layout != "single" and dist.is_initialized():
        dist.destroy_process_group()


class _XLABackend(Backend):
    """Sets the PJRT environment on every worker, then initializes torch-xla there."""

    share_cuda_visible_devices = False

    def __init__(self) -> None:
        self.layout: Layout = "single"
        self.run_id = uuid.uuid4().hex

    def on_start(self, worker_group: Any, backend_config: XLAConfig) -> None:
        import ray
        from ray.train._internal.utils import get_address_and_port

        resources = worker_group.get_resources_per_worker()
        per_worker = resources.get("TPU", 0) or resources.get("GPU", 0) or 1
        world = len(worker_group)
        self.layout = resolve_layout(backend_config, world, per_worker)
        self.run_id = uuid.uuid4().hex  # Backend is a per-process singleton: fresh id per worker group
        master_addr, master_port = worker_group.execute_single(0, get_address_and_port)

        def ranks() -> tuple:
            ctx = ray.train.get_context()
            return (ctx.get_world_rank(), ctx.get_local_rank(), ctx.get_local_world_size(), ctx.get_node_rank())

        futures = []
        for i in range(world):
            rank, local_rank, local_world, node_rank = worker_group.execute_single(i, ranks)
            env = worker_env(backend_config, self.layout, rank=rank, world_size=world, local_rank=local_rank,
                             local_world_size=local_world, node_rank=node_rank, master_addr=master_addr,
                             master_port=master_port, run_id=self.run_id)
            futures.append(worker_group.execute_single_async(i, _apply_env, env))
        ray.get(futures)
        logger.info("rayq xla backend: %d worker(s), layout %s, PJRT_DEVICE=%s", world, self.layout,
                    backend_config.pjrt_device)

    def on_training_start(self, worker_group: Any, backend_config: XLAConfig) -> None:
        import ray

        futures = [worker_group.execute_single_async(i, _init_runtime, self.layout, backend_config.timeout_s,
                                                     backend_config.compilation_cache)
                   for i in range(len(worker_group))]
        infos = ray.get(futures)
        logger.info("rayq xla backend: runtime up: %s", infos)

    def on_shutdown(self, worker_group: Any, backend_config: XLAConfig) -> None:
        try:
            worker_group.execute(_shutdown, self.layout)
        except Exception as exc:  # noqa: BLE001 - best effort, like Ray's own torch backend
            logger.warning("rayq xla backend: shutdown: %s", exc)


def setup_worker() -> Any:
    """Inside a Ray Train worker (or a test): the XLA device, PJRT client created now.

    PJRT_DEVICE defaults to TPU; the backend has set it on every worker already.
    """
    os.environ.setdefault("PJRT_DEVICE", "TPU")
    import torch_xla

    return torch_xla.device()


def available() -> bool:
    """Whether torch-xla imports here (it only does beside torch 2.9.0: the xla lane's venv)."""
    try:
        import torch_xla  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or an undefined symbol beside another torch
        return False
    return True
