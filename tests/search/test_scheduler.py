"""Scripted result sequences through MilestoneScheduler.on_trial_result (no Ray cluster)."""

import math
import pickle
from types import SimpleNamespace

import pytest

from rayq.search.objectives import Constraint
from rayq.search.scheduler import Decision, MilestoneScheduler

ACC, KL = "fp/acc", "ptq/s/kl"
OBJ = [f"{ACC}:max", f"{KL}:min"]


def T(tid, recipe=None):
    return SimpleNamespace(trial_id=tid, config={} if recipe is None else {"recipe_id": recipe})


def R(step, acc=0.5, kl=0.1, loss=2.0, **extra):
    r = {"step": step, "train/loss": loss, **extra}
    if acc is not None:
        r[ACC] = acc
    if kl is not None:
        r[KL] = kl
    return r


def sched(**kw):
    """The MOASHA rule (the tests of the dominance rule are in test_dominance.py)."""
    kw.setdefault("verbose", False)
    kw.setdefault("rule", "moasha")
    return MilestoneScheduler(OBJ, kw.pop("milestones", [100]), **kw)


def feed(s, script):
    """script: [(trial, result)] -> list of actions."""
    return [s.on_trial_result(None, t, r) for t, r in script]


def test_before_the_milestone_everyone_continues():
    s = sched()
    assert feed(s, [(T(f"t{i}"), R(50, acc=0.1 * i)) for i in range(5)]) == ["CONTINUE"] * 5
    assert s.decisions == [] and s.stopped_trials() == {}


def test_moasha_rule_at_one_milestone():
    s = sched()
    script = [(T("a"), R(100, 0.5, 0.1)), (T("b"), R(100, 0.4, 0.2)), (T("c"), R(100, 0.6, 0.05)),
              (T("d"), R(100, 0.3, 0.3)), (T("e"), R(100, 0.55, 0.12))]
    # a: first at the rung; b: dominated, 2/2; c: dominates all, 1/3; d: 4/4; e: second front, 2/5 (1/5 <= 1/3)
    assert feed(s, script) == ["CONTINUE", "STOP", "CONTINUE", "STOP", "CONTINUE"]
    assert set(s.stopped_trials()) == {"b", "d"}
    d = s.stopped_trials()["d"]
    assert (d.kind, d.milestone, d.step, d.position, d.rung_size) == ("milestone", 100, 100, 4, 4)
    assert s.is_stopped("b") and not s.is_stopped("a")
    # later results of a stopped trial keep STOP and add no decision
    n = len(s.decisions)
    assert s.on_trial_result(None, T("b"), R(200)) == "STOP" and len(s.decisions) == n


def test_trade_offs_share_the_first_front():
    s = sched(eta=2)
    # b trades accuracy for KL: not dominated by a, same front; epsilon-net order puts the best
    # accuracy first, so b is 2/2: 1/2 <= 1/2 continues
    assert feed(s, [(T("a"), R(100, 0.6, 0.2)), (T("b"), R(100, 0.4, 0.1))]) == ["CONTINUE", "CONTINUE"]
    assert s.decisions[-1].front == 0


def test_exact_ties_get_the_same_decision():
    s = sched()
    assert feed(s, [(T("a"), R(100)), (T("b"), R(100)), (T("c"), R(100))]) == ["CONTINUE"] * 3
    assert [d.front for d in s.decisions] == [0, 0, 0] and s.decisions[-1].position == 1
    # a strictly better arrival pushes the tied group down: the next tie is 2/5 (1/5 <= 1/3) ...
    assert feed(s, [(T("d"), R(100, 0.9, 0.0)), (T("e"), R(100))]) == ["CONTINUE", "CONTINUE"]
    # ... and a worse one is 6/6
    assert feed(s, [(T("f"), R(100, 0.1, 0.9))]) == ["STOP"]
    # missing values never tie with each other
    s2 = sched()
    assert feed(s2, [(T("a"), R(100, kl=None)), (T("b"), R(100, kl=None))]) == ["CONTINUE", "STOP"]


