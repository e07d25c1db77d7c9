"""`rayq train` from the command line: a run directory, reproduction, resume, bad input."""

import json

from rayq import config as config_io
from rayq.cli import main


def _args(cfg_file, out, *extra):
    return ["train", "--config", str(cfg_file), "--out", str(out), "--no-evaluate", "--json", *extra]


def test_train_writes_a_run_and_reproduces_from_its_config(tiny_setup, tmp_path, capsys):
    cfg, _ = tiny_setup
    cfg = config_io.with_values(cfg, {"recipe.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 3})
    config_io.save(cfg, tmp_path / "c.yaml")
    assert main(_args(tmp_path / "c.yaml", tmp_path / "run")) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["step"] == 6 and (tmp_path / "run" / "checkpoints" / "step_6" / "model.pt").exists()
    assert main(_args(tmp_path / "run" / "config.yaml", tmp_path / "again")) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["train/loss"] == first["train/loss"]  # same config, same data, same seed: same run


def test_rerun_resumes_and_a_different_config_is_refused(tiny_setup, tmp_path, capsys):
    cfg, _ = tiny_setup
    cfg = config_io.with_values(cfg, {"recipe.steps": 6, "train.checkpoint_every": 3})
    config_io.save(cfg, tmp_path / "c.yaml")
    assert main(_args(tmp_path / "c.yaml", tmp_path / "run", "--steps", "6")) == 0
    assert main(_args(tmp_path / "c.yaml", tmp_path / "run", "--steps", "6")) == 0  # resumes at 6: nothing to do
    capsys.readouterr()
    assert main(_args(tmp_path / "c.yaml", tmp_path / "run", "--set", "recipe.weight_decay=0.01")) == 2
    err = capsys.readouterr().err
    assert "holds a run of a different config" in err and len(err.strip().splitlines()) == 1


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    cases = [
        (["train", "--preset", "tiny", "--out", str(tmp_path / "a"), "--set", "recipe.weigth_decay=0.1"],
         "did you mean 'recipe.weight_decay'"),
        (["train", "--preset", "tiny", "--out", str(tmp_path / "b"), "--set", "recipe.weight_decay=-1"],
         "recipe.weight_decay: expected >= 0"),
        (["train", "--preset", "tiny", "--out", str(tmp_path / "c"), "--set", "data.sources=[/nonexistent/*.txt]"],
         "/nonexistent/*.txt"),
        (["train", "--preset", "tiny", "--out", str(tmp_path / "d"), "--recipe", str(tmp_path / "nope.yaml")],
         "nope.yaml: recipe file not found"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c" / "checkpoints").exists()  # nothing half-written


def test_task_placement_needs_ray_workers_and_actor_is_gone(tmp_path, capsys):
    """`rayq train` honours eval.placement: in-process there is no Ray task to evaluate in."""
    base = ["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set"]
    assert main([*base, "eval.placement=task"]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval.placement=task" in err and "cluster.workers" in err and len(err.splitlines()) == 1
    assert main([*base, "eval.placement=actor"]) == 2  # renamed: a Ray task, not an actor
    assert "eval.placement" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_diverged_run_exits_3_with_the_step_and_last_good_checkpoint(tiny_setup, tmp_path, capsys):
    cfg, _ = tiny_setup
    cfg = config_io.with_values(cfg, {"recipe.steps": 30, "recipe.lr": 1e6, "recipe.grad_clip": None,
                                      "recipe.warmup_steps": 0, "train.checkpoint_every": 1,
                                      "recipe.precision": "fp32", "train.log_every": 1})
    config_io.save(cfg, tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-evaluate"]) == 3
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "diverged at step" in x)
    assert "step None" not in line and "last good checkpoint: " in line and "step_" in line
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: null instead
    rows = [json.loads(x) for x in text.splitlines()]
    assert rows[-1]["diverged"] == 1 and rows[-1]["train/loss"] is None
    assert "3 the run" in _help(capsys, "train")  # documented


def _help(capsys, command):
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def test_out_onto_or_under_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        assert main(["train", "--preset", "tiny", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(tmp_path / "f") in err, err


def test_progress_is_one_line_per_report_and_verbose_dumps_keys(tiny_setup, tmp_path, capsys):
    cfg, _ = tiny_setup
    cfg = config_io.with_values(cfg, {"recipe.steps": 4, "train.log_every": 2, "train.checkpoint_every": 4})
    config_io.save(cfg, tmp_path / "c.yaml")
    base = ["train", "--config", str(tmp_path / "c.yaml"), "--no-evaluate"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "step 2/4 · loss " in err and " tok/s" in err and "eta " in err
    assert "train/grad_norm=" not in err and "data:" in err  # says what data preparation does
    assert main([*base, "--out", str(tmp_path / "b"), "--verbose"]) == 0
    assert "train/grad_norm=" in capsys.readouterr().err


def test_extending_a_finished_run_resumes_it_and_a_rerun_says_already_at_step(tiny_setup, tmp_path, capsys):
    cfg, _ = tiny_setup
    cfg = config_io.with_values(cfg, {"recipe.steps": 4, "train.checkpoint_every": 2, "train.log_every": 1})
    config_io.save(cfg, tmp_path / "c.yaml")
    run = tmp_path / "run"
    assert main(_args(tmp_path / "c.yaml", run)) == 0
    capsys.readouterr()
    assert main(_args(tmp_path / "c.yaml", run)) == 0
    out, err = capsys.readouterr()
    assert "already at step 4" in err and json.loads(out.strip().splitlines()[-1])["step"] == 4
    assert main(_args(tmp_path / "c.yaml", run, "--steps", "6")) == 0
    out, err = capsys.readouterr()
    assert "extending" in err and "resuming at step 4" in err
    assert json.loads(out.strip().splitlines()[-1])["step"] == 6
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["train/resumed_from"] == 4
    assert (run / "tokenizer.model").is_file()  # the run carries its tokenizer
