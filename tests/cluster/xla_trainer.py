"""A 1-worker TorchTrainer on rayq's torch-xla backend, for the xla lane's Ray tests."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from rayq import config as config_io


def fit_one_worker(train_fn: Callable[[dict], None], cfg: Any, storage: str, xla_config: Any, *,
                   name: str, env_vars: Optional[dict] = None) -> Any:
    """Run `train_fn({"config": cfg})` on one Ray Train worker (local Ray, 2 CPUs); returns the Result."""
    import ray
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    from rayq.cluster.trainer import connect

    cloudpickle.register_pickle_by_value(sys.modules[train_fn.__module__])  # workers cannot import test modules
    connect(None, num_cpus=2, runtime_env={"env_vars": env_vars or {}})  # the embedded Ray, on loopback
    try:
        trainer = TorchTrainer(
            train_fn, train_loop_config={"config": config_io.to_dict(cfg)}, torch_config=xla_config,
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name=name, storage_path=storage))
        return trainer.fit()
    finally:
        ray.shutdown()
