"""The recipe search on Ray Tune (this module imports ray; `rayq.search` itself does not): each
trial is one recipe, trained with `seeds_per_recipe` seeds as Ray Train runs, reported to Tune as
the seed mean (with a between-seed standard error) and each seed's checkpoint.

Why seeds live inside a trial: seed-to-seed spread of KL (~5% here) exceeds a model's own
evaluation error, so the scheduler and Optuna must compare recipes, not single runs. A trial
starts one TorchTrainer per seed (threads in the trial driver; each is an ordinary Ray Train run
named `<trial>-seed<k>` under `<storage>/trials/`, so Ray resumes it from its last checkpoint when
the trial is restored), collects their reports through a Ray queue, and reports to Tune once all
seeds reached a step. Where evaluation runs is a config choice made by `rayq.cluster.evaluator`
(the same for `rayq train`): in the train workers (the eval hook of the one loop) or, with
`eval.placement: task`, as a Ray task with `cluster.evaluator_resources` on whichever node owns
them (the paper trained on TPUs and evaluated INT8 on GPUs).
"""

from __future__ import annotations

import math
import queue as queue_lib
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import ray.tune
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch
from ray.util.queue import Queue

from rayq import config as config_io
from rayq import metrics as names
from rayq.cluster import evaluator
from rayq.cluster.trainer import QueueReports, build_trainer
from rayq.config import get_dotted
from rayq.errors import UserError
from rayq.run_dir import config_differences
from rayq.schema import Config
from rayq.search import dashboards
from rayq.search import results as results_io
from rayq.search.space import TUNE_POINTS_KEY


def recipe_values(trial_config: dict) -> dict:
    """Dotted recipe values of a trial (grid mode nests them under one key)."""
    values = dict(trial_config.get(TUNE_POINTS_KEY, {}))
    values.update({k: v for k, v in trial_config.items() if k.startswith("recipe.")})
    return values


def trial_config_for(base: Config, trial_config: dict) -> Config:
    return config_io.with_values(base, recipe_values(trial_config))


def config_columns(trial_config: dict, base: Config, searched: Sequence[str]) -> dict:
    """A trial's `config/<path>` columns. Every searched path is written with the trial's resolved
    value (the base config's where the trial's point does not set it), so a null means null, never
    "not set". Fixed for the trial's life: computed once per trial, not per report."""
    cfg = trial_config_for(base, trial_config)
    return {f"config/{path}": results_io.clean(get_dotted(cfg, path)) for path in searched}


def aggregate(per_seed: list[dict], objective_names: list[str]) -> dict:
    """Seed mean of every numeric metric; between-seed standard error of each objective."""
    out: dict[str, Any] = {}
    keys = sorted({k for m in per_seed for k in m})
    for key in keys:
        values = [m[key] for m in per_seed if key in m]
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = sum(float(v) for v in values) / len(values)
        elif values:
            out[key] = values[0]
    if any(m.get(names.DIVERGED) for m in per_seed):
        out[names.DIVERGED] = 1.0
    n = len(per_seed)
    for name in objective_names:
        values = [float(m[name]) for m in per_seed if name in m]
        if len(values) >= 2:
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
            out[f"{name}_seed_se"] = math.sqrt(var / len(values))
        elif values:
            out[f"{name}_seed_se"] = 0.0
    out["seeds"] = n
    return out


def _fit_seed(cfg: Config, storage: str, name: str, q: Any, seed_index: int, data_dir: Optional[str]) -> None:
    try:
        result = build_trainer(cfg, storage=storage, name=name, evaluate=True, data_dir=data_dir,
                               callbacks=[QueueReports(q, seed_index)]).fit()
        if result.error is not None:
            raise result.error
        q.put({"run": seed_index, "done": True})
    except BaseException as exc:  # noqa: BLE001 - handed to the driver thread, which re-raises
        q.put({"run": seed_index, "error": repr(exc)})


