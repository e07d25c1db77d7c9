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

import contextlib
import os
import queue as queue_lib
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import ray
import ray.train
import torch
from ray.train import UserCallback
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from rayq import config as config_io
from rayq import data as data_io
from rayq import metrics as names
from rayq import train
from rayq.batches import TokenStream
from rayq.cluster import backends, evaluator
from rayq.errors import UserError
from rayq.progress import say
from rayq.schema import Config

CHECKPOINTS = "checkpoints"  # Ray Train run name: checkpoints land in <storage>/checkpoints/step_N


# Ray settings of the embedded cluster only (a cluster joined by address keeps its own):
# - Ray starts its workers at nice 15; beside any other busy process on the machine a Ray Train
#   worker then gets a sliver of a core (CFS weight 36 against 1024 at nice 0), while the same
#   loop run by `rayq train` without Ray competes as an equal. The worker is the job here.
# - The metrics pipeline (every process recording and pushing to the metrics agent for the
#   Prometheus exporter) serves a dashboard that is off.
EMBEDDED_SYSTEM_CONFIG = {"worker_niceness": 0, "enable_metrics_collection": False}


def connect(address: Optional[str], *, num_cpus: Optional[float] = None, quiet: bool = True,
            dashboard: bool = False, **ray_init_options: Any) -> Optional[str]:
    """Join a cluster at `address`, or start an embedded local Ray (the laptop default) that
    listens on loopback only. Returns the dashboard URL when there is one (`dashboard=True` starts
    it, on loopback for the embedded Ray). `ray_init_options` go to `ray.init` (e.g. logging_level)."""
    import ray

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict[str, Any] = {"log_to_driver": not quiet, "include_dashboard": dashboard, **ray_init_options}
    if dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
    if address:
        context = ray.init(address=address, **kwargs)
    else:
        with _single_machine_ray():
            context = ray.init(num_cpus=num_cpus, _system_config=EMBEDDED_SYSTEM_CONFIG, **kwargs)
        node_ip = ray.util.get_node_ip_address()
        if node_ip not in LOOPBACK:
            ray.shutdown()
            raise RuntimeError(f"the embedded Ray came up on {node_ip}, not on loopback")
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url or None


LOOPBACK = ("127.0.0.1", "::1")
# Ray's own switch between "one machine" (its default on macOS and Windows: the node IP is the
# loopback address) and "a node of a cluster" (its default on Linux: the outward IP). With the node
# IP on loopback, GCS, raylet, object manager, core workers and the agents bind 127.0.0.1 instead
# of all interfaces (checked in tests/cluster/test_ray_network.py).
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _single_machine_ray() -> Iterator[None]:
    """While the embedded local Ray starts: a single-machine Ray, so nothing it starts listens
    beyond loopback. The processes `ray.init` starts inherit the setting; it is restored after, so
    a later `ray start` or `ray.init(address=...)` of this program joins clusters as usual."""
    from ray._private import ray_constants

    before_env, before_flag = os.environ.get(_SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # Ray reads the variable once, at import
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_SINGLE_MACHINE_ENV] = before_env


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
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()  # hostnames repeat when nodes share a machine
        self.blocked_seconds = 0.0  # time the loop spent waiting in report() (Ray overhead, `rayq bench train`)
        # how this worker process runs, in its first report: a niceness above 0 or more threads
        # than CPUs owned shows up as Ray overhead (`rayq bench train` reads them)
        self._first: dict = {names.ray("torch_threads"): torch.get_num_threads(), names.ray("niceness"): os.nice(0)}
        self._outbox: queue_lib.Queue = queue_lib.Queue()
        self._error: Optional[BaseException] = None
        self._sender = threading.Thread(target=self._send_all, name="rayq-report-sender", daemon=True)
        self._sender.start()

    def new_checkpoint_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"rayq-step_{step}-"))

    def report(self, metrics: dict, checkpoint: Optional[Path] = None) -> Optional[Path]:
        self._raise_if_failed()
        t0 = time.perf_counter()
        # which node trained (it changes after a restart); when; what reporting has cost the loop
        metrics = {**metrics, **self._first, names.train("node_id"): self.node_id, names.train("wall_time"): time.time(),
                   names.ray("report_seconds"): self.blocked_seconds, names.ray("report_backlog"): self._outbox.qsize()}
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
        ckpt = None
        # rank 0 always holds the checkpoint; a sharded one (FSDP) has shard files on every rank,
        # and Ray Train merges the directories every rank reports into one checkpoint
        if checkpoint is not None and (self.rank == 0 or any(Path(checkpoint).iterdir())):
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint))
        # every rank reports the same reports in the same order (it is a barrier); only rank 0's
        # metrics are kept
        ray.train.report(metrics, checkpoint=ckpt,
                         checkpoint_dir_name=f"step_{metrics[names.STEP]}" if checkpoint is not None else None)
        if checkpoint is not None:
            shutil.rmtree(checkpoint, ignore_errors=True)  # uploaded synchronously by report()

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
    reporter.close()  # the last reports reach Ray before the worker's function returns


