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
from rayq.schema import Config
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


def make_searcher(cfg: Config, objectives: list) -> Optional[Any]:
    """Optuna through Ray Tune for nsga2/tpe/gp; None (Tune's variant generator) for grid/random."""
    s = cfg.search
    if s.searcher in ("grid", "random"):
        return None
    import optuna

    samplers = {
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=s.seed, population_size=max(4, s.max_concurrent * 2)),
        "tpe": lambda: optuna.samplers.TPESampler(seed=s.seed, multivariate=True, n_startup_trials=4),
        "gp": lambda: optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=4),
    }
    return CompletedOnlyOptunaSearch(
        total_steps=cfg.recipe.steps,
        metric=[o.name for o in objectives], mode=[o.direction.tune for o in objectives],
        sampler=samplers[s.searcher](), seed=s.seed)


class CompletedOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED for trials that did not finish their steps.

    Ray tells the searcher COMPLETE with the last values of an early-stopped trial; those partial
    objectives would then sit in Optuna's front beside finished recipes and steer its sampler.
    """

    def __init__(self, *args, total_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.total_steps = total_steps

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        finished = bool(result) and not result.get("diverged") and result.get("step", 0) >= self.total_steps
        super().on_trial_complete(trial_id, result if finished else None, error)


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
    from rayq.search import dashboards
    from rayq.search.progress import ProgressTable, fit_on_stderr
    from rayq.search.scheduler import MilestoneScheduler
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
    out_dir.mkdir(parents=True, exist_ok=True)
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
        tuner = ray.tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:
            print(f"rayq search: nothing to resume in {tune_dir}; starting the search", file=sys.stderr)
        scheduler = MilestoneScheduler(objectives, cfg.search.milestones, cfg.search.eta,
                                       hard_limits=checked.constraints,
                                       state_path=str(out_dir / results_io.SCHEDULER_STATE))
        grid = cfg.search.searcher == "grid"
        tuner = ray.tune.Tuner(
            trainable,
            param_space=checked.space.to_tune(),
            tune_config=ray.tune.TuneConfig(
                search_alg=make_searcher(cfg, objectives), scheduler=scheduler,
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


def finish(cfg: Config, out_dir: Path, objectives: list, constraints: list) -> SearchOutcome:
    """Compute the front of completed recipes from the results table; write pareto.csv."""
    rows = results_io.read_rows(out_dir)
    decisions = results_io.read_decisions(out_dir)
    status = results_io.trial_status(rows, decisions, cfg.recipe.steps)
    front = results_io.front_rows(rows, decisions, cfg.recipe.steps, objectives, constraints)
    results_io.write_pareto(front, objectives, out_dir / results_io.PARETO)
    return SearchOutcome(out_dir, front, status, objectives)
