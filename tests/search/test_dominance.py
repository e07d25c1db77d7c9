"""The dominance rule (rule: dominance) and its statistics, through on_trial_result (no Ray)."""

import math
from types import SimpleNamespace

import pytest

from rayq.search.scheduler import MilestoneScheduler
from rayq.search.stopping import Replicate, mean_interval, pooled_sd, prob_dominates, summarise

ACC, KL = "fp/acc", "ptq/s/kl"
OBJ = [f"{ACC}:max", f"{KL}:min"]
PRIOR = {ACC: 0.1, KL: 0.1}


def T(tid, recipe=None):
    return SimpleNamespace(trial_id=tid, config={} if recipe is None else {"recipe_id": recipe})


def R(step, acc=0.5, kl=0.5, **extra):
    return {"step": step, "train/loss": 2.0, ACC: acc, KL: kl, **extra}


def dom(**kw):
    kw.setdefault("verbose", False)
    kw.setdefault("noise_prior", PRIOR)
    return MilestoneScheduler(OBJ, kw.pop("milestones", [100]), rule="dominance", **kw)


def feed(s, script):
    return [s.on_trial_result(None, t, r) for t, r in script]


def test_probability_of_dominance():
    # equal means: each objective is a coin flip, two objectives: 1/4
    assert prob_dominates([1, 1], [1, 1], [0.1, 0.1], 1, 1, [1, -1]) == pytest.approx(0.25)
    # better on both by 5 standard errors of the difference: certain
    se = 0.1 * math.sqrt(2)
    assert prob_dominates([1 + 5 * se, 0], [1, 5 * se], [0.1, 0.1], 1, 1, [1, -1]) > 0.999
    # a trade-off (better on one, worse on the other) is never dominance beyond noise
    assert prob_dominates([2, 2], [1, 1], [0.1, 0.1], 1, 1, [1, -1]) < 1e-6
    # more seeds shrink the standard error; few degrees of freedom in sigma widen it
    p1 = prob_dominates([1.15, 0], [1, 0.15], [0.1, 0.1], 1, 1, [1, -1])
    p4 = prob_dominates([1.15, 0], [1, 0.15], [0.1, 0.1], 4, 4, [1, -1])
    pt = prob_dominates([1.15, 0], [1, 0.15], [0.1, 0.1], 1, 1, [1, -1], df=[2, 2])
    assert p4 > p1 > pt
    assert prob_dominates([math.nan, 0], [1, 1], [0.1, 0.1], 1, 1, [1, -1]) == 0.0


def test_pooled_spread_from_trials_and_from_reported_seed_se():
    # one recipe as 3 one-seed trials: the sample variance of their values
    a = summarise([Replicate((v,), (math.nan,), 1) for v in (1.0, 2.0, 3.0)])
    assert a.mean == (2.0,) and a.df == (2,) and a.ss == (pytest.approx(2.0),)
    # one trial of 2 seeds reporting their standard error 0.5: sample variance 2 * 0.25
    b = summarise([Replicate((5.0,), (0.5,), 2)])
    assert b.df == (1,) and b.ss == (pytest.approx(0.5),) and b.n == 2
    sd, df = pooled_sd([a, b])
    assert df == (3,) and sd[0] == pytest.approx(math.sqrt(2.5 / 3))
    lo, hi = mean_interval(2.0, 1.0, 4, df=math.inf)
    assert (lo, hi) == pytest.approx((2 - 0.98, 2 + 0.98), abs=1e-3)
    assert mean_interval(2.0, 1.0, 4, df=3)[0] < lo  # Student-t is wider with few df


def test_dominated_beyond_noise_stops_a_trade_off_and_a_close_call_do_not():
    s = dom()
    out = feed(s, [(T("a"), R(100, 0.9, 0.1)),
                   (T("b"), R(100, 0.95, 0.3)),  # trades KL for accuracy: same front, continues
                   (T("c"), R(100, 0.88, 0.12)),  # dominated by a, but well within noise
                   (T("d"), R(100, 0.2, 0.9))])  # dominated by a far beyond noise
    assert out == ["CONTINUE", "CONTINUE", "CONTINUE", "STOP"]
    d = s.stopped_trials()["d"]
    assert d.kind == "dominated" and d.dominator in {"a", "b"} and d.p_dominated >= 0.9
    assert d.noise_source == "prior" and "dominated by recipe" in d.reason
    # no quota: everything on the measured first front continues however many there are
    s2 = dom()
    front = [(T(f"f{k}"), R(100, 0.5 + 0.05 * k, 0.1 + 0.05 * k)) for k in range(8)]
    assert feed(s2, front) == ["CONTINUE"] * 8


