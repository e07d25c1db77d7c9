"""Device backends: how a `ClusterConfig` becomes Ray Train scaling and a torch device per worker.

CPU workers talk over gloo, GPU workers over NCCL (Ray's TorchConfig picks the backend from
`use_gpu`). TPU workers run torch-xla PJRT: Ray 2.60 places them on TPU hosts with
`ScalingConfig(use_tpu=True, topology, accelerator_type)`, but its own Torch backend for TPUs
(`tpu_dist`) needs Google's `torch_tpu`, so rayq keeps Ray's process-group set-up off (gloo for
host-side coordination) and runs the device side through torch-xla itself.
"""

from __future__ import annotations

import math
import os
from typing import Any

from rayq.errors import UserError
from rayq.schema import ClusterConfig


def check(cluster: ClusterConfig) -> None:
    """Reject plans that cannot run, before any worker starts."""
    if cluster.device == "tpu":
        if not (cluster.topology and cluster.accelerator_type):
            raise UserError("cluster.topology/accelerator_type: required when cluster.device is tpu (e.g. 4x4, TPU-V5E)")
        hosts = tpu_hosts(cluster.topology, cluster.accelerator_type)
        if cluster.workers % hosts:
            raise UserError(f"cluster.workers={cluster.workers}: a {cluster.accelerator_type} {cluster.topology} slice "
                            f"has {hosts} hosts; workers must be a multiple of it (one worker per host)")
    if cluster.device == "gpu" and cluster.gpus_per_worker <= 0:
        raise UserError("cluster.gpus_per_worker: expected > 0 when cluster.device is gpu")


def tpu_hosts(topology: str, accelerator_type: str) -> int:
    """Hosts in a TPU slice: chips / chips-per-host (4 on v4/v5p/v6e hosts, 8 for v5e 2x4 hosts)."""
    try:
        chips = math.prod(int(x) for x in topology.lower().split("x"))
    except ValueError:
        raise UserError(f"cluster.topology={topology!r}: expected dimensions like 4x4 or 2x2x4") from None
    per_host = 8 if accelerator_type.upper().endswith("V5E") and chips >= 8 else 4
    return max(1, chips // per_host)


def worker_resources(cluster: ClusterConfig) -> dict[str, float]:
    res: dict[str, float] = {"CPU": cluster.cpus_per_worker, **cluster.resources_per_worker}
    if cluster.device == "gpu":
        res["GPU"] = cluster.gpus_per_worker
    return res


def scaling_config(cluster: ClusterConfig) -> Any:
    import ray.train

    check(cluster)
    kwargs: dict[str, Any] = {"num_workers": max(1, cluster.workers)}
    if cluster.device == "tpu":
        kwargs.update(use_tpu=True, topology=cluster.topology, accelerator_type=cluster.accelerator_type,
                      resources_per_worker={"CPU": cluster.cpus_per_worker, **cluster.resources_per_worker} or None)
    else:
        kwargs.update(use_gpu=cluster.device == "gpu", resources_per_worker=worker_resources(cluster))
    return ray.train.ScalingConfig(**kwargs)


def torch_config(cluster: ClusterConfig) -> Any:
    from ray.train.torch import TorchConfig

    if cluster.device == "tpu":  # not tpu_dist: that backend needs torch_tpu, not torch-xla
        return TorchConfig(backend="gloo")
    return TorchConfig(backend="nccl" if cluster.device == "gpu" else "gloo")


def setup_worker(cluster: ClusterConfig) -> Any:
    """Inside a Ray Train worker: threads, allocator, and the torch device of this worker."""
    import torch

    from rayq.allocator import keep_pages

    keep_pages()
    torch.set_num_threads(max(1, int(cluster.cpus_per_worker)))
    if cluster.device == "gpu":
        import ray.train.torch

        return ray.train.torch.get_device()
    if cluster.device == "tpu":
        os.environ.setdefault("PJRT_DEVICE", "TPU")
        import torch_xla

        return torch_xla.device()
    return torch.device("cpu")
