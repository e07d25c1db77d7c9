"""`rayq report DIR --out REPORT`: PNG plots and a Markdown summary of a search.

Figures (drawn by `rayq.search.plots`, each named after the metric it shows):
- `pareto_front.png`: the first maximize objective ("accuracy") against the first minimize one
  ("degradation"): completed recipes at the final step with their front, and beside them every
  recipe at the first milestone, where the stop decisions were made (so a stopped trial's
  early point never sits among final ones).
- `<objective>_vs_step.png`, one per objective: its value at every evaluated step of every trial,
  ±1 between-seed SE, milestones marked (the paper's Figure 3, right, when the objective is KL
  or degradation).
- `<degradation objective>_by_axis.png`: that objective per value of each searched recipe knob at
  one step every non-diverged trial was evaluated at (the paper's Figure 2).
- `summary.md`: every trial (status, where it stopped, recipe values, seeds, each objective ± its
  between-seed SE with a 95% t-interval) and the front, with links to the PNGs.

Status words are rayq's (`results.trial_status`, from the scheduler's decisions), not Tune's:
Tune ends both a stopped and a completed trial as TERMINATED, and its `done` flag (a column of
results.parquet) is True on the report where the scheduler stopped a trial and False on a
completed trial's last report (Tune adds done=True to its own copy of that result only), so
`done` must not be read as "finished".
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from rayq.config import atomic_write_text, config_hash
from rayq.search.export import CONFIG_PREFIX, SearchRun, _label
from rayq.search.objectives import Direction
from rayq.search.objectives import as_float as _f
from rayq.search.plots import FRONT, Trials, plot_by_axis, plot_file, plot_front, plot_vs_step

__all__ = ["write_report", "report_files", "SUMMARY"]

SUMMARY = "summary.md"
# two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1); beyond the table, the
# nearest smaller entry (a slightly wider, conservative interval)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def _t95(df: int) -> float:
    return _T95[max(k for k in _T95 if k <= df)]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def report_files(run: SearchRun) -> dict[str, str]:
    """key -> PNG file name of the figures a search gets (see the module docstring)."""
    acc, deg = run.first(Direction.MAX), run.first(Direction.MIN)
    files: dict[str, str] = {}
    if acc is not None and deg is not None:
        files["front"] = FRONT
    for o in run.objectives:
        files[f"steps:{o.name}"] = plot_file("vs_step", o.name)
    if deg is not None:
        files["axes"] = plot_file("by_axis", deg.name)
    return files


# ----------------------------------------------------------------------------- (d) summary


def _cfg(v: Any) -> str:
    """A recipe value in a table: a null (grad_clip: null = no clipping) is a value, not a gap."""
    return "null" if v is None or (isinstance(v, float) and math.isnan(v)) else _fmt(v)


def _table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in line) + " |" for line in lines]
    return "\n".join(out)


def _status_cell(tr: Trials, t: str) -> str:
    s = tr.run.status[t]
    st = s["status"]
    if st == "stopped":
        at = s["stopped_at"]
        return f"**stopped** at {int(at) if at is not None else '?'}"
    if st == "diverged":
        return "**diverged**"
    if st == "completed" and t not in {r["trial_id"] for r in tr.run.completed}:
        return "completed (infeasible)"
    return st + (" ★ front" if t in tr.front else "") + (" (knee)" if t == tr.knee else "")


def _estimate(row: Mapping[str, Any], name: str) -> str:
    """`value ± SE (95% CI lo–hi, n seeds)`: the seed mean, its between-seed SE and a t-interval;
    one seed has no SE. An item-bootstrap CI the evaluator reported (`<name>_ci_low/_ci_high`,
    averaged over seeds) is added as such."""
    v = _f(row.get(name))
    if not math.isfinite(v):
        return "–"
    n = int(_f(row.get("seeds"))) if math.isfinite(_f(row.get("seeds"))) else 1
    se = _f(row.get(f"{name}_seed_se"))
    out = f"{v:.4g}"
    if n >= 2 and math.isfinite(se):
        h = _t95(n - 1) * se
        out += f" ± {se:.2g} (95% CI {v - h:.4g} – {v + h:.4g})"
    else:
        out += " (1 seed: no SE)"
    lo, hi = _f(row.get(f"{name}_ci_low")), _f(row.get(f"{name}_ci_high"))
    if math.isfinite(lo) and math.isfinite(hi):
        out += f"; item-bootstrap CI {lo:.4g} – {hi:.4g}"
    return out


def _done_note(tr: Trials) -> Optional[str]:
    """Where Tune's `done` flag and rayq's status disagree in a way the docstring does not explain."""
    odd = []
    for t in tr.ids:
        flagged = any((_f(r.get("done")) or 0) >= 1 for r in tr.rows[t] if math.isfinite(_f(r.get("done"))))
        st = tr.status(t)
        if flagged and st in ("completed", "incomplete"):
            odd.append(f"#{tr.number[t]} ({st})")
    if odd:
        return ("Tune's `done` flag is set for trials rayq does not count as stopped: " + ", ".join(odd)
                + " (a stop after the last milestone, or a Tune stopper): check scheduler_state.json.")
    return None


def _summary(tr: Trials, plots: Mapping[str, str], notes: Sequence[str], compared_at: Optional[float]) -> str:
    run = tr.run
    names = [o.name for o in run.objectives]
    cols = tr.config_cols
    short = [c[len(CONFIG_PREFIX + "recipe."):] for c in cols]
    counts: dict[str, int] = {}
    for t in tr.ids:
        counts[tr.status(t)] = counts.get(tr.status(t), 0) + 1
    parts = [
        "# rayq search report", "",
        f"- search: `{os.path.abspath(run.dir)}` (config hash `{config_hash(run.cfg)}`)",
        f"- objectives: {', '.join(f'`{o}`' for o in run.objectives)}"
        + (f"; constraints: {', '.join(f'`{c}`' for c in run.constraints)}" if run.constraints else ""),
        f"- eval: schemes {', '.join(run.cfg.eval.schemes) or 'none'}; tasks {', '.join(run.cfg.eval.tasks)}",
        f"- steps: {run.cfg.recipe.steps}; milestones: {', '.join(map(str, run.cfg.search.milestones))}; "
        f"eta: {run.cfg.search.eta:g}; seeds per recipe: {run.cfg.search.seeds_per_recipe}",
        f"- trials: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}",
        "",
        "Values are seed means ± their between-seed standard error, with a 95% Student-t interval "
        "over the seeds (`seeds` is how many seeds reported that step).",
        "", "## Pareto front of completed recipes", "",
    ]
    front = sorted(tr.front, key=lambda t: tr.number[t])
    if front:
        parts.append(_table(["#", "trial", "label", *short, "seeds", *names],
                            [[tr.number[t], t, _label(tr.point(t)), *[_cfg(tr.point(t).get(c)) for c in cols],
                              _seeds(tr.point(t)), *[_estimate(tr.point(t), n) for n in names]] for t in front]))
    else:
        parts.append("No completed recipe: the front is empty.")
    parts += ["", "## All trials", "",
              "Objectives are each trial's last evaluated values; a stopped trial's are those at the "
              "milestone where it was stopped, so they are not comparable with completed ones.", ""]
    lines = []
    for t in tr.ids:
        s, p = run.status[t], tr.point(t)
        lines.append([tr.number[t], t, _status_cell(tr, t), tr.rank.get(t), p.get("step"),
                      *[_cfg(p.get(c)) for c in cols], _seeds(p), *[_estimate(p, n) for n in names],
                      s.get("reason")])
    parts.append(_table(["#", "trial", "status", "pareto rank", "step", *short, "seeds", *names, "reason"], lines))
    parts += ["", "## Plots", ""]
    for key, file in plots.items():
        if key == "front":
            caption = "Pareto front (completed recipes) and the recipes at the first milestone"
        elif key.startswith("steps:"):
            caption = f"`{key[6:]}` vs step, evaluated steps only"
        else:
            caption = f"`{tr.deg.name}` per value of each searched knob (Figure 2)" + (
                f", compared at step {int(compared_at)}" if compared_at is not None else ", at each trial's last eval")
        parts += [f"### {caption}", "", f"![{caption.replace('`', '')}]({file})", ""]
    parts += ["## Notes", "", *[f"- {n}" for n in notes],
              "- Status is rayq's (from scheduler_state.json). Tune ends stopped and completed trials alike as "
              "TERMINATED; results.parquet's `done` column is Tune's flag: 1 on the report where the scheduler "
              "stopped a trial, 0 on a completed trial's last report.", ""]
    return "\n".join(parts) + "\n"


def _seeds(row: Mapping[str, Any]) -> str:
    n = _f(row.get("seeds"))
    return str(int(n)) if math.isfinite(n) else "1"


def write_report(search_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Draw the plots and write `summary.md` into `out_dir`; return the summary's path."""
    run = SearchRun(search_dir)  # UserError when DIR holds no results or no config
    tr = Trials(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = report_files(run)
    notes: list[str] = []
    compared_at = None
    if "front" in files:
        plot_front(tr, out / files["front"])
    else:
        notes.append("no Pareto plot: it needs one maximize (accuracy) and one minimize (degradation) objective")
    for o in run.objectives:
        plot_vs_step(tr, o, out / files[f"steps:{o.name}"])
    if "axes" in files:
        _, compared_at = plot_by_axis(tr, tr.deg, out / files["axes"])
    else:
        notes.append("no per-knob plot: search.objectives has no minimize (degradation) objective")
    if (note := _done_note(tr)) is not None:
        notes.append(note)
    path = out / SUMMARY
    atomic_write_text(path, _summary(tr, files, notes, compared_at))
    return path
