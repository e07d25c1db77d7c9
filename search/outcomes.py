"""The figures of a batch of simulated or replayed searches: rates with Wilson intervals, means
with percentile bootstrap intervals (`rayq bench search`'s numbers, shared by its offline,
Tune, Optuna and replay modes)."""

from __future__ import annotations

import math
from typing import Sequence


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a binomial rate."""
    if n == 0:
        return [math.nan, math.nan]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def bootstrap(values: Sequence[float], samples: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95% interval of a mean."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return [math.nan, math.nan]
    idx = np.random.default_rng(seed).integers(0, x.size, (samples, x.size))
    means = x[idx].mean(axis=1)
    return [round(float(np.quantile(means, 0.025)), 4), round(float(np.quantile(means, 0.975)), 4)]


def summarise(outcomes: list) -> dict:
    import numpy as np

    n = len(outcomes)
    frac = [o.fraction for o in outcomes]
    knee = sum(o.has_knee for o in outcomes)
    pick = sum(o.pick_truly_pareto for o in outcomes)
    hv = [o.hv_regret for o in outcomes]
    rec = [o.front_recall for o in outcomes]
    return {
        "compute_fraction": round(float(np.mean(frac)), 4),
        "compute_fraction_ci": bootstrap(frac),
        "recovered_knee": round(knee / n, 4),
        "recovered_knee_ci": wilson(knee, n),
        "pick_truly_pareto": round(pick / n, 4),
        "pick_truly_pareto_ci": wilson(pick, n),
        "hv_regret": round(float(np.mean(hv)), 4),
        "hv_regret_ci": bootstrap(hv),
        "front_recall": round(float(np.mean(rec)), 4),
        "front_recall_ci": bootstrap(rec),
        "front_size": round(float(np.mean([len(o.front) for o in outcomes])), 2),
        "completed_recipes": round(float(np.mean([len(o.completed) for o in outcomes])), 2),
        "seeds": n,
    }
