"""export and report on a hand-made search directory (no Ray): picks on a known front, stopped and
diverged trials never exported, exported files run on the 6b preset, report files written."""

import json
import math
import sys

import pytest
import yaml

from rayq import config as config_io
from rayq.cluster.commands import recipe_values
from rayq.errors import UserError
from rayq.search.export import PICKS, SearchRun, choose, export, typed_recipe
from rayq.search.objectives import parse_objectives
from rayq.search.report import SUMMARY, report_files, write_report
from rayq.search.results import write_table

ACC, KL = "fp/acc", "ptq/w8a8-vectorwise/kl"
SPACE = ("search.space={recipe.weight_decay: {choice: [0.1, 0.01, 0.001]}, recipe.precision: {choice: [bf16, fp16]},"
         " recipe.grad_clip: {choice: [null, 1.0]}, recipe.layernorm_fp32: {choice: [true, false]},"
         " recipe.lr: {choice: [0.003, 0.001]}}")

# trial -> (recipe values, {step: (acc, kl)}, extra); tiny: 50 steps, milestone 25.
# Front of the completed trials: A (max acc), B (the knee), C (min KL); D is dominated (rank 1).
# S and V have the best objectives of all, but S was stopped at the milestone and V diverged.
TRIALS = {
    "A": ({"weight_decay": 0.1, "precision": "bf16", "grad_clip": 1.0, "layernorm_fp32": 1.0, "lr": 0.003},
          {25: (0.58, 0.12), 50: (0.60, 0.10)}),
    "B": ({"weight_decay": 0.01, "precision": "bf16", "grad_clip": None, "layernorm_fp32": 0.0, "lr": 0.001},
          {25: (0.50, 0.07), 50: (0.55, 0.05)}),
    "C": ({"weight_decay": 0.001, "precision": "fp16", "grad_clip": 1.0, "layernorm_fp32": 1.0, "lr": 0.001},
          {25: (0.35, 0.02), 50: (0.40, 0.01)}),
    "D": ({"weight_decay": 0.01, "precision": "fp16", "grad_clip": 1.0, "layernorm_fp32": 1.0, "lr": 0.003},
          {25: (0.45, 0.09), 50: (0.50, 0.08)}),
    "S": ({"weight_decay": 0.1, "precision": "fp16", "grad_clip": None, "layernorm_fp32": 1.0, "lr": 0.003},
          {25: (0.90, 0.001)}),
    "V": ({"weight_decay": 0.001, "precision": "bf16", "grad_clip": None, "layernorm_fp32": 0.0, "lr": 0.003},
          {25: (0.95, 0.0005)}),
}


def make_search(tmp_path, objectives=(f"{ACC}:max", f"{KL}:min"), constraints=(), trials=TRIALS, stops=("S",)):
    d = tmp_path / "search"
    d.mkdir()
    cfg = config_io.resolve("tiny", overrides=[SPACE, f"search.objectives={json.dumps(list(objectives))}",
                                               f"search.constraints={json.dumps(list(constraints))}"])
    config_io.save(cfg, d / "config.yaml")
    rows, t = [], 0.0
    for tid, (recipe, evals) in trials.items():
        config = {f"config/recipe.{k}": (float(v) if isinstance(v, (int, float)) else v) for k, v in recipe.items()}
        rows.append({"trial_id": tid, "recipe_id": tid, "time": (t := t + 1), **config, "step": 10.0,
                     "train/loss": 3.0})  # a log-only report: no objective
        for step, (acc, kl) in evals.items():
            rows.append({"trial_id": tid, "recipe_id": tid, "time": (t := t + 1), **config, "step": float(step),
                         "train/loss": 2.0, ACC: acc, KL: kl, f"{KL}_seed_se": 0.1 * kl, "diverged": 0.0,
                         "checkpoint_path": f"/ckpt/{tid}/step_{step}"})
    if "V" in trials:
        rows.append({"trial_id": "V", "recipe_id": "V", "time": t + 1, **config, "step": 30.0,
                     "train/loss": math.nan, "diverged": 1.0})
    write_table(rows, d / "results.parquet")
    decisions = [{"trial_id": s, "recipe_id": s, "action": "STOP", "kind": "milestone", "step": 25,
                  "milestone": 25, "reason": "rank 4/4 at milestone 25"} for s in stops]
    if "V" in trials:
        decisions.append({"trial_id": "V", "recipe_id": "V", "action": "STOP", "kind": "diverged", "step": 30,
                          "milestone": 25, "reason": "train/loss is nan"})
    (d / "scheduler_state.json").write_text(json.dumps({"version": 1, "decisions": decisions}))
    return d


