"""Replayed searches over recorded curves (`rayq bench search --replay`, search/replay.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rayq.errors import UserError
from rayq.search import replay
from rayq.search.offline import Strategy
from rayq.search.results import write_table

LOSS, KL = "eval/loss", "ptq/w8a8-tensor/kl"
STUDIES = Path(__file__).resolve().parents[2] / "studies" / "proxy"
GOOD, BAD = "lr=0.01", "lr=0.03"  # the recipes' names in the synthetic study (only the lr varies)
# (lr, seed) -> {step: (eval loss, KL)}: the lr 0.03 recipe is worse on both objectives at every
# evaluation, by far more than the seeds differ
CURVES = {
    (0.01, 0): {100: (4.0, 1e-4), 200: (3.5, 5e-4), 300: (3.0, 1e-3)},
    (0.01, 1): {100: (4.1, 2e-4), 200: (3.6, 6e-4), 300: (3.2, 3e-3)},
    (0.03, 0): {100: (6.0, 8e-3), 200: (5.5, 9e-3), 300: (5.0, 10e-3)},
    (0.03, 1): {100: (6.1, 9e-3), 200: (5.6, 10e-3), 300: (5.2, 12e-3)},
}


def write_study(path: Path, curves: dict = CURVES, evaluated: bool = True) -> Path:
    """A search directory: per recipe-seed a trial whose evaluation rows are `curves`, with
    rows between them that carry the objectives forward (and a misleading value in them)."""
    rows = []
    for k, ((lr, seed), points) in enumerate(curves.items()):
        for step, (loss, kl) in points.items():
            base = {"trial_id": f"t{k}", "recipe_id": f"t{k}", "config/recipe.lr": lr, "config/train.seed": float(seed)}
            rows.append({**base, "step": float(step - 50), LOSS: 0.0, KL: 0.0, "eval/seconds": None})
            rows.append({**base, "step": float(step), LOSS: loss, KL: kl, "eval/seconds": 1.5})
    path.mkdir(parents=True, exist_ok=True)
    write_table(rows if evaluated else [{**r, "eval/seconds": None} for r in rows], path / "results.parquet")
    return path


def test_grid_truth_and_measured_seed_sd(tmp_path):
    grid = replay.load_grid([write_study(tmp_path / "s")])
    assert sorted(grid.seeds) == [GOOD, BAD] and grid.total_steps == 300 and grid.eval_every == 100
    assert [r["step"] for r in grid.seeds[GOOD][1.0]] == [100, 200, 300]  # evaluation rows only
    assert grid.truth[GOOD] == pytest.approx((3.1, 2e-3)) and grid.truth[BAD] == pytest.approx((5.1, 11e-3))
    sd, recipes = replay.seed_sd(grid, 300)
    # two seeds a gap d apart have sd d/√2; both recipes' gaps are equal, so the pooled sd is it
    assert recipes == 2 and sd == pytest.approx({LOSS: 0.2 / math.sqrt(2), KL: 2e-3 / math.sqrt(2)})
    prior, source = replay.noise_prior(grid)
    assert prior == sd and source.startswith("measured")
    one_seed = {k: v for k, v in CURVES.items() if k[1] == 0}
    prior, source = replay.noise_prior(replay.load_grid([write_study(tmp_path / "one", one_seed)]))
    assert prior == replay.FALLBACK_PRIOR and source.startswith("fallback")


def test_replay_stops_the_dominated_recipe_at_the_first_milestone_only(tmp_path):
    grid = replay.load_grid([write_study(tmp_path / "s")])
    prior, _ = replay.noise_prior(grid)
    assert grid.at(replay.FIRST_SHARE) == 100
    for seed in range(8):
        outcome, stops = replay.run_replay(grid, Strategy("dominance", 0.9), seed, prior=prior)
        # judged on the step-100 evaluations; when it reported 100 before its rival, it stops at its next report
        assert set(stops) == {BAD} and stops[BAD]["judged_at"] == 100 and stops[BAD]["step"] in (100, 200), stops
        assert stops[BAD]["by"] == GOOD and "dominated by" in stops[BAD]["reason"]
        assert outcome.front == (GOOD,) and outcome.has_knee and outcome.front_recall == 1.0
        assert outcome.fraction == pytest.approx((300 + stops[BAD]["step"]) / 600)
        # moasha judges a recipe once, on arrival at the rung: the only front member is never the one cut
        outcome, stops = replay.run_replay(grid, Strategy("moasha", 3.0), seed, prior=prior)
        assert GOOD not in stops and GOOD in outcome.front
    outcome, stops = replay.run_replay(grid, Strategy("no-stopping"), 0, prior=prior)
    assert not stops and outcome.fraction == 1.0 and outcome.completed == (GOOD, BAD)


def test_keys_a_directory_did_not_search_come_from_its_config_yaml(tmp_path):
    lr_only = write_study(tmp_path / "lr", {k: v for k, v in CURVES.items() if k[1] == 0})
    (lr_only / "config.yaml").write_text("recipe:\n  grad_clip: 1.0\n  lr: 0.01\n")
    other = tmp_path / "clip"
    rows = [{"trial_id": "c", "recipe_id": "c", "config/recipe.lr": 0.03, "config/recipe.grad_clip": None,
             "step": float(s), LOSS: 5.0, KL: 1e-3, "eval/seconds": 1.0} for s in (100, 200, 300)]
    other.mkdir()
    write_table(rows, other / "results.parquet")
    grid = replay.load_grid([lr_only, other])
    assert sorted(grid.seeds) == ["grad_clip=1.0 lr=0.01", "grad_clip=1.0 lr=0.03", "grad_clip=None lr=0.03"]


def test_bad_input_is_a_one_line_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="results.parquet") as err:
        replay.load_grid([tmp_path / "empty"])
    assert "\n" not in str(err.value)
    write_study(tmp_path / "noeval", evaluated=False)
    with pytest.raises(UserError, match=r"noeval/results.parquet: no evaluation rows \(expected rows with eval/sec"):
        replay.load_grid([tmp_path / "noeval"])


def test_replay_of_the_committed_proxy_studies():
    dirs = [str(STUDIES / "lr"), str(STUDIES / "contrast")]
    out = replay.run_replay_bench(dirs, range(3), p=0.9, eta=3.0, per_search=8, curves=False)
    for key in ("studies", "recipes", "noise_prior", "noise_source", "measured_seed_sd", "true_front", "true_knee",
                "strategies"):
        assert key in out, key
    assert len(out["studies"]) == 2 and not any(Path(s).is_absolute() for s in out["studies"])
    assert len(out["recipes"]) == 6 and out["total_steps"] == 3000 and out["eval_every"] == 300
    assert out["true_knee"] in out["true_front"]
    single = all(r["seeds"] < 2 for r in out["recipes"].values())
    assert out["noise_source"].startswith("fallback" if single else "measured")
    assert set(out["strategies"]) == {"dominance", "moasha", "no-stopping"}
    full = out["strategies"]["no-stopping"]
    assert full["compute_fraction"] == 1.0 and full["recovered_knee"] == 1.0 and full["hv_regret"] == 0.0
    for name, s in out["strategies"].items():
        assert s["seeds"] == 3 and 1 <= s["distinct_outcomes"] <= 3
        common = s["most_common_outcome"]
        assert not set(common["stopped"]) & set(common["front"]), name  # a stopped recipe never reaches the front
        assert all(0 < x["step"] < 3000 for x in common["stopped"].values())
