import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rayq.errors import UserError
from rayq.schema import Config, ModelConfig, RecipeConfig, SearchConfig
from rayq.search.space import (
    PAPER_CONTROLS,
    leaf_paths,
    paper_axes_grid,
    paper_axes_variants,
    parse_space,
    recipe_label,
    validate_milestones,
    validate_search,
)

TABLE = Path(__file__).resolve().parents[1] / "fixtures" / "paper_table_a3.json"  # the paper's Table A.3

GOOD = {
    "recipe.weight_decay": {"loguniform": [0.001, 0.1]},
    "recipe.precision": {"choice": ["bf16", "fp16"]},
    "recipe.grad_clip": {"choice": [None, 1.0]},
    "recipe.dropout": {"uniform": [0.0, 0.5]},
    "recipe.warmup_steps": {"randint": [10, 50]},
}


def test_parse_good_space():
    s = parse_space(GOOD)
    assert s.paths == list(GOOD)
    assert [p.kind for p in s.params] == ["loguniform", "choice", "choice", "uniform", "randint"]
    assert "recipe.weight_decay" in leaf_paths() and not any(p.startswith("search.") for p in leaf_paths())


@pytest.mark.parametrize(
    "space, message",
    [
        ({}, "search.space: empty"),
        ({"recipe.weight_decy": {"choice": [0.1]}}, "did you mean 'recipe.weight_decay'"),
        ({"search.eta": {"choice": [2]}}, "search.space.search.eta: unknown config path"),
        ({"recipe.dropout": {"choice": []}}, "at least one value"),
        ({"recipe.dropout": {"choice": [0.1, 0.1]}}, "twice"),
        ({"recipe.lr": {"uniform": [0.1, 0.01]}}, "lo < hi"),
        ({"recipe.lr": {"uniform": [0.1, 0.1]}}, "lo < hi"),
        ({"recipe.lr": {"loguniform": [0.0, 0.1]}}, "lo > 0"),
        ({"recipe.lr": {"loguniform": [0.1]}}, "[lo, hi]"),
        ({"recipe.lr": {"unifrom": [0.1, 1]}}, "did you mean 'uniform'"),
        ({"recipe.lr": [0.1, 1]}, "expected one of"),
        ({"recipe.lr": {"choice": [0.1], "grid": [1]}}, "expected one of"),
        ({"recipe.dropout": {"uniform": [0.0, 1.0]}}, "recipe.dropout: expected in [0, 1)"),
        ({"recipe.precision": {"choice": ["bf16", "fp8"]}}, "expected one of 'bf16'"),
        ({"recipe.warmup_steps": {"uniform": [1, 10]}}, "expected int"),
        ({"recipe.warmup_steps": {"randint": [1.5, 10]}}, "integers"),
        ({"recipe.weight_decay": {"choice": ["high"]}}, "expected float"),
    ],
)
def test_bad_spaces_name_the_path(space, message):
    with pytest.raises(UserError) as e:
        parse_space(space)
    text = str(e.value)
    assert message in text and "\n" not in text
    assert text.startswith("search.space")


def test_validates_against_the_given_config():
    cfg = Config(model=ModelConfig(d_model=64, n_head=4))
    with pytest.raises(UserError, match="n_head"):
        parse_space({"model.n_head": {"choice": [4, 5]}}, cfg)


def test_milestone_beyond_the_step_budget():
    cfg = Config(recipe=RecipeConfig(steps=20000), search=SearchConfig(milestones=[5000, 15000]))
    validate_milestones(cfg)
    validate_milestones(cfg, parse_space({"recipe.steps": {"randint": [15000, 20001]}}, cfg))
    with pytest.raises(UserError, match="search.milestones: 5000 is beyond .*=1000"):
        validate_milestones(cfg, parse_space({"recipe.steps": {"randint": [1000, 20001]}}, cfg))
    with pytest.raises(UserError, match="search.milestones: 15000 is beyond the step budget recipe.steps=200"):
        validate_milestones(Config())


