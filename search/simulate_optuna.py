"""NSGA-II under early stopping: what should Optuna be told about a stopped trial? (Ray-free)

Issue 11 asks to measure two ways of telling a real `optuna.samplers.NSGAIISampler` study about
trials the stopping rule ended early:

- `complete-infeasible` (what `RecipeOptunaSearch` does): told COMPLETE with their last values and
  the constraint `finished` = 1 (`Trial.set_constraint`), so Optuna's constrained domination ranks
  them below every finished trial; every trial counts toward a generation. Population as
  `tuner.make_searcher` sizes it: max(4, 2 · max_concurrent).
- `pruned-resized`: told PRUNED (no values); NSGA-II then counts only finished trials toward a
  generation, so the population is sized to the trials expected to finish: the first arm's
  population times the completion rate of the stopping rule (measured on the grid by
  `offline.run_offline`, one figure for all searches, so nothing here is answer-aware).

One simulated search: a budget of `trials` trials (3x the grid), `max_concurrent` running at once
in lockstep ticks as in `offline.py` (each running trial delivers its next report per tick, in a
random order), the real `MilestoneScheduler` (rule dominance, p = `stop_confidence`, the
simulator's noise prior) deciding on every report, and the study asked for a new recipe whenever a
slot frees. The search space is the grid's 11 recipes as one categorical (off-grid combinations of
the paper's axes have no Table A.3 value); its mutation probability is set to 1/4, the value
Optuna uses for the grid's four axes (with one parameter its default, 1/n_params, would mutate
every child, i.e. random search). Each trial is its own recipe for the scheduler (a new seed),
as in `rayq search` with a searcher (one trial per suggestion). Both arms of one seed share the
sampler seed, the curves of trial k of a recipe, and the arrival order (common random numbers).

Scored at TRUE values on the returned front (the Pareto front of finished, never-stopped trials'
final measured values; a recipe may appear through several trials): `hv_regret`,
`recovered_knee`, `pick_truly_pareto`, `front_recall` (see `simulate.score_search`), plus
`compute_fraction` (trial-steps / `trials` full runs), `finished_trials` and the NSGA-II
`generation` reached by the last trial.

    python -m rayq.search.simulate_optuna --seeds 100 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np

from rayq.search import simulate as sim

__all__ = ["ARMS", "run_study", "completion_rate", "measure"]

ARMS = ("complete-infeasible", "pruned-resized")
RECIPE_PARAM = "recipe"
MUTATION_PROB = 0.25  # Optuna's 1/n_params for the paper grid's four axes
FINISHED = "finished"  # the constraint RecipeOptunaSearch sets (1 = stopped before its steps)


def _scheduler(stop_confidence: float):
    from rayq.search.scheduler import MilestoneScheduler

    return MilestoneScheduler(sim.OBJECTIVES, [5000], rule="dominance", stop_confidence=stop_confidence,
                              eval_every=sim.REPORT_EVERY, max_t=sim.TOTAL_STEPS, noise_prior=sim.seed_sd(),
                              verbose=False)


def population_for(arm: str, max_concurrent: int, rate: float) -> int:
    """NSGA-II population of an arm: `make_searcher`'s, or that times the completion rate (>= 2,
    the uniform crossover's parents)."""
    base = max(4, 2 * max_concurrent)
    return base if arm == "complete-infeasible" else max(2, round(base * rate))


def run_study(arm: str, sim_seed: int, *, trials: int = 33, max_concurrent: int = 4, population: int = 8,
              stop_confidence: float = 0.9, noise: float = 1.0) -> dict:
    """One search of `trials` trials under `arm`; its scores and the study's generation."""
    import optuna

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r} (known: {', '.join(ARMS)})")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recipes = {r.recipe_id: r for r in sim.paper_recipes()}
    dist = optuna.distributions.CategoricalDistribution(sorted(recipes))
    sampler = optuna.samplers.NSGAIISampler(seed=sim_seed, population_size=population, mutation_prob=MUTATION_PROB)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    scheduler = _scheduler(stop_confidence)
    rng = np.random.default_rng(sim._seed("optuna", sim_seed))
    running: list = []  # (optuna trial, scheduler trial, report iterator, recipe id, last report)
    finals, stopped, spent, asked = [], set(), 0, 0
    while asked < trials or running:
        while asked < trials and len(running) < max_concurrent:
            ot = study.ask({RECIPE_PARAM: dist})
            rid = ot.params[RECIPE_PARAM]
            reps = iter(sim.trial_reports(recipes[rid], sim._seed(sim_seed, asked, rid), noise))
            st = SimpleNamespace(trial_id=f"{sim_seed}_{asked}", config={})
            scheduler.on_trial_add(None, st)
            running.append((ot, st, reps, f"{asked}/{rid}", {}))
            asked += 1
        for idx in rng.permutation(len(running)).tolist():
            ot, st, reps, rid, last = running[idx]
            rep = next(reps, None)
            if rep is None:
                last["done"] = True
                continue
            last.update(rep, recipe_id=rid)
            if scheduler.on_trial_result(None, st, last) == "STOP":
                last["done"] = True
                if int(rep["step"]) < sim.TOTAL_STEPS:
                    stopped.add(rid)
        still = []
        for ot, st, reps, rid, last in running:
            if not last.get("done"):
                still.append((ot, st, reps, rid, last))
                continue
            scheduler.on_trial_complete(None, st, last)
            spent += int(last["step"])
            finals.append({k: v for k, v in last.items() if k != "done"})
            early = rid in stopped
            if arm == "pruned-resized" and early:
                study.tell(ot, state=optuna.trial.TrialState.PRUNED)
            else:
                if arm == "complete-infeasible":
                    ot.set_constraint(FINISHED, 1.0 if early else 0.0)
                study.tell(ot, [last[sim.ACC], last[sim.DEG]])
        running = still
    out = sim.score_search(sim_seed, arm, finals, stopped, spent=spent)
    last_trial = study.trials[-1]
    return {
        "has_knee": out.has_knee, "pick_truly_pareto": out.pick_truly_pareto, "hv_regret": out.hv_regret,
        "front_recall": out.front_recall, "compute_fraction": spent / (trials * sim.TOTAL_STEPS),
        "finished_trials": trials - len(stopped), "generation": sampler.get_trial_generation(study, last_trial),
        "told": {state.name: sum(t.state == state for t in study.trials)
                 for state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)},
        "infeasible": sum(any(v > 0 for v in (t.constraints or {}).values()) for t in study.trials),
    }


