"""Calibrating the simulator's noise to a study's seed spread (search/calibrate.py)."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from rayq.errors import UserError
from rayq.search import calibrate, replay
from rayq.search import simulate as sim
from rayq.search.results import write_table

LOSS, VKL, TKL = "eval/loss", "ptq/w8a8-vectorwise/kl", "ptq/w8a8-tensor/kl"
STUDIES = Path(__file__).resolve().parents[2] / "studies" / "proxy"
PROXY = [STUDIES / "lr", STUDIES / "contrast", STUDIES / "contrast-seed1", STUDIES / "contrast-seed2"]
# (lr, seed) -> (eval loss, log KL), the same at every step: recipe 0.01 has 3 seeds, 0.03 two, 0.1 one
VALUES = {(0.01, 0): (4.0, -5.0), (0.01, 1): (4.2, -4.8), (0.01, 2): (4.1, -5.2),
          (0.03, 0): (5.0, -4.0), (0.03, 1): (4.7, -4.4),
          (0.1, 0): (6.0, -3.0)}


def write_dir(path: Path, runs: dict, last: int) -> Path:
    """A search directory: each (lr, seed) a trial evaluated every 100 steps up to `last`."""
    rows = []
    for k, ((lr, seed), (loss, log_kl)) in enumerate(runs.items()):
        for step in range(100, last + 1, 100):
            rows.append({"trial_id": f"t{k}", "recipe_id": f"t{k}", "config/recipe.lr": lr,
                         "config/train.seed": float(seed), "step": float(step), "eval/seconds": 1.0,
                         LOSS: loss, VKL: math.exp(log_kl), TKL: math.exp(log_kl)})
    path.mkdir(parents=True, exist_ok=True)
    write_table(rows, path / "results.parquet")
    return path


def study(tmp_path: Path) -> list[Path]:
    """Seed 0 of every recipe to step 1000; the other seeds (their own directories) stop at 800."""
    return [write_dir(tmp_path / "s0", {k: v for k, v in VALUES.items() if k[1] == 0}, 1000),
            write_dir(tmp_path / "s1", {k: v for k, v in VALUES.items() if k[1] == 1}, 800),
            write_dir(tmp_path / "s2", {k: v for k, v in VALUES.items() if k[1] == 2}, 800)]


def test_measure_pools_the_seed_sd_and_reads_late_where_seeds_pair(tmp_path):
    rows = replay.load_rows(study(tmp_path), [LOSS, VKL])
    loss = calibrate.measure(rows, LOSS, log=False)
    assert [p["requested_step"] for p in loss["points"]] == [200, 500, 1000]
    assert [p["step"] for p in loss["points"]] == [200, 500, 800]  # seeds 1 and 2 end at 800
    assert [p["fraction"] for p in loss["points"]] == [0.2, 0.5, 0.8]
    p = loss["points"][0]
    # sums of squares around the recipe means: 0.01: 0.1² + 0.1² + 0, df 2; 0.03: 2 x 0.15², df 1
    assert p["seed_sd"] == pytest.approx(math.sqrt((0.02 + 0.045) / 3)) and p["seed_df"] == 3
    assert p["seeds"] == {"lr=0.01": 3, "lr=0.03": 2} and p["recipes"] == 3
    assert p["recipe_sd"] == pytest.approx(1.0)  # 4, 5, 6: seed 0 of each recipe
    lo, hi = calibrate.sd_interval(3)
    assert p["ratio"] == pytest.approx(p["seed_sd"]) and p["ratio_ci"] == pytest.approx([p["ratio"] * lo, p["ratio"] * hi])
    kl = calibrate.measure(rows, VKL, log=True)["points"][0]  # read in log: log KL -5, -4.8, -5.2 / -4, -4.4 / -3
    assert kl["seed_sd"] == pytest.approx(math.sqrt((0.08 + 0.08) / 3)) and kl["recipe_sd"] == pytest.approx(1.0)
    # two shares falling back onto one step are read once
    twice = calibrate.measure(rows, LOSS, log=False, shares=(0.2, 0.9, 1.0))
    assert [p["step"] for p in twice["points"]] == [200, 800] and "already read" in twice["notes"][0]


def test_sd_interval_of_two_seeds_is_wide():
    lo, hi = calibrate.sd_interval(2)  # 2 recipes x 2 seeds
    assert lo == pytest.approx(0.52, abs=0.01) and hi == pytest.approx(6.28, abs=0.02)
    lo4, hi4 = calibrate.sd_interval(4)
    assert lo < lo4 < 1 < hi4 < hi


def _ratio(k: np.ndarray, c: float) -> np.ndarray:
    """A ratio shaped as the simulator's: proportional to the noise, saturating below 1."""
    return c * k / np.sqrt(1 + (c * k) ** 2)


