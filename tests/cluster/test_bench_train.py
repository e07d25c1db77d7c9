"""`rayq bench train`: the quick run's JSON, the rate arithmetic, the per-process CPU sampler, and
(Ray) the interleaved rounds plus a Ray Train run that reports faster than Ray's controller polls."""

import json
import math
import subprocess
import sys

import pytest

from rayq import config as config_io
from rayq.cli import main
from rayq.cluster.bench import CpuSampler, rates
from rayq.kernels import machine


def test_bench_train_quick_prints_json(tiny_setup, tmp_path, capsys):
    cfg, _ = tiny_setup
    config_io.save(cfg, tmp_path / "c.yaml")
    assert main(["bench", "train", "--quick", "--json", "--config", str(tmp_path / "c.yaml")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("bare_fp32_tokens_per_s", "rayq_fp32_tokens_per_s", "rayq_bf16_tokens_per_s",
                "loop_overhead_vs_bare", "bf16_speedup_vs_fp32", "allocator", "machine"):
        assert key in out
    assert out["rayq_fp32_tokens_per_s"] > 0 and out["allocator"] in ("glibc-keep-pages", "jemalloc", "system")
    assert out["device"] == "cpu" and "ray" not in out  # --quick: no Ray rounds


def test_bench_train_rejects_bad_counts(capsys):
    assert main(["bench", "train", "--steps", "2"]) == 2
    assert "--steps=2" in capsys.readouterr().err


def test_rates_step_and_wall():
    history = [  # first report (warm-up) dropped; 4 steps x 100 tokens between wall 10 s and 12 s
        {"step": 2, "train/tokens_per_s": 1.0, "train/wall_time": 5.0},
        {"step": 4, "train/tokens_per_s": 300.0, "train/wall_time": 10.0},
        {"step": 6, "train/tokens_per_s": 200.0, "train/wall_time": 11.5},
        {"step": 8, "train/tokens_per_s": 250.0, "train/wall_time": 12.0},
    ]
    r = rates(history, tokens_per_step=100)
    assert r["step"] == 250.0
    assert r["wall"] == pytest.approx(400 / 2.0)
    assert math.isnan(rates(history[:1], 100)["wall"])


def test_cpu_sampler_charges_a_busy_child_to_its_name():
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    with CpuSampler(interval=0.05) as sampler:
        subprocess.run([sys.executable, "-c", code], check=True)
    usage = sampler.usage()
    # the child (0.4 s of CPU) and this process are both "python"-named; their share is > 0
    assert sum(usage.values()) > 0 and all(v >= 0 for v in usage.values())
    assert any(name.startswith(("python", "driver")) for name in usage)


def test_bench_train_records_the_cpu_through_kernels_machine():
    info = machine.describe()
    assert info["cores"] >= 1 and len(info["load_average"]) == 3
    assert isinstance(info["model"], str) and info["model"] and isinstance(info["kernel_flags"], list)
def test_ray_train_reports_faster_than_the_controller_polls_without_stalling(tiny_setup, tmp_path):
    """Ray's result queue holds one report and the controller drains it every 2 s: a loop
    reporting every step (tiny steps take milliseconds) must not wait on it, and every report
    must still arrive, in order."""
    import ray

    from rayq.cluster.trainer import fit

    cfg, _ = tiny_setup
    cfg = config_io.with_values(cfg, {"recipe.steps": 12, "train.log_every": 1, "train.eval_every": 0,
                                      "train.checkpoint_every": 6, "cluster.workers": 1,
                                      "cluster.cpus_per_worker": 1.0, "train.threads": 1})
    try:
        fit(cfg, tmp_path / "run")
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["step"] for r in rows if "checkpoint_path" in r] == [6, 12]
    # a synchronous report would have blocked ~2 s for most of these 12 reports
    assert rows[-1]["ray/report_seconds"] < 8.0
    assert rows[0]["ray/niceness"] == 0  # the embedded cluster runs its workers at nice 0
    assert rows[0]["ray/torch_threads"] == 1


@pytest.mark.ray
def test_bench_train_ray_round_reports_overhead_and_breakdown(tiny_setup, tmp_path, capsys):
    cfg, _ = tiny_setup
    config_io.save(cfg, tmp_path / "c.yaml")
    argv = ["bench", "train", "--json", "--steps", "8", "--rounds", "1", "--config", str(tmp_path / "c.yaml")]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (round1,) = out["ray"]["rounds"]
    assert round1["ray_tokens_per_s"]["wall"] > 0 and round1["local_tokens_per_s"]["wall"] > 0
    assert math.isfinite(out["ray_overhead_pct"]) and out["ray_overhead_pct"] < 100
    assert round1["worker_niceness"] == 0 and round1["worker_torch_threads"] == out["threads"]
    assert "ray::RayTrainWorker" in round1["cpu_pct_of_one_core"]  # detached workers are found via RAY_RAYLET_PID