def test_missing_objectives_rank_last():
    s = sched()
    assert feed(s, [(T("a"), R(100, kl=None))]) == ["CONTINUE"]  # alone: nothing to judge
    assert feed(s, [(T("b"), R(100, 0.1, 0.9))]) == ["CONTINUE"]  # worse numbers, but a is missing
    assert feed(s, [(T("c"), R(100, acc=float("nan")))]) == ["STOP"]
    assert feed(s, [(T("d"), R(100, acc=float("inf"), kl=0.0))]) == ["STOP"]  # inf is not a measurement
    assert "nan" in s.stopped_trials()["c"].reason


@pytest.mark.parametrize("bad", [dict(loss=float("nan")), dict(loss=float("inf")), dict(diverged=1),
                                 dict(diverged=True), dict(loss=None)])
def test_divergence_stops_at_once(bad):
    s = sched()
    r = R(30, **{k: v for k, v in bad.items() if k != "loss"}, loss=bad.get("loss", 2.0))
    if bad.get("loss", 0) is None:
        r["train/loss"] = None  # a None loss is not finite either
    assert s.on_trial_result(None, T("x"), r) == "STOP"
    d = s.stopped_trials()["x"]
    assert (d.kind, d.milestone, d.step) == ("diverged", None, 30)
    assert s.diverged_trials() == ["x"]


def test_divergence_after_a_milestone_records_the_milestone_passed():
    s = sched(milestones=[100, 300])
    feed(s, [(T("x"), R(100)), (T("x"), R(200, loss=float("nan")))])
    d = s.stopped_trials()["x"]
    assert (d.kind, d.milestone, d.step) == ("diverged", 100, 200)


def test_no_loss_key_is_not_divergence():
    s = sched()
    r = R(30)
    del r["train/loss"]
    assert s.on_trial_result(None, T("x"), r) == "CONTINUE"


def test_hard_limits_need_certainty():
    name = "ptq/s/degradation_pct"
    s = sched(hard_limits=[f"{name}>=-1"])
    straddles = R(40, **{name: -1.5, f"{name}_ci_low": -2.5, f"{name}_ci_high": -0.5})
    beyond = R(40, **{name: -2.0, f"{name}_ci_low": -2.6, f"{name}_ci_high": -1.3})
    assert s.on_trial_result(None, T("a"), straddles) == "CONTINUE"
    assert s.on_trial_result(None, T("b"), beyond) == "STOP"
    d = s.stopped_trials()["b"]
    assert d.kind == "hard_limit" and name in d.reason and d.milestone is None
    s2 = sched(hard_limits=[Constraint.parse(f"{KL}<=0.5")])
    assert s2.on_trial_result(None, T("c"), R(10, kl=0.7, **{f"{KL}_se": 0.05})) == "STOP"


def test_multiple_milestones_and_jumps():
    s = sched(milestones=[100, 300])
    script = [(T("a"), R(100, 0.5)), (T("b"), R(100, 0.6)), (T("a"), R(300, 0.7)), (T("b"), R(300, 0.65))]
    assert feed(s, script) == ["CONTINUE"] * 3 + ["STOP"]
    assert s.stopped_trials()["b"].milestone == 300
    # a trial that jumps past both milestones in one report is judged at each, in order
    s2 = sched(milestones=[100, 300])
    feed(s2, [(T("a"), R(100, 0.9)), (T("b"), R(300, 0.5))])
    d = s2.stopped_trials()["b"]
    assert d.milestone == 100 and "b" not in s2.rung(300).get("b", {})


def test_rerun_steps_are_not_judged_twice():
    s = sched()
    feed(s, [(T("a"), R(100, 0.9)), (T("b"), R(100, 0.95))])
    n = len(s.decisions)
    # b resumes from an earlier checkpoint and reports step 100 again with worse numbers
    assert feed(s, [(T("b"), R(60)), (T("b"), R(100, 0.1, 0.9))]) == ["CONTINUE", "CONTINUE"]
    assert len(s.decisions) == n


