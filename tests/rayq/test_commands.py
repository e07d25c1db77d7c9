"""rayq.commands through `rayq.cli.main`: exit codes, one-line errors, stdout/stderr split."""

from __future__ import annotations

import json

import pytest
import yaml

from rayq import commands
from rayq.cli import main
from rayq.errors import UserError


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- validate


def test_unknown_key_names_the_closest(capsys):
    err = one_line_error(capsys, "validate", "--preset", "tiny", "--set", "recipe.weigth_decay=0.1")
    assert "recipe.weigth_decay" in err and "did you mean 'recipe.weight_decay'" in err


def test_wrong_type(capsys):
    err = one_line_error(capsys, "validate", "--preset", "tiny", "--set", "recipe.lr=fast")
    assert "recipe.lr: expected float" in err


def test_negative_weight_decay(capsys):
    err = one_line_error(capsys, "validate", "--preset", "tiny", "--set", "recipe.weight_decay=-0.1")
    assert "recipe.weight_decay: expected >= 0" in err


def test_unknown_flag_and_missing_config_file(capsys, tmp_path):
    assert "--bogus" in one_line_error(capsys, "validate", "--bogus")
    assert "config file not found" in one_line_error(capsys, "validate", "--config", str(tmp_path / "no.yaml"))


def test_validate_ok(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny", "name": "mine", "recipe": {"weight_decay": 0.0}}))
    code, out, err = run(capsys, "validate", "--config", str(path), "--set", "recipe.grad_clip=null")
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "ok: mine"
    assert "weight_decay 0" in out and "grad_clip none" in out
    code, out, _ = run(capsys, "validate", "--config", str(path), "--json")
    assert code == 0 and json.loads(out)["recipe"]["weight_decay"] == 0.0


def test_validate_checks_local_sources_exist(capsys, tmp_path):
    err = one_line_error(capsys, "validate", "--preset", "tiny", "--set", f"data.sources=['{tmp_path}/none/*.txt']")
    assert "no file matches" in err and str(tmp_path / "none") in err


def test_help_returns_zero(capsys):
    assert main(["validate", "--help"]) == 0
    assert main(["data", "prepare", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--set" in out and "--steps" in out and "--cluster" in out


def test_parse_args_raises_after_help(capsys):
    from rayq.errors import HelpShown

    parser = commands.make_parser("rayq something")
    commands.add_config_args(parser)
    with pytest.raises(HelpShown):
        commands.parse_args(parser, ["--help"])
    assert "usage: rayq something" in capsys.readouterr().out


def test_validate_runs_the_search_and_eval_checks(capsys):
    err = one_line_error(capsys, "validate", "--preset", "tiny", "--set", "search.objectives=[nonsense/metric:max]")
    assert "search.objectives" in err and "unknown metric 'nonsense/metric'" in err
    err = one_line_error(capsys, "validate", "--preset", "tiny", "--set", "search.space={recipe.weight_decy: {choice: [0.1]}}")
    assert "did you mean 'recipe.weight_decay'" in err
    err = one_line_error(capsys, "validate", "--preset", "tiny", "--set", "eval.schemes=[w8a8-vectorwse]")
    assert "did you mean 'w8a8-vectorwise'" in err
    err = one_line_error(capsys, "validate", "--preset", "tiny", "--set", "eval.tasks=[hellaswg]")
    assert "did you mean 'hellaswag'" in err
    code, out, _ = run(capsys, "validate", "--preset", "demo")
    assert code == 0 and out.startswith("ok: demo")


def test_validate_explain(capsys):
    code, out, err = run(capsys, "validate", "--explain", "recipe.weight_decay", "--explain", "recipe.grad_clip")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "recipe.weight_decay: float = 0.1"
    assert "AdamW decoupled weight decay" in lines[1]
    assert "recipe.grad_clip: float or null = 1.0" in out
    code, out, _ = run(capsys, "validate", "--explain", "recipe")
    assert code == 0 and out.startswith("recipe: section (weight_decay, grad_clip,")
    assert "did you mean 'recipe.steps'" in one_line_error(capsys, "validate", "--explain", "train.steps")


def test_shortcut_flags_and_files(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # shipped cluster files resolve by name from any directory
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: {weight_decay: 0.001, grad_clip: null}\n")
    code, out, _ = run(capsys, "validate", "--preset", "6b", "--recipe", str(recipe), "--cluster", "gcp-tpu",
                       "--set", "recipe.steps=3", "--steps", "7", "--workers", "2", "--address", "ray://h:10001",
                       "--json")
    assert code == 0, out
    cfg = json.loads(out)
    assert cfg["recipe"]["steps"] == 7  # the shortcut wins over --set
    assert cfg["recipe"]["weight_decay"] == 0.001 and cfg["recipe"]["grad_clip"] is None
    assert cfg["cluster"]["device"] == "tpu" and cfg["cluster"]["workers"] == 2
    assert cfg["cluster"]["address"] == "ray://h:10001"
    assert "did you mean 'gcp-tpu'" in one_line_error(capsys, "validate", "--preset", "6b", "--cluster", "gcp-tup")


def test_yaml_attacks_are_one_line_errors(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert "not a UTF-8 text file" in one_line_error(capsys, "validate", "--config", str(f))
    f.write_text("name: " + "[" * 5000 + "]" * 5000)
    assert "nested deeper than" in one_line_error(capsys, "validate", "--config", str(f))
    assert "parameters need" in one_line_error(capsys, "validate", "--preset", "tiny", "--set", "model.d_model=1000000000")
    assert "finite" in one_line_error(capsys, "validate", "--preset", "tiny", "--set", "recipe.eps=1e400")


# ----------------------------------------------------------------------------- ls


def test_ls_presets(capsys):
    code, out, _ = run(capsys, "ls", "presets")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert {"tiny", "small", "410m", "6b"} <= set(names)
    code, js, _ = run(capsys, "ls", "presets", "--json")
    rows = {r["name"]: r["description"] for r in json.loads(js)}
    assert set(rows) == set(names) and "CPU tests" in rows["tiny"]
    # whole comment blocks, never cut mid-sentence (the demo's spans two lines of its YAML)
    assert rows["demo"].endswith("so no noise prior is needed.")
    assert all(d.endswith((".", ")", ":")) or not d for d in rows.values()), rows
    assert " ".join(out.split()).count("Milestone scaled from the paper's 15k of 75k. Stopping:") == 1


def test_ls_unknown_topic(capsys):
    assert "did you mean 'tasks'" in one_line_error(capsys, "ls", "task")


@pytest.mark.parametrize("topic,expected", [("quant", "w8a8-vectorwise"), ("tasks", "heldout-cloze")])
def test_ls_registries(capsys, topic, expected):
    code, out, _ = run(capsys, "ls", topic)
    assert code == 0 and expected in out


# ----------------------------------------------------------------------------- data prepare


def _corpus_flags(tmp_path):
    from corpus_fixture import write_corpus  # tests/corpus_fixture.py, on sys.path via conftest

    write_corpus(tmp_path / "text", docs=4, sentences=80)
    return ["--preset", "tiny", "--set", f"data.sources=['{tmp_path}/text/*.txt']",
            "--set", "data.heldout_documents=[book3]", "--set", f"data.cache_dir={tmp_path}/cache",
            "--set", "model.vocab_size=320", "--set", "data.tokenizer_train_chars=10000"]


def test_data_prepare_summary_and_json(capsys, tmp_path):
    flags = _corpus_flags(tmp_path)
    code, out, err = run(capsys, "data", "prepare", *flags)
    assert code == 0
    assert out.startswith(f"prepared data: {tmp_path}/cache/prepared/")
    assert "train:" in out and "book3" in out
    assert "training a unigram tokenizer" in err  # progress goes to stderr
    code, out, err = run(capsys, "data", "prepare", *flags, "--json")
    summary = json.loads(out)
    assert code == 0 and "reusing" in err
    assert summary["splits"]["heldout"]["documents"] == 1 and summary["splits"]["train"]["tokens"] > 0


def test_data_prepare_bad_inputs(capsys, tmp_path):
    flags = _corpus_flags(tmp_path)
    err = one_line_error(capsys, "data", "prepare", *flags, "--set", "data.heldout_documents=[book33]")
    assert "book33" in err and "did you mean 'book3'" in err
    err = one_line_error(capsys, "data", "prepare", *flags, "--set", f"data.sources=['{tmp_path}/gone.txt']")
    assert "gone.txt" in err
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    err = one_line_error(capsys, "data", "prepare", *flags, "--set", f"data.sources=['{tmp_path}/bad.parquet']")
    assert "bad.parquet: unreadable Parquet" in err
    assert "required" in one_line_error(capsys, "data")
    assert not (tmp_path / "cache").exists()  # every error came before anything was cached


# ----------------------------------------------------------------------------- bench and helpers


def test_bench_unknown_target_suggests(capsys):
    assert "did you mean 'train'" in one_line_error(capsys, "bench", "trian")


def test_bench_dispatches_lazily(monkeypatch, capsys):
    import sys
    import types

    seen = {}
    fake = types.ModuleType("rayq.search.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "rayq.search.bench", fake)
    assert main(["bench", "search", "--json", "--quick"]) == 0
    assert seen["argv"] == ["--json", "--quick"]


def test_config_helpers_are_reusable():
    parser = commands.make_parser("rayq something")
    commands.add_config_args(parser)
    parser.add_argument("--out")
    args = commands.parse_args(parser, ["--preset", "tiny", "--set", "recipe.steps=7", "--out", "x"])
    cfg = commands.config_from_args(args)
    assert cfg.name == "tiny" and cfg.recipe.steps == 7 and args.out == "x"
    with pytest.raises(UserError, match="unrecognized arguments"):
        commands.parse_args(parser, ["--nope"])
    args = commands.parse_args(parser, ["--preset", "tiny", "--steps", "9", "--workers", "1"])
    cfg = commands.config_from_args(args, values={"cluster.workers": 0})
    assert cfg.recipe.steps == 9 and cfg.cluster.workers == 0  # values win over every flag

