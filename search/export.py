"""`rayq export`: the best recipes of a search as YAML files that full-scale runs take unchanged.

    rayq export DIR --out RECIPES [--top K | --pick knee|max-acc|min-degradation]

Which trials. Only completed trials that meet the search's constraints can be exported (stopped,
diverged and incomplete ones never are: `results.trial_status` decides). Distances are taken
after min-max normalising each objective over the Pareto front, so accuracy in points and KL in
nats weigh alike:
- `knee` (the default): the front point closest to the utopia point (the best value of every
  objective on the front), i.e. the best compromise;
- `max-acc` / `min-degradation`: the front point best on the first maximize / first minimize
  objective of `search.objectives` (ties broken on the other objectives, then trial id);
- `--top K`: the knee first, then the other completed trials by non-dominated rank and, within a
  rank, by distance to the utopia point. K larger than the front reaches into rank 1, 2, ...;
  every file states its `pareto_rank`, so such a recipe is never mistaken for a front one.

What a file carries (`rayq train --recipe FILE` reads ONLY its `recipe:` section):
- `recipe:` the paper's knobs (weight_decay, grad_clip, dropout, precision, layernorm_fp32) and
  every other searched recipe path, from the search config's recipe overlaid with the trial's
  values. Scale-dependent knobs (lr, batch_size, steps, warmup_steps) are deliberately NOT
  carried: a learning rate or a step count tuned on a proxy of a few million parameters is wrong
  for 6B, so they come from the full-scale preset. The proxy's values stay in `proxy:` for the
  record (not read by `rayq train`).
- `metrics:` the objectives (their between-seed SE when reported), `train/loss` and the
  checkpoint path at every eval step; `pareto_rank`, `trial_id`, `label`, `search: {dir,
  config_hash}`, `launch: {preset, steps, cluster, command}`.
Every file is validated against the launch preset before it is written, so a recipe that the
preset would reject fails here and not on the cluster.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import yaml

from rayq import config as config_io
from rayq.errors import UserError
from rayq.schema import RecipeConfig
from rayq.search import results as results_io
from rayq.search.objectives import Direction, Objective, parse_constraints, parse_objectives
from rayq.search.pareto import nondominated_ranks, objective_matrix
from rayq.search.space import recipe_label

__all__ = ["PICKS", "PAPER_KNOBS", "SCALE_KNOBS", "export", "SearchRun", "choose",
           "utopia_distance", "typed_recipe"]

PICKS = ("knee", "max-acc", "min-degradation")
PAPER_KNOBS = ("weight_decay", "grad_clip", "dropout", "precision", "layernorm_fp32")
SCALE_KNOBS = ("lr", "batch_size", "steps", "warmup_steps")  # from the full-scale preset, never the proxy
CONFIG_PREFIX = "config/"
DEFAULT_CLUSTER = "gcp-tpu"  # a shipped cluster file, found by name from any directory


# ----------------------------------------------------------------------------- loading a search


class SearchRun:
    """A search directory read once: config, objectives, rows, per-trial status, completed trials."""

    def __init__(self, search_dir: str | os.PathLike):
        self.dir = Path(search_dir)
        self.rows = results_io.read_rows(self.dir)  # UserError when there are no results
        cfg_path = self.dir / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"{cfg_path}: missing (expected the --out directory of a rayq search)")
        self.cfg = config_io.resolve(config_file=cfg_path)
        tasks, schemes = list(self.cfg.eval.tasks), list(self.cfg.eval.schemes)
        self.objectives = parse_objectives(list(self.cfg.search.objectives), tasks, schemes)
        self.constraints = parse_constraints(list(self.cfg.search.constraints), tasks, schemes)
        self.decisions = results_io.read_decisions(self.dir)
        self.status = results_io.trial_status(self.rows, self.decisions, self.cfg.recipe.steps)
        # Candidates for export: completed and feasible, judged on their last report (as the front is).
        self.completed = [s["last"] for s in self.status.values() if s["status"] == "completed"
                          and all(c.satisfied(s["last"]) for c in self.constraints)]
        self.completed.sort(key=lambda r: str(r["trial_id"]))  # reproducible order whatever the table's

    def first(self, direction: Direction) -> Optional[Objective]:
        return next((o for o in self.objectives if o.direction is direction), None)

    def trial_rows(self, trial_id: str) -> list[dict]:
        rows = [r for r in self.rows if r["trial_id"] == trial_id]
        return sorted(rows, key=lambda r: (r.get("step") or 0, r.get("time") or 0))


# ----------------------------------------------------------------------------- choosing


def utopia_distance(Y: np.ndarray, front: np.ndarray) -> np.ndarray:
    """Euclidean distance of each row of Y (minimise orientation) to the front's utopia point,
    every objective min-max normalised over the front (a flat objective counts for nothing)."""
    lo, hi = front.min(axis=0), front.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    return np.linalg.norm((Y - lo) / span, axis=1)


def choose(rows: Sequence[Mapping[str, Any]], objectives: Sequence[Objective], *, top: Optional[int] = None,
           pick: Optional[str] = None) -> list[tuple[int, int]]:
    """(row index, pareto rank) of the chosen rows, best first. `rows`: completed trials' last reports."""
    if top is not None and pick is not None:
        raise UserError("--top and --pick: give one of them")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise UserError(f"--top: expected a whole number >= 1, got {top!r}")
    if pick is not None and pick not in PICKS:
        raise UserError(f"--pick: expected one of {', '.join(PICKS)}, got {pick!r}")
    Y = objective_matrix(list(rows), objectives)
    ranks = nondominated_ranks(Y)
    ok = np.all(np.isfinite(Y), axis=1)
    front = np.flatnonzero(ok & (ranks == 0))
    if front.size == 0:
        raise UserError("no completed recipe to export (every trial was stopped, diverged, unfinished, "
                        "infeasible or lacks an objective)")
    dist = utopia_distance(Y, Y[front])
    tid = [str(r["trial_id"]) for r in rows]
    # distance, then the objectives in order, then the trial id: a total, reproducible order
    key = lambda i: (ranks[i], round(float(dist[i]), 12), *Y[i].tolist(), tid[i])  # noqa: E731
    knee = min(front.tolist(), key=key)
    if pick in (None, "knee") and top is None:
        return [(knee, 0)]
    if pick is not None:
        direction = Direction.MAX if pick == "max-acc" else Direction.MIN
        j = next((k for k, o in enumerate(objectives) if o.direction is direction), None)
        if j is None:
            raise UserError(f"--pick {pick}: search.objectives has no {direction.optuna} objective "
                            f"({', '.join(map(str, objectives))})")
        best = min(front.tolist(), key=lambda i: (Y[i, j], *Y[i].tolist(), tid[i]))
        return [(best, 0)]
    rest = sorted((i for i in np.flatnonzero(ok).tolist() if i != knee), key=key)
    return [(i, int(ranks[i])) for i in [knee, *rest][:top]]


