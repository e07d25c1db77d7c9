"""Synchronous rungs for `rule: dominance` (`search.sync_rungs`): judge a milestone's recipes together.

Asynchronous judging lets the first arrivals at a milestone pass before anything better has
arrived (re-checking at each later evaluation catches some of it, at the cost of the steps run
meanwhile). With a fixed set of trials (a grid), `sync_rungs` holds every trial at each milestone
with Tune's PAUSE decision (Ray 2.60: the trial is checkpointed and its resources freed, so
trials still pending can start and reach the milestone too) until every trial of the search has
arrived there or ended (stopped, finished, errored) before it. The last arrival triggers the
judgement: every held recipe is compared, with the same dominance test as asynchronous judging,
against everything recorded at that step, so the order of arrival no longer matters. Held trials
that are dominated are stopped through `tune_controller.stop_trial` (as Ray's HyperBand stops
paused trials); the others are released and `choose_trial_to_run` hands them back to Tune (a
held trial is never resumed before its rung is judged).

`expected_trials` is the number of trials the search will run (grid points x num_samples);
without it, or when it is never reached (a searcher that stops suggesting), a rung is judged once
no trial is left running or pending, so a search cannot deadlock on a rung.
"""

from __future__ import annotations

from typing import Any, Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

__all__ = ["SyncRungs"]

PAUSE = TrialScheduler.PAUSE
CONTINUE = TrialScheduler.CONTINUE
STOP = TrialScheduler.STOP


class SyncRungs:
    """Mixin for `MilestoneScheduler`: the held/released bookkeeping of synchronous rungs."""

    sync_rungs: bool
    expected_trials: Optional[int]

    def _init_sync(self, sync_rungs: bool, expected_trials: Optional[int]) -> None:
        if expected_trials is not None and expected_trials < 1:
            raise ValueError(f"expected_trials: expected >= 1, got {expected_trials}")
        self.sync_rungs = bool(sync_rungs)
        self.expected_trials = expected_trials
        self._held: dict[int, dict[str, Any]] = {}  # milestone -> trial_id -> trial (held there)
        self._released: dict[int, set[str]] = {}  # milestone -> trial ids judged there

    def _sync_hold(self, tune_controller: Any, trial: Any, tid: str, step: int) -> Optional[str]:
        """PAUSE a trial arriving at an unjudged milestone; judge the rung when it is complete.
        None: not a milestone, decide as usual."""
        if not self.sync_rungs or step not in self.milestones:
            return None
        if tid in self._released.get(step, ()):
            # a resumed trial re-reports the milestone it was judged at (Tune restarts a paused
            # function trainable from its last checkpoint, or from the start): judged already
            return CONTINUE
        self._held.setdefault(step, {})[tid] = trial
        if not self._rung_complete(step, tune_controller):
            return PAUSE
        return self._judge_rung(step, tune_controller, tid)

    def _rung_complete(self, m: int, tune_controller: Any) -> bool:
        held, done = self._held.get(m, {}), self._released.get(m, set())
        known = set(self._trial_recipe)
        ended = {t for t in known if self.is_stopped(t) or t in self._finished}
        missing = known - set(held) - done - ended
        if missing:
            return False
        if self.expected_trials is not None and len(known) >= self.expected_trials:
            return True
        # no count (or not reached): judge once nothing is left that could still arrive
        trials = tune_controller.get_trials() if tune_controller is not None else []
        return not any(t.status in (Trial.PENDING, Trial.RUNNING) and str(t.trial_id) not in held for t in trials)

    def _judge_rung(self, m: int, tune_controller: Any, arriving: str) -> str:
        held = self._held.pop(m)
        released = self._released.setdefault(m, set())
        mine = STOP
        for tid in sorted(held):  # order-free: every recorded recipe at m is a possible dominator
            trial = held[tid]
            released.add(tid)
            rid = self._trial_recipe.get(tid, tid)
            action = STOP if self.is_stopped(tid) else self._dominance(tid, rid, m)
            if tid == arriving:
                mine = action
            elif action == STOP and tune_controller is not None and getattr(trial, "status", None) == Trial.PAUSED:
                tune_controller.stop_trial(trial)
        self._persist()
        return mine

    def _released_paused(self, tune_controller: Any) -> Optional[Any]:
        """A PAUSED trial whose rung was judged (never one still held)."""
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PAUSED and not self.is_stopped(str(trial.trial_id)) \
                    and not any(str(trial.trial_id) in h for h in self._held.values()):
                return trial
        return None

    def choose_trial_to_run(self, tune_controller: Any) -> Optional[Any]:
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING:
                return trial
        return self._released_paused(tune_controller)

    def _sync_state(self) -> dict:
        return {"held": {str(m): sorted(ts) for m, ts in self._held.items()},
                "released": {str(m): sorted(ts) for m, ts in self._released.items()}}

    def _load_sync_state(self, state: dict) -> None:
        # a held trial's object is Tune's; after a restore it re-reports the milestone and is held again
        self._held = {}
        self._released = {int(m): set(ts) for m, ts in state.get("released", {}).items()}
