import json
from pathlib import Path

import numpy as np
import pytest

from rayq.search import simulate as sim
from rayq.search.space import PAPER_CONTROLS, recipe_label

TABLE = Path(__file__).resolve().parents[1] / "fixtures" / "paper_table_a3.json"  # the paper's Table A.3


def test_eleven_recipes_and_the_true_best():
    recipes = sim.paper_recipes()
    assert len(recipes) == 11 and len({r.recipe_id for r in recipes}) == 11
    assert sim.knee() == recipe_label(PAPER_CONTROLS) == "wd0.1-gc1-do0-bf16"
    assert set(sim.true_front()) == {"wd0.1-gcnone-do0-bf16", "wd0.001-gcnone-do0-bf16",
                                     "wd0.1-gc1-do0-bf16", "wd0.01-gc1-do0-bf16"}


def test_calibration_is_table_a3():
    rows = json.loads(TABLE.read_text())["rows"]
    assert [(r["variant"], r["fp16"]["Average"], r["average_pct_diff"]) for r in rows] == list(sim.PAPER_A3)


def test_noise_free_curves_end_at_the_table_and_degradation_shows_by_15k():
    r = {x.recipe_id: x for x in sim.paper_recipes()}["wd0.001-gcnone-do0-bf16"]
    reps = sim.trial_reports(r, 0, noise=0.0)
    assert [x["step"] for x in reps] == list(range(5000, 75001, 5000))
    assert reps[-1][sim.ACC] == pytest.approx(66.21) and reps[-1][sim.DEG] == pytest.approx(-1.36)
    at15 = reps[2][sim.DEG] / reps[-1][sim.DEG]
    assert 0.55 < at15 < 0.75  # visible by 15k of 75k
    accs = [x[sim.ACC] for x in reps]
    assert accs == sorted(accs)  # accuracy rises
    assert all(x["diverged"] == 0 and np.isfinite(x["train/loss"]) for x in reps)
    # kl ranks exactly as degradation (monotone decreasing)
    kls = np.array([x[sim.KL] for x in reps])
    degs = np.array([x[sim.DEG] for x in reps])
    assert (np.argsort(kls) == np.argsort(-degs)).all()


def test_noise_is_centred_and_deterministic():
    r = sim.paper_recipes()[0]
    finals = np.array([[x[sim.ACC], x[sim.DEG]] for x in (sim.trial_reports(r, s)[-1] for s in range(400))])
    assert finals[:, 0].mean() == pytest.approx(r.acc, abs=0.03)
    assert finals[:, 1].mean() == pytest.approx(r.deg, abs=0.03)
    assert 0.1 < finals[:, 0].std() < 0.3
    assert sim.trial_reports(r, 7) == sim.trial_reports(r, 7)


def test_scoring_a_search():
    finals = [{"recipe_id": "0/wd0.1-gc1-do0-bf16", "step": 75000, sim.ACC: 66.0, sim.DEG: 0.3},
              {"recipe_id": "0/wd0.001-gcnone-do0-bf16", "step": 75000, sim.ACC: 66.3, sim.DEG: -1.0},
              {"recipe_id": "0/wd0.01-gc1-do0-fp16", "step": 75000, sim.ACC: 65.0, sim.DEG: -2.0},
              {"recipe_id": "0/wd0.01-gc1-do0-bf16", "step": 15000, sim.ACC: 70.0, sim.DEG: 5.0}]
    o = sim.score_search(0, "x", finals, stopped={"0/wd0.01-gc1-do0-bf16"})
    assert o.trial_steps == 3 * 75000 + 15000 and o.fraction == pytest.approx(240000 / (11 * 75000))  # of the whole grid
    assert o.front == ("wd0.001-gcnone-do0-bf16", "wd0.1-gc1-do0-bf16") and o.has_knee and o.has_true_front


def test_scoring_metrics_at_true_values():
    truth = {r.recipe_id: r for r in sim.paper_recipes()}

    def row(rid, step=75000, da=0.0, dd=0.0):
        return {"recipe_id": f"0/{rid}", "step": step, sim.ACC: truth[rid].acc + da, sim.DEG: truth[rid].deg + dd}

    everything = sim.score_search(0, "x", [row(r) for r in truth])
    assert everything.hv_regret == pytest.approx(0.0) and everything.front_recall == 1.0
    assert everything.pick_truly_pareto and everything.has_knee
    # a noisy measurement puts a dominated recipe on the front and picks it: not truly Pareto
    fooled = sim.score_search(0, "x", [row("wd0.01-gc1-do0-fp16", da=3.0, dd=3.0), row("wd0.1-gcnone-do0-bf16")])
    assert fooled.front == ("wd0.01-gc1-do0-fp16",) and not fooled.pick_truly_pareto
    assert fooled.front_recall == 0.0 and 0 < fooled.hv_regret <= 1
    assert sim.score_search(0, "x", []).hv_regret == 1.0


def test_hypervolume_2d():
    from rayq.search.pareto import hypervolume_2d

    assert hypervolume_2d([(2, 2)], (0, 0)) == 4
    assert hypervolume_2d([(2, 1), (1, 2), (1, 1), (-1, 5)], (0, 0)) == 3  # dominated and below-reference rows add nothing
    assert hypervolume_2d([], (0, 0)) == 0