def test_a_late_arrival_stops_an_earlier_recipe_at_its_next_result():
    s = dom(milestones=[100], eval_every=100)
    assert feed(s, [(T("a"), R(100, 0.5, 0.5)), (T("a"), R(200, 0.6, 0.5))]) == ["CONTINUE", "CONTINUE"]
    assert feed(s, [(T("b"), R(100, 0.9, 0.1))]) == ["CONTINUE"]
    # a is past step 100; it is re-checked against b at the latest step both reached (100)
    assert s.on_trial_result(None, T("a"), R(300, 0.65, 0.5)) == "STOP"
    d = s.stopped_trials()["a"]
    assert d.dominator == "b" and "step 100" in d.reason and (d.step, d.milestone) == (300, 100)


def test_grace_period_max_t_and_non_evaluation_steps():
    s = dom(milestones=[100], eval_every=50, max_t=300)
    assert feed(s, [(T("a"), R(50, 0.9, 0.1)), (T("b"), R(50, 0.1, 0.9))]) == ["CONTINUE"] * 2  # before 100
    assert feed(s, [(T("a"), R(75, 0.9, 0.1))]) == ["CONTINUE"]  # 75 is not an evaluation step
    assert 75 not in s._evals
    assert feed(s, [(T("b"), R(100, 0.1, 0.9))]) == ["CONTINUE"]  # a has no record at 100 yet
    assert feed(s, [(T("a"), R(100, 0.9, 0.1)), (T("b"), R(150, 0.1, 0.9))]) == ["CONTINUE", "STOP"]
    s2 = dom(milestones=[100], max_t=100)
    assert feed(s2, [(T("a"), R(100, 0.9, 0.1)), (T("b"), R(100, 0.1, 0.9))]) == ["CONTINUE"] * 2


def test_without_any_noise_estimate_nothing_is_stopped_as_dominated():
    s = dom(noise_prior=None)
    assert feed(s, [(T("a"), R(100, 0.9, 0.1)), (T("b"), R(100, 0.1, 0.9))]) == ["CONTINUE"] * 2
    assert "no noise estimate" in s.decisions[-1].reason


def test_replicates_measure_the_spread_and_are_carried_forward():
    s = dom(noise_prior=None, milestones=[100], eval_every=100)
    # a recipe with a replicate pilot: three seeds (trials) at step 100, spread sd 0.01
    feed(s, [(T("a0", "A"), R(100, 0.90, 0.10)), (T("a1", "A"), R(100, 0.91, 0.11)),
             (T("a2", "A"), R(100, 0.89, 0.09))])
    assert s.on_trial_result(None, T("b0", "B"), R(100, 0.80, 0.20)) == "STOP"
    d = s.stopped_trials()["b0"]
    assert d.noise_source == "replicates@100" and d.dominator == "A"
    # step 200 has no replicates: sigma is carried from step 100
    feed(s, [(T("a0", "A"), R(200, 0.95, 0.05))])
    assert s.on_trial_result(None, T("c0", "C"), R(100, 0.9, 0.1)) == "CONTINUE"
    assert s.on_trial_result(None, T("c0", "C"), R(200, 0.5, 0.5)) == "STOP"
    assert s.stopped_trials()["c0"].noise_source == "carried@100"


def test_trials_training_several_seeds_report_their_spread():
    """rayq's trial driver trains `seeds` seeds in one trial and reports <objective>_seed_se."""
    s = dom(noise_prior=None)
    se = {f"{ACC}_seed_se": 0.01, f"{KL}_seed_se": 0.01, "seeds": 2}
    assert feed(s, [(T("a"), R(100, 0.9, 0.1, **se)), (T("b"), R(100, 0.85, 0.15, **se))]) == ["CONTINUE", "STOP"]
    assert s.stopped_trials()["b"].noise_source == "replicates@100"
    # the same gap with a spread 20x larger is within noise
    wide = {**se, f"{ACC}_seed_se": 0.2, f"{KL}_seed_se": 0.2}
    s2 = dom(noise_prior=None)
    assert feed(s2, [(T("a"), R(100, 0.9, 0.1, **wide)), (T("b"), R(100, 0.85, 0.15, **wide))]) == ["CONTINUE"] * 2


