"""The search space: `search.space` specs on dotted config paths, validated before Ray starts.

    recipe.weight_decay: {loguniform: [0.001, 0.1]}
    recipe.precision:    {choice: [bf16, fp16]}
    recipe.grad_clip:    {choice: [null, 1.0]}
    recipe.dropout:      {grid: [0.0, 0.1, 0.4]}
    recipe.warmup_steps: {randint: [10, 50]}        # Ray's randint: upper bound excluded

Validation (`parse_space`) names the offending path first (`search.space.recipe.dropout: ...`):
unknown path (closest one named), a spec that is not one `{kind: values}` mapping, an empty
space or value list, `lo >= hi`, `loguniform` with `lo <= 0`, and every value a trial could get
(each choice/grid value, each range endpoint) is applied to the config with
`rayq.config.with_values`, so type and range errors surface here and not in trial 17.

`SearchSpace.to_tune()` gives Ray Tune's param space (flat dotted keys, as the trial applies
them with `with_values`); `SearchSpace.grid()` the explicit list of points for `grid` mode.
`paper_axes_grid()` is the paper's controlled study (Ahmadian et al. 2023, Table A.3).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from rayq.errors import ConfigError, UserError, did_you_mean
from rayq.search.objectives import parse_constraints, parse_objectives

__all__ = [
    "Param",
    "SearchSpace",
    "parse_space",
    "validate_milestones",
    "validate_search",
    "ValidatedSearch",
    "leaf_paths",
    "paper_axes_grid",
    "paper_axes_variants",
    "PAPER_CONTROLS",
    "PAPER_A3_VARIANTS",
]

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
# `points`: an explicit list of grid points (whole recipes), for studies that are not a
# cartesian product, like the paper's one-axis-at-a-time grid:
#     search.space: {points: paper-axes}        or   {points: [{recipe.dropout: 0.1, ...}, ...]}
POINTS = "points"
TUNE_POINTS_KEY = "recipe_grid"  # the trial config key holding a point (search/tuner.py reads it)
_RANGES = ("uniform", "loguniform", "randint")
_SEARCHABLE_SECTIONS = ("recipe", "model", "data", "train", "eval", "cluster")  # never `search` itself


def leaf_paths() -> list[str]:
    """Every dotted path a search space may vary (leaf fields outside the `search` section)."""
    from rayq.schema import Config

    out: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                out.append(prefix + f.name)

    hints = typing.get_type_hints(Config)
    for section in _SEARCHABLE_SECTIONS:
        walk(hints[section], f"{section}.")
    return out


@dataclass(frozen=True)
class Param:
    """One searched path: `kind` in KINDS; `values` the choices, or (lo, hi) of a range."""

    path: str
    kind: str
    values: tuple

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "grid", POINTS)

    def options(self) -> list[dict[str, Any]]:
        """The values of a discrete param as partial points {path: value}."""
        if self.kind == POINTS:
            return [dict(v) for v in self.values]
        return [{self.path: v} for v in self.values]

    def tune_domain(self) -> Any:
        from ray import tune  # lazily: importing rayq.search must not import ray

        if self.kind == POINTS:
            return tune.grid_search([dict(v) for v in self.values])
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.params]

    def searched_paths(self) -> list[str]:
        """Every dotted config path the space varies (the keys of `points` included), in order."""
        out: list[str] = []
        for p in self.params:
            for path in ([k for v in p.values for k in v] if p.kind == POINTS else [p.path]):
                if path not in out:
                    out.append(path)
        return out

    def to_tune(self) -> dict[str, Any]:
        """Ray Tune param space: {dotted path: tune domain} (imports ray)."""
        return {(TUNE_POINTS_KEY if p.kind == POINTS else p.path): p.tune_domain() for p in self.params}

    def grid(self, cfg: Any = None) -> list[dict[str, Any]]:
        """Cartesian product of the `grid` and `choice` specs, in spec order (grid mode).

        A continuous spec cannot be enumerated and is an error. With `cfg`, each point is
        applied to it as a whole so that cross-field errors (e.g. n_head vs d_model) surface.
        """
        for p in self.params:
            if not p.discrete:
                raise UserError(f"search.space.{p.path}: {p.kind} cannot be enumerated in grid mode; "
                                f"use {{grid: [...]}} or {{choice: [...]}}")
        points = []
        for combo in itertools.product(*(p.options() for p in self.params)):
            point: dict[str, Any] = {}
            for part in combo:
                point.update(part)
            points.append(point)
        if cfg is not None:
            for point in points:
                _check_values(cfg, point, "search.space")
        return points


def _check_values(cfg: Any, values: Mapping[str, Any], where: str) -> None:
    from rayq import config as config_io

    try:
        config_io.with_values(cfg, values)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise UserError(f"{where}: {shown} is not a valid config value ({exc})") from None


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{where}: expected a finite number, got {v!r}")
    return v


def _parse_points(spec: Any, cfg: Any, known: list[str]) -> Param:
    where = f"search.space.{POINTS}"
    if spec == "paper-axes":
        spec = paper_axes_grid()
    if not isinstance(spec, (list, tuple)) or not spec:
        raise UserError(f"{where}: expected 'paper-axes' or a non-empty list of {{dotted path: value}} points")
    points: list[dict[str, Any]] = []
    for i, point in enumerate(spec):
        if not isinstance(point, Mapping) or not point:
            raise UserError(f"{where}[{i}]: expected a mapping of dotted paths to values, got {point!r}")
        for path in point:
            _known_path(str(path), known, f"{where}[{i}].{path}")
        if dict(point) in points:
            raise UserError(f"{where}[{i}]: the same point is listed twice")
        _check_values(cfg, point, f"{where}[{i}]")
        points.append(dict(point))
    return Param(POINTS, POINTS, tuple(points))


def _known_path(path: str, known: list[str], where: str) -> None:
    if path not in known:
        raise UserError(f"{where}: unknown config path{did_you_mean(path, known, cutoff=0.5)}")


def _parse_param(path: str, spec: Any, cfg: Any, known: list[str]) -> Param:
    where = f"search.space.{path}"
    if path == POINTS:
        return _parse_points(spec, cfg, known)
    _known_path(path, known, where)
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise UserError(f"{where}: expected one of {{choice|grid: [values]}} or "
                        f"{{uniform|loguniform|randint: [lo, hi]}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in KINDS:
        raise UserError(f"{where}: unknown spec {kind!r}{did_you_mean(kind, KINDS)} (valid: {', '.join(KINDS)})")
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{where}: {kind} expects a list, got {values!r}")
    if kind in ("choice", "grid"):
        if not values:
            raise UserError(f"{where}: {kind} needs at least one value")
        seen: list = []
        for v in values:
            if v in seen:
                raise UserError(f"{where}: {kind} lists {v!r} twice")
            seen.append(v)
            _check_values(cfg, {path: v}, where)
        return Param(path, kind, tuple(values))
    if len(values) != 2:
        raise UserError(f"{where}: {kind} expects [lo, hi], got {values!r}")
    lo, hi = (_number(v, where) for v in values)
    if lo >= hi:
        raise UserError(f"{where}: {kind} needs lo < hi, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise UserError(f"{where}: loguniform needs lo > 0, got {lo}")
    if kind == "randint":
        if not all(isinstance(v, int) for v in (lo, hi)):
            raise UserError(f"{where}: randint expects integers [lo, hi), got {values!r}")
        endpoints = (lo, hi - 1)  # Ray's randint excludes hi
    else:
        lo, hi = float(lo), float(hi)
        endpoints = (lo, hi)
    for v in endpoints:
        _check_values(cfg, {path: v}, where)
    return Param(path, kind, (lo, hi))


def parse_space(space: Mapping[str, Any], cfg: Any = None) -> SearchSpace:
    """Validate `search.space` against `cfg` (default: the default `Config`) and type it."""
    from rayq.schema import Config

    if cfg is None:
        cfg = Config()
    if not isinstance(space, Mapping):
        raise UserError(f"search.space: expected a mapping of dotted paths to specs, got {space!r}")
    if not space:
        raise UserError("search.space: empty; give at least one path, e.g. "
                        "recipe.weight_decay: {loguniform: [0.001, 0.1]}")
    known = leaf_paths()
    params = tuple(_parse_param(str(path), spec, cfg, known) for path, spec in space.items())
    in_points = {k for p in params if p.kind == POINTS for v in p.values for k in v}
    for p in params:
        if p.kind != POINTS and p.path in in_points:
            raise UserError(f"search.space.{p.path}: also set by search.space.{POINTS}; give it in one place")
    return SearchSpace(params)


def validate_milestones(cfg: Any, space: SearchSpace | None = None) -> None:
    """Every milestone must fall within every trial's step budget (recipe.steps, maybe searched)."""
    steps = [cfg.recipe.steps]
    for p in space.params if space is not None else ():
        if p.kind == POINTS:
            steps += [v["recipe.steps"] for v in p.values if "recipe.steps" in v]
        elif p.path == "recipe.steps":
            steps = list(p.values) if p.discrete else [p.values[0]]
    low = min(steps)
    for m in cfg.search.milestones:
        if m > low:
            raise UserError(f"search.milestones: {m} is beyond the step budget recipe.steps={low}")


