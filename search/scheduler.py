"""`MilestoneScheduler`: multi-objective asynchronous successive halving (MOASHA) for Ray Tune.

Ray's schedulers take one metric (ray-2.60.md §5); this one ranks recipes on several objectives
at milestones of the trial's own `step` counter (`training_iteration` restarts after a resume).
On every result, in this order:

1. Already stopped: a trial (or a recipe) that was stopped stays stopped (Tune may still deliver
   a buffered result after a STOP, and a resumed trial re-reports old steps).
2. Divergence: a non-finite `train/loss` or `diverged == 1` stops at once, recorded as diverged.
3. Hard limits: a `Constraint` whose violation is certain given the reported uncertainty (the
   whole CI on the wrong side, see `Constraint.certainly_violated`) stops at once.
4. Milestones: the first result with `step >= m` records the trial's objectives in rung `m`
   (milestones passed in one jump are recorded in order, each deciding). The recipes recorded at
   `m` so far are ranked by non-dominated sorting with the epsilon-net tie-break
   (`pareto.priority_order`), and the rule is Syne Tune's MOASHA rule, unchanged: with `n`
   recipes at the rung and the recipe at 0-based position `p` (exact ties share the best
   position of the tied group), STOP iff `p / n > 1 / eta`;
   while the rung holds fewer than `min_rung_size` recipes (default 2, i.e. MOASHA: the first
   arrival always continues) nothing is stopped. Decisions are asynchronous: a recipe is judged
   against whoever reached the milestone before it and never revisited when better ones arrive
   later, so free workers never wait for a full rung. Missing/NaN objectives rank last.

Seeds. Trials that share a `recipe_id` (read from the result, else `trial.config`, else the
trial id itself, so one-trial-per-recipe needs nothing) are one recipe: its rung value is the
mean over the seeds recorded there so far, re-judged each time another seed arrives. Every STOP
is a recipe decision: the recipe is marked stopped and each of its other seeds gets STOP on its
next result (kind "recipe_stopped"), so a recipe's seeds finish together and no recipe reaches
the final front with a partial seed mean. `is_stopped(trial_id)` is true for all of them.

State is plain attributes (pickled by Tune in tuner.pkl, and by `save`/`restore`). Ray 2.60
pickles the scheduler only when the experiment starts, not as it runs, so pass `state_path` to
make decisions survive a killed driver: the state is written atomically (JSON) after every
change and reloaded when the scheduler is unpickled by `Tuner.restore` or built again on it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from rayq.config import atomic_write_text
from rayq.search.objectives import Constraint, Objective, parse_constraints
from rayq.search.objectives import as_float as _f
from rayq.search.pareto import TIE_BREAKS, _objectives, nondominated_ranks, priority_order

__all__ = ["MilestoneScheduler", "Decision"]

CONTINUE = TrialScheduler.CONTINUE
STOP = TrialScheduler.STOP
_STATE_VERSION = 1


@dataclass(frozen=True)
class Decision:
    """One scheduler decision, as the results writer stores it."""

    trial_id: str
    recipe_id: str
    action: str  # "CONTINUE" or "STOP"
    kind: str  # "milestone" | "diverged" | "hard_limit" | "recipe_stopped"
    step: int  # the trial's step when decided
    milestone: Optional[int]  # rung of a milestone decision; for other stops the last milestone passed
    reason: str  # one human-readable line
    position: Optional[int] = None  # 1-based rank position at the rung
    rung_size: Optional[int] = None  # recipes recorded at the rung (including this one)
    front: Optional[int] = None  # 0-based non-dominated front at the rung


def _step(v: Any, default: int) -> int:
    x = _f(v)
    return int(x) if math.isfinite(x) else int(default)


class MilestoneScheduler(FIFOScheduler):
    """MOASHA at `milestones` of `time_attr` (see the module docstring for the exact rule)."""

    def __init__(
        self,
        objectives: Sequence[Any],
        milestones: Iterable[int] = (15000,),
        eta: float = 3.0,
        hard_limits: Sequence[Any] = (),
        time_attr: str = "step",
        *,
        min_rung_size: int = 2,
        tie_break: str = "epsilon",
        recipe_key: str = "recipe_id",
        loss_key: str = "train/loss",
        diverged_key: str = "diverged",
        stop_recipe_on_divergence: bool = True,
        state_path: Optional[str] = None,
        verbose: bool = True,
    ):
        super().__init__()
        self.objectives: list[Objective] = _objectives(list(objectives))
        self.milestones: list[int] = sorted({int(m) for m in milestones})
        if not self.milestones or self.milestones[0] <= 0:
            raise ValueError("milestones: expected positive step numbers")
        if not eta > 1:
            raise ValueError(f"eta: expected > 1, got {eta}")
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break: expected one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
        self.eta = float(eta)
        self.hard_limits: list[Constraint] = parse_constraints(list(hard_limits))
        self.time_attr = time_attr
        self.min_rung_size = max(1, int(min_rung_size))
        self.tie_break = tie_break
        self.recipe_key = recipe_key
        self.loss_key = loss_key
        self.diverged_key = diverged_key
        self.stop_recipe_on_divergence = stop_recipe_on_divergence
        self.state_path = state_path
        self.verbose = verbose
        # --- state (plain, picklable, JSON-able) ---
        # milestone -> recipe_id -> trial_id -> objective values (raw orientation, NaN = missing)
        self._rungs: dict[int, dict[str, dict[str, list[float]]]] = {m: {} for m in self.milestones}
        self._trial_recipe: dict[str, str] = {}
        self._stopped: dict[str, Decision] = {}  # trial_id -> the decision that stopped it
        self._recipe_stopped: dict[str, Decision] = {}  # recipe_id -> first STOP of that recipe
        self._last_step: dict[str, int] = {}
        self._finished: dict[str, int] = {}  # trial_id -> last step, when Tune completed it
        self.decisions: list[Decision] = []
        if state_path and os.path.exists(state_path):
            self.load_state(state_path)

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

        for c in self.hard_limits:
            if c.certainly_violated(result):
                return self._stop(tid, rid, "hard_limit", step, self._passed(step),
                                  f"hard limit {c} violated beyond doubt ({c.name}={result.get(c.name)})")

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
        self._finished.setdefault(str(trial.trial_id), self._last_step.get(str(trial.trial_id), 0))

    def debug_string(self) -> str:
        sizes = ", ".join(f"{m}: {len(r)}" for m, r in self._rungs.items())
        return (f"MilestoneScheduler(eta={self.eta:g}) recipes per milestone {{{sizes}}}, "
                f"{len(self._stopped)} trials stopped")

    # ------------------------------------------------------------------ the rule

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
            "objectives": [str(o) for o in self.objectives],
            "milestones": self.milestones,
            "rungs": {str(m): {r: {t: clean(v) for t, v in ts.items()} for r, ts in rs.items()}
                      for m, rs in self._rungs.items()},
            "trial_recipe": self._trial_recipe,
            "stopped": {t: asdict(d) for t, d in self._stopped.items()},
            "recipe_stopped": {r: asdict(d) for r, d in self._recipe_stopped.items()},
            "last_step": self._last_step,
            "finished": self._finished,
            "decisions": [asdict(d) for d in self.decisions],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"scheduler state: unsupported version {state.get('version')!r}")
        if state["objectives"] != [str(o) for o in self.objectives]:
            raise ValueError(f"scheduler state: saved for objectives {state['objectives']}, "
                             f"not {[str(o) for o in self.objectives]}")
        self._rungs = {m: {} for m in self.milestones}
        for m, rs in state["rungs"].items():
            self._rungs.setdefault(int(m), {}).update(
                {r: {t: [math.nan if x is None else float(x) for x in v] for t, v in ts.items()}
                 for r, ts in rs.items()})
        self._trial_recipe = dict(state["trial_recipe"])
        self._stopped = {t: Decision(**d) for t, d in state["stopped"].items()}
        self._recipe_stopped = {r: Decision(**d) for r, d in state["recipe_stopped"].items()}
        self._last_step = {t: int(s) for t, s in state["last_step"].items()}
        self._finished = {t: int(s) for t, s in state["finished"].items()}
        self.decisions = [Decision(**d) for d in state["decisions"]]

    def save_state(self, path: str) -> None:
        """Write the state as JSON, atomically (readers see the old file or the new one)."""
        atomic_write_text(path, json.dumps(self.state_dict()))

    def load_state(self, path: str) -> None:
        with open(path) as fh:
            self.load_state_dict(json.load(fh))

    def _persist(self) -> None:
        if self.state_path:
            self.save_state(self.state_path)

    def __setstate__(self, state: dict) -> None:
        # Tuner.restore unpickles the scheduler pickled at the start of the experiment; the
        # state file written since then is newer, so it wins.
        self.__dict__.update(state)
        if self.state_path and os.path.exists(self.state_path):
            self.load_state(self.state_path)

    # TrialScheduler.save/restore (pickled attributes, as Ray's own schedulers do)
    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))
