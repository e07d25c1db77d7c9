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
