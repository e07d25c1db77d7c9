"""The proxy study's presets (issue 12): the model and data of `proxy`, and the three stages'
searches validated the way `rayq search` validates them before Ray starts."""

from __future__ import annotations

import pytest

from rayq import config as config_io
from rayq.search.space import validate_search


def test_proxy_is_the_regime_of_the_study():
    cfg = config_io.resolve("proxy")
    m = cfg.model
    assert (m.d_model, m.n_layer, m.seq_len, m.vocab_size, m.bias) == (128, 6, 256, 2048, True)
    assert cfg.data.bos and cfg.data.corpus == "large" and cfg.train.threads == 1
    assert cfg.recipe.batch_size * m.seq_len == 4096
    assert {"w8a8-vectorwise", "w8a8-tensor"} <= set(cfg.eval.schemes) and cfg.eval.diagnostics


@pytest.mark.parametrize("name,recipes,seeds", [("proxy-lr", 4, 1), ("proxy-contrast", 2, 3), ("proxy-grid", 5, 3)])
def test_stage_presets_validate_and_pair_seeds(name, recipes, seeds):
    """One recipe-seed per trial: every recipe runs once per seed, each seed with every recipe
    (the same initialization and data order), listed pair by pair so finished pairs can be read."""
    cfg = config_io.resolve(name)
    checked = validate_search(cfg)
    points = checked.space.grid(cfg)
    assert cfg.search.seeds_per_recipe == 1 and len(points) == recipes * seeds
    by_seed: dict = {}
    for p in points:
        recipe = tuple(sorted((k, repr(v)) for k, v in p.items() if k != "train.seed"))
        by_seed.setdefault(p.get("train.seed", cfg.train.seed), []).append(recipe)
    assert len(by_seed) == seeds and all(sorted(r) == sorted(by_seed[min(by_seed)]) for r in by_seed.values())
    assert len(set(by_seed[min(by_seed)])) == recipes
    seeds_in_order = [p.get("train.seed", cfg.train.seed) for p in points]
    assert seeds_in_order == sorted(seeds_in_order)  # seed by seed: pairs complete early
    assert cfg.search.searcher == "grid"
    assert cfg.search.milestones == [cfg.recipe.steps]  # compared at the end: no recipe stopped early
    assert "Gate" in _preset_source(name)  # the gate is written where the user reads the preset


def test_contrast_points_differ_in_every_knob_of_the_issue():
    cfg = config_io.resolve("proxy-contrast")
    prone, averse = validate_search(cfg).space.grid(cfg)[:2]
    assert prone["train.seed"] == averse["train.seed"]
    for key in ("recipe.lr", "recipe.grad_clip", "recipe.weight_decay", "recipe.decay_norm_gains", "recipe.dropout",
                "recipe.eps"):
        assert prone[key] != averse[key], key
    assert prone["recipe.grad_clip"] is None and averse["recipe.decay_norm_gains"] is True


def _preset_source(name: str) -> str:
    from importlib import resources

    return resources.files("rayq.presets").joinpath(f"{name}.yaml").read_text()