# ----------------------------------------------------------------------------- the paper's study

# The row labels of Table A.3 (shared/reference/paper_table_a3.json), in the table's order.
PAPER_A3_VARIANTS: tuple[str, ...] = (
    "wd=0.1 (gc=none)",
    "wd=0.01 (gc=none)",
    "wd=0.001 (gc=none)",
    "dtype=bf16 (wd=0.1)",
    "dtype=fp16 (wd=0.1)",
    "dtype=bf16 (wd=0.01)",
    "dtype=fp16 (wd=0.01)",
    "gc=1.0 (wd=0.001)",
    "gc=none (wd=0.001)",
    "dropout=0.0",
    "dropout=0.1",
    "dropout=0.4",
    "dropout=0.8",
)

# The controls every axis is varied around, derived from the labels and scores of Table A.3:
# - "dropout=0.0" has exactly the scores of "dtype=bf16 (wd=0.1)": the dropout axis runs at the
#   dtype axis' control (bf16, weight decay 0.1), and dropout 0 is the control of dropout;
# - "wd=0.1 (gc=none)" differs from that same bf16 / wd=0.1 run, so the run without a gc label
#   clips: gradient clipping 1.0 is the control, and the weight-decay axis turns it off (its
#   label says so), as the gc axis does at weight decay 0.001 ("wd=0.001 (gc=none)" and
#   "gc=none (wd=0.001)" have identical scores: the same run);
# - no label changes the dtype outside the dtype axis: bf16 is the control.
# These are also RecipeConfig's defaults.
PAPER_CONTROLS: dict[str, Any] = {
    "recipe.weight_decay": 0.1,
    "recipe.grad_clip": 1.0,
    "recipe.dropout": 0.0,
    "recipe.precision": "bf16",
}