# ----------------------------------------------------------------------------- one recipe file


def typed_recipe(values: Mapping[str, Any]) -> dict[str, Any]:
    """Parquet stores numbers as float and booleans as 0/1: give each `recipe.*` value its field's
    type again (20.0 -> 20 for an int, 1.0 -> True for a bool), so the preset's loader accepts it."""
    hints = typing.get_type_hints(RecipeConfig)
    out: dict[str, Any] = {}
    for path, v in values.items():
        key = path[len("recipe."):] if path.startswith("recipe.") else path
        tp = hints.get(key)
        args = set(typing.get_args(tp)) if typing.get_origin(tp) is typing.Union else {tp}
        if isinstance(v, float) and math.isnan(v):
            v = None  # a null in a float column (grad_clip: null) reads back as None or NaN
        elif isinstance(v, float) and bool in args:
            v = bool(v)
        elif isinstance(v, float) and int in args and float not in args and v.is_integer():
            v = int(v)
        out[key] = v
    return out


def _searched(row: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's searched values as dotted paths (its `config/recipe.*` columns)."""
    return {k[len(CONFIG_PREFIX):]: v for k, v in row.items() if k.startswith(CONFIG_PREFIX + "recipe.")}


def _metrics(run: SearchRun, trial_id: str) -> list[dict[str, Any]]:
    """Objectives (+ seed SE), loss and checkpoint at every report that carries an objective."""
    names = [o.name for o in run.objectives]
    keep = [*names, *(f"{n}_seed_se" for n in names), "train/loss", "checkpoint_path"]
    out = []
    for r in run.trial_rows(trial_id):
        if not any(results_io.finite(r.get(n)) for n in names):
            continue  # a log-only report, not an eval step
        entry: dict[str, Any] = {"step": int(r["step"]) if results_io.finite(r.get("step")) else None}
        for k in keep:
            v = r.get(k)
            if v is not None and not (isinstance(v, float) and not math.isfinite(v)):
                entry[k] = v
        out.append(entry)
    return out


def _filename(label: str, trial_id: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._+-]+", "_", label) or "recipe"
    name = f"{base}.yaml"
    if name in taken:  # two trials can share a label (e.g. floats equal at :g precision)
        name = f"{base}-{re.sub(r'[^A-Za-z0-9._-]+', '_', trial_id)}.yaml"
    taken.add(name)
    return name


def _label(row: Mapping[str, Any]) -> str:
    searched = _searched(row)
    return recipe_label(searched) if searched else str(row["trial_id"])


def _recipe_document(run: SearchRun, row: Mapping[str, Any], rank: int, path: Path, *, preset: str,
                     preset_steps: int, cluster: str) -> dict[str, Any]:
    searched = _searched(row)
    base = config_io.to_dict(run.cfg)["recipe"]
    trial = typed_recipe(searched)
    keys = [k for k in PAPER_KNOBS] + sorted(k for k in trial if k not in PAPER_KNOBS and k not in SCALE_KNOBS)
    recipe = {k: trial.get(k, base[k]) for k in keys}
    proxy = {k: trial.get(k, base[k]) for k in SCALE_KNOBS}
    label = _label(row)
    names = [o.name for o in run.objectives]
    return {
        "recipe": recipe,
        "trial_id": str(row["trial_id"]),
        "label": label,
        "pareto_rank": int(rank),
        "objectives": {n: row.get(n) for n in names},
        "metrics": _metrics(run, str(row["trial_id"])),
        "proxy": {**proxy, "model": config_io.to_dict(run.cfg)["model"]},
        "search": {"dir": os.path.abspath(run.dir), "config_hash": config_io.config_hash(run.cfg)},
        "launch": {
            "preset": preset,
            "steps": int(preset_steps),
            "cluster": portable_cluster(cluster),
            "command": launch_command(path, preset, cluster, label),
        },
    }


def portable_cluster(cluster: str) -> str:
    """How a launch command names a cluster file so it works from any directory: a shipped one
    (or an unchanged copy of it, such as the checkout's cluster/configs/gcp-tpu.rayq.yaml) by its
    name, found in the installed package; any other file by its absolute path."""
    shipped = config_io.shipped_cluster_files()
    p = Path(cluster).expanduser()
    short = p.name.removesuffix(".yaml").removesuffix(".rayq")
    if short in shipped and (not p.is_file() or p.read_bytes() == shipped[short].read_bytes()):
        return short
    return os.path.abspath(p) if p.is_file() else cluster


def launch_command(path: Path, preset: str, cluster: str, label: str) -> str:
    """The full-scale `rayq train` line of a recipe file, runnable from any directory (the recipe
    by absolute path, the cluster by `portable_cluster`); `--out` stays relative on purpose: the
    run lands where the launch happens."""
    parts = ["rayq", "train", "--recipe", os.path.abspath(path), "--preset", preset,
             "--cluster", portable_cluster(cluster), "--out", f"runs/{label}"]
    return shlex.join(parts)


def _check_launch(recipe: Mapping[str, Any], preset: str, cluster: str) -> None:
    """Resolve the recipe on the launch preset exactly as `rayq train --recipe` would."""
    values = {f"recipe.{k}": v for k, v in recipe.items()}
    if Path(cluster).is_file() or cluster in config_io.shipped_cluster_files():  # check it when it is here
        values.update(config_io.cluster_values(cluster))
    try:
        config_io.resolve(preset=preset, file_values=values)
    except UserError as exc:
        raise UserError(f"the exported recipe does not resolve on --preset {preset}: {exc}") from None


def _clean_yaml(value: Any) -> Any:
    """YAML-safe plain values (numpy scalars and NaN never reach the file)."""
    if isinstance(value, dict):
        return {str(k): _clean_yaml(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_yaml(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- the command


def export(search_dir: str | os.PathLike, out_dir: str | os.PathLike, *, top: Optional[int] = None,
           pick: Optional[str] = None, preset: str = "6b", cluster: str = DEFAULT_CLUSTER,
           force: bool = False) -> list[Path]:
    """Write one recipe YAML per chosen trial into `out_dir`; return their paths, best first.
    An existing recipe file (perhaps edited by hand) is never overwritten unless `force`."""
    run = SearchRun(search_dir)
    chosen = choose(run.completed, run.objectives, top=top, pick=pick)
    preset_steps = config_io.resolve(preset=preset).recipe.steps  # also checks the preset name
    out = Path(out_dir)
    written: list[Path] = []
    taken: set[str] = set()
    docs = []
    for index, rank in chosen:
        row = run.completed[index]
        path = out / _filename(_label(row), str(row["trial_id"]), taken)
        doc = _recipe_document(run, row, rank, path, preset=preset, preset_steps=preset_steps, cluster=cluster)
        _check_launch(doc["recipe"], preset, cluster)
        docs.append((path, doc))
    existing = [str(p) for p, _ in docs if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]}: exists" + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else "")
                        + "; refusing to overwrite a recipe file (it may be edited by hand): "
                        "use --force or another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a directory")
    for path, doc in docs:  # written only once every chosen recipe has validated
        header = (f"# rayq export of trial {doc['trial_id']} (Pareto rank {doc['pareto_rank']}).\n"
                  f"# Run at full scale: {doc['launch']['command']}\n"
                  "# rayq train reads only the recipe: section; lr, batch_size, steps and warmup_steps\n"
                  "# come from the launch preset (the proxy's values are under proxy: for the record).\n")
        config_io.atomic_write_text(path, header + yaml.safe_dump(_clean_yaml(doc), sort_keys=False))
        written.append(path)
    return written
