"""The report's figures draw what was measured: on a results table with sparse eval steps and
objectives carried forward in between (what the trial driver writes), the plotted x values are
exactly the evaluated steps; titles and axis labels name the metric and its unit; seed SE bars,
the chance line and the stamp are there. Checked on the matplotlib artists, not on pixels."""

import json

import numpy as np
import pytest

from rayq import config as config_io
from rayq.search.export import SearchRun
from rayq.search.plots import Trials, chance_level, metric_label, plot_by_axis, plot_front, plot_vs_step
from rayq.search.report import write_report
from rayq.search.results import write_table

ACC, KL = "fp/acc", "ptq/w8a8-vectorwise/kl"
EVAL_STEPS = {"A": [20, 50, 100], "B": [20, 50, 100], "S": [20, 50]}  # S stopped at milestone 50
WD = {"A": 0.1, "B": 0.001, "S": 0.01}


def make_search(tmp_path, carry_all: bool = False):
    """`carry_all`: as `rayq search` writes its rows, every objective, its seed SE and eval/loss
    carried forward, and only `eval/seconds` telling an evaluation's row apart."""
    d = tmp_path / "search"
    d.mkdir()
    space = "search.space={recipe.weight_decay: {choice: [0.1, 0.01, 0.001]}}"
    cfg = config_io.resolve("tiny", overrides=[space, f"search.objectives={json.dumps([f'{ACC}:max', f'{KL}:min'])}",
                                               "recipe.steps=100", "search.milestones=[50]",
                                               "eval.tasks=[piqa, hellaswag]"])
    config_io.save(cfg, d / "config.yaml")
    rows, t = [], 0.0
    for tid, evals in EVAL_STEPS.items():
        carried = {}
        for step in range(10, max(evals) + 1, 10):  # a report every 10 steps, an eval only at some
            row = {"trial_id": tid, "recipe_id": tid, "time": (t := t + 1), "config/recipe.weight_decay": WD[tid],
                   "step": float(step), "train/loss": 3.0 - step / 100, "seeds": 2.0, "done": 0.0}
            if step in evals:
                carried = {ACC: 0.3 + step / 1000 + WD[tid], KL: 0.01 * (1 + WD[tid]) * 100 / step}
                markers = {f"{ACC}_seed_se": 0.01, f"{KL}_seed_se": 0.001, "eval/loss": 2.5}
                row.update({**carried, **markers})
                if carry_all:
                    carried.update(markers)
                    row["eval/seconds"] = 20.0
            else:
                row.update(carried)  # carried forward: not a measurement
            rows.append(row)
        if tid == "S":
            rows[-1]["done"] = 1.0  # Tune's flag on the report where the scheduler stopped it
    write_table(rows, d / "results.parquet")
    decisions = [{"trial_id": "S", "recipe_id": "S", "action": "STOP", "kind": "milestone", "step": 50,
                  "milestone": 50, "reason": "rank 3/3 at milestone 50"}]
    (d / "scheduler_state.json").write_text(json.dumps({"version": 1, "decisions": decisions}))
    return d


@pytest.mark.parametrize("carry_all", [False, True])
def test_vs_step_plots_only_evaluated_steps(tmp_path, carry_all):
    tr = Trials(SearchRun(make_search(tmp_path, carry_all)))
    for obj in tr.run.objectives:
        fig = plot_vs_step(tr, obj, tmp_path / f"{obj.name.replace('/', '-')}.png")
        (ax,) = fig.axes
        data = [line for line in ax.lines if line.get_marker() == "o"]
        got = sorted(tuple(np.asarray(line.get_xdata(), dtype=float).tolist()) for line in data)
        assert got == sorted([(20.0, 50.0, 100.0), (20.0, 50.0, 100.0), (20.0, 50.0)])  # never 10, 30, 40, ...
        assert obj.name in ax.get_title()
        assert ax.get_ylabel().startswith(metric_label(obj.name))
        assert "evaluated steps only" in ax.get_xlabel()
        assert "schemes: w8a8-vectorwise" in fig._supxlabel.get_text() and "search search" in fig._supxlabel.get_text()
        assert len(ax.get_legend().get_texts()) >= 3
    assert "nats" in metric_label(KL) and "fraction correct" in metric_label(ACC)


def test_seed_error_bars_and_chance_line(tmp_path):
    tr = Trials(SearchRun(make_search(tmp_path)))
    fig = plot_vs_step(tr, tr.acc, tmp_path / "acc.png")
    (ax,) = fig.axes
    chance = chance_level(ACC, ["piqa", "hellaswag"])
    assert chance == 0.375
    assert any(np.allclose(line.get_ydata(), chance) for line in ax.lines if line.get_linestyle() == ":")
    bars = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    segs = [s for c in bars for s in c.get_segments()]
    assert segs and all(abs((s[1][1] - s[0][1]) - 0.02) < 1e-9 for s in segs)  # ±1 seed SE of 0.01


def test_front_keeps_stopped_trials_apart_and_by_axis_uses_log_scale(tmp_path):
    tr = Trials(SearchRun(make_search(tmp_path)))
    fig = plot_front(tr, tmp_path / "front.png")
    final, milestone = fig.axes
    final_x = {round(float(x), 9) for c in final.collections for x in np.asarray(c.get_offsets())[:, 0]}
    s_at_50 = round(tr.at_step("S", 50.0)[KL], 9)
    assert s_at_50 not in final_x  # the stopped trial is not among the completed ones
    assert "milestone 50" in milestone.get_title() and "step 100" in final.get_title()
    fig, at = plot_by_axis(tr, tr.deg, tmp_path / "axis.png")
    assert at == 50.0  # the step every trial was evaluated at
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "weight_decay" in ax.get_xlabel()  # 0.001..0.1 spans 100x


def test_summary_gives_seeds_se_and_ci(tmp_path):
    text = write_report(make_search(tmp_path), tmp_path / "report").read_text()
    assert "| seeds |" in text.replace("seeds | fp", "seeds |")
    # two seeds: t(1) = 12.706; SE 0.001 -> half-width 0.0127
    assert "± 0.001 (95% CI" in text and "± 0.01 (95% CI" in text
    assert "**stopped** at 50" in text and "`done`" in text
    assert (tmp_path / "report" / "ptq-w8a8-vectorwise-kl_vs_step.png").exists()