_LABEL_KEYS = {"wd": "recipe.weight_decay", "gc": "recipe.grad_clip", "dropout": "recipe.dropout",
               "dtype": "recipe.precision"}
_LABEL = re.compile(r"^(?P<axis>\w+=[\w.]+)(?:\s*\((?P<ctl>\w+=[\w.]+)\))?$")


def _label_value(key: str, text: str) -> Any:
    if key == "dtype":
        return text
    if text == "none":
        return None
    return float(text)


def _label_point(label: str) -> dict[str, Any]:
    m = _LABEL.match(label.strip())
    if not m:
        raise ValueError(f"cannot parse the Table A.3 label {label!r}")
    point = dict(PAPER_CONTROLS)
    for part in (m["ctl"], m["axis"]):  # the varied axis last: it wins
        if part:
            k, _, v = part.partition("=")
            point[_LABEL_KEYS[k]] = _label_value(k, v)
    return point


def paper_axes_variants() -> list[tuple[str, dict[str, Any]]]:
    """(Table A.3 label, recipe point) for all 13 rows, duplicates included."""
    return [(label, _label_point(label)) for label in PAPER_A3_VARIANTS]


def paper_axes_grid() -> list[dict[str, Any]]:
    """The paper's controlled study: each axis varied around PAPER_CONTROLS, deduplicated.

    weight decay {0.001, 0.01, 0.1} without clipping; clipping {none, 1.0} at weight decay
    0.001; dropout {0, 0.1, 0.4, 0.8}; bf16 vs fp16 at weight decay 0.1 and 0.01. 13 table rows,
    11 distinct recipes (two rows are the same run), in the table's order of first appearance.
    """
    out: list[dict[str, Any]] = []
    for _, point in paper_axes_variants():
        if point not in out:
            out.append(point)
    return out


def recipe_label(point: Mapping[str, Any]) -> str:
    """A short stable id of a recipe point, e.g. `wd0.1-gc1-do0-bf16` (for recipe ids and tables)."""
    parts = []
    first = ["recipe.weight_decay", "recipe.grad_clip", "recipe.dropout", "recipe.precision"]
    for path in [p for p in first if p in point] + sorted(p for p in point if p not in first):
        key = path.rsplit(".", 1)[-1]
        short = {"weight_decay": "wd", "grad_clip": "gc", "dropout": "do", "precision": ""}.get(key, key)
        v = point[path]
        parts.append(f"{short}{'none' if v is None else (f'{v:g}' if isinstance(v, float) else v)}")
    return "-".join(parts)



@dataclass(frozen=True)
class ValidatedSearch:
    objectives: list
    constraints: list
    space: SearchSpace


def validate_search(cfg: Any) -> ValidatedSearch:
    """Everything `rayq search` checks before Ray starts: objectives and constraints against the
    config's eval tasks and schemes, the space against the config, milestones against the steps."""
    tasks, schemes = list(cfg.eval.tasks), list(cfg.eval.schemes)
    objectives = parse_objectives(list(cfg.search.objectives), tasks, schemes)
    constraints = parse_constraints(list(cfg.search.constraints), tasks, schemes)
    space = parse_space(cfg.search.space, cfg)
    if cfg.search.searcher == "grid":
        space.grid(cfg)
    validate_milestones(cfg, space)
    return ValidatedSearch(objectives, constraints, space)


def check_config(cfg: Any) -> None:
    """What `rayq validate` checks of the search section: with a search space, every check `rayq
    search` makes before Ray starts; without one (a train config), its objectives and constraints."""
    if cfg.search.space:
        validate_search(cfg)
        return
    tasks, schemes = list(cfg.eval.tasks), list(cfg.eval.schemes)
    parse_objectives(list(cfg.search.objectives), tasks, schemes)
    parse_constraints(list(cfg.search.constraints), tasks, schemes)