def test_seeds_are_judged_as_a_recipe_and_stopped_together():
    s = sched()
    script = [
        (T("a0", "A"), R(100, 0.6, 0.1)),
        (T("b0", "B"), R(100, 0.7, 0.05)),  # B's first seed looks great: 1/2 -> continue
        (T("a1", "A"), R(100, 0.6, 0.1)),  # A re-judged with 2 seeds: dominated by B, 2/2 -> STOP
    ]
    assert feed(s, script) == ["CONTINUE", "CONTINUE", "STOP"]
    # a0 is past the milestone; its recipe is stopped, so its next result stops it too
    assert s.is_stopped("a0") and s.stopped_trials()["a0"].trial_id == "a1"
    assert s.on_trial_result(None, T("a0"), R(120)) == "STOP"
    assert s.stopped_trials()["a0"].kind == "recipe_stopped"
    # B's second seed is bad: B's mean (0.45, 0.275) is now dominated by A's (0.6, 0.1)
    assert s.on_trial_result(None, T("b1", "B"), R(100, 0.2, 0.5)) == "STOP"
    assert s.rung(100)["B"] == {"b0": [0.7, 0.05], "b1": [0.2, 0.5]}
    assert s.is_stopped("b0") and s.stopped_recipes().keys() == {"A", "B"}
    # the recipe id may also come with the result
    s2 = sched()
    s2.on_trial_result(None, T("z"), R(10, recipe_id="Z"))
    assert s2.recipe_of("z") == "Z"


def test_a_diverged_seed_stops_its_recipe():
    s = sched()
    feed(s, [(T("a0", "A"), R(10)), (T("a1", "A"), R(10, loss=float("nan")))])
    assert s.is_stopped("a0") and s.on_trial_result(None, T("a0", "A"), R(20)) == "STOP"
    s2 = sched(stop_recipe_on_divergence=False)
    feed(s2, [(T("a0", "A"), R(10)), (T("a1", "A"), R(10, loss=float("nan")))])
    assert not s2.is_stopped("a0")


def test_completion_and_finished_trials():
    s = sched()
    feed(s, [(T("a"), R(100, 0.9)), (T("b"), R(100, 0.1))])
    s.on_trial_complete(None, T("a"), R(200))
    s.on_trial_complete(None, T("b"), R(100))
    assert s.finished_trials() == ["a"]


def test_decisions_table_and_status_lines(capsys):
    s = MilestoneScheduler(OBJ, [100], rule="moasha")
    feed(s, [(T("a"), R(100, 0.5)), (T("b"), R(100, 0.4))])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "STOP" in err[1] and "milestone 100" in err[1]
    rows = s.decisions_table()
    assert rows[1]["trial_id"] == "b" and rows[1]["action"] == "STOP" and rows[1]["milestone"] == 100
    assert isinstance(s.decisions[0], Decision)
    assert "MilestoneScheduler" in s.debug_string()


SCRIPT = [
    (T("a"), R(100, 0.5, 0.1)), (T("b"), R(100, 0.4, 0.2)), (T("a"), R(200, 0.55, 0.1)),
    (T("c"), R(100, 0.6, 0.05)), (T("c"), R(200, 0.7, 0.04)), (T("d"), R(100, 0.3, 0.3)),
    (T("e"), R(100, 0.55, 0.12)), (T("e"), R(200, 0.5, 0.2)), (T("a"), R(300, 0.6, 0.1)),
    (T("f"), R(50, loss=float("nan"))), (T("c"), R(300, 0.75, 0.03)), (T("e"), R(300, 0.58, 0.1)),
]


def run(s, script):
    return [s.on_trial_result(None, t, r) for t, r in script]


def test_resume_by_pickle_mid_sequence():
    whole = sched(milestones=[100, 200, 300])
    expected = run(whole, SCRIPT)
    first = sched(milestones=[100, 200, 300])
    got = run(first, SCRIPT[:6])
    restored = pickle.loads(pickle.dumps(first))
    got += run(restored, SCRIPT[6:])
    assert got == expected
    assert [d.reason for d in restored.decisions] == [d.reason for d in whole.decisions]
    assert restored.stopped_trials() == whole.stopped_trials()


def test_resume_from_the_state_file_after_a_killed_driver(tmp_path):
    """Tune pickles the scheduler once (tuner.pkl) at the start; the state file carries the rest."""
    whole = sched(milestones=[100, 200, 300])
    expected = run(whole, SCRIPT)
    path = str(tmp_path / "scheduler.json")
    s = sched(milestones=[100, 200, 300], state_path=path)
    tuner_pkl = pickle.dumps(s)  # what Tuner.restore unpickles: the initial, empty scheduler
    got = run(s, SCRIPT[:7])
    del s  # the driver dies
    restored = pickle.loads(tuner_pkl)
    got += run(restored, SCRIPT[7:])
    assert got == expected
    assert restored.decisions_table() == whole.decisions_table()
    # a new scheduler built on the same state path resumes too (rayq search --resume)
    again = sched(milestones=[100, 200, 300], state_path=path)
    assert again.stopped_trials() == whole.stopped_trials()


