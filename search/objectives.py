"""Typed objectives and constraints of the recipe search.

An objective is `Objective(name, Direction.MAX)`; the strings Ray Tune (`"max"`) and Optuna
(`"maximize"`) want are produced by `Direction.tune` / `Direction.optuna` and nowhere else, so a
direction is never spelled twice (DESIGN.md, "Configuration"). Config strings look like
`"fp/acc:max"` and `"ptq/w8a8-vectorwise/degradation_pct>=-1"`.

Metric names are checked against the vocabulary the trials report with (`rayq.metrics`):
`fp/acc`, `fp/<task>/acc_norm`, `q/<scheme>/<task>/acc`, `ptq/<scheme>/top1_agree`, `eval/loss`,
`train/loss`, `step`, `diag/...`. When the config's eval tasks and schemes are known, the
scheme/task parts must be among them, and an unknown name gets the closest known one named.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from rayq import metrics
from rayq.errors import UserError, did_you_mean

__all__ = [
    "Direction",
    "Objective",
    "Constraint",
    "parse_objectives",
    "parse_constraints",
    "known_metrics",
    "validate_metric",
    "metric_bounds",
]


class Direction(enum.Enum):
    MAX = "max"
    MIN = "min"

    @property
    def tune(self) -> str:
        """Ray Tune's spelling (`mode=`)."""
        return self.value

    @property
    def optuna(self) -> str:
        """Optuna's spelling (`directions=`)."""
        return "maximize" if self is Direction.MAX else "minimize"

    @property
    def sign(self) -> float:
        """Multiply a value by this to get a quantity to minimize."""
        return -1.0 if self is Direction.MAX else 1.0

    @classmethod
    def parse(cls, text: str, where: str = "direction") -> "Direction":
        t = str(text).strip().lower()
        aliases = {"max": cls.MAX, "maximize": cls.MAX, "min": cls.MIN, "minimize": cls.MIN}
        if t not in aliases:
            raise UserError(f"{where}: expected max or min, got {text!r}")
        return aliases[t]


@dataclass(frozen=True)
class Objective:
    name: str  # a reported metric name, e.g. "fp/acc"
    direction: Direction

    def __str__(self) -> str:
        return f"{self.name}:{self.direction.value}"

    def value(self, result: Mapping[str, Any]) -> float:
        """The objective's value in `result` as a float; NaN when missing or not a number."""
        return as_float(result.get(self.name))


def as_float(v: Any) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- metric names


def known_metrics(tasks: Optional[Iterable[str]] = None, schemes: Optional[Iterable[str]] = None) -> list[str]:
    """Every objective a trial can report given the config's eval tasks and schemes (rayq.metrics)."""
    return metrics.objective_names(tasks or [], schemes or [])


def validate_metric(
    name: str,
    tasks: Optional[Iterable[str]] = None,
    schemes: Optional[Iterable[str]] = None,
    where: str = "metric",
) -> str:
    """Return `name` if it is a metric trials report; raise `UserError` naming the closest one.

    With `tasks`/`schemes` None the scheme and task parts are only checked for shape.
    """
    tasks_l = None if tasks is None else list(tasks)
    schemes_l = None if schemes is None else list(schemes)
    if metrics.is_objective(name, tasks_l, schemes_l):
        return name
    candidates = known_metrics(tasks_l or ["<task>"], schemes_l or ["<scheme>"])
    raise UserError(f"{where}: unknown metric {name!r}{did_you_mean(name, candidates, cutoff=0.4)}")


# ----------------------------------------------------------------------------- objectives