def trial_driver(trial_config: dict, *, base: dict, storage: str, objectives: list[str],
                 data_dir: Optional[str] = None) -> None:
    """The Tune function trainable: run the recipe's seeds, report their mean at every step.

    Where each seed's checkpoints are evaluated is `rayq.cluster.evaluator`'s choice
    (`eval.placement`), as for `rayq train`."""
    cfg = trial_config_for(config_io.build(Config, base), trial_config)
    trial_id = ray.tune.get_context().get_trial_id()
    seeds = cfg.search.seeds_per_recipe
    q = Queue(actor_options={"num_cpus": 0})  # inside the trial's placement group: needs no CPU
    threads = []
    for k in range(seeds):
        seed_cfg = config_io.with_values(cfg, {"train.seed": cfg.train.seed + k})
        t = threading.Thread(target=_fit_seed, args=(seed_cfg, f"{storage}/trials", f"{trial_id}-seed{k}", q, k,
                                                     data_dir), daemon=True)
        t.start()
        threads.append(t)

    pending: dict[int, dict[int, dict]] = {}
    checkpoints: dict[int, dict[int, Any]] = {}
    carried: dict[str, float] = {name: float("nan") for name in objectives}  # Tune's strict metric check
    finished: set[int] = set()
    while len(finished) < seeds:
        try:
            item = q.get(timeout=2.0)
        except queue_lib.Empty:
            continue
        if "error" in item:
            raise RuntimeError(f"seed {item['run']} of trial {trial_id} failed: {item['error']}")
        if item.get("done"):
            finished.add(item["run"])
            continue
        m = item["metrics"]
        if m.get(names.DIVERGED):  # one diverged seed makes the recipe unstable: report at once
            ray.tune.report({**carried, **m, names.DIVERGED: 1.0, "seeds": seeds})
            return
        step = int(m[names.STEP])
        pending.setdefault(step, {})[item["run"]] = m
        if item["checkpoint"] is not None:
            checkpoints.setdefault(step, {})[item["run"]] = item["checkpoint"]
        live = seeds - len(finished)
        if len(pending[step]) < max(1, live):
            continue
        by_seed = pending.pop(step)
        step_ckpts = checkpoints.pop(step, {})
        seeds_here = sorted(by_seed)
        per_seed = evaluator.checkpoint_metrics(cfg, [by_seed[k] for k in seeds_here],
                                                [step_ckpts.get(k) for k in seeds_here], evaluate=True,
                                                data_dir=data_dir)
        row = aggregate(per_seed, objectives)
        for name in objectives:
            if name in row:
                carried[name] = row[name]
        # every seed's checkpoint: the row's metrics are the seeds' mean, not seed 0's
        for k, ckpt in sorted(step_ckpts.items()):
            row[names.seed_checkpoint_path(k)] = ckpt.path
        if 0 in step_ckpts:
            row[names.CHECKPOINT_PATH] = step_ckpts[0].path
        ray.tune.report({**carried, **row})


def make_searcher(cfg: Config, objectives: list, constraints: Sequence[Any] = (),
                  storage: Any = None) -> Optional[Any]:
    """Optuna through Ray Tune for nsga2/tpe/gp; None (Tune's variant generator) for grid/random.

    Hard limits and early stops reach every sampler as infeasible trials (`Trial.set_constraint`,
    see `RecipeOptunaSearch`), never as value-less PRUNED ones. With `storage` (an Optuna storage,
    e.g. `dashboards.optuna_storage(DIR)`) the study is kept there, so `optuna-dashboard` reads it.
    """
    s = cfg.search
    if s.searcher in ("grid", "random"):
        return None
    import optuna

    samplers = {
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=s.seed, population_size=max(4, s.max_concurrent * 2)),
        "tpe": lambda: optuna.samplers.TPESampler(seed=s.seed, multivariate=True, n_startup_trials=4),
        "gp": lambda: optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=4),
    }
    return RecipeOptunaSearch(
        total_steps=cfg.recipe.steps, constraints=list(constraints),
        metric=[o.name for o in objectives], mode=[o.direction.tune for o in objectives],
        sampler=samplers[s.searcher](), seed=s.seed,
        **({"storage": storage, "study_name": dashboards.OPTUNA_STUDY} if storage is not None else {}))


FINISHED = "finished"  # the constraint "ran its own recipe.steps" (1 = stopped early)


class RecipeOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna what a trial's end means for the sampler.

    Ray tells the searcher COMPLETE with the last values of every trial, stopped early or not.
    Told as PRUNED (no values) instead, NSGA-II never counts stopped trials toward a generation
    (a search where most trials are stopped stays in its random first generation) and TPE files
    value-less multi-objective trials in its good group while few trials completed. So every
    trial with finite values is told COMPLETE with constraint values (`Trial.set_constraint`,
    <= 0 feasible): one per hard limit (by how much the final value misses the bound) and
    `finished` (1 when the trial stopped before its own `recipe.steps`, searched or not).
    Optuna's constrained domination then ranks every early-stopped or limit-violating trial
    below every feasible one: NSGA-II's generations fill, and TPE's good group holds only
    finished, feasible recipes. Diverged trials and errors are FAIL.

    Measured against the alternative (PRUNED, with the NSGA-II population shrunk to the trials
    expected to finish: 8 x 0.44 -> 4) by `simulate_optuna` (200 searches of 33 trials, rule
    dominance p 0.9; search/benchmarks/nsga2-stopped-trials-200.json): HV regret 0.0645
    [0.057, 0.073] here vs 0.0646 [0.056, 0.073] (paired difference 0.000 [-0.007, 0.007]);
    knee on the front 0.74 [0.68, 0.80] vs 0.79 [0.73, 0.84] (+0.05 [0.005, 0.095]), but PRUNED
    spent 0.65 of the budget vs 0.58 (+0.07 [0.06, 0.09]: it let 17.8 trials finish vs 15.2); the
    exported pick was truly Pareto-optimal in 0.915 vs 0.88. No clear win at equal compute, so
    COMPLETE + infeasible stays: it also needs no guess of the completion rate.
    """

    def __init__(self, *args, total_steps: int, constraints: Sequence[Any] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.total_steps = int(total_steps)
        self.constraints = list(constraints)
        self._trial_steps: dict[str, int] = {}

    def suggest(self, trial_id: str) -> Optional[dict]:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            self._trial_steps[trial_id] = int(recipe_values(config).get("recipe.steps", self.total_steps))
        return config

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        values = [_as_float((result or {}).get(m)) for m in self.metric] if result else []
        usable = bool(values) and not error and not (result or {}).get("diverged") \
            and all(math.isfinite(v) for v in values)
        if not usable:
            super().on_trial_complete(trial_id, None, error=True)  # FAIL: no sampler learns from it
            return
        if ot_trial is not None and trial_id not in self._completed_trials:
            steps = self._trial_steps.get(trial_id, self.total_steps)
            for key, value in trial_constraints(result, self.constraints, steps).items():
                ot_trial.set_constraint(key, value)
        super().on_trial_complete(trial_id, result, error=False)


def trial_constraints(result: dict, constraints: Sequence[Any], total_steps: int) -> dict[str, float]:
    """Optuna constraint values of a trial (<= 0 feasible): per hard limit (keyed by its text),
    how far the value misses the bound (a missing value misses by 1); `finished`: 1 if the
    trial stopped before its steps."""
    out = {}
    for c in constraints:
        v = _as_float(result.get(c.name))
        out[str(c)] = 1.0 if not math.isfinite(v) else (c.value - v if c.op == ">=" else v - c.value)
    out[FINISHED] = 0.0 if _as_float(result.get("step")) >= total_steps else 1.0
    return out


def _as_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def make_scheduler(cfg: Config, objectives: list, constraints: Sequence[Any],
                   expected_trials: Optional[int] = None) -> Any:
    """The search's `MilestoneScheduler` from `search.*`, its state file relative to the search dir;
    `expected_trials` (the search's trial count) tells `search.sync_rungs` when a rung is complete.

    Milestones must be evaluation steps (a milestone between evaluations would be judged on the
    previous evaluation's values, or on none).
    """
    from rayq.search.scheduler import MilestoneScheduler

    s, every = cfg.search, cfg.train.eval_every
    known = {o.name for o in objectives} | {c.name for c in constraints}
    stray = sorted(set(s.noise_prior) - known)
    if stray:
        raise UserError(f"search.noise_prior: {stray[0]!r} is neither an objective nor a constraint metric "
                        f"(known: {', '.join(sorted(known))})")
    bad = [m for m in s.milestones if every == 0 or m % every]
    if bad:
        raise UserError(f"search.milestones: {bad[0]} is not an evaluation step; expected multiples of "
                        f"train.eval_every={every}" if every else
                        "search.milestones: train.eval_every is 0 (evaluation only at the end); expected "
                        "eval_every > 0 dividing every milestone")
    if s.rule == "dominance" and s.seeds_per_recipe < 2:
        missing = [o.name for o in objectives if o.name not in s.noise_prior]
        if missing:  # legal (recipes still stop on divergence and hard limits), but say so up front
            print(f"rayq search: rule dominance has no noise estimate for {missing[0]!r} (seeds_per_recipe=1, "
                  f"no search.noise_prior): no recipe will be stopped as dominated; set search.noise_prior "
                  f"or search.seeds_per_recipe >= 2", file=sys.stderr)
    return MilestoneScheduler(objectives, s.milestones, s.eta, hard_limits=constraints, rule=s.rule,
                              stop_confidence=s.stop_confidence, eval_every=every,
                              noise_prior=s.noise_prior, state_path=results_io.SCHEDULER_STATE,
                              sync_rungs=s.sync_rungs, expected_trials=expected_trials if s.sync_rungs else None)


class ResultsWriter(Callback):
    """Keeps `DIR/results.parquet` current as the search runs (see rayq.search.results)."""

    def __init__(self, out_dir: str | Path, base: Config, searched: list[str]):
        self.out_dir = Path(out_dir)
        self.base, self.searched = base, searched
        self.path = self.out_dir / results_io.RESULTS
        self._load()

    def _load(self) -> None:
        self.rows: list[dict] = results_io.read_rows(self.out_dir) if self.path.exists() else []
        self._config_cols: dict[str, dict] = {}  # trial id -> its config/<path> columns
        self._last_flush = 0.0

    def __getstate__(self) -> dict:
        # Tune pickles callbacks once, when the experiment starts: the rows on disk are the truth
        return {k: v for k, v in self.__dict__.items() if k not in ("rows", "_config_cols")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()  # a restored search continues the table, it does not start it again

    def on_trial_result(self, iteration, trials, trial, result, **info):
        cols = self._config_cols.get(trial.trial_id)
        if cols is None:
            cols = self._config_cols[trial.trial_id] = config_columns(dict(trial.config), self.base, self.searched)
        self.rows.append(results_io.result_row(trial.trial_id, cols, dict(result)))
        if time.time() - self._last_flush >= results_io.FLUSH_SECONDS:
            self.flush()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.flush()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.flush()

    def on_experiment_end(self, trials, **info):
        self.flush()

    def flush(self) -> None:
        if self.rows:
            results_io.write_table(self.rows, self.path)
        self._last_flush = time.time()


@dataclass
class SearchOutcome:
    out_dir: Path
    front: list[dict]
    status: dict[str, dict]
    objectives: list


def storage_for(cfg: Config, out_dir: Path) -> str:
    """Where Tune and Train write: `cluster.storage` (local, s3://, gs://) or DIR/ray."""
    return cfg.cluster.storage or str(out_dir / "ray")


def _say(msg: str) -> None:
    print(f"rayq search: {msg}", file=sys.stderr, flush=True)


def trial_label(trial_config: dict) -> str:
    """A trial's recipe label for the progress table (e.g. `wd0.1-gc1-bf16`)."""
    from rayq.search.space import recipe_label

    values = recipe_values(trial_config)
    return recipe_label(values) if values else "base recipe"


def run_search(cfg: Config, out_dir: str | Path, *, resume: bool = False, dashboard: bool = False) -> SearchOutcome:
    """`rayq search`: validate, prepare data once, run Tune, write results and the front."""
    import ray.tune

    from rayq import data as data_io
    from rayq.cluster.trainer import connect
    from rayq.search.progress import ProgressTable, fit_on_stderr
    from rayq.search.scheduler import state_dir
    from rayq.search.space import validate_search

    out_dir = Path(out_dir).resolve()
    checked = validate_search(cfg)  # everything is checked before Ray starts
    objectives = checked.objectives
    names = [o.name for o in objectives]
    tune_dir = f"{storage_for(cfg, out_dir)}/tune"
    if not resume and (out_dir / results_io.RESULTS).exists():
        raise UserError(f"{out_dir}: holds a search already; pass --resume to continue it, or a new --out")
    if dashboard:
        dashboards.check_dashboard()
    if not resume and (out_dir / results_io.SCHEDULER_STATE).exists():
        raise UserError(f"{out_dir / results_io.SCHEDULER_STATE}: a search's state is here already; pass --resume "
                        f"to continue that search, or a new --out (a fresh search never loads old decisions)")
    if resume:
        _refuse_changed_config(cfg, out_dir)
    if resume and ray.tune.Tuner.can_restore(tune_dir) and not (out_dir / results_io.SCHEDULER_STATE).exists():
        raise UserError(f"{out_dir / results_io.SCHEDULER_STATE}: missing; without it the scheduler would resume "
                        f"with no memory of its decisions (restore the file, or start a new --out)")
    with state_dir(out_dir):
        trials = None if not cfg.search.sync_rungs else (
            len(checked.space.grid(cfg)) if cfg.search.searcher == "grid" else cfg.search.num_samples)
        scheduler = _scheduler_or_refuse(cfg, objectives, checked.constraints, out_dir, trials)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "config.yaml").exists():  # a resumed search keeps the config it started with
        config_io.save(cfg, out_dir / "config.yaml")
    data = data_io.prepare(cfg.data, cfg.model.vocab_size,
                           progress=lambda msg: print(msg, file=sys.stderr, flush=True))  # once
    url = connect(cfg.cluster.address, dashboard=dashboard)
    if url:
        _say(f"Ray dashboard: {url} (when it asks for a token: `ray get-auth-token`)")
    _say(dashboards.tensorboard_line(tune_dir))

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial_driver, base=config_io.to_dict(cfg), storage=storage_for(cfg, out_dir),
                                 objectives=names, data_dir=str(data.root)),
        {"CPU": cfg.search.trial_cpus})
    if resume and ray.tune.Tuner.can_restore(tune_dir):
        # the scheduler in tuner.pkl resolves its relative state path against this directory
        # (the search may have moved) and reloads the state file there
        with state_dir(out_dir):
            tuner = ray.tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
    else:
        if resume:
            print(f"rayq search: nothing to resume in {tune_dir}; starting the search", file=sys.stderr)
        grid = cfg.search.searcher == "grid"
        tuner = ray.tune.Tuner(
            trainable,
            param_space=checked.space.to_tune(),
            tune_config=ray.tune.TuneConfig(
                search_alg=make_searcher(cfg, objectives, checked.constraints,
                                         storage=dashboards.optuna_storage(out_dir)),
                scheduler=scheduler,
                num_samples=1 if grid else cfg.search.num_samples,
                max_concurrent_trials=cfg.search.max_concurrent),
            run_config=ray.tune.RunConfig(
                name="tune", storage_path=storage_for(cfg, out_dir),
                callbacks=[ResultsWriter(out_dir, cfg, checked.space.searched_paths()),
                           ProgressTable(names, cfg.recipe.steps, out_dir, trial_label)],
                failure_config=ray.tune.FailureConfig(max_failures=1),
                verbose=0))  # Ray's own table (stdout, no stop decisions) off: ProgressTable prints ours
    fit_on_stderr(tuner)  # stdout carries only the results of `rayq search`
    return finish(cfg, out_dir, objectives, checked.constraints)


