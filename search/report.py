"""`rayq report DIR --out REPORT`: PNG plots and a Markdown summary of a search.

- `pareto_front.png`: accuracy vs degradation. Completed trials in colour (the front filled and
  connected), early-stopped trials apart in grey squares labelled with the milestone where they
  stopped, diverged ones as red x (at their last finite objectives; those without any are counted
  in the legend), unfinished ones as grey triangles.
- `degradation_vs_step.png`: degradation (and accuracy) against step for every trial, the paper's
  Figure 3 (right); milestones as dotted lines, between-seed SE as a band where reported.
- `degradation_by_axis.png`: degradation per value of each searched `config/recipe.*` column, the
  paper's Figure 2: mean over trials ± standard error across them (a lone trial shows its
  between-seed SE). Trials are compared at one step, the latest step every non-diverged trial
  was evaluated at (typically the first milestone): comparing a stopped trial's value at 15k
  with a completed one's at 75k would confound the recipe with training length.
- `summary.md`: every trial (status, where it stopped, recipe values, objectives) and the front,
  with links to the PNGs.

"Accuracy" is the first maximize objective of `search.objectives`, "degradation" the first
minimize one; a plot that needs one the search does not have is left out and the summary says so.
Matplotlib is used through `Figure` objects only (the Agg canvas, no pyplot), so drawing changes
no global backend state and is safe off the main thread. Every file is written atomically.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from rayq.config import atomic_write_bytes, atomic_write_text, config_hash
from rayq.errors import UserError
from rayq.search import results as results_io
from rayq.search.export import CONFIG_PREFIX, SearchRun, _label, choose
from rayq.search.objectives import Direction, Objective
from rayq.search.objectives import as_float as _f
from rayq.search.pareto import ranks_of

__all__ = ["write_report", "PLOTS", "SUMMARY"]

SUMMARY = "summary.md"
PLOTS = {"front": "pareto_front.png", "steps": "degradation_vs_step.png", "axes": "degradation_by_axis.png"}
_STYLE = {  # status -> (colour, marker)
    "completed": ("C0", "o"),
    "stopped": ("0.55", "s"),
    "diverged": ("tab:red", "x"),
    "incomplete": ("0.7", "^"),
}


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _save(fig: Any, path: Path) -> None:
    """savefig into memory, then an atomic write (readers never see half a PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # Agg canvas by default when saving; no pyplot state

    return Figure(figsize=(width, height))


class _Trials:
    """Per trial: number, status, its rows, and the point it is plotted at."""

    def __init__(self, run: SearchRun):
        self.run = run
        self.acc = run.first(Direction.MAX)
        self.deg = run.first(Direction.MIN)
        self.ids = sorted(run.status, key=str)
        self.number = {t: i + 1 for i, t in enumerate(self.ids)}
        self.rows = {t: run.trial_rows(t) for t in self.ids}
        front = results_io.front_rows(run.rows, run.decisions, run.cfg.recipe.steps, run.objectives,
                                      run.constraints)
        self.front = {r["trial_id"] for r in front}
        ranks = ranks_of(run.completed, run.objectives) if run.completed else []
        self.rank = {r["trial_id"]: k for r, k in zip(run.completed, ranks)}
        try:  # the recipe `rayq export` picks by default, marked in the plot and the tables
            self.knee = run.completed[choose(run.completed, run.objectives)[0][0]]["trial_id"]
        except UserError:
            self.knee = None
        self.config_cols = sorted({k for r in run.rows for k in r if k.startswith(CONFIG_PREFIX + "recipe.")})

    def status(self, t: str) -> str:
        return self.run.status[t]["status"]

    def point(self, t: str) -> dict:
        """The row a trial is shown with: its last report (as the front uses) when it has every
        objective, else its last report that does (a stopped or diverged trial's last eval)."""
        last = self.run.status[t]["last"]
        if all(math.isfinite(o.value(last)) for o in self.run.objectives):
            return last
        for r in reversed(self.rows[t]):
            if all(math.isfinite(o.value(r)) for o in self.run.objectives):
                return r
        return last

    def series(self, t: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(step, value, seed SE) of a metric over a trial's reports where it is finite."""
        pts = [(_f(r.get("step")), _f(r.get(name)), _f(r.get(f"{name}_seed_se"))) for r in self.rows[t]]
        pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
        arr = np.array(pts, dtype=float).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2]


def _axis_label(o: Objective) -> str:
    return f"{o.name} ({'higher' if o.direction is Direction.MAX else 'lower'} is better)"


# ----------------------------------------------------------------------------- (a) the front


def _plot_front(tr: _Trials, path: Path) -> None:
    acc, deg = tr.acc, tr.deg
    fig = _figure(7.5, 5.5)
    ax = fig.add_subplot()
    seen: set[str] = set()
    no_objectives = 0
    for t in tr.ids:
        st = tr.status(t)
        p = tr.point(t)
        x, y = deg.value(p), acc.value(p)
        if not (math.isfinite(x) and math.isfinite(y)):
            no_objectives += st == "diverged"
            continue
        colour, marker = _STYLE[st]
        on_front = t in tr.front
        label = {"completed": "completed (on the front)" if on_front else "completed (dominated)",
                 "stopped": "stopped early", "diverged": "diverged", "incomplete": "unfinished"}[st]
        face = colour if (on_front or st in ("stopped",)) else "none"
        kw = dict(marker=marker, s=70 if on_front else 45, zorder=3, label=None if label in seen else label)
        if marker == "x":
            ax.scatter([x], [y], c=colour, **kw)
        else:
            ax.scatter([x], [y], facecolors=face, edgecolors=colour, linewidths=1.4, **kw)
        seen.add(label)
        note = f"#{tr.number[t]}" + (" knee" if t == tr.knee else "")
        if st == "stopped":
            at = tr.run.status[t]["stopped_at"]
            note += f" stop@{int(at) if at is not None else '?'}"
        ax.annotate(note, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8,
                    color="0.35" if st != "completed" else "black")
    front = sorted(((deg.value(tr.point(t)), acc.value(tr.point(t))) for t in tr.front))
    if len(front) > 1:
        ax.plot(*zip(*front), color="C0", lw=1.2, zorder=2)
    for c in tr.run.constraints:  # a constraint on a plotted metric is a line the front must respect
        if c.name == deg.name:
            ax.axvline(c.value, color="tab:orange", ls="--", lw=1, label=f"constraint {c}")
        elif c.name == acc.name:
            ax.axhline(c.value, color="tab:orange", ls="--", lw=1, label=f"constraint {c}")
    if no_objectives:
        ax.plot([], [], " ", label=f"{no_objectives} diverged before any eval (not shown)")
    ax.set_xlabel(_axis_label(deg))
    ax.set_ylabel(_axis_label(acc))
    ax.set_title("Pareto front of completed recipes (#n: trial number in summary.md)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    _save(fig, path)


# ----------------------------------------------------------------------------- (b) vs step


def _plot_steps(tr: _Trials, path: Path) -> None:
    metrics = [o for o in (tr.deg, tr.acc) if o is not None]
    fig = _figure(7.5 * len(metrics), 5)
    for k, obj in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for n, t in enumerate(tr.ids):
            steps, vals, se = tr.series(t, obj.name)
            if steps.size == 0:
                continue
            st = tr.status(t)
            colour = f"C{n % 10}" if st == "completed" else _STYLE[st][0]
            style = {"completed": "-", "stopped": "--", "diverged": ":", "incomplete": ":"}[st]
            ax.plot(steps, vals, style, color=colour, lw=1.4, marker=".", label=f"#{tr.number[t]} {_label(tr.run.status[t]['last'])} ({st})")
            if st == "completed" and np.isfinite(se).all() and (se > 0).any():
                ax.fill_between(steps, vals - se, vals + se, color=colour, alpha=0.15, lw=0)
            if st != "completed":
                ax.scatter(steps[-1:], vals[-1:], color=colour, marker=_STYLE[st][1], s=50, zorder=3)
        for m in tr.run.cfg.search.milestones:
            ax.axvline(m, color="0.6", ls=":", lw=1)
        ax.set_xlabel("step (dotted: milestones)")
        ax.set_ylabel(_axis_label(obj))
        ax.grid(alpha=0.3)
        if k == 0:
            ax.set_title(f"{obj.name} vs step per trial (dashed: stopped early)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
    _save(fig, path)


# ----------------------------------------------------------------------------- (c) per axis


def _comparison(tr: _Trials) -> tuple[Optional[float], dict[str, dict]]:
    """The step trials are compared at, and each non-diverged trial's row there (or its last)."""
    name = tr.deg.name
    cand = [t for t in tr.ids if tr.status(t) != "diverged"]
    steps = [set(tr.series(t, name)[0].tolist()) for t in cand]
    steps = [s for s in steps if s]
    common = set.intersection(*steps) if steps else set()
    at = max(common) if common else None
    out = {}
    for t in cand:
        rows = [r for r in tr.rows[t] if math.isfinite(_f(r.get(name)))]
        if not rows:
            continue
        chosen = [r for r in rows if _f(r.get("step")) == at] if at is not None else []
        out[t] = (chosen or rows)[-1]
    return at, out


def _plot_axes(tr: _Trials, path: Path) -> Optional[float]:
    name = tr.deg.name
    at, rows = _comparison(tr)
    cols = tr.config_cols
    n = max(1, len(cols))
    ncol = min(3, n)
    nrow = math.ceil(n / ncol)
    fig = _figure(4.8 * ncol, 3.8 * nrow)
    when = f"at step {int(at)}" if at is not None else "at each trial's last eval"
    fig.suptitle(f"{name} per value of each searched axis, {when} "
                 "(mean ± SE over trials; a lone trial: its between-seed SE)")
    if not cols:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no searched recipe column in results.parquet", ha="center", va="center")
    for k, col in enumerate(cols):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        groups: dict[Any, list[str]] = {}
        for t, r in rows.items():
            v = r.get(col)
            v = None if isinstance(v, float) and math.isnan(v) else v
            groups.setdefault(v, []).append(t)
        keys = sorted(groups, key=lambda v: (v is not None, isinstance(v, str), v if v is not None else 0))
        numeric = [v for v in keys if isinstance(v, float)]
        categorical = len(keys) <= 6 or len(numeric) < len(keys)
        for i, v in enumerate(keys):
            vals = np.array([_f(rows[t].get(name)) for t in groups[v]])
            x = i if categorical else v
            colours = [_STYLE[tr.status(t)][0] if tr.status(t) != "completed" else "C0" for t in groups[v]]
            jitter = (np.arange(len(vals)) - (len(vals) - 1) / 2) * 0.06 if categorical else 0.0
            ax.scatter(x + jitter, vals, c=colours, s=18, alpha=0.7, zorder=2)
            if len(vals) >= 2:
                se = vals.std(ddof=1) / math.sqrt(len(vals))
            else:  # one trial: its between-seed SE, if it had seeds
                se = _f(rows[groups[v][0]].get(f"{name}_seed_se"))
            ax.errorbar([x], [vals.mean()], yerr=[se] if math.isfinite(se) else None, fmt="D", color="black",
                        ms=5, capsize=4, zorder=3)
            if categorical:
                ax.annotate(f"n={len(vals)}", (x, vals.mean()), xytext=(8, -3), textcoords="offset points",
                            fontsize=7, color="0.3")
        if categorical:
            ax.set_xticks(range(len(keys)), ["none" if v is None else _fmt(v) for v in keys])
        elif numeric and min(numeric) > 0 and max(numeric) / min(numeric) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(col[len(CONFIG_PREFIX):])
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    _save(fig, path)
    return at


# ----------------------------------------------------------------------------- (d) summary


def _cfg(v: Any) -> str:
    """A recipe value in a table: a null (grad_clip: null = no clipping) is a value, not a gap."""
    return "null" if v is None or (isinstance(v, float) and math.isnan(v)) else _fmt(v)


def _table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in line) + " |" for line in lines]
    return "\n".join(out)


def _status_cell(tr: _Trials, t: str) -> str:
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


def _summary(tr: _Trials, plots: Mapping[str, str], notes: Sequence[str], compared_at: Optional[float]) -> str:
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
        f"- steps: {run.cfg.recipe.steps}; milestones: {', '.join(map(str, run.cfg.search.milestones))}; "
        f"eta: {run.cfg.search.eta:g}",
        f"- trials: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}",
        "", "## Pareto front of completed recipes", "",
    ]
    front = sorted(tr.front, key=lambda t: tr.number[t])
    if front:
        parts.append(_table(["#", "trial", "label", *short, *names],
                            [[tr.number[t], t, _label(tr.point(t)), *[_cfg(tr.point(t).get(c)) for c in cols],
                              *[tr.point(t).get(n) for n in names]] for t in front]))
    else:
        parts.append("No completed recipe: the front is empty.")
    parts += ["", "## All trials", "",
              "Objectives are each trial's last evaluated values; a stopped trial's are those at the "
              "milestone where it was stopped, so they are not comparable with completed ones.", ""]
    lines = []
    for t in tr.ids:
        s, p = run.status[t], tr.point(t)
        lines.append([tr.number[t], t, _status_cell(tr, t), tr.rank.get(t), p.get("step"),
                      *[_cfg(p.get(c)) for c in cols], *[p.get(n) for n in names], s.get("reason")])
    parts.append(_table(["#", "trial", "status", "pareto rank", "step", *short, *names, "reason"], lines))
    parts += ["", "## Plots", ""]
    captions = {"front": "Pareto front", "steps": "Degradation vs step (Figure 3, right)",
                "axes": "Degradation per axis value (Figure 2)"}
    for key, file in plots.items():
        extra = ""
        if key == "axes":
            extra = f" — compared at step {int(compared_at)}" if compared_at is not None else " — at each trial's last eval"
        parts += [f"### {captions[key]}{extra}", "", f"![{captions[key]}]({file})", ""]
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts) + "\n"


def write_report(search_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Draw the plots and write `summary.md` into `out_dir`; return the summary's path."""
    run = SearchRun(search_dir)  # UserError when DIR holds no results or no config
    tr = _Trials(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    notes: list[str] = []
    compared_at = None
    if tr.acc is not None and tr.deg is not None:
        _plot_front(tr, out / PLOTS["front"])
        plots["front"] = PLOTS["front"]
    else:
        notes.append("no Pareto plot: it needs one maximize (accuracy) and one minimize (degradation) objective")
    if tr.deg is not None:
        _plot_steps(tr, out / PLOTS["steps"])
        plots["steps"] = PLOTS["steps"]
        compared_at = _plot_axes(tr, out / PLOTS["axes"])
        plots["axes"] = PLOTS["axes"]
    else:
        notes.append("no degradation plots: search.objectives has no minimize objective")
    path = out / SUMMARY
    atomic_write_text(path, _summary(tr, plots, notes, compared_at))
    return path
