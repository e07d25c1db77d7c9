"""`MilestoneScheduler`: rayq's multi-objective early stopping for Ray Tune.

Ray's schedulers take one metric (ray-2.60.md §5); this one judges recipes on several objectives
at the trial's own `step` counter (`training_iteration` restarts after a resume). On every
result, in this order:

1. Already stopped: a trial (or a recipe) that was stopped stays stopped (Tune may still deliver
   a buffered result after a STOP, and a resumed trial re-reports old steps).
2. Divergence: a non-finite `train/loss` or `diverged == 1` stops at once, recorded as diverged.
3. Hard limits: a `Constraint` violated beyond doubt stops at once. With a between-seed spread
   known at that step (see rule `dominance`) the test is a real interval of the recipe's seed
   mean, value ± z·σ/√n; with neither replicates nor a prior it falls back to the report's own
   uncertainty (`Constraint.certainly_violated`: the whole CI on the wrong side).
4. The stopping rule, `rule`:

   `dominance` (default; `stopping.py` has the statistics): every report at an evaluation step
   (a multiple of `eval_every`, or every report when it is 0) is recorded for the trial's recipe.
   From the first milestone on, and before `max_t`, the recipe is compared with EVERY other
   recipe recorded so far, live or stopped (except diverged or limit-violating ones, which can
   never be on the front), at the latest evaluation step both have reached;
   it is stopped iff some recipe j dominates it beyond noise, P(j ≻ i) ≥ `stop_confidence`.
   No quota: the measured first front is never cut for lack of slots. Each running recipe is
   re-checked at each of its results, so a recipe that arrives late at a step can stop one that
   passed it earlier (asynchronous with revisiting), and early arrivals do not pass for free.
   Seed counts may differ between recipes: each side's standard error is σ/√n.
   With `sync_rungs` (`sync_rungs.py`) every trial is held (PAUSE) at each milestone until the
   search's trials have all arrived or ended, then the rung is judged together.

   `moasha` (Schmucker et al. 2021, kept for comparison): the first result with `step >= m`
   records the trial's objectives in rung `m`; the recipes recorded at `m` so far are ranked by
   non-dominated sorting with the epsilon-net tie-break (`pareto.priority_order`); with `n`
   recipes at the rung and the recipe at 0-based position `p` (exact ties share the best position
   of the tied group), STOP iff `p / n > 1 / eta`; while the rung holds fewer than
   `min_rung_size` recipes nothing is stopped. One-by-one and never revisited.

Seeds. Trials that share a `recipe_id` (read from the result, else `trial.config`, else the
trial id itself, so one-trial-per-recipe needs nothing) are one recipe: its value is the mean
over the seeds recorded so far. Every STOP is a recipe decision: the recipe is marked stopped and
each of its other seeds gets STOP on its next result (kind "recipe_stopped"), so no recipe
reaches the final front with a partial seed mean. `is_stopped(trial_id)` is true for all of them.
A trial that ends in an error is recorded as a STOP of kind "error" (not of its recipe): it is
never a front candidate.

State is plain attributes. Ray 2.60 pickles the scheduler only when the experiment starts (in
tuner.pkl), not as it runs, and never calls `TrialScheduler.save/restore`; so the state is written
atomically (JSON) to `state_path` after every change. `state_path` may be relative: it is then
resolved against `state_dir(...)` (the search directory, set by `rayq search` around
`Tuner.restore`), so a moved search directory resumes. A state saved with other objectives,
milestones, eta, rule or stop confidence is refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from rayq.config import atomic_write_text
from rayq.search.objectives import Constraint, Objective, parse_constraints
from rayq.search.objectives import as_float as _f
from rayq.search.pareto import TIE_BREAKS, _objectives, nondominated_ranks, priority_order
from rayq.search.stopping import Replicate, mean_interval, noise_for, pooled_sd, prob_dominates, summarise
from rayq.search.sync_rungs import SyncRungs

__all__ = ["MilestoneScheduler", "Decision", "RULES", "state_dir"]

CONTINUE = TrialScheduler.CONTINUE
STOP = TrialScheduler.STOP
RULES = ("dominance", "moasha")
_STATE_VERSION = 2
_STATE_DIR: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("rayq_scheduler_state_dir",
                                                                           default=None)


@contextlib.contextmanager
def state_dir(path: str | os.PathLike) -> Iterator[None]:
    """Resolve relative `state_path`s against `path` (the search directory) while unpickling."""
    token = _STATE_DIR.set(os.fspath(path))
    try:
        yield
    finally:
        _STATE_DIR.reset(token)


@dataclass(frozen=True)
class Decision:
    """One scheduler decision, as the results writer stores it."""

    trial_id: str
    recipe_id: str
    action: str  # "CONTINUE" or "STOP"
    kind: str  # "milestone" | "dominated" | "diverged" | "hard_limit" | "recipe_stopped" | "error"
    step: int  # the trial's step when decided
    milestone: Optional[int]  # rung of a milestone decision; the evaluation step compared at for a
    # dominated stop; for other stops the last milestone passed
    reason: str  # one human-readable line
    position: Optional[int] = None  # 1-based rank position at the rung (moasha)
    rung_size: Optional[int] = None  # recipes recorded at the rung (including this one)
    front: Optional[int] = None  # 0-based non-dominated front at the rung (moasha)
    dominator: Optional[str] = None  # recipe that dominates this one beyond noise (dominance)
    p_dominated: Optional[float] = None  # max over recipes j of P(j ≻ this one) (dominance)
    noise_source: Optional[str] = None  # where σ came from: replicates@S, carried@S, prior


def _step(v: Any, default: int) -> int:
    x = _f(v)
    return int(x) if math.isfinite(x) else int(default)


class MilestoneScheduler(SyncRungs, FIFOScheduler):
    """Multi-objective early stopping at the trial's `time_attr` (see the module docstring)."""

    def __init__(
        self,
        objectives: Sequence[Any],
        milestones: Iterable[int] = (15000,),
        eta: float = 3.0,
        hard_limits: Sequence[Any] = (),
        time_attr: str = "step",
        *,
        rule: str = "dominance",
        stop_confidence: float = 0.9,
        eval_every: int = 0,
        max_t: Optional[int] = None,
        noise_prior: Optional[Mapping[str, float]] = None,
        min_rung_size: int = 2,
        tie_break: str = "epsilon",
        recipe_key: str = "recipe_id",
        seeds_key: str = "seeds",
        loss_key: str = "train/loss",
        diverged_key: str = "diverged",
        stop_recipe_on_divergence: bool = True,
        state_path: Optional[str] = None,
        verbose: bool = True,
        sync_rungs: bool = False,
        expected_trials: Optional[int] = None,
    ):
        super().__init__()
        if sync_rungs and rule != "dominance":
            raise ValueError("sync_rungs: only with rule dominance (moasha's quota is asynchronous by design)")
        self._init_sync(sync_rungs, expected_trials)
        self.objectives: list[Objective] = _objectives(list(objectives))
        self.milestones: list[int] = sorted({int(m) for m in milestones})
        if not self.milestones or self.milestones[0] <= 0:
            raise ValueError("milestones: expected positive step numbers")
        if not eta > 1:
            raise ValueError(f"eta: expected > 1, got {eta}")
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break: expected one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
        if rule not in RULES:
            raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
        if not 0.5 <= stop_confidence < 1:
            raise ValueError(f"stop_confidence: expected in [0.5, 1), got {stop_confidence}")
        if eval_every < 0:
            raise ValueError(f"eval_every: expected >= 0, got {eval_every}")
        self.eta = float(eta)
        self.rule = rule
        self.stop_confidence = float(stop_confidence)
        self.eval_every = int(eval_every)
        self.max_t = None if max_t is None else int(max_t)
        self.hard_limits: list[Constraint] = parse_constraints(list(hard_limits))
        # metrics whose between-seed spread is tracked: the objectives, then the hard limits'
        self._tracked: list[str] = [o.name for o in self.objectives]
        self._tracked += [c.name for c in self.hard_limits if c.name not in self._tracked]
        prior = dict(noise_prior or {})
        unknown = sorted(set(prior) - set(self._tracked))
        if unknown:
            raise ValueError(f"noise_prior: {unknown[0]!r} is neither an objective nor a hard-limit metric")
        self.noise_prior: dict[str, float] = {k: float(v) for k, v in prior.items()}
        self.time_attr = time_attr
        self.min_rung_size = max(1, int(min_rung_size))
        self.tie_break = tie_break
        self.recipe_key = recipe_key
        self.seeds_key = seeds_key
        self.loss_key = loss_key
        self.diverged_key = diverged_key
        self.stop_recipe_on_divergence = stop_recipe_on_divergence
        self.state_path = state_path
        self._state_base = _STATE_DIR.get()
        self.verbose = verbose
        # --- state (plain, picklable, JSON-able) ---
        # moasha: milestone -> recipe_id -> trial_id -> objective values (raw orientation, NaN = missing)
        self._rungs: dict[int, dict[str, dict[str, list[float]]]] = {m: {} for m in self.milestones}
        # dominance: evaluation step -> recipe_id -> trial_id -> Replicate of the tracked metrics
        self._evals: dict[int, dict[str, dict[str, Replicate]]] = {}
        self._trial_recipe: dict[str, str] = {}
        self._stopped: dict[str, Decision] = {}  # trial_id -> the decision that stopped it
        self._recipe_stopped: dict[str, Decision] = {}  # recipe_id -> first STOP of that recipe
        self._last_step: dict[str, int] = {}
        self._finished: dict[str, int] = {}  # trial_id -> last step, when Tune completed it
        self.decisions: list[Decision] = []
        self._cache: dict[Any, Any] = {}  # derived from _evals; never saved
        path = self.resolved_state_path()
        if path and os.path.exists(path):
            self.load_state(path)

    # ------------------------------------------------------------------ Tune hooks

    def on_trial_add(self, tune_controller, trial) -> None:
        self._recipe_of(trial, {})

    def on_trial_result(self, tune_controller, trial, result: Mapping[str, Any]) -> str:
        tid = str(trial.trial_id)
        rid = self._recipe_of(trial, result)
        step = _step(result.get(self.time_attr), self._last_step.get(tid, 0))
        self._last_step[tid] = max(step, self._last_step.get(tid, 0))

        if tid in self._stopped:
            return STOP
        if rid in self._recipe_stopped:
            first = self._recipe_stopped[rid]
            return self._stop(tid, rid, "recipe_stopped", step, first.milestone,
                              f"recipe {rid} was stopped ({first.kind} of trial {first.trial_id} at step {first.step})")

        loss = _f(result.get(self.loss_key))
        div = _f(result.get(self.diverged_key))
        if (self.loss_key in result and not math.isfinite(loss)) or (math.isfinite(div) and div >= 1):
            what = f"{self.loss_key}={result.get(self.loss_key)}" if not math.isfinite(loss) else f"{self.diverged_key}=1"
            return self._stop(tid, rid, "diverged", step, self._passed(step), f"diverged ({what})",
                              whole_recipe=self.stop_recipe_on_divergence)

        if self.rule == "dominance" and self._is_eval_step(step):
            self._record_eval(tid, rid, step, result)
        for c in self.hard_limits:
            violated, why = self._hard_limit_violated(c, rid, step, result)
            if violated:
                return self._stop(tid, rid, "hard_limit", step, self._passed(step),
                                  f"hard limit {c} violated beyond doubt ({why})")

        if self.rule == "dominance":
            held = self._sync_hold(tune_controller, trial, tid, step)
            return held if held is not None else self._dominance(tid, rid, step)
        for m in self.milestones:
            if step < m:
                break
            if tid in self._rungs[m].get(rid, {}):
                continue  # already judged here (a resumed trial re-reports old steps)
            action = self._judge(tid, rid, m, step, result)
            if action == STOP:
                return STOP
        return CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: Optional[Mapping[str, Any]]) -> None:
        tid = str(trial.trial_id)
        step = _step((result or {}).get(self.time_attr), self._last_step.get(tid, 0))
        self._finished[tid] = step
        self._persist()

    def on_trial_error(self, tune_controller, trial) -> None:
        tid = str(trial.trial_id)
        step = self._last_step.get(tid, 0)
        self._finished.setdefault(tid, step)
        if tid not in self._stopped:  # persisted by _stop: a crash right after still knows
            self._stop(tid, self._trial_recipe.get(tid, tid), "error", step, self._passed(step),
                       "the trial ended in an error", whole_recipe=False)

    def debug_string(self) -> str:
        if self.rule == "dominance":
            return (f"MilestoneScheduler(rule=dominance, p={self.stop_confidence:g}) "
                    f"{len(self._evals)} evaluation steps recorded, {len(self._stopped)} trials stopped")
        sizes = ", ".join(f"{m}: {len(r)}" for m, r in self._rungs.items())
        return (f"MilestoneScheduler(rule=moasha, eta={self.eta:g}) recipes per milestone {{{sizes}}}, "
                f"{len(self._stopped)} trials stopped")

    # ------------------------------------------------------------------ rule: dominance

    def _is_eval_step(self, step: int) -> bool:
        if self.eval_every == 0 or step in self.milestones:
            return True
        return step > 0 and step % self.eval_every == 0

    def _record_eval(self, tid: str, rid: str, step: int, result: Mapping[str, Any]) -> None:
        at = self._evals.setdefault(step, {}).setdefault(rid, {})
        if tid in at:
            return  # a resumed trial re-reports an old step: the first measurement stands
        seeds = _step(result.get(self.seeds_key), 1)
        at[tid] = Replicate(tuple(_f(result.get(n)) for n in self._tracked),
                            tuple(_f(result.get(f"{n}_seed_se")) for n in self._tracked), max(1, seeds))
        self._cache.pop(("noise", step), None)
        self._cache.pop(("summary", step, rid), None)
        # σ carried forward to later steps may change too
        self._cache = {k: v for k, v in self._cache.items() if k[0] != "noise_at"}
        self._persist()

    def _summary(self, step: int, rid: str):
        key = ("summary", step, rid)
        if key not in self._cache:
            self._cache[key] = summarise(list(self._evals[step][rid].values()))
        return self._cache[key]

    def _noise(self, step: int) -> tuple[tuple[float, ...], tuple[float, ...], Optional[str]]:
        """(σ, degrees of freedom, source) per tracked metric at `step` (replicates, carried, prior)."""
        key = ("noise_at", step)
        if key not in self._cache:
            by_step = {}
            for s in self._evals:
                if s > step:
                    continue
                nk = ("noise", s)
                if nk not in self._cache:
                    self._cache[nk] = pooled_sd([self._summary(s, r) for r in self._evals[s]])
                by_step[s] = self._cache[nk]
            prior = [self.noise_prior.get(n, math.nan) for n in self._tracked]
            self._cache[key] = noise_for(step, by_step, prior)
        return self._cache[key]

    def _dominance(self, tid: str, rid: str, step: int) -> str:
        if step < self.milestones[0] or (self.max_t is not None and step >= self.max_t):
            return CONTINUE
        mine = sorted((s for s, rs in self._evals.items() if rid in rs and self.milestones[0] <= s <= step),
                      reverse=True)
        if not mine:
            return CONTINUE
        n_obj = len(self.objectives)
        signs = [o.direction.sign * -1 for o in self.objectives]  # +1 = larger is better
        best_p, best_j, best_s, best_src, compared = 0.0, None, None, None, 0
        # a diverged or limit-violating recipe can never be on the front, so it stops nobody
        barred = {r for r, d in self._recipe_stopped.items() if d.kind in ("diverged", "hard_limit")}
        others = sorted({r for s in mine for r in self._evals[s] if r != rid and r not in barred})
        for j in others:
            s = next(s for s in mine if j in self._evals[s])  # the latest step both reached
            mi, mj = self._summary(s, rid), self._summary(s, j)
            sd, df, src = self._noise(s)
            if src is None or not mi.finite or not mj.finite:
                continue
            compared += 1
            p = prob_dominates(mj.mean[:n_obj], mi.mean[:n_obj], sd[:n_obj], mj.n, mi.n, signs, df[:n_obj])
            if p > best_p:
                best_p, best_j, best_s, best_src = p, j, s, src
        at_milestone = step in self.milestones
        if best_p >= self.stop_confidence:
            vals = self._describe(self._summary(best_s, rid))
            reason = (f"step {best_s}: recipe {rid} ({vals}) dominated by recipe {best_j} "
                      f"({self._describe(self._summary(best_s, best_j))}) with P={best_p:.3f} >= "
                      f"{self.stop_confidence:g} (sigma from {best_src})")
            self._stop(tid, rid, "dominated", step, best_s, reason, rung_size=compared + 1,
                       dominator=best_j, p_dominated=round(best_p, 6), noise_source=best_src)
            return STOP
        if at_milestone:
            why = ("no noise estimate yet (no replicates, no noise_prior): nothing is stopped on dominance"
                   if compared == 0 and others else
                   f"max P(dominated)={best_p:.3f} < {self.stop_confidence:g}"
                   + (f" (by {best_j}, sigma from {best_src})" if best_j else ""))
            self._record(Decision(tid, rid, CONTINUE, "milestone", step, step,
                                  f"milestone {step}: recipe {rid} ({self._describe(self._summary(mine[0], rid))}) "
                                  f"vs {compared} recipe(s): {why}", rung_size=compared + 1,
                                  dominator=best_j, p_dominated=round(best_p, 6), noise_source=best_src))
        return CONTINUE

    def _describe(self, summary) -> str:
        vals = ", ".join(f"{o.name}={v:.4g}" for o, v in zip(self.objectives, summary.mean))
        return vals + (f", {summary.n} seeds" if summary.n > 1 else "")

    def _hard_limit_violated(self, c: Constraint, rid: str, step: int, result: Mapping[str, Any]) -> tuple[bool, str]:
        """A real CI of the recipe's seed mean when a between-seed σ is known at this step."""
        v = _f(result.get(c.name))
        k = self._tracked.index(c.name)
        sd, df, src = math.nan, math.inf, None
        if self.rule == "dominance":
            sds, dfs, src = self._noise(step)
            if src is not None:
                sd, df = sds[k], dfs[k]
        seeds = max(1, _step(result.get(self.seeds_key), 1))
        if src is not None and math.isfinite(sd) and math.isfinite(v):
            lo, hi = mean_interval(v, sd, seeds, df=df)
            bad = hi < c.value if c.op == ">=" else lo > c.value
            return bad, f"{c.name}={v:.4g}, 95% CI of the {seeds}-seed mean [{lo:.4g}, {hi:.4g}], sigma from {src}"
        return c.certainly_violated(result), f"{c.name}={result.get(c.name)}, outside its reported CI"

    # ------------------------------------------------------------------ rule: moasha

    def _judge(self, tid: str, rid: str, m: int, step: int, result: Mapping[str, Any]) -> str:
        rung = self._rungs[m]
        rung.setdefault(rid, {})[tid] = [o.value(result) for o in self.objectives]
        recipes = list(rung)
        means = np.array([self._recipe_mean(rung[r]) for r in recipes], dtype=float)
        Y = means * np.array([o.direction.sign for o in self.objectives])
        i = recipes.index(rid)
        order = priority_order(Y, self.tie_break)
        # Exact ties share the best position among them (as MOASHA's searchsorted ranks do):
        # identical results get identical decisions, whatever order they arrived in.
        same = [k for k in range(len(recipes)) if np.all(np.isfinite(Y[i])) and np.array_equal(Y[k], Y[i])]
        p, n = min(order.index(k) for k in same or [i]), len(recipes)
        front = int(nondominated_ranks(Y)[i])
        seeds = len(rung[rid])
        vals = ", ".join(f"{o.name}={v:.4g}" for o, v in zip(self.objectives, means[i]))
        who = f"recipe {rid}" + (f" ({seeds} seeds)" if seeds > 1 else "")
        if n < self.min_rung_size:
            action, why = CONTINUE, f"{n} recipe(s) at the milestone, too few to judge"
        elif p / n > 1.0 / self.eta:
            action, why = STOP, f"position {p + 1}/{n} is outside the top 1/{self.eta:g}"
        else:
            action, why = CONTINUE, f"position {p + 1}/{n} is within the top 1/{self.eta:g}"
        reason = f"milestone {m}: {who} {vals}, front {front}: {why}"
        if action == STOP:
            self._stop(tid, rid, "milestone", step, m, reason, position=p + 1, rung_size=n, front=front)
        else:
            self._record(Decision(tid, rid, CONTINUE, "milestone", step, m, reason, p + 1, n, front))
        return action

    @staticmethod
    def _recipe_mean(seeds: Mapping[str, list[float]]) -> list[float]:
        arr = np.array(list(seeds.values()), dtype=float)
        # A seed with a missing objective makes the recipe's mean missing (ranked last):
        # averaging the others would compare recipes on different seed sets.
        return arr.mean(axis=0).tolist()

    def _passed(self, step: int) -> Optional[int]:
        passed = [m for m in self.milestones if m <= step]
        return passed[-1] if passed else None

    def _stop(self, tid: str, rid: str, kind: str, step: int, milestone: Optional[int], reason: str,
              whole_recipe: bool = True, **rank: Any) -> str:
        d = Decision(tid, rid, STOP, kind, step, milestone, reason, **rank)
        self._stopped[tid] = d
        if whole_recipe:
            self._recipe_stopped.setdefault(rid, d)
        self._record(d)
        return STOP

    def _record(self, d: Decision) -> None:
        self.decisions.append(d)
        if self.verbose:
            print(f"[rayq.search] step {d.step} trial {d.trial_id}: {d.action} - {d.reason}", file=sys.stderr)
        self._persist()

    def _recipe_of(self, trial: Any, result: Mapping[str, Any]) -> str:
        tid = str(trial.trial_id)
        known = self._trial_recipe.get(tid)
        if known is not None and known != tid:
            return known  # an explicit recipe id, once seen, sticks
        rid = result.get(self.recipe_key)
        if rid is None:
            cfg = getattr(trial, "config", None) or {}
            rid = cfg.get(self.recipe_key) if isinstance(cfg, Mapping) else None
        # no recipe id (yet): the trial is its own recipe; a later result may still name one
        rid = tid if rid is None else str(rid)
        self._trial_recipe[tid] = rid
        return rid

    # ------------------------------------------------------------------ queries

    def is_stopped(self, trial_id: str) -> bool:
        """True if the trial, or its recipe (another seed), was stopped: keep it off the front."""
        tid = str(trial_id)
        return tid in self._stopped or self._trial_recipe.get(tid) in self._recipe_stopped

    def stopped_trials(self) -> dict[str, Decision]:
        """trial_id -> the STOP decision (for seeds stopped with their recipe: the recipe's)."""
        out = dict(self._stopped)
        for tid, rid in self._trial_recipe.items():
            if tid not in out and rid in self._recipe_stopped:
                out[tid] = self._recipe_stopped[rid]
        return out

    def stopped_recipes(self) -> dict[str, Decision]:
        return dict(self._recipe_stopped)

    def diverged_trials(self) -> list[str]:
        return [t for t, d in self._stopped.items() if d.kind == "diverged"]

    def finished_trials(self) -> list[str]:
        """Trials Tune completed that were never stopped (their recipe neither): front candidates."""
        return [t for t in self._finished if not self.is_stopped(t)]

    def recipe_of(self, trial_id: str) -> Optional[str]:
        return self._trial_recipe.get(str(trial_id))

    def rung(self, milestone: int) -> dict[str, dict[str, list[float]]]:
        """Recorded objective values at a milestone: recipe_id -> trial_id -> values."""
        return {r: dict(t) for r, t in self._rungs[int(milestone)].items()}

    def decisions_table(self) -> list[dict[str, Any]]:
        """Every decision as a plain dict (one row each), for results.parquet."""
        return [asdict(d) for d in self.decisions]

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        def clean(v: list[float]) -> list[Optional[float]]:
            return [x if math.isfinite(x) else None for x in v]

        return {
            "version": _STATE_VERSION,
            **self._settings(),
            "rungs": {str(m): {r: {t: clean(v) for t, v in ts.items()} for r, ts in rs.items()}
                      for m, rs in self._rungs.items()},
            "evals": {str(s): {r: {t: rep.to_json() for t, rep in ts.items()} for r, ts in rs.items()}
                      for s, rs in self._evals.items()},
            "trial_recipe": self._trial_recipe,
            "stopped": {t: asdict(d) for t, d in self._stopped.items()},
            "recipe_stopped": {r: asdict(d) for r, d in self._recipe_stopped.items()},
            "last_step": self._last_step,
            "finished": self._finished,
            "decisions": [asdict(d) for d in self.decisions],
            "sync_rungs": self.sync_rungs,
            "sync": self._sync_state(),
        }

    def _settings(self) -> dict[str, Any]:
        """What decisions depend on: a state saved under other settings must not be continued."""
        return {"objectives": [str(o) for o in self.objectives], "milestones": self.milestones,
                "rule": self.rule, "eta": self.eta, "stop_confidence": self.stop_confidence,
                "eval_every": self.eval_every, "hard_limits": [str(c) for c in self.hard_limits]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"scheduler state: unsupported version {state.get('version')!r} "
                             f"(this rayq writes {_STATE_VERSION})")
        for key, mine in self._settings().items():
            if state.get(key) != mine:
                raise ValueError(f"scheduler state: saved with {key}={state.get(key)!r}, "
                                 f"this search has {key}={mine!r}")
        if bool(state.get("sync_rungs", False)) != self.sync_rungs:  # absent in states of older rayq
            raise ValueError(f"scheduler state: saved with sync_rungs={bool(state.get('sync_rungs', False))}, "
                             f"this search has sync_rungs={self.sync_rungs}")
        self._rungs = {m: {} for m in self.milestones}
        for m, rs in state["rungs"].items():
            self._rungs.setdefault(int(m), {}).update(
                {r: {t: [math.nan if x is None else float(x) for x in v] for t, v in ts.items()}
                 for r, ts in rs.items()})
        self._evals = {int(s): {r: {t: Replicate.from_json(v) for t, v in ts.items()} for r, ts in rs.items()}
                       for s, rs in state["evals"].items()}
        self._cache = {}
        self._trial_recipe = dict(state["trial_recipe"])
        self._stopped = {t: Decision(**d) for t, d in state["stopped"].items()}
        self._recipe_stopped = {r: Decision(**d) for r, d in state["recipe_stopped"].items()}
        self._last_step = {t: int(s) for t, s in state["last_step"].items()}
        self._finished = {t: int(s) for t, s in state["finished"].items()}
        self.decisions = [Decision(**d) for d in state["decisions"]]
        self._load_sync_state(state.get("sync", {}))

    def resolved_state_path(self) -> Optional[str]:
        """`state_path`, a relative one resolved against the search directory (see `state_dir`)."""
        if not self.state_path or os.path.isabs(self.state_path):
            return self.state_path
        base = _STATE_DIR.get() or self._state_base
        return os.path.join(base, self.state_path) if base else self.state_path

    def save_state(self, path: str) -> None:
        """Write the state as JSON, atomically (readers see the old file or the new one)."""
        atomic_write_text(path, json.dumps(self.state_dict()))

    def load_state(self, path: str) -> None:
        """Load a saved state; a damaged file is a ValueError naming it (never a partial load)."""
        try:
            with open(path) as fh:
                state = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ValueError(f"damaged scheduler state {path} ({exc})") from None
        try:
            self.load_state_dict(state)
        except ValueError:
            raise
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"damaged scheduler state {path} ({type(exc).__name__}: {exc})") from None

    def _persist(self) -> None:
        path = self.resolved_state_path()
        if path:
            self.save_state(path)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        # Tuner.restore unpickles the scheduler pickled at the start of the experiment; the
        # state file written since then is newer, so it wins. A search resumed with
        # `rayq search --resume` must have it (see tuner.run_search).
        self.__dict__.update(state)
        base = _STATE_DIR.get()
        if base is not None:
            self._state_base = base
        path = self.resolved_state_path()
        if path and os.path.exists(path):
            self.load_state(path)