def _refuse_changed_config(cfg: Config, out_dir: Path) -> None:
    """`--resume` continues the same search (as `Tuner.restore` is meant for): a config that differs
    from the one the search started with is refused, naming the keys, before anything runs."""
    saved_path = out_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = config_io.resolve(config_file=saved_path)
    differ = config_differences(config_io.to_dict(saved), config_io.to_dict(cfg))
    if differ:
        more = f" (+{len(differ) - 3} more)" if len(differ) > 3 else ""
        raise UserError(f"{saved_path}: --resume continues the search started with this config, but "
                        f"{', '.join(differ[:3])}{more} differ; resume with the same flags, or start a new --out")


def _scheduler_or_refuse(cfg: Config, objectives: list, constraints: Sequence[Any], out_dir: Path,
                         expected_trials: Optional[int] = None) -> Any:
    """Build the scheduler; a saved state of other settings (milestones, eta, rule, ...) is refused
    in one line, so a resumed search never continues under different rules."""
    try:
        return make_scheduler(cfg, objectives, constraints, expected_trials)
    except ValueError as exc:
        raise UserError(f"{out_dir / results_io.SCHEDULER_STATE}: {exc}") from None


def finish(cfg: Config, out_dir: Path, objectives: list, constraints: list) -> SearchOutcome:
    """Compute the front of completed recipes from the results table; write pareto.csv."""
    rows = results_io.read_rows(out_dir)
    decisions = results_io.read_decisions(out_dir)
    status = results_io.trial_status(rows, decisions, cfg.recipe.steps)
    front = results_io.front_rows(rows, decisions, cfg.recipe.steps, objectives, constraints)
    results_io.write_pareto(front, objectives, out_dir / results_io.PARETO)
    return SearchOutcome(out_dir, front, status, objectives)