def test_state_for_other_objectives_is_rejected(tmp_path):
    path = str(tmp_path / "s.json")
    s = sched(state_path=path)
    feed(s, [(T("a"), R(100))])
    with pytest.raises(ValueError, match="objectives"):
        MilestoneScheduler(["fp/acc:max"], [100], state_path=path, verbose=False, rule="moasha")


def test_bad_arguments():
    with pytest.raises(ValueError):
        MilestoneScheduler(OBJ, [], verbose=False)
    with pytest.raises(ValueError):
        MilestoneScheduler(OBJ, [100], eta=1, verbose=False)
    with pytest.raises(ValueError):
        MilestoneScheduler(OBJ, [100], tie_break="coin", verbose=False)
    assert math.isclose(MilestoneScheduler(OBJ, [200, 100, 100], verbose=False).milestones[0], 100)


def test_recipe_id_arriving_with_the_first_result_after_on_trial_add():
    s = sched()
    t = T("x")
    s.on_trial_add(None, t)  # Tune calls this before any result; the config names no recipe
    s.on_trial_result(None, t, R(100, recipe_id="X"))
    assert s.recipe_of("x") == "X" and "X" in s.rung(100)


def test_a_newcomer_dominating_everyone_continues():
    """Regression for the reading of Syne Tune's MOASHA code: its priority helper returns a sort
    ORDER where a rank is meant, so the newcomer (the last row) was given the index of whichever
    row sorts last. Here that is row 3 (d): 3/5 > 1/3 would stop the best recipe of the rung."""
    s = sched()
    script = [(T("a"), R(100, 0.6, 0.2)), (T("b"), R(100, 0.5, 0.3)), (T("c"), R(100, 0.45, 0.35)),
              (T("d"), R(100, 0.1, 0.9))]
    feed(s, script)
    assert s.on_trial_result(None, T("e"), R(100, 0.99, 0.01)) == "CONTINUE"
    d = s.decisions[-1]
    assert (d.trial_id, d.position, d.rung_size, d.front) == ("e", 1, 5, 0)


def test_a_state_of_other_settings_is_refused(tmp_path):
    path = str(tmp_path / "s.json")
    feed(sched(state_path=path, milestones=[100, 200]), [(T("a"), R(100))])
    for kw, what in ((dict(milestones=[100, 300]), "milestones"), (dict(milestones=[100, 200], eta=2), "eta"),
                     (dict(milestones=[100, 200], rule="dominance"), "rule")):
        with pytest.raises(ValueError, match=what):
            sched(state_path=path, **kw)
    assert sched(state_path=path, milestones=[100, 200]).rung(100).keys() == {"a"}


def test_a_relative_state_path_follows_a_moved_search_dir(tmp_path):
    from rayq.search.scheduler import state_dir

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    with state_dir(old):
        s = sched(state_path="scheduler_state.json")
    tuner_pkl = pickle.dumps(s)
    feed(s, [(T("a"), R(100, 0.9)), (T("b"), R(100, 0.1, 0.9))])
    assert (old / "scheduler_state.json").exists()
    old.rename(new)  # the search directory moves; tuner.pkl still names the old absolute place
    with state_dir(new):
        restored = pickle.loads(tuner_pkl)
    assert restored.is_stopped("b") and restored.resolved_state_path() == str(new / "scheduler_state.json")


def test_an_errored_trial_is_never_a_front_candidate(tmp_path):
    path = str(tmp_path / "s.json")
    s = sched(state_path=path)
    feed(s, [(T("a"), R(100, 0.9)), (T("b"), R(100, 0.95))])
    s.on_trial_error(None, T("b"))
    s.on_trial_complete(None, T("a"), R(200))
    assert s.finished_trials() == ["a"] and s.stopped_trials()["b"].kind == "error"
    assert not s.is_stopped("a")  # an error stops the trial, not its recipe's other seeds
    # persisted at once: a driver killed right after the error still knows
    again = sched(state_path=path)
    assert again.stopped_trials()["b"].kind == "error"