def completion_rate(stop_confidence: float, seeds: Sequence[int], max_concurrent: int = 8) -> float:
    """Share of the grid's recipes the rule lets finish (offline grid searches, default settings)."""
    from rayq.search.offline import Strategy, run_offline

    done = [len(run_offline(Strategy("dominance", stop_confidence), s, max_concurrent=max_concurrent).completed)
            for s in seeds]
    return float(np.mean(done)) / len(sim.paper_recipes())


def _summary(rows: list[dict]) -> dict:
    from rayq.search.outcomes import bootstrap, wilson

    n = len(rows)
    out: dict = {"seeds": n}
    for key in ("has_knee", "pick_truly_pareto"):
        k = sum(bool(r[key]) for r in rows)
        name = "recovered_knee" if key == "has_knee" else key
        out[name], out[f"{name}_ci"] = round(k / n, 4), wilson(k, n)
    for key in ("hv_regret", "front_recall", "compute_fraction", "finished_trials", "generation"):
        vals = [float(r[key]) for r in rows]
        out[key], out[f"{key}_ci"] = round(float(np.mean(vals)), 4), bootstrap(vals)
    return out


def _paired(a: list[dict], b: list[dict]) -> dict:
    """Paired differences b − a over the same seeds (bootstrap CI of the mean difference)."""
    from rayq.search.outcomes import bootstrap

    out = {}
    for key in ("hv_regret", "has_knee", "pick_truly_pareto", "compute_fraction"):
        d = [float(y[key]) - float(x[key]) for x, y in zip(a, b)]
        name = "recovered_knee" if key == "has_knee" else key
        out[name] = {"mean": round(float(np.mean(d)), 4), "ci": bootstrap(d)}
    return out


def measure(seeds: Sequence[int], *, trials: int = 33, max_concurrent: int = 4, stop_confidence: float = 0.9,
            rate_seeds: int = 50, progress: Optional[callable] = None) -> dict:
    """Both arms over `seeds` searches; `rate_seeds` offline grid searches (seeds disjoint from
    `seeds`) fix the completion rate that sizes the pruned arm's population."""
    rate = completion_rate(stop_confidence, range(10_000, 10_000 + rate_seeds))
    rows: dict[str, list[dict]] = {}
    pops = {}
    for arm in ARMS:
        pops[arm] = population_for(arm, max_concurrent, rate)
        rows[arm] = []
        for s in seeds:
            rows[arm].append(run_study(arm, s, trials=trials, max_concurrent=max_concurrent, population=pops[arm],
                                       stop_confidence=stop_confidence))
        if progress:
            progress(f"{arm}: {_summary(rows[arm])}")
    return {
        "settings": {"trials": trials, "max_concurrent": max_concurrent, "stop_confidence": stop_confidence,
                     "rule": "dominance", "noise_prior": sim.seed_sd(), "mutation_prob": MUTATION_PROB,
                     "completion_rate": round(rate, 4), "completion_rate_seeds": rate_seeds,
                     "population": pops, "search_space": "the grid's 11 recipes as one categorical"},
        "arms": {arm: _summary(rows[arm]) for arm in ARMS},
        "pruned_minus_complete": _paired(rows["complete-infeasible"], rows["pruned-resized"]),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rayq.search.simulate_optuna", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=100, help="simulated searches per arm")
    p.add_argument("--trials", type=int, default=33, help="trials per search")
    p.add_argument("--p", type=float, default=0.9, help="stop confidence of the dominance rule")
    p.add_argument("--out", default=None, help="write the JSON here (atomically) instead of stdout")
    args = p.parse_args(argv)
    result = measure(range(args.seeds), trials=args.trials, stop_confidence=args.p,
                     progress=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    if args.out:
        from rayq.config import atomic_write_text

        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0 if all(math.isfinite(v["hv_regret"]) for v in result["arms"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
