"""Device backends: how a `ClusterConfig` becomes Ray Train scaling and a torch device per worker.

CPU workers talk over gloo, GPU workers over NCCL (Ray's TorchConfig picks the backend from
`use_gpu`). TPU workers run torch-xla PJRT: Ray 2.60 places them on TPU hosts with
`ScalingConfig(use_tpu=True, topology, accelerator_type)`, but its own Torch backend for TPUs
(`tpu_dist`) needs Google's `torch_tpu`, so rayq keeps Ray's process-group set-up off (gloo for
host-side coordination) and runs the device side through torch-xla itself.
"""

from __future__ import annotations

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


def check_run(cfg: Any) -> None:
    """`check` plus what depends on the recipe: on TPU hosts (torch-xla SPMD: one worker per host
    drives all its chips) every host splits its share of the batch over its chips."""
    cluster = cfg.cluster
    check(cluster)
    if cluster.device == "tpu":
        _, chips = tpu_slice(cluster.topology, cluster.accelerator_type)
        devices = max(1, cluster.workers) * chips
        if cfg.recipe.batch_size % devices:
            raise UserError(f"recipe.batch_size={cfg.recipe.batch_size}: not divisible by the {devices} TPU chips "
                            f"({cluster.workers} hosts x {chips}); every chip takes an equal slice of the batch")


# Ray's TPU names: v5e is "v5litepod" there (TPU-V5E would fail ScalingConfig's validation)
_RAY_TPU_NAMES = {"TPU-V5E": "TPU-V5LITEPOD", "V5E": "TPU-V5LITEPOD"}


def ray_tpu_type(accelerator_type: str) -> str:
    name = accelerator_type.upper()
    return _RAY_TPU_NAMES.get(name, name if name.startswith("TPU-") else f"TPU-{name}")


def tpu_slice(topology: str, accelerator_type: str) -> tuple[int, int]:
    """(hosts, chips per host) of one slice, as Ray Train places it (ray.util.tpu)."""
    from ray.util.tpu import get_tpu_worker_resources

    try:
        hosts, per_host = get_tpu_worker_resources(topology, ray_tpu_type(accelerator_type))
    except ValueError as exc:
        raise UserError(f"cluster.topology={topology!r}, cluster.accelerator_type={accelerator_type!r}: {exc}") from None
    return hosts, int(per_host["TPU"])


def tpu_hosts(topology: str, accelerator_type: str) -> int:
    """Hosts in a TPU slice (v4/v5p/v6e hosts have 4 chips; v5e: 1 host up to 2x4, then 4-chip hosts)."""
    return tpu_slice(topology, accelerator_type)[0]


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
        _, chips = tpu_slice(cluster.topology, cluster.accelerator_type)
        # one worker per host owns its chips (torch-xla SPMD); resources_per_worker: {TPU: 1} and
        # workers = chips gives one worker per chip (torch-xla multiprocess + DDP)
        res = {"CPU": cluster.cpus_per_worker, "TPU": chips, **cluster.resources_per_worker}
        kwargs.update(use_tpu=True, topology=cluster.topology, accelerator_type=ray_tpu_type(cluster.accelerator_type),
                      resources_per_worker=res)
    else:
        kwargs.update(use_gpu=cluster.device == "gpu", resources_per_worker=worker_resources(cluster))
    return ray.train.ScalingConfig(**kwargs)


def torch_config(cluster: ClusterConfig) -> Any:
    from ray.train.torch import TorchConfig

    if cluster.device == "tpu":  # not tpu_dist (needs Google's torch_tpu): rayq's torch-xla PJRT backend
        from rayq.cluster.xla import XLAConfig

        return XLAConfig.for_cluster(cluster)
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
    if cluster.device == "tpu":  # PJRT env set by rayq.cluster.xla's backend; client created now
        from rayq.cluster.xla import setup_worker as xla_setup_worker

        return xla_setup_worker()
    return torch.device("cpu")
