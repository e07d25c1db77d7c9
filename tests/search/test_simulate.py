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
    assert o.trial_steps == 3 * 75000 + 15000 and o.fraction == pytest.approx(240000 / 300000)
    assert o.front == ("wd0.001-gcnone-do0-bf16", "wd0.1-gc1-do0-bf16") and o.has_knee and o.has_true_front


def test_offline_loop_with_the_scheduler():
    from ray.tune.schedulers import FIFOScheduler

    from rayq.search.scheduler import MilestoneScheduler

    full = sim.run_offline(FIFOScheduler(), 3)
    assert full.fraction == 1.0 and len(full.completed) == 11
    s = MilestoneScheduler(sim.OBJECTIVES, [5000, 15000, 45000], 3, verbose=False)
    early = sim.run_offline(s, 3)
    assert early.fraction < 0.6 and len(early.completed) < 11
    # stopped recipes never reach the front
    assert not set(early.front) & {d.recipe_id for d in s.stopped_trials().values()}


def test_bench_offline_prints_json(capsys):
    from rayq.search.bench import main

    assert main(["--offline", "--seeds", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["strategies"]) == {"mo-milestones", "no-stopping", "weighted-asha", "mo-15k"}
    assert out["strategies"]["no-stopping"]["compute_fraction"] == 1.0
    assert out["true_best_knee"] == "wd0.1-gc1-do0-bf16"


def test_bench_bad_input():
    from rayq.errors import UserError
    from rayq.search.bench import main

    for argv in (["--strategies", "hyperband"], ["--milestones", "0"], ["--milestones", "x"], ["--seeds", "0"]):
        with pytest.raises(UserError):
            main(argv + ["--offline"])


@pytest.mark.ray
def test_bench_quick_through_ray_tune(capfd):
    from rayq.search.bench import main

    assert main(["--quick", "--json"]) == 0
    out = json.loads(capfd.readouterr().out)  # stdout stays pure JSON although Tune prints banners
    s = out["strategies"]
    assert s["no-stopping"]["compute_fraction"] == 1.0 and s["no-stopping"]["completed_recipes"] == 11
    assert s["mo-milestones"]["compute_fraction"] < 1.0
    assert out["timing"]["errors"] == 0