def test_offline_loop_with_the_schedulers():
    from rayq.search import offline

    full = offline.run_offline(offline.Strategy("no-stopping"), 3)
    assert full.fraction == 1.0 and len(full.completed) == 11
    for strategy in (offline.Strategy("dominance", 0.9), offline.Strategy("moasha", 3.0)):
        s = offline.make_scheduler(strategy)
        early = offline.run_offline(strategy, 3, scheduler=s)
        assert early.fraction < 0.9 and len(early.completed) < 11
        # stopped recipes never reach the front
        assert not set(early.front) & {d.recipe_id for d in s.stopped_trials().values()}
    # the pilot's extra seeds cost compute and give the rule replicates
    pilot = offline.Strategy("dominance-pilot", 0.9)
    s = offline.make_scheduler(pilot)
    offline.run_offline(pilot, 3, scheduler=s)
    assert any(d.noise_source and "replicates@5000" in d.noise_source for d in s.decisions)
    # late re-ranking keeps the table's finals (the truth) but changes the curves
    r = sim.paper_recipes()[0]
    plain, late = sim.trial_reports(r, 1, 0.0), sim.trial_reports(r, 1, 0.0, late=0.6)
    assert late[-1][sim.DEG] == pytest.approx(plain[-1][sim.DEG]) and late[8][sim.DEG] > plain[8][sim.DEG] + 0.3


def test_wilson_and_bootstrap():
    from rayq.search.outcomes import bootstrap, wilson

    lo, hi = wilson(180, 200)
    assert lo < 0.9 < hi and hi - lo < 0.1
    assert wilson(200, 200)[1] == 1.0 and wilson(0, 200)[0] == 0.0
    lo, hi = bootstrap([0.0, 1.0] * 100)
    assert lo < 0.5 < hi


def test_bench_offline_prints_json(capsys, tmp_path):
    from rayq.search.bench import main

    png = tmp_path / "curves.png"
    assert main(["--offline", "--seeds", "2", "--json", "--strategies", "dominance,moasha,no-stopping",
                 "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["default_strategy"] == "dominance"
    assert set(out["strategies"]) == {"dominance", "moasha", "no-stopping"}
    ns = out["strategies"]["no-stopping"]
    assert ns["compute_fraction"] == 1.0 and ns["seeds"] == 2
    for key in ("recovered_knee", "recovered_knee_ci", "pick_truly_pareto", "hv_regret", "front_recall"):
        assert key in out["strategies"]["dominance"]
    assert [c["dial"] for c in out["curves"]["dominance"]] == [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
    assert set(out["noise_sweep"]) == {"0.25", "0.5", "1", "2"} and "dominance" in out["late_reranking"]
    assert "moasha" in out["equal_compute"] and out["true_best_knee"] == "wd0.1-gc1-do0-bf16"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_bad_input():
    from rayq.errors import UserError
    from rayq.search.bench import main

    for argv in (["--strategies", "hyperband"], ["--p", "0.2"], ["--eta", "1"], ["--seeds", "0"]):
        with pytest.raises(UserError):
            main(argv + ["--offline"])
    with pytest.raises(UserError, match="--plot"):
        main(["--plot", "x.png"])


@pytest.mark.ray
def test_bench_quick_through_ray_tune(capfd):
    from rayq.search.bench import main

    assert main(["--quick", "--json"]) == 0
    out = json.loads(capfd.readouterr().out)  # stdout stays pure JSON although Tune prints banners
    s = out["strategies"]
    assert s["no-stopping"]["compute_fraction"] == 1.0 and s["no-stopping"]["completed_recipes"] == 11
    assert s["dominance"]["compute_fraction"] < 1.0
    assert out["timing"]["errors"] == 0


def test_nsga2_study_is_told_what_each_arm_says_about_stopped_trials():
    from rayq.search import simulate_optuna as so

    done = so.run_study("complete-infeasible", 3, trials=12, population=4)
    early = 12 - done["finished_trials"]
    assert early > 0  # the rule stops some recipes, or there is nothing to compare
    assert done["told"] == {"COMPLETE": 12, "PRUNED": 0} and done["infeasible"] == early
    assert done["generation"] >= 1  # stopped trials count toward a generation too
    pruned = so.run_study("pruned-resized", 3, trials=12, population=4)
    assert pruned["told"] == {"COMPLETE": pruned["finished_trials"], "PRUNED": 12 - pruned["finished_trials"]}
    assert pruned["infeasible"] == 0
    assert 0 < pruned["compute_fraction"] <= 1 and 0 <= pruned["hv_regret"] <= 1
    assert so.population_for("complete-infeasible", 4, 0.44) == 8
    assert so.population_for("pruned-resized", 4, 0.44) == 4 and so.population_for("pruned-resized", 1, 0.1) == 2


def test_offline_loop_with_synchronous_rungs():
    from rayq.search import offline

    strategy = offline.Strategy("dominance-sync", 0.9)
    s = offline.make_scheduler(strategy)
    out = offline.run_offline(strategy, 5, scheduler=s)
    # every recipe was held at the first milestone and judged there together
    assert len(s._released[offline.FIRST_MILESTONE]) == 11 and not s._held
    at_first = [d for d in s.decisions if d.step == offline.FIRST_MILESTONE]
    assert len(at_first) == 11  # one decision per recipe: CONTINUE (milestone) or STOP (dominated)
    assert 0 < out.fraction < 1 and len(out.completed) + len(s.stopped_recipes()) == 11
