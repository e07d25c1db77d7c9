"""Where evaluation runs: the one place that reads `eval.placement`, for `rayq train` and
`rayq search` alike.

* `worker`: the INT8 evaluator is the train loop's eval hook (`loop_hook`), run inside the train
  workers (or the in-process loop) at every eval step; its metrics arrive in the report.
* `task`: the loop runs no hook; the driver hands each committed checkpoint to a Ray task with
  `cluster.evaluator_resources` (`checkpoint_metrics`), placed on whichever node owns them (the
  paper trained on TPUs and evaluated INT8 on GPUs), and merges the task's metrics into the
  report. The task loads the checkpoint from storage (`rayq.checkpoint.load_model`) and runs
  the same hook, so both placements report the same metric names.

Ray is imported only where a task is launched: in-process runs never import it.
"""

from __future__ import annotations

import socket
from typing import Any, Optional, Sequence

from rayq import checkpoint as ckpt_io
from rayq import config as config_io
from rayq import data as data_io
from rayq import metrics as names
from rayq.allocator import keep_pages
from rayq.errors import UserError
from rayq.eval import make_eval_hook
from rayq.precision import PrecisionPolicy
from rayq.schema import Config
from rayq.train import EvalHook


def check(cfg: Config, *, evaluate: bool, on_ray: bool) -> None:
    """Refuse a placement this run cannot honour (before anything starts)."""
    if evaluate and cfg.eval.placement == "task" and not on_ray:
        raise UserError("eval.placement=task evaluates checkpoints in Ray tasks: it needs cluster.workers >= 1 "
                        "(or eval.placement=worker, or --no-evaluate)")


def loop_hook(cfg: Config, data: data_io.PreparedData, *, evaluate: bool) -> Optional[EvalHook]:
    """The train loop's eval hook when evaluation runs in the loop (`eval.placement: worker`), else None."""
    if evaluate and cfg.eval.placement == "worker":
        return make_eval_hook(cfg, data)
    return None


def checkpoint_metrics(cfg: Config, reports: Sequence[dict], checkpoints: Sequence[Any], *, evaluate: bool,
                       data_dir: Optional[str]) -> list[dict]:
    """The driver's side: `reports` with the evaluator's metrics merged in, one Ray task per
    report that has a checkpoint (`eval.placement: task`); unchanged otherwise.

    `checkpoints[i]` is report i's `ray.train.Checkpoint` (or None: nothing committed at that report).
    """
    if not evaluate or cfg.eval.placement != "task":
        return list(reports)
    todo = [i for i, ck in enumerate(checkpoints) if ck is not None]
    found = evaluate_checkpoints(cfg, [checkpoints[i] for i in todo], data_dir) if todo else []
    out = list(reports)
    for i, extra in zip(todo, found):
        out[i] = {**out[i], **extra}
    return out


def _evaluate_one(cfg_dict: dict, checkpoint: Any, data_dir: Optional[str] = None) -> dict:
    """The Ray task: score one committed checkpoint on this node's device."""
    import ray  # inside the task: a Ray worker

    keep_pages()
    cfg = config_io.build(Config, cfg_dict)
    loaded = ckpt_io.load_model(checkpoint.to_directory(), "auto")
    policy = PrecisionPolicy.from_recipe(cfg.recipe, next(loaded.model.parameters()).device.type)
    hook = make_eval_hook(cfg, data_io.reuse_or_prepare(data_dir, cfg.data, cfg.model.vocab_size))
    metrics = hook(loaded.model, loaded.step, policy)
    metrics[names.eval_("node")] = socket.gethostname()
    # hostnames repeat when nodes share a machine
    metrics[names.eval_("node_id")] = ray.get_runtime_context().get_node_id()
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