def exported(paths):
    return [yaml.safe_load(p.read_text()) for p in paths]


@pytest.mark.parametrize("pick, expected", [(None, "B"), ("knee", "B"), ("max-acc", "A"), ("min-degradation", "C")])
def test_picks_on_a_hand_made_front(tmp_path, pick, expected):
    d = make_search(tmp_path)
    (doc,) = exported(export(d, tmp_path / "out", pick=pick))
    assert doc["trial_id"] == expected and doc["pareto_rank"] == 0


def test_top_k_knee_first_then_rank_and_distance_never_stopped_or_diverged(tmp_path):
    d = make_search(tmp_path)
    docs = exported(export(d, tmp_path / "out", top=10))
    # A and C are the two extremes (both at distance 1 from utopia): the better first objective wins
    assert [x["trial_id"] for x in docs] == ["B", "A", "C", "D"]
    assert [x["pareto_rank"] for x in docs] == [0, 0, 0, 1]
    assert [x["trial_id"] for x in exported(export(d, tmp_path / "out2", top=2))] == ["B", "A"]


def test_exported_file_contents_and_full_scale_resolve(tmp_path):
    d = make_search(tmp_path)
    (path,) = export(d, tmp_path / "out", pick="knee", preset="6b", cluster="cluster/configs/gcp-tpu.rayq.yaml")
    doc = yaml.safe_load(path.read_text())
    assert doc["recipe"] == {"weight_decay": 0.01, "grad_clip": None, "dropout": 0.0, "precision": "bf16",
                             "layernorm_fp32": False}  # lr was searched but is a scale knob: not carried
    assert doc["proxy"]["lr"] == 0.001 and doc["proxy"]["steps"] == 50
    assert doc["label"] == "wd0.01-gcnone-bf16-layernorm_fp320-lr0.001"  # space.recipe_label of the searched values
    assert path.name == f"{doc['label']}.yaml"
    assert [m["step"] for m in doc["metrics"]] == [25, 50]  # eval steps only, not the log-only report
    assert doc["metrics"][-1][ACC] == 0.55 and doc["metrics"][-1][KL] == 0.05
    assert doc["metrics"][-1]["train/loss"] == 2.0 and doc["metrics"][-1]["checkpoint_path"] == "/ckpt/B/step_50"
    cfg = config_io.resolve(config_file=d / "config.yaml")
    assert doc["search"]["config_hash"] == config_io.config_hash(cfg)
    six = config_io.resolve("6b")
    assert doc["launch"]["preset"] == "6b" and doc["launch"]["steps"] == six.recipe.steps
    assert doc["launch"]["command"] == (f"rayq train --recipe {path} --preset 6b --cluster "
                                        f"gcp-tpu --out runs/{doc['label']}")
    # what `rayq train --recipe FILE --preset 6b` does with it
    full = config_io.resolve("6b", file_values=recipe_values(str(path)))
    assert full.recipe.weight_decay == 0.01 and full.recipe.grad_clip is None and full.recipe.layernorm_fp32 is False
    assert full.recipe.lr == six.recipe.lr and full.recipe.batch_size == six.recipe.batch_size
    assert full.model == six.model


def test_stopped_and_diverged_never_exported(tmp_path):
    d = make_search(tmp_path, trials={k: TRIALS[k] for k in ("S", "V")})
    with pytest.raises(UserError, match="no completed recipe to export"):
        export(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_constraints_exclude_infeasible_recipes(tmp_path):
    d = make_search(tmp_path, constraints=[f"{ACC}>=0.45"])
    (doc,) = exported(export(d, tmp_path / "out", pick="min-degradation"))
    assert doc["trial_id"] == "B"  # C has the lowest KL but breaks the constraint


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="no results"):
        export(tmp_path, tmp_path / "out")
    d = make_search(tmp_path)
    for top in (0, -1):
        with pytest.raises(UserError, match="--top"):
            export(d, tmp_path / "out", top=top)
    with pytest.raises(UserError, match="--pick"):
        export(d, tmp_path / "out", pick="best")
    with pytest.raises(UserError, match="unknown preset"):
        export(d, tmp_path / "out", preset="7b")
    with pytest.raises(UserError, match="no results"):
        write_report(tmp_path, tmp_path / "report")


