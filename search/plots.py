"""The figures of `rayq report`: what a search measured, drawn so that it cannot be misread.

- Only evaluated steps are drawn. Trials report at every log step, and the trial driver carries
  the last objectives forward into reports where nothing was evaluated (Tune's strict metric
  check wants every objective in every report); those carried values are not measurements. A row
  is an evaluation of a metric when it carries that metric's between-seed SE (`<name>_seed_se`,
  which the driver computes only from fresh seed reports) or the held-out loss `eval/loss` (which
  the train loop reports only at eval steps); a table with neither column has no carried values.
- Each figure is named after the metric it shows (`<metric>_vs_step.png`), with units and the
  scale on its axes; seed means carry ±1 between-seed SE bars; accuracy has a chance line.
- Stopped trials are never drawn as rivals of completed ones: the front compares completed
  recipes at the final step, and a second panel shows every recipe at the milestone where the
  stop decisions were made.
- Every PNG is stamped with its search, config hash, schemes and tasks (`rayq.eval.plots.stamp`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rayq.errors import UserError
from rayq.eval.plots import figure, place_labels, save_png, stamp
from rayq.search import results as results_io
from rayq.search.export import CONFIG_PREFIX, SearchRun, _label, choose
from rayq.search.objectives import Direction, Objective
from rayq.search.objectives import as_float as _f
from rayq.search.pareto import ranks_of

__all__ = ["Trials", "metric_label", "chance_level", "evaluated_rows", "plot_file", "plot_front",
           "plot_vs_step", "plot_by_axis", "FRONT"]

FRONT = "pareto_front.png"
STYLE = {  # status -> (colour, marker, line style)
    "completed": ("C0", "o", "-"),
    "stopped": ("0.5", "s", "--"),
    "diverged": ("tab:red", "x", ":"),
    "incomplete": ("0.7", "^", ":"),
}
PALETTE = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9")  # no red or grey: those mean diverged / stopped
# Accuracy a model guessing uniformly gets: 1 / choices for multiple choice; no line for
# exact-match tasks (lambada-style last word), whose chance is ~0.
CHANCE = {"piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5, "copa": 0.5, "copa100": 0.5, "storycloze": 0.5,
          "heldout-cloze": 0.25, "lambada": 0.0, "heldout-lambada": 0.0}
EXACT_MATCH = {"lambada", "heldout-lambada"}


def plot_file(kind: str, metric: str) -> str:
    """`ptq/w8a8-vectorwise/kl`, "vs_step" -> `ptq-w8a8-vectorwise-kl_vs_step.png`."""
    return f"{re.sub(r'[^A-Za-z0-9.+-]+', '-', metric).strip('-')}_{kind}.png"


def metric_label(name: str) -> str:
    """An axis label with the metric's meaning and unit."""
    parts = name.split("/")
    if name == "fp/acc":
        return "FP accuracy, mean over tasks (fraction correct)"
    if parts[-1] == "acc" and parts[0] == "fp":
        return f"FP accuracy on {parts[1]} (fraction correct)"
    if parts[-1] == "acc" and parts[0] == "q":
        return f"{parts[1]} accuracy on {parts[2]} (fraction correct)"
    if parts[0] == "ptq" and len(parts) == 3:
        scheme, key = parts[1], parts[2]
        if key == "kl":
            return f"KL(FP ‖ {scheme}) per token (nats)"
        if key == "kl_se":
            return f"SE of KL(FP ‖ {scheme}) (nats)"
        if key.startswith("degradation_pct"):
            return f"{scheme} degradation, (Q − FP)/FP (%)"
    if name in ("train/loss", "eval/loss"):
        return f"{name} (nats/token)"
    return name


def chance_level(name: str, tasks: list[str]) -> Optional[float]:
    """Chance accuracy of an accuracy metric (None when unknown or ~0)."""
    parts = name.split("/")
    if parts[-1] != "acc":
        return None
    if name == "fp/acc" or (parts[0] == "q" and len(parts) == 3):
        picked = [t for t in tasks if t != "heldout-ppl"]
    else:
        picked = [parts[-2]]
    if not picked or any(t not in CHANCE for t in picked):
        return None
    level = float(np.mean([CHANCE[t] for t in picked]))
    return level if level > 0 else None


def _direction_note(o: Objective) -> str:
    return "higher is better" if o.direction is Direction.MAX else "lower is better"


