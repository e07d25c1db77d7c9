"""Ray Train runs of the one loop: DDP equivalence and recovery from a killed worker."""

import importlib
import json
import threading
import time

import pytest
import torch

from rayq import config as config_io
from rayq.train import LocalReporter, run

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from rayq.cluster.trainer import connect

    connect(None, num_cpus=2)
    yield
    ray.shutdown()


def _kill_own_train_workers() -> int:
    """SIGKILL the Ray Train workers of this test's Ray (descendants of this process; never
    another user's Ray on a shared machine). Returns how many."""
    import ray  # noqa: F401 - puts ray's vendored psutil (ray/thirdparty_files) on sys.path

    psutil = importlib.import_module("psutil")

    workers = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ray::RayTrainWorker" in " ".join(proc.cmdline()):
                workers.append(proc)
        except psutil.Error:  # exited meanwhile
            continue
    for proc in workers:
        proc.kill()  # psutil checks the pid still names the same process
    return len(workers)


def _model(run_dir):
    from rayq import checkpoint as ckpt_io

    return torch.load(ckpt_io.latest(run_dir / "checkpoints") / "model.pt", weights_only=True)


def test_two_workers_with_batch_b_match_one_worker_with_batch_2b(ray_local, tiny_setup, tmp_path):
    from rayq.cluster.trainer import fit

    base, data = tiny_setup
    cfg = config_io.with_values(base, {"recipe.steps": 8, "recipe.batch_size": 8, "train.checkpoint_every": 8,
                                       "train.eval_every": 8, "recipe.precision": "fp32",
                                       "cluster.workers": 2, "cluster.cpus_per_worker": 0.5})
    fit(cfg, tmp_path / "ray2")
    local = config_io.with_values(cfg, {"cluster.workers": 0})
    run(local, LocalReporter(tmp_path / "local", local, echo=False), data=data)
    a, b = _model(tmp_path / "ray2"), _model(tmp_path / "local")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    rows = [json.loads(x) for x in (tmp_path / "ray2" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8 and rows[-1]["checkpoint_path"].endswith("step_8")


def test_killed_worker_resumes_from_last_checkpoint(ray_local, tiny_setup, tmp_path):
    from rayq.cluster.trainer import fit

    base, _ = tiny_setup
    cfg = config_io.with_values(base, {"recipe.steps": 160, "train.checkpoint_every": 20, "train.eval_every": 100,
                                       "train.log_every": 10, "cluster.workers": 1, "cluster.cpus_per_worker": 0.5,
                                       "cluster.max_failures": 2})
    out = tmp_path / "run"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(fit(cfg, out)))
    thread.start()
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_40").exists():
        assert time.time() < deadline and thread.is_alive(), "run never reached step 40"
        time.sleep(0.2)
    assert _kill_own_train_workers() > 0, "no Ray Train worker process of this test's Ray found to kill"
    thread.join(timeout=300)
    assert result.get("step") == 160
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 160
    resumed = {r["train/resumed_from"] for r in rows}
    assert max(resumed) >= 20, f"the run never resumed from a checkpoint: {resumed}"  # step_40 may not be committed yet


def test_ray_data_loader_feeds_the_same_loop(ray_local, tiny_setup, tmp_path):
    """`data.loader: ray-data`: 2 workers read their shards through Ray Data and train normally."""
    from rayq.cluster.trainer import fit

    base, _ = tiny_setup
    cfg = config_io.with_values(base, {"recipe.steps": 6, "recipe.batch_size": 4, "train.checkpoint_every": 3,
                                       "train.eval_every": 6, "data.loader": "ray-data",
                                       "cluster.workers": 2, "cluster.cpus_per_worker": 0.5})
    metrics = fit(cfg, tmp_path / "run")
    assert metrics["step"] == 6 and metrics["train/loss"] < 7
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "checkpoint_path" in r] == [3, 6]


def test_train_honours_eval_placement_task(ray_local, tiny_setup, tmp_path):
    """`eval.placement: task`: the workers run no eval hook; the driver evaluates every committed
    checkpoint in a Ray task and writes each report once, with the task's metrics merged in."""
    from rayq.cluster.trainer import fit

    base, _ = tiny_setup
    cfg = config_io.with_values(base, {"recipe.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 3,
                                       "train.log_every": 1, "eval.placement": "task", "eval.task_size": 8,
                                       "eval.kl_tokens": 256, "eval.bootstrap_samples": 10,
                                       "cluster.workers": 1, "cluster.cpus_per_worker": 0.5,
                                       "cluster.evaluator_resources": {"CPU": 0.5}})
    last = fit(cfg, tmp_path / "run", evaluate=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one writer: each report once
    evaluated = [r["step"] for r in rows if "ptq/w8a8-vectorwise/kl" in r]
    assert evaluated == [3, 6] == [r["step"] for r in rows if "checkpoint_path" in r]
    assert all("eval/node_id" in r for r in rows if r["step"] in (3, 6))  # scored by the task, not the loop
    assert last["step"] == 6 and "fp/acc" in last and last["checkpoint_path"] == rows[-1]["checkpoint_path"]


def test_rank0_progress_reaches_the_terminal_with_workers(ray_local, tiny_setup, tmp_path, capsys):
    """`rayq train --workers N`: the driver prints one progress line per rank-0 report (the
    workers' own logs stay off the driver), says what it does before Ray starts, and the run
    directory carries the tokenizer."""
    from rayq.cluster.trainer import fit

    base, _ = tiny_setup
    cfg = config_io.with_values(base, {"recipe.steps": 4, "train.checkpoint_every": 4, "train.log_every": 2,
                                       "cluster.workers": 1, "cluster.cpus_per_worker": 0.5})
    capsys.readouterr()
    fit(cfg, tmp_path / "run")
    err = capsys.readouterr().err
    assert "rayq train: data: " in err and "starting Ray" in err
    assert "step 2/4 · loss " in err and "step 4/4 · loss " in err
    assert (tmp_path / "run" / "tokenizer.model").is_file()
