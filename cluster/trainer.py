"""The Ray glue for training: a TorchTrainer (Ray Train V2) whose workers call `rayq.train.run`.

Nothing here trains: the workers run the same loop as a local run, with a reporter that forwards
to `ray.train.report`. Checkpoints become Ray Train checkpoints named `step_N` under
`<storage>/checkpoints/`, so a run directory looks the same with or without Ray, and Ray's
automatic resume (same storage path + name) and `FailureConfig` restarts bring the loop back
through `ray.train.get_checkpoint()`. A controller-side callback (`QueueReports`) forwards every
report to the driver, which merges in the evaluator's metrics when evaluation runs elsewhere
(`rayq.cluster.evaluator`) and appends it to `metrics.jsonl` with the train loop's one writer.
"""

from __future__ import annotations

import os
import queue as queue_lib
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
import ray.data
import ray.train
from ray.train import UserCallback
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from rayq import config as config_io
from rayq import data as data_io
from rayq import metrics as names
from rayq import train
from rayq.cluster import backends, evaluator
from rayq.errors import UserError
from rayq.schema import Config

CHECKPOINTS = "checkpoints"  # Ray Train run name: checkpoints land in <storage>/checkpoints/step_N


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
        ray.init(num_cpus=num_cpus, **kwargs)


class RayTrainReporter:
    """The train loop's reporter inside a Ray Train worker."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()  # hostnames repeat when nodes share a machine

    def new_checkpoint_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"rayq-step_{step}-"))

    def report(self, metrics: dict, checkpoint: Optional[Path] = None) -> Optional[Path]:
        metrics = {**metrics, names.train("node_id"): self.node_id}  # which node trained (it changes after a restart)
        ckpt = None
        # rank 0 always holds the checkpoint; a sharded one (FSDP) has shard files on every rank,
        # and Ray Train merges the directories every rank reports into one checkpoint
        if checkpoint is not None and (self.rank == 0 or any(Path(checkpoint).iterdir())):
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint))
        # every rank reports (it is a barrier); only rank 0's metrics are kept
        ray.train.report(metrics, checkpoint=ckpt,
                         checkpoint_dir_name=f"step_{metrics[names.STEP]}" if checkpoint is not None else None)
        if checkpoint is not None:
            shutil.rmtree(checkpoint, ignore_errors=True)  # uploaded synchronously by report()
        return None

    def restore(self) -> Optional[Path]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return Path(ckpt.to_directory())  # a local copy, whatever the storage


def train_worker(loop_config: dict) -> None:
    """The per-worker function of the TorchTrainer: rebuild the config, run the one loop."""
    cfg = config_io.build(Config, loop_config["config"])
    device = backends.setup_worker(cfg.cluster)
    data = data_io.reuse_or_prepare(loop_config.get("data_dir"), cfg.data, cfg.model.vocab_size)
    hook = evaluator.loop_hook(cfg, data, evaluate=loop_config["evaluate"])
    reporter = RayTrainReporter()
    batches = ray_data_batches(cfg, reporter.world_size) if cfg.data.loader == "ray-data" else None
    train.run(cfg, reporter, data=data, evaluator=hook, device=device, batches=batches)


def ray_data_batches(cfg: Config, world_size: int) -> data_io.TokenStream:
    """This worker's batches from its Ray Data shard of the train split (`data.loader: ray-data`).

    The shard's token rows are read once into memory and windowed by the same `TokenStream` as
    the default loader, so order is seeded and the position resumes exactly; each worker sees
    only its shard, so a run is not batch-for-batch equal to a 1-worker run.
    """
    shard = ray.train.get_dataset_shard("train")
    parts = [data_io.tokens_from_arrow(t) for t in shard.iter_batches(batch_format="pyarrow", batch_size=None)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return data_io.TokenStream(tokens, cfg.model.seq_len, cfg.recipe.batch_size // world_size, seed=cfg.train.seed,
                               bos_id=data_io.SPM_BOS_ID if cfg.data.bos else None)


class QueueReports(UserCallback):
    """Forward rank 0's metrics and the checkpoint of every report of one Train run to a driver
    thread through a Ray queue (controller side): `{"run": index, "metrics", "checkpoint"}`."""

    def __init__(self, reports: Queue, run_index: int = 0):
        self.reports, self.run_index = reports, run_index

    def after_report(self, run_context, metrics, checkpoint):  # noqa: D401 - Ray's hook name
        self.reports.put({"run": self.run_index, "metrics": dict(metrics[0]), "checkpoint": checkpoint})


def build_trainer(cfg: Config, *, storage: str, name: str = CHECKPOINTS, evaluate: bool = False,
                  callbacks: Optional[list] = None, data_dir: Optional[str] = None) -> TorchTrainer:
    """A TorchTrainer running `cfg` on `cfg.cluster.workers` workers, resuming from storage/name.

    `evaluate`: run the INT8 evaluator; the workers run it in the loop only with
    `eval.placement: worker` (`rayq.cluster.evaluator`)."""
    backends.check_run(cfg)  # bad plans stop here, before any worker starts
    datasets = None
    if cfg.data.loader == "ray-data":
        files = data_io.reuse_or_prepare(data_dir, cfg.data, cfg.model.vocab_size).train_files()
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
    """`rayq train --workers N`: run `cfg` on Ray Train into `run_dir`; returns the last report
    (with the evaluator's metrics, wherever they ran)."""
    run_dir = Path(run_dir).resolve()
    storage = cfg.cluster.storage or str(run_dir)
    if "://" in storage:
        raise UserError(f"cluster.storage={storage}: rayq train writes its run directory locally; "
                        "remote storage is for rayq search (use a local path or leave it null)")
    evaluator.check(cfg, evaluate=evaluate, on_ray=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_io.save(cfg, run_dir / "config.yaml")
    data = data_io.prepare(cfg.data, cfg.model.vocab_size)  # once, on the driver
    connect(cfg.cluster.address)
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(cfg, storage=storage, evaluate=evaluate, callbacks=[QueueReports(reports)],
                            data_dir=str(data.root))
    log = _ReportLog(cfg, run_dir, reports, evaluate=evaluate, data_dir=str(data.root))
    log.start()
    try:
        result = trainer.fit()
    finally:
        log.stop()
    if result.error is not None:
        raise result.error
    return log.last


class _ReportLog(threading.Thread):
    """The driver's consumer of one Train run's reports: evaluator metrics merged in
    (`evaluator.checkpoint_metrics`), then one `metrics.jsonl` line per report."""

    def __init__(self, cfg: Config, run_dir: Path, reports: Queue, *, evaluate: bool, data_dir: str):
        super().__init__(name="rayq-report-log", daemon=True)
        self.cfg, self.run_dir, self.reports = cfg, run_dir, reports
        self.evaluate, self.data_dir = evaluate, data_dir
        self.last: dict = {}
        self.error: Optional[BaseException] = None
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            while True:
                try:
                    item = self.reports.get(timeout=0.5)
                except queue_lib.Empty:
                    if self._stopping.is_set():
                        return  # fit() returned and every report was read
                    continue
                row, ckpt = item["metrics"], item["checkpoint"]
                if ckpt is not None:
                    row = {**row, names.CHECKPOINT_PATH: ckpt.path}
                [row] = evaluator.checkpoint_metrics(self.cfg, [row], [ckpt], evaluate=self.evaluate,
                                                     data_dir=self.data_dir)
                train.append_metrics(self.run_dir, row)
                self.last = row
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop() on the driver thread
            self.error = exc

    def stop(self) -> None:
        self._stopping.set()
        self.join()
        if self.error is not None:
            raise self.error