def test_validate_search_entry_point():
    space = {"recipe.weight_decay": {"grid": [0.01, 0.1]}}
    cfg = Config(recipe=RecipeConfig(steps=20000), search=SearchConfig(searcher="grid", space=space))
    v = validate_search(cfg)
    assert [str(o) for o in v.objectives] == ["fp/acc:max", "ptq/w8a8-vectorwise/kl:min"]
    bad = dataclasses.replace(cfg, search=SearchConfig(space=space, objectives=["ptq/w8a8-vectorwse/kl:min"]))
    with pytest.raises(UserError, match="did you mean 'ptq/w8a8-vectorwise/kl'"):
        validate_search(bad)
    cont = dataclasses.replace(cfg, search=SearchConfig(searcher="grid", space={"recipe.lr": {"uniform": [0.001, 0.01]}}))
    with pytest.raises(UserError, match="grid mode"):
        validate_search(cont)


def test_explicit_points():
    s = parse_space({"points": "paper-axes", "train.seed": {"grid": [0, 1]}})
    grid = s.grid(Config())
    assert len(grid) == 22 and grid[0] == {**paper_axes_grid()[0], "train.seed": 0}
    assert set(s.to_tune()) == {"recipe_grid", "train.seed"}
    assert s.searched_paths() == list(PAPER_CONTROLS) + ["train.seed"]
    pts = [{"recipe.dropout": 0.1}, {"recipe.dropout": 0.2, "recipe.precision": "fp16"}]
    assert parse_space({"points": pts}).grid() == pts
    for bad, msg in [
        ({"points": []}, "non-empty"),
        ({"points": [{"recipe.dropot": 0.1}]}, "did you mean 'recipe.dropout'"),
        ({"points": [{"recipe.dropout": 1.5}]}, "expected in [0, 1)"),
        ({"points": [{"recipe.dropout": 0.1}, {"recipe.dropout": 0.1}]}, "twice"),
        ({"points": "paper-axes", "recipe.dropout": {"grid": [0.0]}}, "one place"),
    ]:
        with pytest.raises(UserError) as e:
            parse_space(bad)
        assert msg in str(e.value), str(e.value)


def test_grid_points_and_continuous_rejected():
    s = parse_space({"recipe.precision": {"grid": ["bf16", "fp16"]}, "recipe.grad_clip": {"choice": [None, 1.0]}})
    assert s.grid(Config()) == [
        {"recipe.precision": "bf16", "recipe.grad_clip": None},
        {"recipe.precision": "bf16", "recipe.grad_clip": 1.0},
        {"recipe.precision": "fp16", "recipe.grad_clip": None},
        {"recipe.precision": "fp16", "recipe.grad_clip": 1.0},
    ]
    with pytest.raises(UserError, match="grid mode"):
        parse_space(GOOD).grid()


def test_importing_rayq_search_does_not_import_ray():
    code = ("import sys, rayq.search as s; s.parse_space({'recipe.dropout': {'choice': [0.1]}}); "
            "s.select_top([{'fp/acc': 1.0}], ['fp/acc:max'], 1); assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_paper_axes_grid():
    grid = paper_axes_grid()
    assert len(grid) == 11 and len(paper_axes_variants()) == 13
    assert PAPER_CONTROLS in grid
    keys = {"recipe.weight_decay", "recipe.grad_clip", "recipe.dropout", "recipe.precision"}
    assert all(set(p) == keys for p in grid)
    # each axis spans the paper's values
    assert {p["recipe.weight_decay"] for p in grid} == {0.001, 0.01, 0.1}
    assert {p["recipe.grad_clip"] for p in grid} == {None, 1.0}
    assert {p["recipe.dropout"] for p in grid} == {0.0, 0.1, 0.4, 0.8}
    assert {p["recipe.precision"] for p in grid} == {"bf16", "fp16"}
    # one axis at a time: every point differs from the controls in at most two keys
    # (the axis and, for the wd/gc/dtype axes, the control named in the label)
    assert all(sum(p[k] != PAPER_CONTROLS[k] for k in keys) <= 2 for p in grid)
    labels = [recipe_label(p) for p in grid]
    assert len(set(labels)) == 11 and recipe_label(PAPER_CONTROLS) == "wd0.1-gc1-do0-bf16"
    from rayq.config import with_values

    for p in grid:
        with_values(Config(), p)


def test_paper_rows_with_equal_scores_are_the_same_recipe():
    table = json.loads(TABLE.read_text())
    variants = dict(paper_axes_variants())
    assert [r["variant"] for r in table["rows"]] == list(variants)
    for a in table["rows"]:
        for b in table["rows"]:
            same_scores = a["fp16"] == b["fp16"] and a["int8"] == b["int8"]
            assert same_scores == (variants[a["variant"]] == variants[b["variant"]]), (a["variant"], b["variant"])
