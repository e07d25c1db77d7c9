"""Pareto machinery: non-dominated sorting, crowding distance and an epsilon-net tie-break.

This is the ranking MOASHA uses (Schmucker et al. 2021, arXiv 2106.12639; Syne Tune's
`nondominated_sort`): rows are sorted front by front, and inside a front by an epsilon-net
(Clarkson's farthest-point order), so that when only part of a front can be kept the kept
points are spread along it rather than bunched at one end. NSGA-II's crowding distance is
offered as the alternative tie-break.

Differences from Syne Tune, on purpose:
- objectives are min-max normalised over the front being ordered before distances are taken
  (accuracy in points and KL in nats differ by orders of magnitude; raw distances would ignore
  KL, and scaling over all rows would let one far-off row flatten the front);
- the epsilon-net seed is the best row on the first objective, never a random one, so a
  decision is reproducible from the recorded results (needed for resume and tests);
- rows with a missing or NaN objective are never on a front: they are ranked after every
  finite row, in input order.

Everything here works in "minimise" orientation internally (`objective_matrix` flips MAX).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rayq.search.objectives import Objective, parse_objectives

__all__ = [
    "objective_matrix",
    "nondominated_ranks",
    "crowding_distance",
    "epsilon_net_order",
    "priority_order",
    "pareto_front",
    "select_top",
    "ranks_of",
    "hypervolume_2d",
]


TIE_BREAKS = ("epsilon", "crowding", "knee")


def _records(rows: Any) -> list[Mapping[str, Any]]:
    if hasattr(rows, "to_dict"):  # a pandas DataFrame
        return rows.to_dict("records")
    return list(rows)


def _objectives(objectives: Sequence[Any]) -> list[Objective]:
    if all(isinstance(o, Objective) for o in objectives):
        return list(objectives)
    return parse_objectives([o if isinstance(o, str) else str(o) for o in objectives])


def objective_matrix(rows: Any, objectives: Sequence[Any]) -> np.ndarray:
    """(n, m) float array of the objectives to MINIMISE (MAX objectives negated); NaN if missing."""
    objs = _objectives(objectives)
    recs = _records(rows)
    Y = np.full((len(recs), len(objs)), np.nan)
    for i, r in enumerate(recs):
        for j, o in enumerate(objs):
            v = o.value(r)
            if math.isfinite(v):
                Y[i, j] = o.direction.sign * v
    return Y


def _finite_rows(Y: np.ndarray) -> np.ndarray:
    return np.all(np.isfinite(Y), axis=1)


def nondominated_ranks(Y: np.ndarray) -> np.ndarray:
    """Front index of each row (0 = non-dominated), minimisation; NaN rows get the last rank.

    Row a dominates b when a <= b in every objective and a < b in one. Equal rows do not
    dominate each other, so ties share a front. O(n^2 m), fine for the hundreds of trials a
    search has.
    """
    Y = np.asarray(Y, dtype=float)
    if Y.ndim == 1:
        Y = Y[:, None]
    n = Y.shape[0]
    ranks = np.full(n, -1, dtype=int)
    ok = _finite_rows(Y)
    idx = np.flatnonzero(ok)
    if idx.size:
        Z = Y[idx]
        le = np.all(Z[:, None, :] <= Z[None, :, :], axis=2)
        lt = np.any(Z[:, None, :] < Z[None, :, :], axis=2)
        dom = le & lt  # dom[a, b]: a dominates b
        count = dom.sum(axis=0)  # how many rows dominate each row
        remaining = np.ones(idx.size, dtype=bool)
        front = 0
        while remaining.any():
            current = remaining & (count == 0)
            ranks[idx[current]] = front
            remaining &= ~current
            count = count - dom[current].sum(axis=0)
            front += 1
    last = (ranks.max() + 1) if ok.any() else 0
    ranks[~ok] = last
    return ranks


def _normalise(Y: np.ndarray) -> np.ndarray:
    """Min-max scale every column over the finite rows (a constant column becomes 0)."""
    Z = np.array(Y, dtype=float)
    ok = _finite_rows(Z)
    if not ok.any():
        return Z
    lo = Z[ok].min(axis=0)
    span = Z[ok].max(axis=0) - lo
    span[span <= 0] = 1.0
    return (Z - lo) / span


def crowding_distance(Y: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each row within its own front (inf at the front's ends)."""
    Y = np.asarray(Y, dtype=float)
    if Y.ndim == 1:
        Y = Y[:, None]
    Z = _normalise(Y)
    ranks = nondominated_ranks(Y)
    dist = np.zeros(Y.shape[0])
    ok = _finite_rows(Y)
    for r in np.unique(ranks[ok]):
        members = np.flatnonzero((ranks == r) & ok)
        if members.size <= 2:
            dist[members] = np.inf
            continue
        for j in range(Z.shape[1]):
            order = members[np.argsort(Z[members, j], kind="stable")]
            dist[order[0]] = dist[order[-1]] = np.inf
            span = Z[order[-1], j] - Z[order[0], j]
            if span > 0:
                dist[order[1:-1]] += (Z[order[2:], j] - Z[order[:-2], j]) / span
    dist[~ok] = -np.inf
    return dist


