"""Ray-free simulated searches: the real scheduler classes driven by a lockstep loop.

This is the benchmark's figure (`rayq bench search --offline`): hundreds of searches in minutes,
with the same `MilestoneScheduler` (and Ray's `ASHAScheduler` / `FIFOScheduler` for the
baselines) that `rayq search` hands to Tune. Tune mode (`simulate_tune.run_tune`) confirms it on 20.

One search: the 11 recipes of the paper-axes grid (`simulate.grid_order`, shuffled per search)
start in that order, at most `max_concurrent` trials at once; every tick each running trial
delivers its next report (in a random order within the tick) and gets the scheduler's decision.
That loop (`run_trials`) also drives `replay.py`, which feeds it curves real trials recorded.

Strategies (`STRATEGIES`; each has one dial, swept by the benchmark):
- `dominance` (what `rayq search` uses by default: `rule: dominance`): stop when dominated beyond
  noise with probability >= p (dial p), from 5000 steps on, an evaluation every 5000, one seed
  per recipe, σ from a configured prior (`search.noise_prior`): the between-seed sd of the
  final values under the simulator's noise model at scale 1 (`simulate.seed_sd()`: 0.18 points on
  both objectives under the default model; a calibrated model, `calibrate.py`, brings its own).
  The prior stays fixed when the noise sweep scales the simulated noise, so the sweep also
  measures a misspecified prior.
- `dominance-pilot`: the same rule with σ from a replicate pilot the search schedules itself:
  the first `PILOT_RECIPES` recipes of the grid get `PILOT_SEEDS` extra seeds (trials sharing
  their `recipe_id`) that run to the first milestone (5000) only; later steps carry that σ
  forward (Student-t with the pilot's degrees of freedom). Its compute is counted.
- `dominance-sync`: `dominance` (prior σ) with synchronous rungs (`search.sync_rungs`): every
  recipe is held (PAUSE) at the first milestone until the whole grid has arrived, then all are
  judged together; a held trial frees its slot, so later recipes start meanwhile.
- `moasha`: `rule: moasha` at the ASHA ladder 5000/15000/45000 (dial η).
- `weighted-asha@w`: Ray's `ASHAScheduler` on acc + w·degradation_pct, grace 5000 (dial η),
  reported at several w: a single fixed weight is answer-aware (w = 1 makes the knee the optimum).
- `no-stopping`: FIFO, the whole grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from rayq.search import simulate as sim

__all__ = ["Strategy", "STRATEGIES", "DIALS", "make_scheduler", "run_offline", "run_trials", "PILOT_RECIPES",
           "PILOT_SEEDS"]

STRATEGIES = ("dominance", "dominance-pilot", "dominance-sync", "moasha", "weighted-asha", "no-stopping")
DIALS = {  # the dial each strategy is swept over in the benchmark's curves
    "dominance": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95),
    "dominance-pilot": (0.7, 0.8, 0.9, 0.95, 0.975),
    "dominance-sync": (0.5, 0.7, 0.8, 0.85, 0.9, 0.95),
    "moasha": (2.0, 3.0, 4.0, 6.0),
    "weighted-asha": (2.0, 3.0, 4.0, 6.0),
    "no-stopping": (None,),
}
WEIGHTS = (0.5, 1.0, 2.0)  # weighted ASHA: acc + w * degradation_pct
MOASHA_MILESTONES = (5000, 15000, 45000)
FIRST_MILESTONE = 5000
PILOT_RECIPES = 2
PILOT_SEEDS = 2
LATE_SHARE = 1 / 3  # share of recipes with late re-ranking in the "late" variant
LATE_JUMP = 0.6  # points of degradation that arrive during the LR decay in that variant


@dataclass(frozen=True)
class Strategy:
    family: str  # one of STRATEGIES
    dial: Optional[float] = None  # p for dominance, eta for moasha / weighted-asha
    weight: Optional[float] = None  # weighted-asha only

    @property
    def name(self) -> str:
        return f"weighted-asha@{self.weight:g}" if self.family == "weighted-asha" else self.family

    @property
    def label(self) -> str:
        return self.name if self.dial is None else f"{self.name}:{self.dial:g}"

    @property
    def pilot(self) -> bool:
        return self.family == "dominance-pilot"


def make_scheduler(strategy: Strategy, model: sim.NoiseModel = sim.NOISE) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from rayq.search.scheduler import MilestoneScheduler

    f = strategy.family
    if f in ("dominance", "dominance-pilot", "dominance-sync"):
        sync = {"sync_rungs": True, "expected_trials": len(sim.paper_recipes())} if f == "dominance-sync" else {}
        return MilestoneScheduler(sim.OBJECTIVES, [FIRST_MILESTONE], rule="dominance",
                                  stop_confidence=strategy.dial, eval_every=sim.REPORT_EVERY,
                                  max_t=sim.TOTAL_STEPS, noise_prior=None if f == "dominance-pilot" else sim.seed_sd(model=model),
                                  verbose=False, **sync)
    if f == "moasha":
        return MilestoneScheduler(sim.OBJECTIVES, MOASHA_MILESTONES, strategy.dial, rule="moasha", verbose=False)
    if f == "weighted-asha":
        return ASHAScheduler(time_attr="step", metric="weighted", mode="max", max_t=sim.TOTAL_STEPS,
                             grace_period=FIRST_MILESTONE, reduction_factor=strategy.dial)
    if f == "no-stopping":
        return FIFOScheduler()
    raise ValueError(f"unknown strategy {f!r} (known: {', '.join(STRATEGIES)})")


Entry = tuple[str, Iterator[dict], str, bool]  # trial name, its reports, recipe id, the recipe's main trial


def run_offline(strategy: Strategy, sim_seed: int, *, max_concurrent: int = 8, noise: float = 1.0,
                late: bool = False, scheduler: Any = None, model: sim.NoiseModel = sim.NOISE) -> sim.SearchOutcome:
    """One simulated search under `strategy` with the noise `model` scaled by `noise`; scored at the
    recipes' true values."""
    scheduler = scheduler if scheduler is not None else make_scheduler(strategy, model)
    rng = np.random.default_rng(sim._seed("offline", sim_seed))
    order = sim.grid_order(sim_seed)
    late_rng = np.random.default_rng(sim._seed("late", sim_seed))
    late_ids = ({order[i].recipe_id for i in late_rng.choice(len(order), round(LATE_SHARE * len(order)), replace=False)}
                if late else set())
    weight = strategy.weight if strategy.weight is not None else sim.WEIGHT

    def reports(r, seed, upto=None):
        reps = sim.trial_reports(r, seed, noise, late=LATE_JUMP if r.recipe_id in late_ids else 0.0, model=model)
        return iter([{**x, "weighted": x[sim.ACC] + weight * x[sim.DEG]} for x in reps
                     if upto is None or x["step"] <= upto])

    trials: list[Entry] = []
    for k, r in enumerate(order):
        trials.append((f"{sim_seed}_{k}", reports(r, sim._seed(sim_seed, k)), r.recipe_id, True))
        if strategy.pilot and k < PILOT_RECIPES:
            for e in range(PILOT_SEEDS):
                pilot = reports(r, sim._seed(sim_seed, k, "pilot", e), FIRST_MILESTONE)
                trials.append((f"{sim_seed}_{k}_pilot{e}", pilot, r.recipe_id, False))
    finals, stopped, spent = run_trials(scheduler, trials, rng, max_concurrent=max_concurrent,
                                        total_steps=sim.TOTAL_STEPS, label=strategy.label)
    return sim.score_search(sim_seed, strategy.label, finals, stopped, spent=spent)