def parse_objectives(
    texts: Sequence[str],
    tasks: Optional[Iterable[str]] = None,
    schemes: Optional[Iterable[str]] = None,
) -> list[Objective]:
    """`["fp/acc:max", "ptq/w8a8-vectorwise/kl:min"]` -> typed objectives, validated."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise UserError("search.objectives: expected at least one 'metric:max|min'")
    tasks_l = None if tasks is None else list(tasks)
    schemes_l = None if schemes is None else list(schemes)
    out: list[Objective] = []
    for i, text in enumerate(texts):
        where = f"search.objectives[{i}]"
        if isinstance(text, Objective):
            obj = text
        else:
            if not isinstance(text, str) or ":" not in text:
                raise UserError(f"{where}: expected 'metric:max|min', got {text!r}")
            name, _, d = text.strip().rpartition(":")
            obj = Objective(name.strip(), Direction.parse(d, where))
        validate_metric(obj.name, tasks_l, schemes_l, where)
        if any(o.name == obj.name for o in out):
            raise UserError(f"{where}: {obj.name!r} is listed twice")
        out.append(obj)
    return out


# ----------------------------------------------------------------------------- constraints


def metric_bounds(result: Mapping[str, Any], name: str, z: float = 1.96) -> tuple[float, float]:
    """(low, high) bounds of a reported metric's uncertainty.

    Uses `<name>_ci_low/_ci_high` when reported (the paired-bootstrap CI of degradation),
    else `<name>_se` (`kl_se`) as value +- z*se, else the point value itself (no uncertainty
    reported: the value is taken at face value). NaN when the metric is missing.
    """
    v = as_float(result.get(name))
    lo, hi = as_float(result.get(f"{name}_ci_low")), as_float(result.get(f"{name}_ci_high"))
    if math.isfinite(lo) and math.isfinite(hi):
        return lo, hi
    se = as_float(result.get(f"{name}_se"))
    if math.isfinite(v) and math.isfinite(se):
        return v - z * se, v + z * se
    return v, v


_CONSTRAINT = re.compile(r"^\s*(?P<name>[^<>=\s]+)\s*(?P<op>>=|<=)\s*(?P<value>\S+)\s*$")


@dataclass(frozen=True)
class Constraint:
    """`metric >= value` or `metric <= value` on a reported metric."""

    name: str
    op: str  # ">=" or "<="
    value: float

    @classmethod
    def parse(
        cls,
        text: str,
        tasks: Optional[Iterable[str]] = None,
        schemes: Optional[Iterable[str]] = None,
        where: str = "constraint",
    ) -> "Constraint":
        m = _CONSTRAINT.match(str(text))
        if not m:
            raise UserError(f"{where}: expected 'metric>=value' or 'metric<=value', got {text!r}")
        try:
            value = float(m["value"])
        except ValueError:
            raise UserError(f"{where}: {m['value']!r} is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"{where}: expected a finite bound, got {m['value']!r}")
        validate_metric(m["name"], tasks, schemes, where)
        return cls(m["name"], m["op"], value)

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value:g}"

    def satisfied(self, result: Mapping[str, Any]) -> bool:
        """The point value meets the bound (a missing or NaN value does not)."""
        v = as_float(result.get(self.name))
        if not math.isfinite(v):
            return False
        return v >= self.value if self.op == ">=" else v <= self.value

    def certainly_violated(self, result: Mapping[str, Any]) -> bool:
        """The whole reported uncertainty interval lies on the wrong side of the bound.

        This is the hard-limit test: e.g. `degradation_pct>=-1` is certainly violated when even
        `degradation_pct_ci_high` is below -1. A missing metric is never a certain violation.
        """
        lo, hi = metric_bounds(result, self.name)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return False
        return hi < self.value if self.op == ">=" else lo > self.value


def parse_constraints(
    texts: Sequence[str],
    tasks: Optional[Iterable[str]] = None,
    schemes: Optional[Iterable[str]] = None,
) -> list[Constraint]:
    if isinstance(texts, str):
        texts = [texts]
    tasks_l = None if tasks is None else list(tasks)
    schemes_l = None if schemes is None else list(schemes)
    return [
        c if isinstance(c, Constraint) else Constraint.parse(c, tasks_l, schemes_l, f"search.constraints[{i}]")
        for i, c in enumerate(texts)
    ]