def epsilon_net_order(Y: np.ndarray, seed_dim: int = 0) -> list[int]:
    """Farthest-point order of the rows (Clarkson 2005), seeded at the best row on `seed_dim`.

    Distances are Euclidean in the given (already normalised) space; ties go to the lower index.
    """
    Y = np.asarray(Y, dtype=float)
    n = Y.shape[0]
    if n == 0:
        return []
    first = int(np.argmin(Y[:, seed_dim]))  # argmin returns the first of equal values
    order = [first]
    mind = np.linalg.norm(Y - Y[first], axis=1)
    mind[first] = -1.0
    while len(order) < n:
        nxt = int(np.argmax(mind))
        order.append(nxt)
        mind = np.minimum(mind, np.linalg.norm(Y - Y[nxt], axis=1))
        mind[order] = -1.0
    return order


def priority_order(Y: np.ndarray, tie_break: str = "epsilon") -> list[int]:
    """Row indices best first: by front, inside a front by `tie_break`; NaN rows last.

    tie_break: "epsilon" (epsilon-net, MOASHA), "crowding" (larger crowding distance first) or
    "knee" (closest to the front's utopia corner first, objectives min-max scaled over the front:
    keeps the best trade-offs rather than the front's spread).
    """
    Y = np.asarray(Y, dtype=float)
    if Y.ndim == 1:
        Y = Y[:, None]
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break: expected one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
    ranks = nondominated_ranks(Y)
    ok = _finite_rows(Y)
    crowd = crowding_distance(Y) if tie_break == "crowding" else None
    out: list[int] = []
    for r in np.unique(ranks[ok]):
        members = np.flatnonzero((ranks == r) & ok)
        if tie_break == "epsilon":
            # scaled over the front itself: an outlier elsewhere (a dropout-0.8 run 15 points
            # behind) must not squash the front's spread on one objective
            out += [int(members[k]) for k in epsilon_net_order(_normalise(Y[members]))]
        elif tie_break == "knee":
            dist = np.linalg.norm(_normalise(Y[members]), axis=1)  # the utopia corner is 0 after scaling
            out += [int(members[k]) for k in np.lexsort((members, dist))]
        else:
            # crowding first, then the first objective, then index: a total, reproducible order
            out += sorted(members.tolist(), key=lambda i: (-crowd[i], Y[i, 0], i))
    out += np.flatnonzero(~ok).tolist()
    return out


def pareto_front(rows: Any, objectives: Sequence[Any]) -> list[int]:
    """Indices of the rows on the first front (rows with a missing objective never are)."""
    Y = objective_matrix(rows, objectives)
    ranks = nondominated_ranks(Y)
    ok = _finite_rows(Y)
    return [i for i in range(len(ranks)) if ok[i] and ranks[i] == 0]


def select_top(rows: Any, objectives: Sequence[Any], k: int, tie_break: str = "epsilon") -> list[int]:
    """The `k` best row indices by non-dominated sorting and the tie-break (best first)."""
    if k <= 0:
        return []
    Y = objective_matrix(rows, objectives)
    return priority_order(Y, tie_break)[:k]


def ranks_of(rows: Iterable[Mapping[str, Any]], objectives: Sequence[Any]) -> list[int]:
    """Pareto rank (front index) of every row; for tables and the export's `pareto_rank`."""
    return nondominated_ranks(objective_matrix(list(rows), objectives)).tolist()


def hypervolume_2d(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Area dominated by `points` (both coordinates to MAXIMISE) above `reference`.

    Points at or below the reference on either axis add nothing; duplicates and dominated
    points are harmless (the sweep keeps the staircase of the non-dominated ones).
    """
    rx, ry = float(reference[0]), float(reference[1])
    pts = sorted(((float(x), float(y)) for x, y in points if x > rx and y > ry), key=lambda p: (-p[0], -p[1]))
    area, best_y = 0.0, ry
    for x, y in pts:  # by decreasing x: each point adds the strip above the best y so far
        if y > best_y:
            area += (x - rx) * (y - best_y)
            best_y = y
    return area