def evaluated_rows(rows: list[dict], name: str, markers: tuple[str, ...]) -> list[dict]:
    """The rows of one trial where `name` was measured (see the module docstring); `markers` are
    the marker columns the whole table has."""
    out = []
    for r in rows:
        if not (math.isfinite(_f(r.get(name))) and math.isfinite(_f(r.get("step")))):
            continue
        if markers and not any(math.isfinite(_f(r.get(m))) for m in markers):
            continue  # a value carried forward from the last evaluation
        out.append(r)
    return out


EVALUATED = "eval/seconds"


class Trials:
    """A search as the figures see it: per trial its number, status and evaluated series."""

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
        present = {k for r in run.rows for k, v in r.items() if math.isfinite(_f(v))}
        # `eval/seconds` is reported by an evaluation only; the objectives and their seed SE are
        # carried forward between evaluations, so they mark evaluations only where it is absent
        self._markers = {o.name: (EVALUATED,) if EVALUATED in present else
                         tuple(m for m in (f"{o.name}_seed_se", "eval/loss") if m in present) for o in run.objectives}
        cfg = run.cfg
        self.stamp = (f"search {Path(run.dir).resolve().name} · config {_hash(cfg)} · "
                      f"schemes: {', '.join(cfg.eval.schemes) or 'none'} · tasks: {', '.join(cfg.eval.tasks)} · "
                      f"{cfg.search.seeds_per_recipe} seed(s) per recipe · {cfg.recipe.steps} steps")

    def status(self, t: str) -> str:
        return self.run.status[t]["status"]

    def label(self, t: str) -> str:
        return _label(self.run.status[t]["last"])

    def evaluations(self, t: str, name: str) -> list[dict]:
        markers = self._markers.get(name)
        if markers is None:
            present = [m for m in (EVALUATED, f"{name}_seed_se", "eval/loss")
                       if any(math.isfinite(_f(r.get(m))) for r in self.run.rows)]
            markers = (EVALUATED,) if EVALUATED in present else tuple(present)
        return evaluated_rows(self.rows[t], name, markers)

    def series(self, t: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(step, value, between-seed SE) at the steps where `name` was evaluated."""
        rows = self.evaluations(t, name)
        arr = np.array([(_f(r["step"]), _f(r[name]), _f(r.get(f"{name}_seed_se"))) for r in rows],
                       dtype=float).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2]

    def point(self, t: str) -> dict:
        """The row a trial is shown with: its last evaluation with every objective."""
        evals = [r for r in self.rows[t] if all(math.isfinite(o.value(r)) for o in self.run.objectives)]
        evals = [r for r in evals if all(r in self.evaluations(t, o.name) for o in self.run.objectives)] or evals
        return evals[-1] if evals else self.run.status[t]["last"]

    def at_step(self, t: str, step: float) -> Optional[dict]:
        """The trial's evaluation at exactly `step`, if it had one with every objective."""
        for r in self.evaluations(t, self.run.objectives[0].name):
            if _f(r.get("step")) == step and all(math.isfinite(o.value(r)) for o in self.run.objectives):
                return r
        return None


def _hash(cfg: Any) -> str:
    from rayq.config import config_hash

    return config_hash(cfg)


def _se(row: dict, name: str) -> float:
    se = _f(row.get(f"{name}_seed_se"))
    return se if math.isfinite(se) else 0.0


def _log_if_wide(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return v.size > 1 and bool((v > 0).all()) and v.max() / v.min() >= 10


# ----------------------------------------------------------------------------- the front


def _front_panel(tr: Trials, ax: Any, rows: dict[str, dict], title: str, stopped_here: set[str]) -> None:
    acc, deg = tr.acc, tr.deg
    pts, texts, seen = [], [], set()
    for t, r in rows.items():
        st = tr.status(t)
        x, y = deg.value(r), acc.value(r)
        if st == "completed" and not stopped_here:
            kind = "on the front" if t in tr.front else "dominated"
        elif t in stopped_here:
            kind = "stopped at this milestone"
        else:
            kind = st if st != "completed" else "continued (completed)"
        colour, marker, _ = STYLE[st]
        filled = kind in ("on the front", "stopped at this milestone") or st == "diverged"
        ax.errorbar([x], [y], xerr=[_se(r, deg.name)], yerr=[_se(r, acc.name)], fmt="none", ecolor=colour,
                    alpha=0.5, lw=1, capsize=2, zorder=2)
        kw = dict(marker=marker, s=60, zorder=3, label=None if kind in seen else kind)
        if marker == "x":
            ax.scatter([x], [y], c=colour, **kw)
        else:
            ax.scatter([x], [y], facecolors=colour if filled else "none", edgecolors=colour, linewidths=1.4, **kw)
        seen.add(kind)
        pts.append((x, y))
        texts.append(f"#{tr.number[t]}" + (" knee" if t == tr.knee and not stopped_here else ""))
    if not stopped_here:
        front = sorted((deg.value(rows[t]), acc.value(rows[t])) for t in tr.front if t in rows)
        if len(front) > 1:
            ax.plot(*zip(*front), color="C0", lw=1.2, zorder=1, label="Pareto front")
    for c in tr.run.constraints:
        if c.name == deg.name:
            ax.axvline(c.value, color="tab:orange", ls="--", lw=1, label=f"constraint {c}")
        elif c.name == acc.name:
            ax.axhline(c.value, color="tab:orange", ls="--", lw=1, label=f"constraint {c}")
    chance = chance_level(acc.name, list(tr.run.cfg.eval.tasks))
    if chance is not None:
        ax.axhline(chance, color="0.4", ls=":", lw=1, label=f"chance ({chance:g})")
    if _log_if_wide(np.array([p[0] for p in pts])):
        ax.set_xscale("log")
    ax.set_xlabel(f"{metric_label(deg.name)}\n{_direction_note(deg)}"
                  + (", log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(f"{metric_label(acc.name)}\n{_direction_note(acc)}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if pts:
        place_labels(ax, pts, texts, color="0.25")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def plot_front(tr: Trials, path: Path) -> Any:
    """Left: completed recipes at the final step and their front. Right (when the search has a
    milestone before the end): every recipe at the first milestone, where stops were decided."""
    steps = tr.run.cfg.recipe.steps
    milestone = next((m for m in tr.run.cfg.search.milestones if m < steps), None)
    at_m = {}
    if milestone is not None:
        at_m = {t: r for t in tr.ids if (r := tr.at_step(t, float(milestone))) is not None}
    fig = figure(13 if at_m else 7.5, 5.5)
    axes = fig.subplots(1, 2, sharey=True) if at_m else [fig.subplots()]
    done = {t: tr.point(t) for t in tr.ids if tr.status(t) == "completed"
            and all(math.isfinite(o.value(tr.point(t))) for o in tr.run.objectives)}
    _front_panel(tr, axes[0], done, f"completed recipes at step {steps}: Pareto front (±1 seed SE)", set())
    if at_m:
        stopped = {t for t in at_m if tr.status(t) == "stopped" and tr.run.status[t]["stopped_at"] == milestone}
        _front_panel(tr, axes[1], at_m, f"all recipes at milestone {milestone}, where stops were decided",
                     stopped)
    stamp(fig, tr.stamp + " · #n: trial number in summary.md")
    save_png(fig, path)
    return fig


# ----------------------------------------------------------------------------- vs step


def plot_vs_step(tr: Trials, obj: Objective, path: Path) -> Any:
    """One objective against step for every trial, at its evaluated steps only."""
    fig = figure(10, 5)
    ax = fig.subplots()
    values = []
    for n, t in enumerate(tr.ids):
        steps, vals, se = tr.series(t, obj.name)
        if steps.size == 0:
            continue
        st = tr.status(t)
        colour = PALETTE[n % len(PALETTE)] if st == "completed" else STYLE[st][0]
        where = f"stopped at {tr.run.status[t]['stopped_at']}" if st == "stopped" else st
        ax.errorbar(steps, vals, yerr=np.where(np.isfinite(se), se, 0.0), fmt=STYLE[st][2], color=colour,
                    marker="o", ms=4, lw=1.4, capsize=3, label=f"#{tr.number[t]} {tr.label(t)} ({where})")
        if st != "completed":
            ax.scatter(steps[-1:], vals[-1:], color=colour, marker=STYLE[st][1], s=60, zorder=3)
        values.extend(vals.tolist())
    for m in tr.run.cfg.search.milestones:
        ax.axvline(m, color="0.6", ls=":", lw=1)
        ax.annotate(f"milestone {m}", (m, 1), xycoords=("data", "axes fraction"), xytext=(3, -10),
                    textcoords="offset points", fontsize=7, color="0.4")
    chance = chance_level(obj.name, list(tr.run.cfg.eval.tasks))
    if chance is not None:
        ax.axhline(chance, color="0.4", ls=":", lw=1, label=f"chance ({chance:g})")
    log = _log_if_wide(np.array(values))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("training step (evaluated steps only)")
    ax.set_ylabel(f"{metric_label(obj.name)}\n{_direction_note(obj)}" + (", log scale" if log else ""))
    ax.set_title(f"{obj.name} vs step per trial\nseed mean ± 1 between-seed SE; dashed: stopped early", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    stamp(fig, tr.stamp)
    save_png(fig, path)
    return fig


# ----------------------------------------------------------------------------- per axis


def comparison(tr: Trials, name: str) -> tuple[Optional[float], dict[str, dict]]:
    """The step trials are compared at (the latest step every non-diverged trial was evaluated
    at), and each non-diverged trial's evaluation there (or its last)."""
    cand = [t for t in tr.ids if tr.status(t) != "diverged"]
    steps = [s for s in (set(tr.series(t, name)[0].tolist()) for t in cand) if s]
    common = set.intersection(*steps) if steps else set()
    at = max(common) if common else None
    out = {}
    for t in cand:
        rows = tr.evaluations(t, name)
        if rows:
            chosen = [r for r in rows if _f(r.get("step")) == at] if at is not None else []
            out[t] = (chosen or rows)[-1]
    return at, out


def _numeric(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def plot_by_axis(tr: Trials, obj: Objective, path: Path) -> tuple[Any, Optional[float]]:
    """`obj` per value of each searched `config/recipe.*` column, at one comparable step: mean ±
    SE over the trials with that value (a lone trial: its between-seed SE), trials as dots."""
    at, rows = comparison(tr, obj.name)

    def key(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    # a knob every compared trial shares (e.g. varied only by a diverged trial) shows nothing
    cols = [c for c in tr.config_cols if len({key(r.get(c)) for r in rows.values()}) >= 2]
    n = max(1, len(cols))
    ncol = min(3, n)
    nrow = math.ceil(n / ncol)
    fig = figure(5 * ncol, 4 * nrow + 0.6)
    when = f"at step {int(at)}" if at is not None else "at each trial's last evaluation"
    fig.suptitle(f"{obj.name} per value of each searched knob, {when}\n"
                 "black: mean ± SE over trials (n = trials; a lone trial shows its between-seed SE)", fontsize=10)
    if not cols:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no searched knob took two values among the compared trials", ha="center", va="center")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel()) if cols else []
    for ax in list(axes)[len(cols):]:
        ax.set_visible(False)
    for ax, col in zip(axes, cols):
        groups: dict[Any, list[str]] = {}
        for t, r in rows.items():
            groups.setdefault(key(r.get(col)), []).append(t)
        keys = sorted(groups, key=lambda v: (v is not None, isinstance(v, str), v if v is not None else 0))
        # a numeric axis only for a knob with a range (a two-value or 0/1 knob reads as categories);
        # log when its positive values span 10x or more (weight decay, learning rate)
        numeric = all(_numeric(v) for v in keys) and len(keys) > 1
        log = numeric and _log_if_wide(np.array(keys, dtype=float))
        numeric = numeric and (log or len(keys) >= 3)
        for i, v in enumerate(keys):
            vals = np.array([_f(rows[t].get(obj.name)) for t in groups[v]])
            x = v if numeric else i
            spread = (np.arange(len(vals)) - (len(vals) - 1) / 2) * 0.06  # jitter so dots do not hide
            if log:
                xs = x * 10 ** (spread * 0.5)
            elif numeric:
                xs = x + spread * (max(keys) - min(keys)) / len(keys)
            else:
                xs = i + spread
            for t, xi, yi in zip(groups[v], xs, vals):
                st = tr.status(t)
                ax.scatter([xi], [yi], color=STYLE[st][0], marker=STYLE[st][1], s=20, alpha=0.8, zorder=2)
            se = vals.std(ddof=1) / math.sqrt(len(vals)) if len(vals) >= 2 else _f(rows[groups[v][0]].get(
                f"{obj.name}_seed_se"))
            ax.errorbar([x], [vals.mean()], yerr=[se] if math.isfinite(se) else None, fmt="D", color="black",
                        ms=5, capsize=4, zorder=3)
            ax.annotate(f"n={len(vals)}", (x, vals.mean()), xytext=(7, -3), textcoords="offset points",
                        fontsize=7, color="0.3")
        if not numeric:
            ax.set_xticks(range(len(keys)), ["null" if v is None else f"{v:g}" if _numeric(v) else str(v)
                                             for v in keys])
        elif log:
            ax.set_xscale("log")
        knob = col[len(CONFIG_PREFIX):]
        ax.set_xlabel(knob + (" (log scale)" if log else ""))
        ax.set_ylabel(metric_label(obj.name))
        ax.grid(alpha=0.3)
    if cols:
        handles = [axes[0].scatter([], [], color=STYLE[s][0], marker=STYLE[s][1], label=s)
                   for s in ("completed", "stopped", "incomplete") if any(tr.status(t) == s for t in rows)]
        fig.legend(handles=handles, loc="outside lower right", fontsize=7, ncols=len(handles) or 1)
    stamp(fig, tr.stamp)
    save_png(fig, path)
    return fig, at
