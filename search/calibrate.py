"""Calibrate the simulator's noise to the seed spread a study measured.

    rayq bench search --offline --calibrate-from DIR [DIR ...] [--seeds 200] [--json]

measures the study directories (`rayq search` outputs, e.g. studies/proxy/lr, contrast,
contrast-seed1: any number, one seed or recipe more per directory is fine), prints what it
measured, and runs the offline benchmark with the simulator's noise scaled to match; the output's
`calibration` key holds all of the below.

The simulator (`simulate.py`) speaks accuracy and degradation points of a 6B model at 75000 steps,
the proxy study nats of eval loss and KL of a 1.7M-parameter model at 3000. What carries over is
dimensionless: at a fraction f of training,

    r(f) = SD between the seeds of one recipe / SD between recipes (one seed each),

read on eval loss <-> accuracy and on log KL <-> degradation (`PAIRS`; the simulator reports KL as
0.02 exp(-deg/2), so its log KL is affine in the degradation and the two ratios are the same
number). Vector-wise W8A8 KL is fitted, the simulator's scheme; per-tensor KL (the replay's and
Gate B's metric) is measured beside it (`ALSO`) and not fitted.

Measured (`measure`): at each share of training in `SHARES`, the nearest evaluation step; where no
recipe has two seeds there (a seed stopped short), the latest earlier step where one has, reported
as `step` beside `requested_step` (the proxy's seed 1 ends at 2400 of 3000: its "100%" is 80%). The
seed SD is pooled over the recipes with >= 2 seeds at that step (`stopping.pooled_sd`, df =
sum(seeds - 1)); the recipe SD is over every recipe recorded there, its lowest seed (the simulated
searches run one seed per recipe too). An SD from 2-3 seeds is itself very uncertain: with df
degrees of freedom the 95% interval of sigma is sd * sqrt(df / chi2 quantiles), x[0.52, 6.3] at df 2
(2 recipes x 2 seeds), x[0.62, 2.45] at df 4 (2 x 3); `ratio_ci` is that interval, the recipe
spread taken as known. A bootstrap over 2-3 seeds has too few distinct resamples to say more.
Whatever else differs between two seeds' runs counts as seed spread here (a pair run on two machines
brings their numerics' difference along): if anything the ratio over-states seed noise alone.

Simulated (`simulated_ratios`): the same ratio of the simulator at the same fractions of its 75000
steps, by Monte Carlo over `SIM_SEEDS` seeds of each of the 11 recipes (seed SD pooled over the
recipes; recipe SD of one seed per recipe, root-mean-square over the seeds), at the noise scales
`K_GRID`.

Fit (`fit_scale`): per objective the scale k (`NoiseModel.acc_scale`, `.deg_scale`; seed_sd, eval_sd
and tau_sd keep their defaults, so the SHAPE over training stays the simulator's) minimising the
squared error of log r over the fractions, interpolated log-log on the grid. Its interval refits at
the chi-square ends of the smallest df among the fractions, moving all fractions together (they
share seeds: not independent evidence); None where that end is off the grid. `per_fraction` is the k
each fraction alone would give: it shows the shape. The simulator's ratio is about flat over
training (a per-seed offset that grows as the recipes' spread grows, plus a constant evaluation
noise), so it cannot follow a measured ratio that grows or shrinks; a single k is a compromise, and
`residual` (measured / simulated ratio at the fitted k, per fraction) says by how much. The
benchmark's dominance prior is the calibrated model's between-seed sd (`simulate.seed_sd`).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from rayq.errors import UserError
from rayq.search import replay, study
from rayq.search import simulate as sim
from rayq.search.results import finite
from rayq.search.stopping import Replicate, pooled_sd, summarise

__all__ = ["PAIRS", "ALSO", "SHARES", "measure", "simulated_ratios", "fit_scale", "calibrate", "model_of",
           "describe"]

# simulator objective -> (study metric, read in log): the pairs the scales are fitted on
PAIRS = {sim.ACC: ("eval/loss", False), sim.DEG: ("ptq/w8a8-vectorwise/kl", True)}
ALSO = (("ptq/w8a8-tensor/kl", True),)  # measured where recorded, not fitted
SHARES = (0.2, 0.5, 1.0)
# per recipe: the simulated seed SD then has 11 x 39 df, a sampling error of a few % where the
# measured one is uncertain by x0.5-6 (df 2); more seeds would only cost time
SIM_SEEDS = 40
SIM_GRAIN = 2500  # simulated fractions are read at multiples of this many of the 75000 steps
K_GRID = tuple(2.0 ** (np.arange(-6, 7) / 2))  # noise scales 0.125 .. 8, sqrt(2) apart
FIT_POINTS = 2001  # the log-k grid the interpolated error is minimised on
LEVEL = 0.95


def _value(v: float, log: bool) -> Optional[float]:
    if not math.isfinite(v) or (log and v <= 0):
        return None
    return math.log(v) if log else v


def _by_recipe(curves: dict, step: float, log: bool) -> dict[str, dict[float, float]]:
    """recipe -> seed -> its (log) value at `step`."""
    out: dict[str, dict[float, float]] = {}
    for (label, seed), curve in curves.items():
        v = _value(curve[step], log) if step in curve else None
        if v is not None:
            out.setdefault(label, {})[seed] = v
    return out


def sd_interval(df: int, level: float = LEVEL) -> tuple[float, float]:
    """Multipliers of a sample SD with `df` degrees of freedom giving the `level` interval of sigma
    (normal data: df s^2 / sigma^2 is chi-square with df)."""
    from scipy.special import chdtri  # the inverse survival function of chi-square

    tail = (1 - level) / 2
    return math.sqrt(df / chdtri(df, tail)), math.sqrt(df / chdtri(df, 1 - tail))


def measure(rows: Sequence[dict], metric: str, log: bool, shares: Sequence[float] = SHARES) -> dict:
    """The measured ratio of `metric` at each share of training (see the module docstring):
    {"metric", "log", "total_steps", "points": [...], "notes": [...]}."""
    curves = study.curves(rows, metric)
    steps = sorted({s for c in curves.values() for s in c})
    if not steps:
        raise UserError(f"calibrate: no {metric!r} evaluations in the study")
    total = steps[-1]
    every = math.gcd(*(int(s) for s in steps))
    paired = [s for s in steps if any(len(v) >= 2 for v in _by_recipe(curves, s, log).values())]
    points, notes, used = [], [], set()
    for share in shares:
        requested = max(every, round(share * total / every) * every)
        earlier = [s for s in paired if s <= requested]
        if not earlier:
            notes.append(f"share {share:g}: no recipe has 2 seeds at or before step {requested:g}")
            continue
        step = earlier[-1]
        if step in used:
            notes.append(f"share {share:g}: falls back to step {step:g}, already read for an earlier share")
            continue
        used.add(step)
        at = _by_recipe(curves, step, log)
        # the lowest seed of each recipe: one draw per recipe, as a simulated search sees them
        recipe_sd = float(np.std([seeds[min(seeds)] for seeds in at.values()], ddof=1)) if len(at) >= 2 else 0.0
        if not recipe_sd > 0:
            notes.append(f"share {share:g}: no spread between recipes at step {step:g} ({len(at)} recorded)")
            continue
        reps = [summarise([Replicate((v,), (math.nan,)) for v in seeds.values()])
                for seeds in at.values() if len(seeds) >= 2]
        (seed_sd,), (df,) = pooled_sd(reps)
        ratio = seed_sd / recipe_sd
        lo, hi = sd_interval(df)
        points.append({
            "share": share, "requested_step": requested, "step": step, "fraction": step / total,
            "seed_sd": seed_sd, "seed_df": df, "seeds": {lab: len(s) for lab, s in sorted(at.items()) if len(s) >= 2},
            "recipe_sd": recipe_sd, "recipes": len(at), "ratio": ratio, "ratio_ci": [ratio * lo, ratio * hi]})
    return {"metric": metric, "log": log, "total_steps": total, "points": points, "notes": notes}


def _sim_step(fraction: float) -> int:
    return max(SIM_GRAIN, round(fraction * sim.TOTAL_STEPS / SIM_GRAIN) * SIM_GRAIN)


@functools.lru_cache(maxsize=64)
def simulated_ratios(model: sim.NoiseModel, fractions: tuple[float, ...], n: int = SIM_SEEDS
                     ) -> dict[str, tuple[float, ...]]:
    """Simulator objective -> its ratio at each fraction under `model` (see the module docstring)."""
    steps = [_sim_step(f) for f in fractions]
    every = math.gcd(sim.TOTAL_STEPS, *steps)
    index = [s // every - 1 for s in steps]
    recipes = sim.paper_recipes()
    objectives = list(PAIRS)
    # values[recipe, seed, fraction, objective]; the seeds are those of simulate.seed_sd
    values = np.array([[[[rep[o] for o in objectives] for rep in (reps[i] for i in index)]
                        for reps in (sim.trial_reports(r, 10_000 + k, every=every, model=model) for k in range(n))]
                       for r in recipes])
    seed_sd = np.sqrt(values.var(axis=1, ddof=1).mean(axis=0))  # pooled over recipes (equal n)
    recipe_sd = np.sqrt(values.var(axis=0, ddof=1).mean(axis=0))  # one seed per recipe, RMS over seeds
    ratio = seed_sd / recipe_sd
    return {o: tuple(float(x) for x in ratio[:, j]) for j, o in enumerate(objectives)}


def _grid_table(fractions: tuple[float, ...], n: int) -> dict[str, np.ndarray]:
    """Simulator objective -> ratios [grid scale, fraction] over K_GRID (one scale for both
    objectives: each objective's noise depends on its own scale only)."""
    runs = [simulated_ratios(sim.NoiseModel(acc_scale=k, deg_scale=k), fractions, n) for k in K_GRID]
    return {o: np.array([r[o] for r in runs]) for o in PAIRS}


def fit_scale(targets: Sequence[float], grid: Sequence[float], table: np.ndarray,
              factor: Sequence[float] = (1.0, 1.0)) -> dict:
    """The scale k on `grid` (interpolated log-log) whose simulated ratios (`table[grid index,
    fraction]`) best match `targets` (least squares in log); `factor` scales the targets for the
    interval's ends. {"k", "k_ci", "per_fraction", "residual"}; a k at the grid's edge is None."""
    log_k = np.log(np.asarray(grid, dtype=float))
    fine = np.linspace(log_k[0], log_k[-1], FIT_POINTS)
    log_r = np.stack([np.interp(fine, log_k, np.log(table[:, j])) for j in range(table.shape[1])], axis=1)
    log_t = np.log(np.asarray(targets, dtype=float))

    def best(cols: Sequence[int], shift: float = 0.0) -> Optional[float]:
        err = ((log_r[:, cols] - (log_t[cols] + shift)) ** 2).sum(axis=1)
        i = int(np.argmin(err))
        return None if i in (0, FIT_POINTS - 1) else float(math.exp(fine[i]))

    every = list(range(len(log_t)))
    k = best(every)
    residual = None
    if k is not None:
        at = [float(np.interp(math.log(k), log_k, np.log(table[:, j]))) for j in every]
        residual = [float(math.exp(t - a)) for t, a in zip(log_t, at)]
    return {"k": k, "k_ci": [best(every, math.log(factor[0])), best(every, math.log(factor[1]))],
            "per_fraction": [best([j]) for j in every], "residual": residual}


def calibrate(dirs: Sequence[str | os.PathLike], shares: Sequence[float] = SHARES, n: int = SIM_SEEDS,
              progress: Optional[Callable[[str], None]] = None) -> dict:
    """Measure the study `dirs`, simulate the same ratios and fit the scales (the module docstring)."""
    rows = replay.load_rows(dirs, [m for m, _ in PAIRS.values()])
    measured = {o: measure(rows, m, log, shares) for o, (m, log) in PAIRS.items()}
    also = {}
    for m, log in ALSO:
        if any(finite(r.get(m)) for r in rows):
            also[m] = measure(rows, m, log, shares)
    fits: dict[str, Any] = {}
    for o, meas in measured.items():
        pts = meas["points"]
        if not pts:
            raise UserError(f"calibrate: {meas['metric']}: no step with a recipe of 2 seeds and 2 recipes "
                            f"({'; '.join(meas['notes'])})")
        fractions = tuple(p["fraction"] for p in pts)
        if progress:
            progress(f"calibrate: simulating {o} at fractions {', '.join(f'{f:.2f}' for f in fractions)} "
                     f"({len(K_GRID)} noise scales x 11 recipes x {n} seeds)")
        table = _grid_table(fractions, n)[o]
        df = min(p["seed_df"] for p in pts)
        fit = fit_scale([p["ratio"] for p in pts], K_GRID, table, sd_interval(df))
        default = simulated_ratios(sim.NOISE, fractions, n)[o]
        fits[o] = {"study_metric": meas["metric"], "fractions": list(fractions),
                   "simulated_steps": [_sim_step(f) for f in fractions], "simulated_at_default": list(default),
                   "ci_df": df, **fit}
        if fit["k"] is None:
            raise UserError(f"calibrate: {meas['metric']}: the measured ratios "
                            f"{[round(p['ratio'], 4) for p in pts]} need a noise scale outside "
                            f"{K_GRID[0]:g}-{K_GRID[-1]:g}x the simulator's")
    model = sim.NoiseModel(acc_scale=round(fits[sim.ACC]["k"], 3), deg_scale=round(fits[sim.DEG]["k"], 3))
    for o, fit in fits.items():
        fit["simulated_at_calibrated"] = list(simulated_ratios(model, tuple(fit["fractions"]), n)[o])
    return {"studies": [os.fspath(d) for d in dirs], "pairs": {o: {"metric": m, "log": log} for o, (m, log) in PAIRS.items()},
            "measured": measured, "measured_also": also, "fit": fits, "simulated_seeds": n,
            "noise_model": dict(model.__dict__), "interval": f"{LEVEL:.0%} chi-square interval of the seed SD "
            "(recipe spread taken as known); k_ci refits at it with the smallest df"}


def model_of(calibration: dict) -> sim.NoiseModel:
    return sim.NoiseModel(**calibration["noise_model"])


def describe(calibration: dict) -> list[str]:
    """What was measured and fitted, one line each (the CLI prints them on stderr)."""
    def num(x: Optional[float]) -> str:
        return "off-grid" if x is None else f"{x:.3g}"

    lines = []
    for group in (calibration["measured"], calibration["measured_also"]):
        for meas in group.values():
            name = f"{'log ' if meas['log'] else ''}{meas['metric']}"
            for p in meas["points"]:
                seeds = ", ".join(f"{n}" for n in p["seeds"].values())
                moved = "" if p["step"] == p["requested_step"] else f" (for {p['requested_step']:g})"
                lines.append(f"{name} @ {p['step']:g}/{meas['total_steps']:g}{moved}: "
                             f"seed sd {p['seed_sd']:.3g} (df {p['seed_df']}, seeds per paired recipe {seeds}) / "
                             f"recipe sd {p['recipe_sd']:.3g} ({p['recipes']} recipes) = {p['ratio']:.3g} "
                             f"[{p['ratio_ci'][0]:.3g}, {p['ratio_ci'][1]:.3g}]")
            lines += [f"{name}: {note}" for note in meas["notes"]]
    for o, fit in calibration["fit"].items():
        sim_at = ", ".join(f"{f:.2f}: {d:.3g} -> {c:.3g}" for f, d, c in
                           zip(fit["fractions"], fit["simulated_at_default"], fit["simulated_at_calibrated"]))
        lines.append(f"{o} <- {fit['study_metric']}: scale {num(fit['k'])} [{num(fit['k_ci'][0])}, "
                     f"{num(fit['k_ci'][1])}], per fraction {', '.join(num(k) for k in fit['per_fraction'])}; "
                     f"simulated ratio default -> calibrated {sim_at}")
    return lines