def test_fit_scale_recovers_a_scale_and_shows_a_shape_it_cannot_follow():
    grid = calibrate.K_GRID
    cs = (0.05, 0.2, 0.1)
    table = np.stack([_ratio(np.asarray(grid), c) for c in cs], axis=1)
    fit = calibrate.fit_scale([_ratio(np.array(1.7), c) for c in cs], grid, table, factor=(0.5, 2.0))
    assert fit["k"] == pytest.approx(1.7, rel=0.02)
    assert fit["per_fraction"] == pytest.approx([1.7] * 3, rel=0.02) and fit["residual"] == pytest.approx([1] * 3, rel=0.02)
    lo, hi = fit["k_ci"]
    assert lo < 1.7 / 1.9 and 1.7 * 1.9 < hi  # the ratio saturates: more than x2 on k for x2 on the ratio
    # measured shape: fraction 0 as if k = 0.5, fraction 1 as if k = 2; one k lies between
    shape = calibrate.fit_scale([_ratio(np.array(0.5), cs[0]), _ratio(np.array(2.0), cs[1])], grid, table[:, :2])
    assert shape["per_fraction"] == pytest.approx([0.5, 2.0], rel=0.02) and 0.5 < shape["k"] < 2.0
    assert shape["residual"][0] < 1 < shape["residual"][1]
    beyond = calibrate.fit_scale([0.9, 0.9, 0.9], grid, table)
    assert beyond["k"] is None and beyond["residual"] is None


def test_noise_model_scales_each_objective_alone():
    r = sim.paper_recipes()[0]
    base = sim.trial_reports(r, 3)
    assert sim.trial_reports(r, 3, model=sim.NoiseModel(acc_scale=1.0, deg_scale=1.0)) == base
    free = sim.trial_reports(r, 3, noise=0.0)
    twice = sim.trial_reports(r, 3, model=sim.NoiseModel(deg_scale=2.0))
    for b, f, t in zip(base, free, twice):
        assert t[sim.ACC] == b[sim.ACC]
        assert t[sim.DEG] - f[sim.DEG] == pytest.approx(2 * (b[sim.DEG] - f[sim.DEG]))
    silent = sim.trial_reports(r, 3, model=sim.NoiseModel(acc_scale=0.0))
    assert [x[sim.ACC] for x in silent] == pytest.approx([x[sim.ACC] for x in free])


def test_simulated_ratios_follow_each_scale():
    fractions = (0.2, 0.8)
    quiet = calibrate.simulated_ratios(sim.NoiseModel(acc_scale=0.0, deg_scale=1.0), fractions, 4)
    loud = calibrate.simulated_ratios(sim.NoiseModel(acc_scale=0.0, deg_scale=2.0), fractions, 4)
    assert quiet[sim.ACC] == (0.0, 0.0)
    assert all(0 < q < v < 1 for q, v in zip(quiet[sim.DEG], loud[sim.DEG]))


def test_committed_proxy_study_is_measured_on_its_seed_pairs():
    rows = replay.load_rows(PROXY, [LOSS, VKL])
    for metric, log in ((LOSS, False), (VKL, True), (TKL, True)):
        m = calibrate.measure(rows, metric, log)
        # three seeds per stage-2 recipe, all to step 3000; contrast/incomplete-seed1.parquet and
        # contrast-seed1/avx2-emulated-to-2400.parquet are not read (else a recipe would show more seeds)
        assert [p["step"] for p in m["points"]] == [600, 1500, 3000] and m["total_steps"] == 3000
        assert [p["requested_step"] for p in m["points"]] == [600, 1500, 3000]
        for p in m["points"]:
            assert p["recipes"] == 6  # four lrs of stage 1, two recipes of stage 2
            assert sorted(p["seeds"].values()) == [3, 3] and p["seed_df"] == 4
            assert all(math.isfinite(x) and x > 0 for x in (p["seed_sd"], p["recipe_sd"], p["ratio"], *p["ratio_ci"]))


def test_bench_runs_at_the_calibrated_noise(tmp_path, capsys, monkeypatch):
    from rayq.search.bench import main

    with pytest.raises(UserError, match="--calibrate-from"):
        main(["--calibrate-from", str(tmp_path)])
    # a small Monte Carlo: the maths are tested above, this is the wiring
    monkeypatch.setattr(calibrate, "calibrate", functools.partial(calibrate.calibrate, n=3))
    seed_sd = sim.seed_sd
    monkeypatch.setattr(sim, "seed_sd", lambda step=sim.TOTAL_STEPS, noise=1.0, model=sim.NOISE, n=400:
                        seed_sd(step, noise, model, 10))
    assert main(["--offline", "--calibrate-from", *map(str, study(tmp_path)), "--strategies", "no-stopping",
                 "--seeds", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cal = out["calibration"]
    assert out["noise_model"] == {"scale": 1.0, **cal["noise_model"]}
    assert cal["noise_model"]["acc_scale"] == round(cal["fit"][sim.ACC]["k"], 3) > 0
    assert [p["step"] for p in cal["measured"][sim.DEG]["points"]] == [200, 500, 800]
    assert out["strategies"]["no-stopping"]["compute_fraction"] == 1.0
