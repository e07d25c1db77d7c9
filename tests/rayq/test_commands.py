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
    assert "--set" in capsys.readouterr().out


# ----------------------------------------------------------------------------- ls


def test_ls_presets(capsys):
    code, out, _ = run(capsys, "ls", "presets")
    assert code == 0
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert {"tiny", "small", "410m", "6b"} <= set(rows)
    assert "CPU tests" in rows["tiny"]
    code, out, _ = run(capsys, "ls", "presets", "--json")
    assert {"name": "tiny", "description": rows["tiny"]} in json.loads(out)


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