def run_trials(scheduler: Any, trials: Sequence[Entry], rng: np.random.Generator, *, max_concurrent: int,
               total_steps: int, label: str = "search") -> tuple[list[dict], set, int]:
    """Drive `scheduler` over `trials` as Tune's controller would, in lockstep: trials start in the
    given order, at most `max_concurrent` at once; every tick each running trial delivers its next
    report (in an `rng` order within the tick) and gets the scheduler's decision.

    Returns (finals: the last report of every main trial, with its `recipe_id`; stopped: the
    recipe ids whose main trial was stopped before `total_steps`; spent: trial-steps of all trials).
    """
    pending = [(SimpleNamespace(trial_id=name, config={}, status="PENDING"), it, rid, main)
               for name, it, rid, main in trials]
    running: list = []
    paused: dict = {}  # trial id -> its running entry, held by a synchronous rung (PAUSE)
    finals: list = []
    stopped: set = set()
    spent = 0
    lasts: dict = {}  # trial id -> its last report (shared with its running entry)
    # the loop is Tune's controller here: what a scheduler may ask of one (HyperBand's calls)
    controller = SimpleNamespace(
        get_trials=lambda: [e[0] for e in running] + [e[0] for e in paused.values()] + [e[0] for e in pending],
        stop_trial=lambda t: lasts[t.trial_id].update(done=True))
    while pending or running or paused:
        while pending and len(running) < max_concurrent:
            entry = pending.pop(0)
            entry[0].status = "RUNNING"
            scheduler.on_trial_add(controller, entry[0])
            running.append((*entry, lasts.setdefault(entry[0].trial_id, {})))
        while paused and len(running) < max_concurrent:
            t = scheduler.choose_trial_to_run(controller)
            if t is None or t.trial_id not in paused:
                break
            t.status = "RUNNING"
            running.append(paused.pop(t.trial_id))
        for tid in [t for t, e in paused.items() if e[4].get("done")]:  # stopped while held
            running.append(paused.pop(tid))
        if not running and paused:
            raise RuntimeError(f"{label}: every trial is held at a rung that is never judged")
        for idx in rng.permutation(len(running)).tolist():
            trial, it, rid, main, last = running[idx]
            if last.get("done"):
                continue
            rep = next(it, None)
            if rep is None:
                last["done"] = True
                continue
            rep = {**rep, "recipe_id": rid}
            last.update(rep)
            action = scheduler.on_trial_result(controller, trial, rep)
            if action == "PAUSE":
                trial.status = "PAUSED"
                last["paused"] = True
            elif action == "STOP":
                last["done"] = True
        still = []
        for trial, it, rid, main, last in running:
            if last.pop("paused", False) and not last.get("done"):
                paused[trial.trial_id] = (trial, it, rid, main, last)
            elif last.get("done"):
                if main and int(last["step"]) < total_steps and scheduler_stopped(scheduler, trial):
                    stopped.add(rid)
                scheduler.on_trial_complete(None, trial, last)
                spent += int(last.get("step", 0))
                if main:
                    finals.append({k: v for k, v in last.items() if k != "done"})
            else:
                still.append((trial, it, rid, main, last))
        running = still
    return finals, stopped, spent


def scheduler_stopped(scheduler: Any, trial: Any) -> bool:
    """A trial that ended before its last report was stopped (by a STOP, or while held)."""
    return True if not hasattr(scheduler, "is_stopped") else scheduler.is_stopped(trial.trial_id)
