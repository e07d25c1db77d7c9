"""The search simulator: synthetic learning curves calibrated to the paper, run through Ray Tune.

Multi-objective schedulers are judged on many searches, which real 6B training cannot afford
(Syne Tune's simulator backend replays tabulated curves for the same reason). Here a Tune
*function trainable* with no model reports, every 5000 "steps" of a 75000-step run, the metrics a
real trial reports; there is no sleeping (virtual time: one report per Tune round trip). The
same curves drive the Ray-free lockstep loop of `offline.py`, the benchmark's figure.

Calibration (Ahmadian et al. 2023, Table A.3, `PAPER_A3` below; the 13 rows are 11 recipes):
- final FP accuracy (average over the 8 tasks) and final degradation (the "Average % Diff"
  column, INT8 vs FP, negative = worse) of each recipe are the table's values at step 75000;
- FP accuracy rises from ~chance along a log curve, `acc(t) = C + (A - C) g(t)/g(T)` with
  `g(t) = log(1 + t/tau)`, tau = 2000 steps x (1 + dropout) (dropout slows learning);
- degradation grows with steps and is visible by 15000 (the paper's Figure 3):
  `deg(t) = D s(t)`, `s(t) = (1 - exp(-t/15000)) / (1 - exp(-T/15000))`, so s(15000) = 0.64;
- noise, per trial (a seed), the parameters of `NoiseModel` (defaults `NOISE`): a persistent
  offset (`seed_sd` 0.15 points on accuracy and on degradation, scaled by the curve), a per-trial
  jitter of the curve's time constant (`tau_sd` 10% in log), and per-report evaluation noise
  (`eval_sd` 0.10 points each). The paper ran each recipe once, so its seed spread is unknown;
  these are of the order of the table's smallest gaps between recipes, which is what makes
  ranking them non-trivial. `noise` scales all of it (the benchmark sweeps 0.25x-2x), and
  `acc_scale` / `deg_scale` each objective's share. The defaults are guesses; `calibrate.py`
  derives the two scales from the seed spread a study measured (`rayq bench search --offline
  --calibrate-from DIR...`).
- late re-ranking (`late`, off by default): a recipe's degradation may grow during the LR decay
  (PTQ error is reported to jump when the LR decays). With `late = L`, the recipe's degradation
  follows a curve ending L points BETTER than its table value until 60% of training, and the
  missing L arrives over the last 40% (quadratically): the final value, and so the truth, stays
  the table's, but early measurements flatter it. The offline benchmark applies it to a random
  third of the recipes per search.
- `ptq/<scheme>/kl` is reported as a monotone function of the measured degradation
  (0.02 exp(-deg/2)), so `kl:min` ranks exactly as `degradation_pct:max`.

"True best" (documented in bench.py too): the noise-free Pareto front of (final accuracy max,
final degradation max) is {wd=0.001 gc=none, wd=0.1 gc=none, the bf16 wd=0.1 gc=1.0 control,
bf16 wd=0.01 gc=1.0}; its knee (closest to the utopia point after min-max scaling over the
front) is the paper's control recipe (bf16, weight decay 0.1, clipping 1.0, no dropout) — the
recipe the paper recommends. A search "recovers the true best" when its final front (over
completed, never-stopped trials) contains the knee; containing any true-front recipe is
reported beside it.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from rayq.search.objectives import parse_objectives
from rayq.search.pareto import pareto_front, select_top
from rayq.search.space import paper_axes_variants, recipe_label

__all__ = [
    "PAPER_A3",
    "SimRecipe",
    "paper_recipes",
    "true_front",
    "knee",
    "paper_truth",
    "front_of",
    "knee_of",
    "true_hv",
    "score_against",
    "score_search",
    "trial_reports",
    "simulated_trainable",
    "OBJECTIVES",
    "SCHEME",
    "TOTAL_STEPS",
    "REPORT_EVERY",
    "NoiseModel",
    "NOISE",
    "seed_sd",
]

# (variant, FP average, Average % Diff) of Table A.3 (shared/reference/paper_table_a3.json)
PAPER_A3: tuple[tuple[str, float, float], ...] = (
    ("wd=0.1 (gc=none)", 65.99, -0.09),
    ("wd=0.01 (gc=none)", 65.92, -0.26),
    ("wd=0.001 (gc=none)", 66.21, -1.36),
    ("dtype=bf16 (wd=0.1)", 65.93, 0.32),
    ("dtype=fp16 (wd=0.1)", 64.89, -0.76),
    ("dtype=bf16 (wd=0.01)", 65.42, 0.77),
    ("dtype=fp16 (wd=0.01)", 64.91, -1.73),
    ("gc=1.0 (wd=0.001)", 65.37, 0.41),
    ("gc=none (wd=0.001)", 66.21, -1.36),
    ("dropout=0.0", 65.93, 0.32),
    ("dropout=0.1", 64.96, 0.31),
    ("dropout=0.4", 64.17, -0.27),
    ("dropout=0.8", 51.17, -0.57),
)

SCHEME = "w8a8-vectorwise"
ACC, DEG, KL = "fp/acc", f"ptq/{SCHEME}/degradation_pct", f"ptq/{SCHEME}/kl"
OBJECTIVES = [f"{ACC}:max", f"{DEG}:max"]
TOTAL_STEPS = 75000
REPORT_EVERY = 5000
CHANCE = 40.0  # accuracy at step 0, averaged over the 8 tasks (roughly their chance levels)
TAU_ACC = 2000.0
TAU_DEG = 15000.0
LATE_START = 0.6  # fraction of training after which a late re-ranking recipe's degradation jumps
CI_HALF = 0.6  # reported half-width of the degradation CI (paired bootstrap over 8 tasks)
WEIGHT = 1.0  # the single-metric baseline maximises acc + WEIGHT * degradation_pct (both in points)


@dataclass(frozen=True)
class NoiseModel:
    """Seed-to-seed and evaluation noise of a simulated trial (points of the table's units)."""

    seed_sd: float = 0.15  # persistent per-seed offset of the final accuracy and degradation
    eval_sd: float = 0.10  # fresh noise on every report (evaluation on a finite task sample)
    tau_sd: float = 0.10  # per-seed jitter of the accuracy curve's time constant (sd in log)
    # per-objective multipliers of all the noise above: calibration to a measured study
    # (calibrate.py) finds accuracy and degradation noisy by different factors
    acc_scale: float = 1.0  # the accuracy's offset, time-constant jitter and evaluation noise
    deg_scale: float = 1.0  # the degradation's offset and evaluation noise


NOISE = NoiseModel()


@dataclass(frozen=True)
class SimRecipe:
    recipe_id: str
    point: dict
    acc: float  # final FP accuracy (points)
    deg: float  # final Average % Diff (points; negative = INT8 worse)
    labels: tuple


def paper_recipes() -> list[SimRecipe]:
    """The 11 distinct recipes of the paper-axes grid with their Table A.3 finals."""
    scores = {v: (a, d) for v, a, d in PAPER_A3}
    out: dict[str, SimRecipe] = {}
    for label, point in paper_axes_variants():
        rid = recipe_label(point)
        a, d = scores[label]
        if rid in out:
            if (out[rid].acc, out[rid].deg) != (a, d):
                raise AssertionError(f"Table A.3 rows {out[rid].labels} and {label!r} are one recipe but differ")
            out[rid] = SimRecipe(rid, point, a, d, out[rid].labels + (label,))
        else:
            out[rid] = SimRecipe(rid, point, a, d, (label,))
    return list(out.values())


def paper_truth(recipes: Sequence[SimRecipe] | None = None) -> dict[str, tuple[float, float]]:
    """recipe id -> its noise-free final (accuracy, degradation), in `OBJECTIVES` order."""
    return {r.recipe_id: (r.acc, r.deg) for r in (recipes or paper_recipes())}


def true_front(recipes: Sequence[SimRecipe] | None = None) -> list[str]:
    return front_of(paper_truth(recipes), OBJECTIVES)


def knee(recipes: Sequence[SimRecipe] | None = None) -> str:
    """The front member closest to the utopia point after min-max scaling over the front."""
    return knee_of(paper_truth(recipes), OBJECTIVES)


def _truth_rows(truth: Mapping[str, Sequence[float]], objectives: Sequence[str]) -> tuple[list[str], list[dict]]:
    names = [o.name for o in parse_objectives(list(objectives))]
    return list(truth), [dict(zip(names, values)) for values in truth.values()]


def front_of(truth: Mapping[str, Sequence[float]], objectives: Sequence[str]) -> list[str]:
    """The Pareto front of `truth` (recipe -> true values in `objectives` order)."""
    ids, rows = _truth_rows(truth, objectives)
    return [ids[i] for i in pareto_front(rows, objectives)]


def knee_of(truth: Mapping[str, Sequence[float]], objectives: Sequence[str]) -> str:
    ids, rows = _truth_rows(truth, objectives)
    return ids[select_top(rows, objectives, 1, "knee")[0]]


def _seed(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def trial_reports(
    recipe: SimRecipe,
    trial_seed: int,
    noise: float = 1.0,
    total_steps: int = TOTAL_STEPS,
    every: int = REPORT_EVERY,
    *,
    late: float = 0.0,
    model: NoiseModel = NOISE,
) -> list[dict[str, float]]:
    """Every report of one simulated trial (deterministic in `trial_seed`)."""
    rng = np.random.default_rng(_seed("trial", recipe.recipe_id, trial_seed))
    dropout = float(recipe.point.get("recipe.dropout", 0.0))
    # at scales 1.0 these products equal `noise` exactly: the default draws stay bit-identical
    scale = np.array([noise * model.acc_scale, noise * model.deg_scale])
    tau = TAU_ACC * (1 + dropout) * math.exp(scale[0] * model.tau_sd * rng.normal())
    off_acc, off_deg = scale * model.seed_sd * rng.normal(size=2)
    g_end = math.log1p(total_steps / tau)
    s_end = 1 - math.exp(-total_steps / TAU_DEG)
    out = []
    for step in range(every, total_steps + 1, every):
        g = math.log1p(step / tau) / g_end
        s = (1 - math.exp(-step / TAU_DEG)) / s_end
        e_acc, e_deg = scale * model.eval_sd * rng.normal(size=2)
        jump = max(0.0, (step / total_steps - LATE_START) / (1 - LATE_START)) ** 2
        acc = CHANCE + (recipe.acc + off_acc - CHANCE) * g + e_acc
        deg = (recipe.deg + late + off_deg) * s - late * jump + e_deg
        loss = 2.2 + 6.0 * (1 - g) + (recipe.acc - acc) * 0.01  # decorative; finite
        out.append({
            "step": step,
            "train/loss": loss,
            ACC: acc,
            DEG: deg,
            f"{DEG}_ci_low": deg - CI_HALF,
            f"{DEG}_ci_high": deg + CI_HALF,
            KL: 0.02 * math.exp(-deg / 2),
            f"{KL}_se": 0.0005,
            "weighted": acc + WEIGHT * deg,
            "diverged": 0.0,
        })
    return out


@functools.lru_cache(maxsize=16)
def seed_sd(step: int = TOTAL_STEPS, noise: float = 1.0, model: NoiseModel = NOISE, n: int = 400) -> dict[str, float]:
    """Between-seed sd of one report's (accuracy, degradation) at `step`, by Monte Carlo over seeds,
    averaged over the grid's recipes: the `noise_prior` of the simulated `dominance` searches."""
    k = step // REPORT_EVERY - 1
    sds = []
    for r in paper_recipes():
        vals = np.array([[x[ACC], x[DEG]] for x in (trial_reports(r, 10_000 + i, noise, model=model)[k]
                                                     for i in range(n))])
        sds.append(vals.std(axis=0, ddof=1))
    acc_sd, deg_sd = np.sqrt(np.mean(np.square(sds), axis=0))
    return {ACC: float(acc_sd), DEG: float(deg_sd)}


def simulated_trainable(config: Mapping[str, Any]) -> None:
    """The Tune function trainable: replays one trial's reports through `ray.tune.report`.

    config: {"sim": {"recipe_id", "trial_seed", "sim_seed", "strategy", "upto"?}, "noise": float};
    `upto` marks a pilot seed that stops after that step.
    """
    from ray import tune

    sim = config["sim"]
    recipe = {r.recipe_id: r for r in paper_recipes()}[sim["recipe_id"]]
    gate = config.get("gate")
    if gate:
        # virtual time: the first wave of a search starts together (a freshly started trial
        # would otherwise replay all 15 reports before the next trial's actor is even up)
        import ray

        ray.get(ray.get_actor(gate["name"]).wait.remote(
            f"{sim['strategy']}/{sim['sim_seed']}", int(gate["first_wave"]), float(gate["timeout_s"])))
    upto = sim.get("upto")
    for rep in trial_reports(recipe, int(sim["trial_seed"]), float(config.get("noise", 1.0))):
        if upto is not None and rep["step"] > upto:
            break  # a pilot seed: replicates to the first milestone only
        tune.report({**rep, "recipe_id": f"{sim['sim_seed']}/{recipe.recipe_id}", "sim_seed": sim["sim_seed"],
                     "pilot": 1.0 if upto is not None else 0.0})


# ----------------------------------------------------------------------------- scoring a search


HV_REFERENCE = (64.0, -2.0)  # (accuracy, degradation) floor of the hypervolume; dropout 0.8 falls below


@dataclass(frozen=True)
class SearchOutcome:
    sim_seed: int
    strategy: str
    trial_steps: int  # steps reported by all trials (a stopped trial spent up to its last report)
    grid_steps: int  # every recipe of the grid run to the end, one seed each
    completed: tuple  # recipe ids that ran to the end and were never stopped
    front: tuple  # their Pareto front (by their final measured values)
    has_knee: bool  # the noise-free knee is on the returned front
    has_true_front: bool  # some noise-free Pareto-optimal recipe is on it
    pick_truly_pareto: bool  # the exported pick (knee of the measured front) is truly Pareto-optimal
    hv_regret: float  # 1 - HV(returned front at TRUE values) / HV(true front); 1 when nothing returned
    front_recall: float  # fraction of the true front on the returned front

    @property
    def fraction(self) -> float:
        return self.trial_steps / self.grid_steps


def true_hv(ids: Sequence[str], truth: Mapping[str, Sequence[float]], objectives: Sequence[str],
            reference: Sequence[float]) -> float:
    """Hypervolume of the recipes `ids` at their true values above `reference` (raw orientation);
    two objectives, min ones negated so that both are maximised."""
    from rayq.search.pareto import hypervolume_2d

    objs = parse_objectives(list(objectives))
    if len(objs) != 2:
        raise ValueError(f"hypervolume: expected 2 objectives, got {len(objs)}")
    up = [-o.direction.sign for o in objs]
    return hypervolume_2d([[u * v for u, v in zip(up, truth[i])] for i in ids], [u * r for u, r in zip(up, reference)])


def score_against(
    truth: Mapping[str, Sequence[float]],
    objectives: Sequence[str],
    hv_reference: Sequence[float],
    sim_seed: int,
    strategy: str,
    finals: Sequence[Mapping[str, Any]],
    stopped: Optional[set] = None,
    total_steps: int = TOTAL_STEPS,
    spent: Optional[int] = None,
) -> SearchOutcome:
    """Score one search at the recipes' true values (`truth`: recipe id -> values in `objectives`
    order, the recipe ids the finals carry). finals: the last result of every recipe's main trial
    ({recipe_id, step, objectives...}); `spent`: trial-steps of all trials (default: the finals')."""
    stopped = stopped or set()
    spent = sum(int(f["step"]) for f in finals) if spent is None else int(spent)
    done = [f for f in finals if int(f["step"]) >= total_steps and f["recipe_id"] not in stopped]
    front_idx = pareto_front(done, objectives)
    label = [str(f["recipe_id"]) for f in done]
    front = tuple(sorted(label[i] for i in front_idx))
    best = set(front_of(truth, objectives))
    pick = select_top([done[i] for i in front_idx], objectives, 1, "knee") if front_idx else []
    hv_true = true_hv(sorted(best), truth, objectives, hv_reference)
    return SearchOutcome(
        sim_seed, strategy, spent, len(truth) * total_steps,
        tuple(sorted(label)), front,
        knee_of(truth, objectives) in front, bool(set(front) & best),
        bool(pick) and label[front_idx[pick[0]]] in best,
        1.0 - true_hv(front, truth, objectives, hv_reference) / hv_true,
        len(set(front) & best) / len(best),
    )


def score_search(
    sim_seed: int,
    strategy: str,
    finals: Sequence[Mapping[str, Any]],
    stopped: Optional[set] = None,
    total_steps: int = TOTAL_STEPS,
    spent: Optional[int] = None,
) -> SearchOutcome:
    """`score_against` the paper grid's noise-free finals. Tune mode's recipe ids carry the
    search's seed ("<sim_seed>/<recipe>"), so the prefix is dropped on both finals and stops."""
    def bare(rid: Any) -> str:
        return str(rid).split("/")[-1]

    finals = [{**f, "recipe_id": bare(f["recipe_id"])} for f in finals]
    return score_against(paper_truth(), OBJECTIVES, HV_REFERENCE, sim_seed, strategy, finals,
                         {bare(r) for r in stopped or ()}, total_steps, spent)


def grid_order(sim_seed: int) -> list[SimRecipe]:
    """The grid in the order trials are started for one simulated search (shuffled per seed:
    a fixed order would always start, and so always let through, the same recipes first)."""
    recipes = paper_recipes()
    rng = np.random.default_rng(_seed("order", sim_seed))
    return [recipes[i] for i in rng.permutation(len(recipes))]