def test_unequal_seed_counts_use_each_recipes_standard_error():
    # A has 4 seeds at the step, B one: B's mean is 4x as uncertain in variance. A gap that is
    # decisive between two 4-seed means is not between a 4-seed and a 1-seed mean.
    # seeds spread by sd ~0.115 around the means (A: 0.9/0.1, B: 0.65/0.35, a gap of 0.25)
    wiggle = (0.1, -0.1, 0.1, -0.1)
    four = [(T(f"a{k}", "A"), R(100, 0.9 + w, 0.1 - w)) for k, w in enumerate(wiggle)]
    s = dom(noise_prior=None, stop_confidence=0.95)
    feed(s, four)
    assert s.on_trial_result(None, T("b0", "B"), R(100, 0.65, 0.35)) == "CONTINUE"
    s4 = dom(noise_prior=None, stop_confidence=0.95)
    feed(s4, four)
    out = feed(s4, [(T(f"b{k}", "B"), R(100, 0.65 + w, 0.35 - w)) for k, w in enumerate(wiggle)])
    assert out == ["CONTINUE"] * 3 + ["STOP"]


def test_hard_limits_use_a_ci_of_the_seed_mean():
    deg = "ptq/s/degradation_pct"
    # per-seed eval CIs averaged straddle the bound, but 2 seeds agree closely on -1.3
    r = R(100, **{deg: -1.3, f"{deg}_ci_low": -2.0, f"{deg}_ci_high": -0.6, f"{deg}_seed_se": 0.01,
                  f"{ACC}_seed_se": 0.01, f"{KL}_seed_se": 0.01, "seeds": 2})
    s = dom(noise_prior=None, hard_limits=[f"{deg}>=-1"])
    assert s.on_trial_result(None, T("a"), r) == "STOP"
    d = s.stopped_trials()["a"]
    assert d.kind == "hard_limit" and "CI of the 2-seed mean" in d.reason
    # the same mean with a large between-seed spread is not beyond doubt
    s2 = dom(noise_prior=None, hard_limits=[f"{deg}>=-1"])
    assert s2.on_trial_result(None, T("a"), {**r, f"{deg}_seed_se": 0.5}) == "CONTINUE"
    # one seed and no spread known: the report's own CI decides (it straddles: continue)
    s3 = dom(noise_prior=None, hard_limits=[f"{deg}>=-1"])
    assert s3.on_trial_result(None, T("a"), {k: v for k, v in r.items() if not k.endswith("seed_se")
                                             and k != "seeds"}) == "CONTINUE"


def test_state_round_trip_and_bad_settings(tmp_path):
    path = str(tmp_path / "s.json")
    s = dom(state_path=path, eval_every=100)
    script = [(T("a"), R(100, 0.9, 0.1)), (T("b"), R(100, 0.5, 0.5)), (T("a"), R(200, 0.9, 0.1))]
    feed(s, script)
    again = dom(state_path=path, eval_every=100)
    assert again.decisions_table() == s.decisions_table()
    assert again.state_dict()["evals"] == s.state_dict()["evals"] and "200" in s.state_dict()["evals"]
    with pytest.raises(ValueError, match="stop_confidence"):
        dom(state_path=path, eval_every=100, stop_confidence=0.8)
    with pytest.raises(ValueError, match="noise_prior"):
        dom(noise_prior={"fp/accc": 0.1})
    with pytest.raises(ValueError, match="rule"):
        MilestoneScheduler(OBJ, [100], rule="hyperband")
    with pytest.raises(ValueError, match="stop_confidence"):
        dom(stop_confidence=0.3)


def test_a_diverged_recipe_stops_nobody():
    s = dom(milestones=[100], eval_every=100)
    feed(s, [(T("a"), R(100, 0.9, 0.1)), (T("a"), {"step": 150, "train/loss": float("nan")})])
    assert s.stopped_trials()["a"].kind == "diverged"
    assert s.on_trial_result(None, T("b"), R(100, 0.2, 0.9)) == "CONTINUE"
    assert s.on_trial_result(None, T("c"), R(100, -0.3, 1.4)) == "STOP"  # b, a live recipe, still can
