"""What Optuna is told about trials (RecipeOptunaSearch) and the scheduler built from search.*.

Real Optuna studies through Ray's OptunaSearch class (no Ray cluster is started)."""

import dataclasses

import optuna
import pytest

from rayq.errors import UserError
from rayq.schema import Config, SearchConfig, TrainConfig
from rayq.search.objectives import Constraint, parse_objectives
from rayq.search.tuner import RecipeOptunaSearch, make_scheduler

ACC, KL, DEG = "fp/acc", "ptq/w8a8-vectorwise/kl", "ptq/w8a8-vectorwise/degradation_pct"
OBJ = parse_objectives([f"{ACC}:max", f"{KL}:min"])


def searcher(sampler, steps_choice=None, constraints=()):
    dist = optuna.distributions
    space = {"recipe.weight_decay": dist.FloatDistribution(1e-3, 1e-1, log=True)}
    if steps_choice:
        space["recipe.steps"] = dist.CategoricalDistribution(steps_choice)
    return RecipeOptunaSearch(space=space, metric=[ACC, KL], mode=["max", "min"], sampler=sampler,
                              total_steps=100, constraints=list(constraints), seed=0)


def result(step, acc=0.5, kl=0.1, **extra):
    return {"step": step, ACC: acc, KL: kl, **extra}


def test_trials_are_told_complete_with_constraints_never_pruned():
    limit = Constraint.parse(f"{DEG}>=-1")
    s = searcher(optuna.samplers.TPESampler(seed=0), constraints=[limit])
    for tid, res, err in (("done", result(100, **{DEG: -0.5}), False),
                          ("stopped", result(40, **{DEG: -0.5}), False),
                          ("limit", result(100, **{DEG: -1.5}), False),
                          ("diverged", result(20, diverged=1.0), False),
                          ("error", result(20), True)):
        s.suggest(tid)
        s.on_trial_complete(tid, res, error=err)
    trials = {t.number: t for t in s._ot_study.trials}
    states = [trials[i].state for i in range(5)]
    C, F = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
    assert states == [C, C, C, F, F]  # nothing is PRUNED (value-less) any more
    key = str(limit)
    assert trials[0].constraints == {key: -0.5, "finished": 0.0}  # feasible: within the limit, finished
    assert trials[1].constraints == {key: -0.5, "finished": 1.0}  # stopped before its steps: infeasible
    assert trials[2].constraints == {key: pytest.approx(0.5), "finished": 0.0}  # misses the limit by 0.5
    # TPE sees the stopped and the limit-violating trials as infeasible, not as value-less PRUNED
    assert s.suggest("next") is not None


def test_a_searched_steps_is_judged_against_its_own_value():
    s = searcher(optuna.samplers.RandomSampler(seed=0), steps_choice=[40])
    assert s.suggest("t")["recipe.steps"] == 40
    s.on_trial_complete("t", result(40))
    assert s._ot_study.trials[0].constraints == {"finished": 0.0}


def test_nsga2_leaves_its_first_generation_when_most_trials_are_stopped():
    sampler = optuna.samplers.NSGAIISampler(seed=0, population_size=4)
    s = searcher(sampler)
    for k in range(9):  # all stopped early, as a strict stopping rule does
        s.suggest(f"t{k}")
        s.on_trial_complete(f"t{k}", result(30, 0.5 + 0.01 * k, 0.1))
    last = s._ot_study.trials[-1]
    assert sampler.get_trial_generation(s._ot_study, last) >= 2  # PRUNED trials would have kept it at 0


def cfg(**search):
    return dataclasses.replace(Config(), train=TrainConfig(eval_every=30),
                               search=SearchConfig(objectives=[f"{ACC}:max", f"{KL}:min"], **search))


def test_make_scheduler_checks_milestones_and_priors(capsys):
    with pytest.raises(UserError, match="search.milestones: 45 is not an evaluation step.*eval_every=30"):
        make_scheduler(cfg(milestones=[30, 45]), OBJ, [])
    with pytest.raises(UserError, match="eval_every is 0"):
        make_scheduler(dataclasses.replace(cfg(milestones=[30]), train=TrainConfig(eval_every=0)), OBJ, [])
    with pytest.raises(UserError, match="search.noise_prior: 'fp/accc'"):
        make_scheduler(cfg(milestones=[30], noise_prior={"fp/accc": 0.1}), OBJ, [])
    s = make_scheduler(cfg(milestones=[30, 60]), OBJ, [])
    assert "no recipe will be stopped as dominated" in capsys.readouterr().err
    assert (s.rule, s.stop_confidence, s.eval_every, s.state_path) == ("dominance", 0.9, 30, "scheduler_state.json")
    make_scheduler(cfg(milestones=[30], seeds_per_recipe=2), OBJ, [])
    make_scheduler(cfg(milestones=[30], noise_prior={ACC: 0.1, KL: 0.01}), OBJ, [])
    assert capsys.readouterr().err == ""
    assert make_scheduler(cfg(milestones=[30], rule="moasha", eta=2), OBJ, []).eta == 2


def test_search_config_fields():
    with pytest.raises(ValueError, match="stop_confidence"):
        SearchConfig(stop_confidence=1.0)
    with pytest.raises(ValueError, match="noise_prior"):
        SearchConfig(noise_prior={ACC: -1})


def test_sync_rungs_reach_the_scheduler_and_need_rule_dominance():
    s = make_scheduler(cfg(milestones=[30], noise_prior={ACC: 0.1, KL: 0.01}, sync_rungs=True), OBJ, [], 6)
    assert s.sync_rungs and s.expected_trials == 6
    assert make_scheduler(cfg(milestones=[30]), OBJ, [], 6).expected_trials is None  # async: no count needed
    with pytest.raises(ValueError, match="sync_rungs: expected rule dominance, got rule moasha"):
        SearchConfig(objectives=[f"{ACC}:max"], rule="moasha", sync_rungs=True)