def test_tune_never_needs_save_or_restore():
    """Ray 2.60 never calls TrialScheduler.save/restore: the state file is the one mechanism."""
    assert "save" not in MilestoneScheduler.__dict__ and "restore" not in MilestoneScheduler.__dict__


# ---------------------------------------------------------------------- synchronous rungs


class Controller:
    """What the scheduler asks of Tune's controller (ray 2.60: get_trials, stop_trial)."""

    def __init__(self, trials):
        self.trials, self.stopped = trials, []

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        trial.status = "TERMINATED"


def sync_sched(**kw):
    return MilestoneScheduler(OBJ, [100], rule="dominance", eval_every=100, noise_prior={ACC: 0.01, KL: 0.01},
                              sync_rungs=True, verbose=False, **kw)


def arrive(s, ctl, trial, result):
    action = s.on_trial_result(ctl, trial, result)
    trial.status = {"PAUSE": "PAUSED", "STOP": "TERMINATED"}.get(action, "RUNNING")
    return action


def test_sync_rungs_hold_the_milestone_and_judge_the_grid_together():
    a, b, c = (SimpleNamespace(trial_id=t, config={}, status="RUNNING") for t in "abc")
    d = SimpleNamespace(trial_id="d", config={}, status="PENDING")
    ctl = Controller([a, b, c, d])
    s = sync_sched(expected_trials=4)
    for t in (a, b, c, d):
        s.on_trial_add(ctl, t)
    # a is far behind everyone: async judging would let it pass (it arrives first)
    assert arrive(s, ctl, a, R(100, 0.30, 0.30)) == "PAUSE"
    assert arrive(s, ctl, b, R(100, 0.60, 0.10)) == "PAUSE"
    assert s.choose_trial_to_run(ctl) is d  # pending trials start while the rung is held
    d.status = "RUNNING"
    assert arrive(s, ctl, c, R(100, 0.62, 0.09)) == "PAUSE"
    assert s.choose_trial_to_run(ctl) is None  # nobody held is resumed before the rung is judged
    assert arrive(s, ctl, d, R(100, 0.20, 0.40)) == "STOP"  # the last arrival: judged with the rest
    assert ctl.stopped == ["a"]  # a held dominated trial is stopped through the controller
    assert s.is_stopped("a") and s.stopped_trials()["a"].kind == "dominated"
    assert {s.choose_trial_to_run(ctl).trial_id} <= {"b", "c"}  # released
    b.status = c.status = "RUNNING"
    n = len(s.decisions)
    assert arrive(s, ctl, b, R(100, 0.60, 0.10)) == "CONTINUE"  # resumed from the start: judged already
    assert len(s.decisions) == n
    # after the milestone, evaluations are judged as usual (no second hold at a non-milestone)
    assert arrive(s, ctl, b, R(200, 0.61, 0.10)) == "CONTINUE"


def test_sync_rungs_without_a_count_judge_when_nothing_else_can_arrive():
    a, b = (SimpleNamespace(trial_id=t, config={}, status="RUNNING") for t in "ab")
    ctl = Controller([a, b])
    s = sync_sched()
    for t in (a, b):
        s.on_trial_add(ctl, t)
    assert arrive(s, ctl, a, R(100, 0.60, 0.10)) == "PAUSE"
    assert arrive(s, ctl, b, R(100, 0.61, 0.11)) == "CONTINUE"  # a trade-off: both live
    assert ctl.stopped == [] and s.choose_trial_to_run(ctl) is a


def test_sync_rungs_settings_are_checked():
    with pytest.raises(ValueError, match="sync_rungs: only with rule dominance"):
        MilestoneScheduler(OBJ, [100], rule="moasha", sync_rungs=True, verbose=False)
    with pytest.raises(ValueError, match="expected_trials"):
        sync_sched(expected_trials=0)


def test_a_state_saved_without_sync_rungs_is_refused_by_a_sync_search(tmp_path):
    path = str(tmp_path / "state.json")
    s = MilestoneScheduler(OBJ, [100], rule="dominance", eval_every=100, state_path=path, verbose=False)
    feed(s, [(T("a"), R(100))])
    with pytest.raises(ValueError, match="sync_rungs=False, this search has sync_rungs=True"):
        sync_sched(state_path=path)
    assert MilestoneScheduler(OBJ, [100], rule="dominance", eval_every=100, state_path=path,
                              verbose=False).recipe_of("a") == "a"