def ray_data_batches(cfg: Config, world_size: int) -> TokenStream:
    """This worker's batches from its Ray Data shard of the train split (`data.loader: ray-data`).

    The shard's token rows are read once into memory and windowed by the same `TokenStream` as
    the default loader, so order is seeded and the position resumes exactly; each worker sees
    only its shard, so a run is not batch-for-batch equal to a 1-worker run.
    """
    shard = ray.train.get_dataset_shard("train")
    parts = [data_io.tokens_from_arrow(t) for t in shard.iter_batches(batch_format="pyarrow", batch_size=None)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return TokenStream(tokens, cfg.model.seq_len, cfg.recipe.batch_size // world_size, seed=cfg.train.seed,
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
        # seconds to import, and only this loader reads through Ray Data (`import ray.data` here
        # would make `ray` a local name of this function and break the other path)
        from ray import data as ray_data

        files = data_io.reuse_or_prepare(data_dir, cfg.data, cfg.model.vocab_size).train_files()
        datasets = {"train": ray_data.read_parquet(files).select_columns(["tokens"])}
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


def fit(cfg: Config, run_dir: str | Path, *, evaluate: bool = False, verbose: bool = False) -> dict:
    """`rayq train --workers N`: run `cfg` on Ray Train into `run_dir`; returns the last report
    (with the evaluator's metrics, wherever they ran). Rank 0's reports reach the terminal as the
    driver receives them (one progress line each, key=value with `verbose`); the workers' own
    logs stay off the driver (`log_to_driver=False`), so the terminal is not flooded."""
    run_dir = Path(run_dir).resolve()
    storage = cfg.cluster.storage or str(run_dir)
    if "://" in storage:
        raise UserError(f"cluster.storage={storage}: rayq train writes its run directory locally; "
                        "remote storage is for rayq search (use a local path or leave it null)")
    evaluator.check(cfg, evaluate=evaluate, on_ray=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_io.save(cfg, run_dir / "config.yaml")
    data = data_io.prepare(cfg.data, cfg.model.vocab_size,  # once, on the driver
                           progress=lambda m: say(f"rayq train: data: {m}"))
    data_io.copy_tokenizer(data, run_dir)
    say(f"rayq train: starting Ray ({cfg.cluster.address or 'local'}) and {cfg.cluster.workers} "
        f"Ray Train worker(s) for {cfg.name} to step {cfg.recipe.steps} into {run_dir}")
    connect(cfg.cluster.address)
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(cfg, storage=storage, evaluate=evaluate, callbacks=[QueueReports(reports)],
                            data_dir=str(data.root))
    log = _ReportLog(cfg, run_dir, reports, evaluate=evaluate, data_dir=str(data.root),
                     echo=train.ProgressEcho.of(cfg, verbose=verbose))
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

    def __init__(self, cfg: Config, run_dir: Path, reports: Queue, *, evaluate: bool, data_dir: str,
                 echo: Optional[train.ProgressEcho] = None):
        super().__init__(name="rayq-report-log", daemon=True)
        self.cfg, self.run_dir, self.reports, self.echo = cfg, run_dir, reports, echo
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
                if self.echo is not None:
                    self.echo(row)
                self.last = row
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop() on the driver thread
            self.error = exc

    def stop(self) -> None:
        self._stopping.set()
        self.join()
        if self.error is not None:
            raise self.error
