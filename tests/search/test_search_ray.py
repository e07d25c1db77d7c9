"""End to end: `rayq search` on local Ray with real Ray Train trials, a planted diverging recipe,
results/front/export, the exported recipe trained again, and a search killed and resumed."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from rayq import config as config_io

pytestmark = pytest.mark.ray

RAYQ = str(Path(sys.executable).with_name("rayq"))


def _search_config(tiny_cfg, path: Path, points: list[dict], **extra) -> Path:
    cfg = config_io.with_values(tiny_cfg, {
        "recipe.steps": 20, "train.eval_every": 10, "train.checkpoint_every": 10, "train.log_every": 5,
        "eval.task_size": 16, "eval.kl_tokens": 1024, "eval.bootstrap_samples": 50,
        "cluster.workers": 1, "cluster.cpus_per_worker": 0.25,
        "search.searcher": "grid", "search.space": {"points": points}, "search.milestones": [10],
        "search.max_concurrent": 2, "search.trial_cpus": 0.25, **extra})
    config_io.save(cfg, path)
    return path


def _run(args, **kw):
    return subprocess.run([RAYQ, *args], capture_output=True, text=True, timeout=900, **kw)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its process group and every process it started (its Ray: GCS, raylet,
    workers, agents), and nothing else: never another user's Ray on a shared machine."""
    import ray  # noqa: F401 - puts ray's vendored psutil (ray/thirdparty_files) on sys.path

    psutil = importlib.import_module("psutil")

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for child in tree:  # a descendant that left the process group
        try:
            child.kill()  # psutil checks the pid still names the same process
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def test_search_stops_the_diverging_recipe_and_exports_the_front(tiny_setup, tmp_path):
    cfg, _ = tiny_setup
    points = [
        {"recipe.weight_decay": 0.1, "recipe.precision": "bf16"},
        {"recipe.weight_decay": 0.01, "recipe.precision": "fp16", "recipe.dropout": 0.1},
        {"recipe.weight_decay": 0.001, "recipe.grad_clip": None},
        {"recipe.lr": 1.0e6, "recipe.grad_clip": None, "recipe.warmup_steps": 0},  # planted: diverges at once
    ]
    conf = _search_config(cfg, tmp_path / "search.yaml", points)
    out = tmp_path / "s"
    proc = _run(["search", "--config", str(conf), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = pq.read_table(out / "results.parquet").to_pylist()
    from rayq.search.results import read_decisions, trial_status

    status = trial_status(rows, read_decisions(out), 20)
    assert len(status) == 4
    diverged = [s for s in status.values() if s["status"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["last"]["config/recipe.lr"] == 1.0e6
    assert diverged[0]["last"]["step"] < 20  # stopped early, not trained to the end
    assert sum(s["status"] == "completed" for s in status.values()) >= 1

    front = (out / "pareto.csv").read_text().splitlines()
    assert len(front) >= 2 and "fp/acc" in front[0]
    recipes = sorted((out / "recipes").glob("*.yaml"))
    assert recipes, proc.stderr[-2000:]
    exported = yaml.safe_load(recipes[0].read_text())
    assert exported["recipe"]["weight_decay"] in (0.1, 0.01, 0.001)

    run_dir = tmp_path / "again"
    again = _run(["train", "--config", str(conf), "--recipe", str(recipes[0]), "--out", str(run_dir),
                  "--steps", "4", "--no-evaluate", "--json"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == 4


def test_killed_search_resumes_and_keeps_finished_trials(tiny_setup, tmp_path):
    cfg, _ = tiny_setup
    points = [{"recipe.weight_decay": wd} for wd in (0.1, 0.03, 0.01)]
    conf = _search_config(cfg, tmp_path / "search.yaml", points, **{"search.max_concurrent": 1,
                                                                    "search.milestones": [20]})
    out = tmp_path / "s"
    proc = subprocess.Popen([RAYQ, "search", "--config", str(conf), "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    done_before: set = set()
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "results.parquet").exists():
                rows = pq.read_table(out / "results.parquet").to_pylist()
                done_before = {r["trial_id"] for r in rows if r.get("step") == 20}
                if done_before:
                    break
            time.sleep(1)
    finally:
        _kill_tree(proc)  # the driver and the Ray it started, as kill -9 would
    assert done_before, "no trial finished before the kill"

    resumed = _run(["search", "--resume", "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    finished = {r["trial_id"] for r in rows if r.get("step") == 20}
    assert done_before <= finished  # every finished trial is kept
    assert len({r["trial_id"] for r in rows}) == 3 and len(finished) == 3
