"""Interleaved timing: the one way kernels, their probes and the precision probe race candidates.

Candidates run round-robin, so a neighbour that slows the shared machine for a while slows all of
them alike, and the median per candidate is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional


def race(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
         digits: Optional[int] = 3) -> dict[str, float]:
    """Median ms per candidate over `rounds`, the candidates interleaved round-robin after
    `warmup` untimed calls each (first-call allocation, primitive creation); rounded to `digits`
    decimals, or not at all with None."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return med if digits is None else {k: round(v, digits) for k, v in med.items()}


def race_with_scout(fns: dict[str, Callable[[], object]], rounds: int, factor: float,
                    digits: Optional[int] = 3) -> tuple[dict[str, float], list[str]]:
    """`race` for the candidates within `factor` of the fastest on one timed scout call each (the
    scout is their warmup); the slower ones are reported at that one call, and named. A scalar
    fallback kernel (`_int_mm` on CPUs without VNNI: ~80x fp32) would otherwise take minutes a
    round at the bench's shapes, to tell what one call already tells."""
    once: dict[str, float] = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        once[k] = (time.perf_counter() - t0) * 1e3
    best = min(once.values())
    slow = sorted(k for k, v in once.items() if v > factor * best)
    timed = race({k: f for k, f in fns.items() if k not in slow}, rounds, warmup=0, digits=digits)
    timed.update({k: once[k] if digits is None else round(once[k], digits) for k in slow})
    return timed, slow
