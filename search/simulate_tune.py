"""The search simulator through real Ray Tune: the same strategies as `rayq.search.offline`, each
simulated search one `Tuner.fit` of `simulate.simulated_trainable` trials behind a start gate, so
the offline figures can be confirmed on Tune (`rayq bench search` without --offline).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Sequence

import numpy as np

from rayq.search import offline
from rayq.search.simulate import (
    REPORT_EVERY,
    TOTAL_STEPS,
    SearchOutcome,
    _seed,
    grid_order,
    paper_recipes,
    score_search,
    simulated_trainable,
)


class _StartGate:
    """A Ray actor (async): holds the first `first_wave` trials of each search until all arrived."""

    def __init__(self):
        self.count: dict[str, int] = {}
        self.events: dict[str, Any] = {}

    async def wait(self, key: str, first_wave: int, timeout_s: float) -> bool:
        import asyncio

        n = self.count[key] = self.count.get(key, 0) + 1
        ev = self.events.setdefault(key, asyncio.Event())
        if n > first_wave:
            return True  # a later trial starts when a worker frees up: no waiting
        if n == first_wave:
            ev.set()
        try:
            await asyncio.wait_for(ev.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


def _search_mux_class():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler

    class SearchMux(FIFOScheduler):
        """Many independent simulated searches in one Tune run: one scheduler per search (keyed by
        the trial's strategy and sim seed), and at most `per_search` running trials per search,
        as if each search had its own `per_search` workers. Starting Tune trial actors is what
        costs time on 2 CPUs (~4 s each); one run lets Tune reuse them across searches."""

        def __init__(self, factories: Mapping[str, Any], per_search: int):
            super().__init__()
            self.factories = dict(factories)
            self.per_search = per_search
            self.schedulers: dict[tuple, Any] = {}

        @staticmethod
        def key(trial: Any) -> tuple:
            sim = trial.config["sim"]
            return sim["strategy"], int(sim["sim_seed"])

        def _of(self, trial: Any) -> Any:
            k = self.key(trial)
            if k not in self.schedulers:
                self.schedulers[k] = self.factories[k[0]]()
            return self.schedulers[k]

        def on_trial_add(self, tc, trial):
            self._of(trial).on_trial_add(tc, trial)

        def on_trial_result(self, tc, trial, result):
            return self._of(trial).on_trial_result(tc, trial, result)

        def on_trial_complete(self, tc, trial, result):
            self._of(trial).on_trial_complete(tc, trial, result)

        def on_trial_error(self, tc, trial):
            self._of(trial).on_trial_error(tc, trial)

        def on_trial_remove(self, tc, trial):
            self._of(trial).on_trial_remove(tc, trial)

        def choose_trial_to_run(self, tc):
            running: dict[tuple, int] = {}
            trials = tc.get_trials()
            for t in trials:
                if t.status == Trial.RUNNING:
                    running[self.key(t)] = running.get(self.key(t), 0) + 1
            for t in trials:
                if t.status == Trial.PENDING and running.get(self.key(t), 0) < self.per_search:
                    return t
            return None

        def debug_string(self) -> str:
            return f"SearchMux({len(self.schedulers)} searches)"

    return SearchMux


def run_tune(
    strategies: Sequence[Any],
    seeds: Sequence[int],
    *,
    per_search: int = 8,
    searches_at_once: int = 1,
    seeds_per_fit: int = 1,
    noise: float = 1.0,
    retries: int = 1,
) -> tuple[list[SearchOutcome], dict[str, Any]]:
    """Run every (strategy, seed) search through real Ray Tune; score each search.

    strategies: `offline.Strategy` values (the same schedulers as the offline loop, the same
    replicate pilot for `dominance`). One `Tuner.fit()` per `seeds_per_fit` seeds (all
    strategies of those seeds in it; a failed fit is retried), one `ray.init` for all. Each
    search is the paper-axes grid (Tune's grid search) started in a per-seed shuffled order with
    its own scheduler; trials of a seed see the same curves under every strategy (common random
    numbers), so strategies are compared on identical draws.
    """
    import sys
    import time

    seeds = list(seeds)
    t0 = time.time()
    outcomes: list[SearchOutcome] = []
    info = {"fits": 0, "fit_s": [], "trials": 0, "reports": 0, "errors": 0, "retries": 0}
    for i in range(0, len(seeds), seeds_per_fit):
        chunk = seeds[i:i + seeds_per_fit]
        for attempt in range(retries + 1):
            try:
                got, fit = _fit_once(strategies, chunk, per_search, searches_at_once, noise)
                break
            except Exception as exc:  # noqa: BLE001 - a dead raylet on a busy machine: start over
                if attempt == retries:
                    raise
                info["retries"] += 1
                print(f"[bench search] fit for seeds {chunk} failed ({exc!r:.200}); retrying", file=sys.stderr)
                import ray

                ray.shutdown()
        outcomes += got
        info["fits"] += 1
        info["fit_s"].append(fit["wall_s"])
        for k in ("trials", "reports", "errors"):
            info[k] += fit[k]
        done = ", ".join(f"{o.strategy} {o.fraction:.2f}{'*' if o.has_knee else ''}" for o in got)
        print(f"[bench search] seeds {chunk} in {fit['wall_s']:.0f}s: {done}  (* = knee on the front)",
              file=sys.stderr, flush=True)
    wall = time.time() - t0
    info["wall_s"] = round(wall, 1)
    info["reports_per_s"] = round(info["reports"] / max(wall, 1e-9), 1)
    info["fit_s_mean"] = round(float(np.mean(info["fit_s"])), 1)
    del info["fit_s"]
    return outcomes, info


def _fit_once(strategies, seeds, per_search, searches_at_once, noise):
    import shutil
    import tempfile
    import time

    import ray
    from ray import tune

    from rayq.cluster.trainer import connect

    connect(None, num_cpus=2, logging_level="ERROR")  # the embedded Ray: loopback only
    by_label = {s.label: s for s in strategies}
    points = []
    for seed in seeds:
        for strategy in strategies:
            for k, r in enumerate(grid_order(seed)):
                points.append({"recipe_id": r.recipe_id, "trial_seed": _seed(seed, k), "sim_seed": seed,
                               "strategy": strategy.label})
                if strategy.pilot and k < offline.PILOT_RECIPES:
                    points += [{"recipe_id": r.recipe_id, "trial_seed": _seed(seed, k, "pilot", e), "sim_seed": seed,
                                "strategy": strategy.label, "upto": offline.FIRST_MILESTONE}
                               for e in range(offline.PILOT_SEEDS)]
    factories = {label: functools.partial(offline.make_scheduler, s) for label, s in by_label.items()}
    mux = _search_mux_class()(factories, per_search)
    storage = tempfile.mkdtemp(prefix="rayq-bench-search-")
    gate_name = f"rayq-sim-gate-{os.getpid()}-{time.time_ns()}"
    gate = ray.remote(num_cpus=0)(_StartGate).options(name=gate_name).remote()
    first_wave = min(per_search, len(paper_recipes()))
    t0 = time.time()
    try:
        tuner = tune.Tuner(
            tune.with_resources(simulated_trainable, {"CPU": 0.1}),
            param_space={"sim": tune.grid_search(points), "noise": noise,
                         "gate": {"name": gate_name, "first_wave": first_wave, "timeout_s": 120.0}},
            tune_config=tune.TuneConfig(scheduler=mux, max_concurrent_trials=per_search * searches_at_once,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name="sim", storage_path=storage, verbose=0),
        )
        grid = tuner.fit()
        wall = time.time() - t0
    finally:
        try:
            ray.kill(gate)
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            pass
        shutil.rmtree(storage, ignore_errors=True)
    finals: dict[tuple, list] = {}
    stopped: dict[tuple, set] = {}
    spent: dict[tuple, int] = {}
    reports = errors = 0
    for res in grid:
        if res.error is not None:
            errors += 1
            continue
        sim = res.config["sim"]
        k = (sim["strategy"], int(sim["sim_seed"]))
        m = dict(res.metrics)
        reports += int(m["step"]) // REPORT_EVERY
        spent[k] = spent.get(k, 0) + int(m["step"])
        if sim.get("upto") is not None:
            continue  # a pilot seed: its compute counts, its values are not a recipe's final
        finals.setdefault(k, []).append(m)
        if int(m["step"]) < TOTAL_STEPS:
            stopped.setdefault(k, set()).add(m["recipe_id"])
    outcomes = [score_search(seed, s.label, finals.get((s.label, seed), []), stopped.get((s.label, seed), set()),
                             spent=spent.get((s.label, seed), 0))
                for s in strategies for seed in seeds]
    return outcomes, {"wall_s": round(wall, 1), "trials": len(points), "reports": reports, "errors": errors}
