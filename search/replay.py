"""Replayed searches over recorded training curves (`rayq bench search --replay DIR [DIR ...]`).

The offline benchmark (`offline.py`) judges the stopping rules on simulated curves; this judges
them on the curves real trials recorded (`rayq search` directories such as `studies/proxy/*`),
through the same lockstep loop (`offline.run_trials`) and the same scheduler classes.

The grid: every recipe of the directories together (a recipe = its `config/*` values without
`config/train.seed`, named as `rayq study` names it) with its seeds that reached the last
evaluation step; seeds stopping short (runs in progress) are left out and listed. Only
evaluation rows are read (`eval/seconds` set): the other rows carry the objectives forward. A
directory has `config/` columns only for the keys it searched; the keys another directory
searched are filled from its `config.yaml` (the search config that produced it), so a recipe is
named by its full values (the lr study's clipping 1.0 would otherwise read `grad_clip=None`, the
contrast study's way of saying "no clipping").

Truth: each recipe's mean over its seeds at the last step. One replay (seed s): the recipes start
in a shuffled order, each with one of its recorded seeds drawn uniformly, whose evaluations are
its reports. It is scored by `simulate.score_against` at the truth, with the hypervolume reference
at the worst true value per objective plus 10% of the range. Objectives are compared on their raw
values, as the scheduler compares them: KL is not log-scaled, so early KL gaps (values ~1e-4) count
for little next to a σ set by the spread of the final values (~1e-3).

Strategies (`STRATEGIES`): `dominance` (first milestone at 20% of training, σ = `noise_prior`: the
between-seed sd at the last step pooled over recipes with >= 2 seeds, else `FALLBACK_PRIOR`),
`moasha` (milestones at 20% and 60%) and `no-stopping`. The pilot variant would need seeds beyond
the recorded ones, the synchronous one changes nothing when the whole grid runs at once, and a
weighted single metric would add nats of loss to KL: they are left out. With one seed per recipe
every replay sees the same curves, only the start order and the order within a tick vary, so many
replays coincide (`distinct_outcomes`).
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from rayq.config import read_yaml_file
from rayq.errors import UserError
from rayq.search import offline, study
from rayq.search import simulate as sim
from rayq.search.objectives import parse_objectives
from rayq.search.outcomes import summarise as summarise_outcomes
from rayq.search.results import RESULTS, clean, finite
from rayq.search.stopping import Replicate, pooled_sd, summarise

__all__ = ["Grid", "load_rows", "load_grid", "noise_prior", "seed_sd", "make_scheduler", "run_replay", "run_replay_bench",
           "OBJECTIVES", "FALLBACK_PRIOR", "STRATEGIES"]

OBJECTIVES = ("eval/loss:min", "ptq/w8a8-tensor/kl:min")
# σ when no recipe has two seeds at the last step: of the order of the seed 0 / seed 1 gaps of the
# proxy contrast pair at steps 300-900 (contrast/incomplete-seed1.parquet, not read here: that pair
# stopped at step ~1200): eval loss 0.02-0.10 nats apart, per-tensor KL up to 1.7e-3 apart (the
# prone recipe), one seed's sd being about the gap / √2.
FALLBACK_PRIOR = {"eval/loss": 0.05, "ptq/w8a8-tensor/kl": 1e-3}
STRATEGIES = ("dominance", "moasha", "no-stopping")
FIRST_SHARE = 0.2  # the dominance rule's first milestone, as a share of training
MOASHA_SHARES = (0.2, 0.6)
SD_SHARES = (0.2, 0.5, 1.0)  # where the measured between-seed sd is reported
HV_PAD = 0.1  # hypervolume reference: this share of the truth's range beyond its worst value


@dataclass(frozen=True)
class Grid:
    studies: tuple[str, ...]
    objectives: tuple[str, ...]
    seeds: dict[str, dict[float, list[dict]]]  # recipe -> seed -> its evaluation reports, by step
    total_steps: int
    eval_every: int
    left_out: tuple[str, ...]  # recipe-seeds short of total_steps

    @property
    def names(self) -> list[str]:
        return [o.name for o in parse_objectives(list(self.objectives))]

    @cached_property
    def truth(self) -> dict[str, tuple[float, ...]]:
        """recipe -> its mean over seeds of each objective at the last step."""
        return {rid: tuple(statistics.fmean(reps[-1][n] for reps in by_seed.values()) for n in self.names)
                for rid, by_seed in self.seeds.items()}

    @cached_property
    def hv_reference(self) -> list[float]:
        ref = []
        for k, o in enumerate(parse_objectives(list(self.objectives))):
            vals = [v[k] for v in self.truth.values()]
            worst = max(vals, key=lambda v: o.direction.sign * v)
            pad = HV_PAD * (max(vals) - min(vals)) or HV_PAD * abs(worst) or 1.0  # one recipe: still a box
            ref.append(worst + o.direction.sign * pad)
        return ref

    def at(self, share: float) -> int:
        """The evaluation step nearest `share` of training."""
        return max(self.eval_every, round(share * self.total_steps / self.eval_every) * self.eval_every)


def _search_config(directory: str | os.PathLike) -> dict:
    """The directory's config.yaml through rayq's guarded YAML reader (a directory handed over by
    someone else is not trusted: size, alias and type limits), {} when there is none."""
    path = Path(directory) / "config.yaml"
    return read_yaml_file(path, "search config") if path.exists() else {}


def _dotted(config: dict, key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _fill_config(by_dir: dict[str, list[dict]]) -> list[dict]:
    """Every row, with the `config/` keys its directory did not search taken from its config.yaml."""
    keys = {k for rows in by_dir.values() for r in rows for k in r if k.startswith("config/")}
    out: list[dict] = []
    for d, rows in by_dir.items():
        missing = keys - {k for r in rows for k in r}
        base = _search_config(d) if missing else {}
        fill = {k: clean(_dotted(base, k.removeprefix("config/"))) for k in missing}
        out += [{**fill, **r} for r in rows]
    return out


def load_rows(dirs: Sequence[str | os.PathLike], names: Sequence[str]) -> list[dict]:
    """Every row of the search directories `dirs`, each checked for evaluation rows reporting the
    metrics `names`, with the config keys other directories searched filled in from its config.yaml
    (so that one recipe gets one name across directories: `study.curves` labels by varying keys)."""
    by_dir: dict[str, list[dict]] = {}
    for d in dirs:
        rows = study.load([d])  # a UserError naming the file when there is no results.parquet
        path = os.path.join(os.fspath(d), RESULTS)
        evals = [r for r in rows if finite(r.get(study.EVALUATED))]
        if not evals:
            raise UserError(f"{path}: no evaluation rows (expected rows with {study.EVALUATED} set)")
        for n in names:
            if not any(finite(r.get(n)) for r in evals):
                raise UserError(f"{path}: no {n!r} in its evaluation rows (expected the objectives {', '.join(names)})")
        by_dir[os.fspath(d)] = rows
    return _fill_config(by_dir)


def load_grid(dirs: Sequence[str | os.PathLike], objectives: Sequence[str] = OBJECTIVES) -> Grid:
    """The replay grid of the search directories `dirs` (see the module docstring)."""
    names = [o.name for o in parse_objectives(list(objectives))]
    rows = load_rows(dirs, names)
    curves = {n: study.curves(rows, n) for n in names}
    both = set.intersection(*(set(c) for c in curves.values()))
    total = int(max(max(curves[n][k]) for n in names for k in both))
    seeds: dict[str, dict[float, list[dict]]] = defaultdict(dict)
    left_out, steps_seen = [], set()
    for label, seed in sorted(both):
        steps = sorted(set.intersection(*(set(curves[n][(label, seed)]) for n in names)))
        if not steps or steps[-1] < total:
            left_out.append(f"{label} seed={seed:g} (to step {steps[-1] if steps else 0:g})")
            continue
        steps_seen.update(int(s) for s in steps)
        seeds[label][seed] = [{"step": int(s), **{n: curves[n][(label, seed)][s] for n in names}, "diverged": 0.0}
                              for s in steps]
    every = math.gcd(*steps_seen)
    return Grid(tuple(os.fspath(d) for d in dirs), tuple(objectives), dict(seeds), total, every, tuple(left_out))


def seed_sd(grid: Grid, step: int) -> tuple[dict[str, float], int]:
    """(objective -> one seed's sd at `step` pooled over the recipes with >= 2 seeds there, those
    recipes' count); ({}, 0) when none has."""
    names = grid.names
    summaries = []
    for by_seed in grid.seeds.values():
        at = [r for reps in by_seed.values() for r in reps if r["step"] == step]
        if len(at) >= 2:
            summaries.append(summarise([Replicate(tuple(r[n] for n in names), (math.nan,) * len(names)) for r in at]))
    if not summaries:
        return {}, 0
    sd, _ = pooled_sd(summaries)
    return dict(zip(names, sd)), len(summaries)


def noise_prior(grid: Grid) -> tuple[dict[str, float], str]:
    """(the dominance rule's σ per objective, where it came from)."""
    sd, recipes = seed_sd(grid, grid.total_steps)
    if recipes:
        return sd, (f"measured: between-seed sd at step {grid.total_steps} pooled over {recipes} recipe(s) "
                    "with >= 2 seeds")
    prior = {n: FALLBACK_PRIOR[n] for n in grid.names if n in FALLBACK_PRIOR}
    missing = "" if len(prior) == len(grid.names) else "; objectives without one are never judged beyond noise"
    return prior, (f"fallback constant prior (replay.FALLBACK_PRIOR): no recipe has 2 seeds at step "
                   f"{grid.total_steps}{missing}")


def make_scheduler(strategy: offline.Strategy, grid: Grid, prior: dict[str, float]) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    from rayq.search.scheduler import MilestoneScheduler

    if strategy.family == "dominance":
        return MilestoneScheduler(list(grid.objectives), [grid.at(FIRST_SHARE)], rule="dominance",
                                  stop_confidence=strategy.dial, eval_every=grid.eval_every, max_t=grid.total_steps,
                                  noise_prior=prior, verbose=False)
    if strategy.family == "moasha":
        return MilestoneScheduler(list(grid.objectives), [grid.at(s) for s in MOASHA_SHARES], strategy.dial,
                                  rule="moasha", verbose=False)
    if strategy.family == "no-stopping":
        return FIFOScheduler()
    raise ValueError(f"unknown replay strategy {strategy.family!r} (known: {', '.join(STRATEGIES)})")


def run_replay(grid: Grid, strategy: offline.Strategy, replay_seed: int, *, prior: dict[str, float],
               max_concurrent: int = 8, scheduler: Any = None) -> tuple[sim.SearchOutcome, dict[str, dict]]:
    """One replayed search: (its outcome at the truth, stopped recipe -> {step, judged_at, reason,
    by: the recipe that dominated it beyond noise (dominance) or None})."""
    scheduler = scheduler if scheduler is not None else make_scheduler(strategy, grid, prior)
    # the order and the seeds drawn depend on the replay seed only: every strategy replays the same searches
    draw = np.random.default_rng(sim._seed("replay", replay_seed))
    recipes = sorted(grid.seeds)
    trials: list[offline.Entry] = []
    for k, i in enumerate(draw.permutation(len(recipes)).tolist()):
        by_seed = grid.seeds[recipes[i]]
        seed = sorted(by_seed)[int(draw.integers(len(by_seed)))]
        trials.append((f"{replay_seed}_{k}", iter(by_seed[seed]), recipes[i], True))
    tick = np.random.default_rng(sim._seed("tick", replay_seed))
    finals, stopped, spent = offline.run_trials(scheduler, trials, tick, max_concurrent=max_concurrent,
                                                total_steps=grid.total_steps, label=strategy.label)
    outcome = sim.score_against(grid.truth, grid.objectives, grid.hv_reference, replay_seed, strategy.label, finals,
                                stopped, grid.total_steps, spent)
    first_stop: dict[str, Any] = {}
    for d in getattr(scheduler, "decisions", []):
        if d.action == "STOP":
            first_stop.setdefault(d.recipe_id, d)
    stops = {}
    for f in finals:
        if f["recipe_id"] in stopped:
            d = first_stop.get(f["recipe_id"])
            # judged_at: the evaluation step the decision compared (dominance) or the rung (moasha); a
            # recipe that reached it before its rivals is judged there at its next report (step)
            stops[f["recipe_id"]] = {"step": int(f["step"]), "judged_at": getattr(d, "milestone", None),
                                     "reason": getattr(d, "reason", None), "by": getattr(d, "dominator", None)}
    return outcome, stops


def _replays(grid: Grid, strategy: offline.Strategy, seeds: Sequence[int], prior: dict, per_search: int) -> dict:
    runs = [run_replay(grid, strategy, s, prior=prior, max_concurrent=per_search) for s in seeds]
    # an outcome: which recipes stopped at which step, and the returned front
    keys = [(tuple(sorted((r, x["step"]) for r, x in stops.items())), o.front) for o, stops in runs]
    outcomes = Counter(keys)
    (common, front), count = outcomes.most_common(1)[0]
    example = runs[keys.index((common, front))][1]
    truth, best = grid.truth, set(sim.front_of(grid.truth, grid.objectives))
    return {**summarise_outcomes([o for o, _ in runs]), "distinct_outcomes": len(outcomes),
            "first_stop_steps": dict(Counter(str(min(x["step"] for x in st.values())) if st else "none"
                                             for _, st in runs)),
            "most_common_outcome": {
                "searches": count, "front": list(front),
                "stopped": {rid: {**x, "final": dict(zip(grid.names, truth[rid])), "truly_pareto": rid in best,
                                  # False: the recipe that dominated it when it was stopped no longer does at the end
                                  "by_dominates_at_end": None if x["by"] not in truth else rid not in sim.front_of(
                                      {x["by"]: truth[x["by"]], rid: truth[rid]}, grid.objectives)}
                            for rid, x in sorted(example.items(), key=lambda kv: kv[1]["step"])}}}


def run_replay_bench(dirs: Sequence[str], seeds: Sequence[int], *, p: float, eta: float, per_search: int,
                     curves: bool, progress: Optional[Callable[[str], None]] = None) -> dict:
    """The `replay` section of `rayq bench search --replay` (see the module docstring)."""
    grid = load_grid(dirs)
    prior, source = noise_prior(grid)
    truth = grid.truth
    measured: dict[str, dict[str, float]] = defaultdict(dict)
    for share in SD_SHARES:
        step = grid.at(share)
        sd, _ = seed_sd(grid, step)
        for n, v in sd.items():
            measured[n][str(step)] = v
    out: dict = {
        "studies": [os.path.relpath(d) if os.path.isabs(d) else d for d in dirs],
        "objectives": list(grid.objectives),
        "objective_scale": "raw values, as the scheduler compares them (KL is not log-scaled)",
        "total_steps": grid.total_steps, "eval_every": grid.eval_every, "max_concurrent": per_search,
        "milestones": {"dominance": [grid.at(FIRST_SHARE)], "moasha": [grid.at(s) for s in MOASHA_SHARES]},
        "recipes": {rid: {"seeds": len(grid.seeds[rid]), "truth": dict(zip(grid.names, truth[rid]))}
                    for rid in sorted(truth)},
        "left_out": list(grid.left_out),
        "noise_prior": prior, "noise_source": source, "measured_seed_sd": dict(measured),
        "true_front": sim.front_of(truth, grid.objectives), "true_knee": sim.knee_of(truth, grid.objectives),
        "hv_reference": grid.hv_reference, "strategies": {}, "curves": {},
    }
    points = [offline.Strategy("dominance", p), offline.Strategy("moasha", eta), offline.Strategy("no-stopping")]
    for s in points:
        out["strategies"][s.name] = {"dial": s.dial, **_replays(grid, s, seeds, prior, per_search)}
        if progress:
            r = out["strategies"][s.name]
            progress(f"{s.label:16s} compute {r['compute_fraction']:.3f} knee {r['recovered_knee']:.3f} "
                     f"({r['distinct_outcomes']} distinct outcomes)")
    if curves:
        for s in points:
            out["curves"][s.name] = [
                {"dial": d, **(out["strategies"][s.name] if d == s.dial
                               else _replays(grid, offline.Strategy(s.family, d), seeds, prior, per_search))}
                for d in offline.DIALS[s.family]]
    return out
