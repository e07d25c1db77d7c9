"""The Ray glue for training: a TorchTrainer (Ray Train V2) whose workers call `rayq.train.run`.

Nothing here trains: the workers run the same loop as a local run, with a reporter that forwards
to `ray.train.report`. Checkpoints become Ray Train checkpoints named `step_N` under
`<storage>/checkpoints/`, so a run directory looks the same with or without Ray, and Ray's
automatic resume (same storage path + name) and `FailureConfig` restarts bring the loop back
through `ray.train.get_checkpoint()`. A controller-side callback appends every report to
`metrics.jsonl` in the run directory.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from rayq import config as config_io
from rayq.errors import UserError
from rayq.schema import Config

CHECKPOINTS = "checkpoints"  # Ray Train run name: checkpoints land in <storage>/checkpoints/step_N


# Ray settings of the embedded cluster only (a cluster joined by address keeps its own):
# - Ray starts its workers at nice 15; beside any other busy process on the machine a Ray Train
#   worker then gets a sliver of a core (CFS weight 36 against 1024 at nice 0), while the same
#   loop run by `rayq train` without Ray competes as an equal. The worker is the job here.
# - The metrics pipeline (every process recording and pushing to the metrics agent for the
#   Prometheus exporter) serves a dashboard that is off.
EMBEDDED_SYSTEM_CONFIG = {"worker_niceness": 0, "enable_metrics_collection": False}


def connect(address: Optional[str], *, num_cpus: Optional[float] = None, quiet: bool = True) -> None:
    """Join a cluster at `address`, or start an embedded local Ray (the laptop default)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict[str, Any] = {"log_to_driver": not quiet, "include_dashboard": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # workers import rayq from this checkout/venv; keep the local cluster on loopback
        ray.init(num_cpus=num_cpus, _system_config=EMBEDDED_SYSTEM_CONFIG, **kwargs)


class RayTrainReporter:
    """The train loop's reporter inside a Ray Train worker.

    `ray.train.report` puts each report on a result queue of size 1 that the controller drains
    once per poll (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), so a loop reporting
    more often than that would stall for up to 2 s per report. Reports therefore go through one
    sender thread, in order, while the loop trains on; a checkpoint's staging directory (unique
    per step) is uploaded and deleted by the sender. `close()` flushes it; an error in the sender
    is raised in the loop at its next report. A backlog (`ray/report_backlog`) means the loop
    reports faster than the controller polls: raise `train.log_every`.
    """

    def __init__(self) -> None:
        import ray.train
        import torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()  # hostnames repeat when nodes share a machine
        self.blocked_seconds = 0.0  # time the loop spent waiting in report() (Ray overhead, `rayq bench train`)
        # how this worker process runs, in its first report: a niceness above 0 or more threads
        # than CPUs owned shows up as Ray overhead (`rayq bench train` reads them)
        self._first: dict = {"ray/torch_threads": torch.get_num_threads(), "ray/niceness": os.nice(0)}
        self._outbox: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None
        self._sender = threading.Thread(target=self._send_all, name="rayq-report-sender", daemon=True)
        self._sender.start()

    def new_checkpoint_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"rayq-step_{step}-"))

    def report(self, metrics: dict, checkpoint: Optional[Path] = None) -> Optional[Path]:
        self._raise_if_failed()
        t0 = time.perf_counter()
        # which node trained (it changes after a restart); when; what reporting has cost the loop
        metrics = {**metrics, **self._first, "train/node_id": self.node_id, "train/wall_time": time.time(),
                   "ray/report_seconds": self.blocked_seconds, "ray/report_backlog": self._outbox.qsize()}
        self._first = {}
        self._outbox.put((metrics, checkpoint))
        self.blocked_seconds += time.perf_counter() - t0
        return None

    def close(self) -> None:
        """Send every queued report, stop the sender, raise what it failed with."""
        self._outbox.put(None)
        self._sender.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError("reporting to Ray Train failed") from self._error

    def _send_all(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            if self._error is not None:  # after a failure, drop the rest: the loop raises at its next report
                continue
            try:
                self._send(*item)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self._error = exc

    def _send(self, metrics: dict, checkpoint: Optional[Path]) -> None:
        import ray.train

        ckpt = None
        # rank 0 always holds the checkpoint; a sharded one (FSDP) has shard files on every rank,
        # and Ray Train merges the directories every rank reports into one checkpoint
        if checkpoint is not None and (self.rank == 0 or any(Path(checkpoint).iterdir())):
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint))
        # every rank reports the same reports in the same order (it is a barrier); only rank 0's
        # metrics are kept
        ray.train.report(metrics, checkpoint=ckpt,
                         checkpoint_dir_name=f"step_{metrics['step']}" if checkpoint is not None else None)
        if checkpoint is not None:
            shutil.rmtree(checkpoint, ignore_errors=True)  # uploaded synchronously by report()

    def restore(self) -> Optional[Path]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return Path(ckpt.to_directory())  # a local copy, whatever the storage