def test_pick_needs_a_matching_objective(tmp_path):
    rows = [{"trial_id": "a", KL: 0.1}, {"trial_id": "b", KL: 0.2}]
    objs = parse_objectives([f"{KL}:min"])
    assert choose(rows, objs) == [(0, 0)]
    with pytest.raises(UserError, match="no maximize objective"):
        choose(rows, objs, pick="max-acc")
    assert set(PICKS) == {"knee", "max-acc", "min-degradation"}


def test_typed_recipe_restores_field_types():
    got = typed_recipe({"recipe.warmup_steps": 20.0, "recipe.layernorm_fp32": 0.0, "recipe.grad_clip": math.nan,
                        "recipe.dropout": 0.1, "recipe.precision": "fp16"})
    assert got == {"warmup_steps": 20, "layernorm_fp32": False, "grad_clip": None, "dropout": 0.1, "precision": "fp16"}
    assert type(got["warmup_steps"]) is int


def test_report_writes_plots_and_marks_stopped_trials(tmp_path):
    d = make_search(tmp_path)
    summary = write_report(d, tmp_path / "report")
    assert summary == tmp_path / "report" / SUMMARY
    files = report_files(SearchRun(d))
    assert sorted(files.values()) == ["fp-acc_vs_step.png", "pareto_front.png", "ptq-w8a8-vectorwise-kl_by_axis.png",
                                      "ptq-w8a8-vectorwise-kl_vs_step.png"]  # named after the metric shown
    for name in files.values():
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    text = summary.read_text()
    for name in files.values():
        assert f"({name})" in text
    assert "**stopped** at 25" in text and "**diverged**" in text
    assert "compared at step 25" in text  # the per-axis plot compares trials where all were evaluated
    lines = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| ")
             and line.split("|")[2].strip() in TRIALS}
    assert "front" in lines["B"] and "(knee)" in lines["B"] and "front" not in lines["D"] and "stopped" in lines["S"]
    assert "| null |" in lines["B"]  # grad_clip: null is shown as a value
    assert not list((tmp_path / "report").glob(".*"))  # no temporary files left behind


def test_report_without_a_minimize_objective(tmp_path):
    d = make_search(tmp_path, objectives=[f"{ACC}:max"])
    text = write_report(d, tmp_path / "report").read_text()
    assert "no Pareto plot" in text and "no per-knob plot" in text
    assert not (tmp_path / "report" / "pareto_front.png").exists()
    assert (tmp_path / "report" / "fp-acc_vs_step.png").exists()


def test_modules_do_not_import_ray():
    import subprocess

    code = "import sys, rayq.search.export, rayq.search.report, rayq.search.plots; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_export_refuses_to_overwrite_a_recipe_file_unless_forced(tmp_path, capsys):
    from rayq.cli import main

    d = make_search(tmp_path)
    (path,) = export(d, tmp_path / "out", pick="knee")
    path.write_text(path.read_text() + "# tuned by hand\n")
    with pytest.raises(UserError, match="refusing to overwrite.*--force"):
        export(d, tmp_path / "out", pick="knee")
    assert path.read_text().endswith("# tuned by hand\n")  # untouched
    assert main(["export", str(d), "--out", str(tmp_path / "out"), "--pick", "knee"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["export", str(d), "--out", str(tmp_path / "out"), "--pick", "knee", "--force"]) == 0
    assert not path.read_text().endswith("# tuned by hand\n")


def test_launch_command_works_from_any_directory(tmp_path, monkeypatch):
    """The exported command names the recipe by absolute path and the cluster by its shipped name,
    so it resolves from another directory (a relative --out at export time included)."""
    import shlex

    from rayq.commands import add_config_args, config_from_args, make_parser, parse_args

    d = make_search(tmp_path)
    monkeypatch.chdir(tmp_path)
    (path,) = export(d, "recipes", pick="knee", cluster="gcp-tpu")
    doc = yaml.safe_load(path.read_text())
    argv = shlex.split(doc["launch"]["command"])
    assert argv[:2] == ["rayq", "train"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    parser = make_parser("rayq train")
    add_config_args(parser)
    parser.add_argument("--out")
    cfg = config_from_args(parse_args(parser, argv[2:]))
    assert cfg.recipe.weight_decay == 0.01 and cfg.model == config_io.resolve("6b").model
    assert cfg.cluster == config_io.resolve("6b", file_values=config_io.cluster_values("gcp-tpu")).cluster
