"""Evaluation on hardware of its own: a Ray task per checkpoint with `cluster.evaluator_resources`.

The paper trained on TPUs and evaluated INT8 on GPUs; here that is `eval.placement: actor`
plus evaluator resources (e.g. `{GPU: 1}` or a custom `evaluator: 1` resource owned by one node).
The task loads the checkpoint from storage, rebuilds the model and runs the same eval hook the
train workers would have run, so both placements report the same metric names.
"""

from __future__ import annotations

from typing import Any, Optional

from rayq import config as config_io
from rayq.schema import Config


def _evaluate_one(cfg_dict: dict, checkpoint: Any, data_dir: Optional[str] = None) -> dict:
    import socket

    import ray
    import torch

    from rayq import checkpoint as ckpt_io
    from rayq.allocator import keep_pages
    from rayq.cluster.trainer import worker_data
    from rayq.eval import make_eval_hook
    from rayq.precision import PrecisionPolicy
    from rayq.train import build_model

    keep_pages()
    cfg = config_io.build(Config, cfg_dict)
    state = ckpt_io.load(checkpoint.to_directory(), with_optimizer=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, device)
    model.load_state_dict(state["model"])
    policy = PrecisionPolicy.from_recipe(cfg.recipe, device.type)
    hook = make_eval_hook(cfg, worker_data(cfg, data_dir))
    metrics = hook(model, int(state["trainer"]["step"]), policy)
    metrics["eval/node"] = socket.gethostname()
    metrics["eval/node_id"] = ray.get_runtime_context().get_node_id()  # hostnames repeat when nodes share a machine
    return metrics


def evaluate_checkpoints(cfg: Config, checkpoints: list, data_dir: Optional[str] = None) -> list[dict]:
    """Evaluate Ray Train checkpoints in parallel tasks placed by `cluster.evaluator_resources`."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    res = dict(cfg.cluster.evaluator_resources)
    # placement_group=None: not inside the calling Tune trial's placement group (it captures child
    # tasks, and its bundle has no evaluator resources), but on whichever node owns them
    options: dict[str, Any] = {"num_cpus": res.pop("CPU", 1), "num_gpus": res.pop("GPU", 0), "resources": res,
                               "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)}
    task = ray.remote(_evaluate_one).options(**options)
    return ray.get([task.remote(config_io.to_dict(cfg), ck, data_dir) for ck in checkpoints])