def worker_data(cfg: Config, data_dir: Optional[str]) -> Any:
    """The prepared data on a worker or evaluator task. The driver prepared it once; reuse its
    directory when this node can see it (one machine, shared filesystems), else prepare here
    (cached by content hash on this node)."""
    from rayq import data as data_io

    if data_dir and os.path.exists(os.path.join(data_dir, "manifest.json")):
        return data_io.open_prepared(data_dir)
    return data_io.prepare(cfg)


def train_worker(loop_config: dict) -> None:
    """The per-worker function of the TorchTrainer: rebuild the config, run the one loop."""
    from rayq import train
    from rayq.cluster import backends

    cfg = config_io.build(Config, loop_config["config"])
    device = backends.setup_worker(cfg.cluster)
    data = worker_data(cfg, loop_config.get("data_dir"))
    evaluator = None
    if loop_config.get("evaluate"):
        from rayq.eval import make_eval_hook

        evaluator = make_eval_hook(cfg, data)
    reporter = RayTrainReporter()
    batches = ray_data_batches(cfg, reporter.world_size) if cfg.data.loader == "ray-data" else None
    train.run(cfg, reporter, data=data, evaluator=evaluator, device=device, batches=batches)
    reporter.close()  # the last reports reach Ray before the worker's function returns


def ray_data_batches(cfg: Config, world_size: int) -> Any:
    """This worker's batches from its Ray Data shard of the train split (`data.loader: ray-data`).

    The shard's token rows are read once into memory and windowed by the same `TokenStream` as
    the default loader, so order is seeded and the position resumes exactly; each worker sees
    only its shard, so a run is not batch-for-batch equal to a 1-worker run.
    """
    import numpy as np
    import ray.train

    from rayq import data as data_io

    shard = ray.train.get_dataset_shard("train")
    parts = [data_io.tokens_from_arrow(t) for t in shard.iter_batches(batch_format="pyarrow", batch_size=None)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return data_io.TokenStream(tokens, cfg.model.seq_len, cfg.recipe.batch_size // world_size, seed=cfg.train.seed)


def _metrics_callback(run_dir: str) -> Any:
    from ray.train import UserCallback

    class MetricsLog(UserCallback):
        """Append rank 0's metrics of every report to <run_dir>/metrics.jsonl (controller side)."""

        def after_report(self, run_context, metrics, checkpoint):  # noqa: D401 - Ray's hook name
            row = dict(metrics[0])
            if checkpoint is not None:
                row["checkpoint_path"] = checkpoint.path
            with open(Path(run_dir) / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")

    return MetricsLog()


def build_trainer(cfg: Config, *, storage: str, name: str = CHECKPOINTS, evaluate: bool = False,
                  callbacks: Optional[list] = None, data_dir: Optional[str] = None) -> Any:
    """A TorchTrainer running `cfg` on `cfg.cluster.workers` workers, resuming from storage/name."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from rayq.cluster import backends

    backends.check_run(cfg)  # bad plans stop here, before any worker starts
    datasets = None
    if cfg.data.loader == "ray-data":
        import ray.data

        from rayq import data as data_io

        files = data_io.open_prepared(data_dir).train_files() if data_dir else data_io.prepare(cfg).train_files()
        datasets = {"train": ray.data.read_parquet(files).select_columns(["tokens"])}
    return TorchTrainer(
        train_worker,
        datasets=datasets,
        train_loop_config={"config": config_io.to_dict(cfg), "evaluate": evaluate, "data_dir": data_dir},
        torch_config=backends.torch_config(cfg.cluster),
        scaling_config=backends.scaling_config(cfg.cluster),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None),
            callbacks=callbacks or [],
        ),
    )


def fit(cfg: Config, run_dir: str | Path, *, evaluate: bool = False) -> dict:
    """`rayq train --workers N`: run `cfg` on Ray Train into `run_dir`; returns the last metrics."""
    run_dir = Path(run_dir).resolve()
    storage = cfg.cluster.storage or str(run_dir)
    if "://" in storage:
        raise UserError(f"cluster.storage={storage}: rayq train writes its run directory locally; "
                        "remote storage is for rayq search (use a local path or leave it null)")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_io.save(cfg, run_dir / "config.yaml")
    from rayq import data as data_io

    data = data_io.prepare(cfg)  # once, on the driver
    connect(cfg.cluster.address)
    trainer = build_trainer(cfg, storage=storage, evaluate=evaluate, callbacks=[_metrics_callback(str(run_dir))],
                            data_dir=str(data.root))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})
