import pytest

from rayq import config as cfgio
from rayq.errors import ConfigError, UserError
from rayq.model import count_parameters
from rayq.schema import Config


def test_every_preset_resolves():
    for name in cfgio.list_presets():
        cfg = cfgio.resolve(name)
        assert isinstance(cfg, Config)


@pytest.mark.parametrize("name,expected", [("410m", 410e6), ("6b", 6e9), ("13b", 13e9), ("52b", 52e9)])
def test_paper_presets_match_their_names(name, expected):
    cfg = cfgio.resolve(name)
    assert cfg.model.vocab_size == 51200 and cfg.model.seq_len == 2048
    n = count_parameters(cfg.model)  # meta device: nothing allocated
    assert abs(n - expected) / expected < 0.10, n


def test_overrides_and_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base: tiny\nrecipe: {weight_decay: 0.01, grad_clip: null}\n")
    cfg = cfgio.resolve(config_file=f, overrides=["recipe.weight_decay=0.2", "recipe.precision=fp16"])
    assert cfg.recipe.weight_decay == 0.2 and cfg.recipe.grad_clip is None
    assert cfg.recipe.precision == "fp16" and cfg.model.d_model == 64  # from the tiny base


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match=r"recipe\.weigth_decay: unknown key; did you mean 'recipe\.weight_decay'"):
        cfgio.resolve("tiny", overrides=["recipe.weigth_decay=0.1"])


@pytest.mark.parametrize("override,match", [
    ("recipe.weight_decay=-0.1", "recipe.weight_decay: expected >= 0"),
    ("recipe.steps=abc", "recipe.steps: expected int"),
    ("recipe.precision=fp8", "recipe.precision: expected one of"),
    ("recipe.dropout=1.0", r"recipe.dropout: expected in \[0, 1\)"),
    ("model.n_head=5", "model.n_head: must divide"),
    ("recipe.batch_size=true", "recipe.batch_size: expected int"),
])
def test_bad_values_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        cfgio.resolve("tiny", overrides=[override])


def test_saved_config_reproduces(tmp_path):
    cfg = cfgio.resolve("small", overrides=["recipe.dropout=0.1", "data.sources=[a.txt]"])
    cfgio.save(cfg, tmp_path / "config.yaml")
    assert cfgio.resolve(config_file=tmp_path / "config.yaml") == cfg
    assert cfgio.config_hash(cfg) == cfgio.config_hash(cfgio.resolve(config_file=tmp_path / "config.yaml"))


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        cfgio.resolve(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        cfgio.resolve(config_file=bad)
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        cfgio.resolve("tinny")
