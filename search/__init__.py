"""rayq.search: which recipes to try (search space, objectives, Pareto ranking, noise-aware
early stopping, the search simulator).

Importing this package is light: it never imports ray. Names are resolved lazily on first
access (optuna-style re-exports of private modules through `__all__`), so
`from rayq.search import MilestoneScheduler` imports ray only then.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    # objectives.py
    "Direction": "objectives",
    "Objective": "objectives",
    "Constraint": "objectives",
    "parse_objectives": "objectives",
    "parse_constraints": "objectives",
    "known_metrics": "objectives",
    "validate_metric": "objectives",
    # space.py
    "Param": "space",
    "SearchSpace": "space",
    "parse_space": "space",
    "validate_search": "space",
    "validate_milestones": "space",
    "paper_axes_grid": "space",
    "paper_axes_variants": "space",
    "recipe_label": "space",
    "PAPER_CONTROLS": "space",
    # pareto.py
    "nondominated_ranks": "pareto",
    "crowding_distance": "pareto",
    "epsilon_net_order": "pareto",
    "priority_order": "pareto",
    "pareto_front": "pareto",
    "select_top": "pareto",
    "ranks_of": "pareto",
    "hypervolume_2d": "pareto",
    # stopping.py (the dominance rule's statistics; no ray)
    "prob_dominates": "stopping",
    # scheduler.py (imports ray)
    "MilestoneScheduler": "scheduler",
    "Decision": "scheduler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
