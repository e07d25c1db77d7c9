"""A trial's status against its own (searched) recipe.steps, and errors kept off the front."""

from rayq.search.results import front_rows, trial_status


def rows(tid, steps_run, searched_steps=None):
    extra = {} if searched_steps is None else {"config/recipe.steps": float(searched_steps)}
    return [{"trial_id": tid, "step": float(s), "fp/acc": 0.5, **extra} for s in steps_run]


def test_a_searched_steps_is_judged_against_its_own_value():
    table = rows("short", [10, 20], searched_steps=20) + rows("long", [10, 20], searched_steps=40) + rows("base", [40])
    status = trial_status(table, [], total_steps=40)
    assert {t: s["status"] for t, s in status.items()} == {"short": "completed", "long": "incomplete",
                                                           "base": "completed"}


def test_an_errored_trial_is_never_on_the_front():
    table = rows("ok", [40]) + [{"trial_id": "err", "step": 40.0, "fp/acc": 0.9}]
    err = {"trial_id": "err", "recipe_id": "err", "action": "STOP", "kind": "error", "step": 40,
           "milestone": None, "reason": "the trial ended in an error"}
    assert trial_status(table, [err], 40)["err"]["status"] == "stopped"
    assert [r["trial_id"] for r in front_rows(table, [err], 40, ["fp/acc:max"])] == ["ok"]
