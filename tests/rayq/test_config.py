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


# ----------------------------------------------------------------------------- issue 10: validation gaps


@pytest.mark.parametrize("override", [
    "recipe.eps=1e400", "recipe.weight_decay=.inf", "model.init_std=1e400", "recipe.init_loss_scale=.inf",
    "recipe.lr=.nan", "eval.confidence=-.inf", "cluster.cpus_per_worker=1e999",
])
def test_non_finite_floats_are_refused(override):
    with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]}: expected a finite number"):
        cfgio.resolve("tiny", overrides=[override])


def test_seed_is_a_uint32():
    assert cfgio.resolve("tiny", overrides=[f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    for bad in (-1, 2**32):
        with pytest.raises(ConfigError, match=r"train\.seed: expected in \[0, 2\*\*32\)"):
            cfgio.resolve("tiny", overrides=[f"train.seed={bad}"])
        with pytest.raises(ConfigError, match=r"search\.seed: expected in \[0, 2\*\*32\)"):
            cfgio.resolve("tiny", overrides=[f"search.seed={bad}"])


def test_absurd_model_size_names_the_memory_it_would_need():
    with pytest.raises(ConfigError, match=r"^model\.d_model/n_layer/vocab_size: .* parameters need .*iB for weights"):
        cfgio.resolve("tiny", overrides=["model.d_model=1000000000"])
    assert cfgio.resolve("52b").model.num_parameters > 50e9  # the paper's largest model is fine


@pytest.mark.parametrize("preset,bias", [("tiny", True), ("tiny", False), ("410m", True)])
def test_schema_parameter_count_is_the_models(preset, bias):
    cfg = cfgio.resolve(preset, overrides=[f"model.bias={str(bias).lower()}"])
    assert cfg.model.num_parameters == count_parameters(cfg.model)


def test_binary_yaml_is_one_line_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="not a UTF-8 text file"):
        cfgio.resolve(config_file=f)
    f.write_bytes(b"name: x\x00\n")
    with pytest.raises(UserError, match="NUL bytes"):
        cfgio.resolve(config_file=f)


def test_deep_yaml_is_refused_before_recursion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UserError, match=r"c\.yaml: line 1 is not valid YAML \(nested deeper than 64 levels\)"):
        cfgio.resolve(config_file=f)
    f.write_text("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200)))
    with pytest.raises(UserError, match="nested deeper than 64 levels"):
        cfgio.resolve(config_file=f)


def test_billion_laughs_is_refused(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    f = tmp_path / "lol.yaml"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"lol\.yaml: expands to more than 100,000 YAML nodes"):
        cfgio.resolve(config_file=f)


def test_huge_yaml_is_refused_unread(tmp_path):
    f = tmp_path / "c.yaml"
    with open(f, "wb") as fh:
        fh.truncate(cfgio.MAX_YAML_BYTES + 1)
    with pytest.raises(UserError, match="expected a YAML config file under 4 MB"):
        cfgio.resolve(config_file=f)


# ----------------------------------------------------------------------------- keys, docs, cluster files


def test_unknown_key_did_you_mean_across_sections():
    with pytest.raises(ConfigError, match=r"^train\.steps: unknown key; did you mean 'recipe\.steps'\?"):
        cfgio.resolve("tiny", overrides=["train.steps=5"])
    with pytest.raises(ConfigError, match=r"did you mean 'cluster\.workers'\?"):
        cfgio.resolve("tiny", overrides=["recipe.workers=2"])
    with pytest.raises(ConfigError, match=r"^trian: unknown key; did you mean 'train'\?"):
        cfgio.resolve("tiny", overrides=["trian.seed=1"])


def test_every_config_field_is_documented():
    from rayq.schema import field_info

    for key in cfgio.config_keys():
        info = field_info(key)
        assert info.doc and not info.doc.startswith("TODO"), key
    info = field_info("recipe.weight_decay")
    assert info.type is float and info.default == 0.1 and "AdamW" in info.doc
    with pytest.raises(KeyError):
        field_info("recipe.nope")


def test_cluster_file_by_name_or_path_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = cfgio.cluster_values("gcp-tpu")
    assert by_name["cluster.device"] == "tpu"
    assert cfgio.cluster_values("cluster/configs/gcp-tpu.rayq.yaml") == by_name  # as exported commands spell it
    assert set(cfgio.shipped_cluster_files()) >= {"gcp-tpu", "gcp-gpu", "aws-gpu", "kuberay-gpu", "kuberay-tpu"}
    own = tmp_path / "mine.yaml"
    own.write_text("cluster: {workers: 3}\n")
    assert cfgio.cluster_values(str(own)) == {"cluster.workers": 3}
    with pytest.raises(UserError, match=r"--cluster gcp-tup: no such file or shipped cluster; did you mean 'gcp-tpu'\?"):
        cfgio.cluster_values("gcp-tup")
    with pytest.raises(UserError, match="no such file"):
        cfgio.cluster_values("elsewhere/gcp-tpu.rayq.yaml")  # a real path that is missing is not guessed
