import math

import pytest

from rayq.errors import UserError
from rayq.search.objectives import (
    Constraint,
    Direction,
    Objective,
    known_metrics,
    parse_constraints,
    parse_objectives,
    validate_metric,
)

TASKS = ["heldout-lambada", "heldout-cloze"]
SCHEMES = ["w8a8-vectorwise"]


def test_direction_one_boundary():
    assert (Direction.MAX.tune, Direction.MAX.optuna) == ("max", "maximize")
    assert (Direction.MIN.tune, Direction.MIN.optuna) == ("min", "minimize")
    assert Direction.parse("Maximize") is Direction.MAX
    with pytest.raises(UserError):
        Direction.parse("up")


def test_parse_default_objectives():
    objs = parse_objectives(["fp/acc:max", "ptq/w8a8-vectorwise/kl:min"], TASKS, SCHEMES)
    assert objs == [Objective("fp/acc", Direction.MAX), Objective("ptq/w8a8-vectorwise/kl", Direction.MIN)]
    assert [str(o) for o in objs] == ["fp/acc:max", "ptq/w8a8-vectorwise/kl:min"]
    assert objs[0].value({"fp/acc": "0.5"}) == 0.5 and math.isnan(objs[0].value({}))


def test_task_and_scheme_metrics():
    parse_objectives(["fp/heldout-cloze/acc_norm:max", "ptq/w8a8-vectorwise/degradation_pct:max"], TASKS, SCHEMES)
    assert "q/w8a8-vectorwise/heldout-cloze/acc_norm" in known_metrics(TASKS, SCHEMES)
    # without a config only the shape is checked
    validate_metric("ptq/w4-colwise/kl")


@pytest.mark.parametrize("name", [
    "ptq/w8a8-vectorwise/top1_agree", "ptq/w8a8-vectorwise/top1_agree_se", "q/w8a8-vectorwise/acc",
    "q/w8a8-vectorwise/heldout-cloze/acc_norm", "q/w8a8-vectorwise/heldout-lambada/acc", "eval/loss",
    "fp/heldout-lambada/ppl", "fp/acc_norm", "fp/heldout-cloze/acc_bytes", "train/grad_norm", "diag/qkv_rmse_max",
    "diag/blocks.0.attn.qkv/outlier_frac",
])
def test_every_name_the_evaluator_reports_is_an_objective(name):
    assert validate_metric(name, TASKS, SCHEMES) == name
    assert name in known_metrics(TASKS, SCHEMES) or name.startswith("diag/")


@pytest.mark.parametrize("name", ["eval/seconds", "train/node_id", "eval/node", "fp/heldout-ppl/tokens", "q/acc"])
def test_bookkeeping_and_made_up_names_are_not_objectives(name):
    with pytest.raises(UserError):
        validate_metric(name, TASKS, SCHEMES)


@pytest.mark.parametrize(
    "text, hint",
    [
        ("ptq/w8a8-vectorwse/kl:min", "ptq/w8a8-vectorwise/kl"),
        ("fp/accuracy:max", "fp/acc"),
        ("fp/heldout-lambda/acc:max", "fp/heldout-lambada/acc"),
        ("ptq/w8a8-vectorwise/kll:min", "ptq/w8a8-vectorwise/kl"),
    ],
)
def test_unknown_objective_names_closest(text, hint):
    with pytest.raises(UserError) as e:
        parse_objectives([text], TASKS, SCHEMES)
    assert str(e.value).startswith("search.objectives[0]:") and hint in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [[], ["fp/acc"], ["fp/acc:up"], ["fp/acc:max", "fp/acc:min"]])
def test_bad_objective_lists(bad):
    with pytest.raises(UserError):
        parse_objectives(bad, TASKS, SCHEMES)


def test_constraint_parse_and_satisfied():
    c = Constraint.parse("ptq/w8a8-vectorwise/degradation_pct>=-1", TASKS, SCHEMES)
    assert (c.name, c.op, c.value) == ("ptq/w8a8-vectorwise/degradation_pct", ">=", -1.0)
    assert c.satisfied({c.name: -0.5}) and not c.satisfied({c.name: -1.5}) and not c.satisfied({})
    k = Constraint.parse("ptq/w8a8-vectorwise/kl <= 0.05")
    assert k.satisfied({k.name: 0.01}) and not k.satisfied({k.name: float("nan")})
    assert str(k) == "ptq/w8a8-vectorwise/kl<=0.05"
    for bad in ["fp/acc>0.5", "fp/acc>=x", "fp/ac>=1", "fp/acc>=inf"]:
        with pytest.raises(UserError):
            Constraint.parse(bad)
    assert len(parse_constraints(["fp/acc>=0.3", "ptq/a/kl<=1"])) == 2


def test_certain_violation_uses_the_ci():
    c = Constraint.parse("ptq/s/degradation_pct>=-1")
    n = c.name
    # point below the bound but CI straddles it: not certain
    assert not c.certainly_violated({n: -1.5, f"{n}_ci_low": -2.5, f"{n}_ci_high": -0.5})
    # whole CI below: certain
    assert c.certainly_violated({n: -2.0, f"{n}_ci_low": -2.8, f"{n}_ci_high": -1.2})
    # KL with a standard error: value +- 1.96 se
    k = Constraint.parse("ptq/s/kl<=0.1")
    assert not k.certainly_violated({"ptq/s/kl": 0.12, "ptq/s/kl_se": 0.02})
    assert k.certainly_violated({"ptq/s/kl": 0.2, "ptq/s/kl_se": 0.02})
    # no uncertainty reported: the point value is taken at face value; missing: never certain
    assert k.certainly_violated({"ptq/s/kl": 0.2}) and not k.certainly_violated({})
