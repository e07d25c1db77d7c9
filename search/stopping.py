"""Noise-aware dominance: the statistics behind `rule: dominance` (the default stopping rule).

A recipe i is stopped only when another recipe j dominates it beyond noise:

    P(j ≻ i) = Π_k F_ν( s_k (μ_jk − μ_ik) / (σ_k √(1/n_j + 1/n_i)) )

over the objectives k (s_k = +1 for max, −1 for min), with μ the seed means of the two recipes
at the same evaluation step, n their seed counts there and σ_k the between-seed standard
deviation of one seed's value at that step, pooled across every recipe with replicates at the
step (so recipes with unequal seed counts are compared with the right standard errors). F_ν is
Student's t CDF with the pooled degrees of freedom ν (a σ estimated from 4 replicates is itself
uncertain, and the normal CDF would trust it too much), the normal CDF for a configured prior.
The product treats the objectives' noises as independent. This is racing / ε-PAL-style confidence
classification (Zuluaga et al. 2013) rather than a successive-halving quota: nothing on the
measured front is ever cut for lack of slots, and `p` (`search.stop_confidence`) is the one dial
between compute and the risk of losing a good recipe.

Where σ comes from, in this order (the decision records which):
1. `replicates@S`: seeds of a recipe at step S — several trials sharing a `recipe_id`, and/or a
   trial that trains `seeds` seeds itself and reports `<objective>_seed_se` (rayq's trial driver);
2. `prior`: a configured between-seed sd per objective (`search.noise_prior`), meant as the
   spread of the final values;
3. `carried@S'`: without a prior, the latest earlier step S' that had replicates (e.g. a
   replicate pilot that ran only to the first milestone);
4. none: no recipe is stopped on dominance (a recipe without any noise estimate is never judged
   "beyond noise").

Everything here is plain numbers (no Ray) so that the offline simulator, the Tune scheduler and
the tests use the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Mapping, Optional, Sequence

from scipy.special import stdtr, stdtrit

__all__ = ["Replicate", "Summary", "summarise", "pooled_sd", "prob_dominates", "mean_interval"]

_N01 = NormalDist()


@dataclass(frozen=True)
class Replicate:
    """One trial's report at one step: values (raw orientation), their between-seed standard
    errors inside the trial (NaN when the trial trains one seed) and its seed count."""

    values: tuple[float, ...]
    seed_se: tuple[float, ...]
    seeds: int = 1

    def to_json(self) -> list:
        def clean(xs):
            return [x if math.isfinite(x) else None for x in xs]

        return [clean(self.values), clean(self.seed_se), self.seeds]

    @classmethod
    def from_json(cls, raw: Sequence) -> "Replicate":
        def nan(xs):
            return tuple(math.nan if x is None else float(x) for x in xs)

        return cls(nan(raw[0]), nan(raw[1]), int(raw[2]))


@dataclass(frozen=True)
class Summary:
    """A recipe at one step: seed means, within-recipe sums of squares and degrees of freedom."""

    mean: tuple[float, ...]
    ss: tuple[float, ...]
    df: tuple[int, ...]
    n: int

    @property
    def finite(self) -> bool:
        return all(math.isfinite(m) for m in self.mean)


def summarise(trials: Sequence[Replicate]) -> Summary:
    """Combine the trials of one recipe at one step into seed means and a within-recipe SS.

    A trial of n seeds with between-seed standard error se contributes (n−1)·n·se² to the sum of
    squares (its sample variance is n·se²) and its mean with weight n; trials of one seed
    contribute through their spread around the recipe mean.
    """
    n_obj = len(trials[0].values)
    mean, ss, df = [], [], []
    total = sum(t.seeds for t in trials)
    for k in range(n_obj):
        vals = [(t.values[k], t.seeds, t.seed_se[k]) for t in trials]
        if not all(math.isfinite(v) for v, _, _ in vals):
            mean.append(math.nan)
            ss.append(0.0)
            df.append(0)
            continue
        mu = sum(v * n for v, n, _ in vals) / total
        s = sum(n * (v - mu) ** 2 for v, n, _ in vals)
        d = total - 1
        for _, n, se in vals:
            if n >= 2 and math.isfinite(se):
                s += (n - 1) * n * se * se
            elif n >= 2:
                d -= n - 1  # seeds without a reported spread add to the mean, not to σ
        mean.append(mu)
        ss.append(s)
        df.append(max(d, 0))
    return Summary(tuple(mean), tuple(ss), tuple(df), total)


def pooled_sd(summaries: Sequence[Summary]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Between-seed sd of one seed's value per objective, pooled over recipes; NaN where df = 0."""
    if not summaries:
        return (), ()
    n_obj = len(summaries[0].mean)
    sd, dfs = [], []
    for k in range(n_obj):
        df = sum(s.df[k] for s in summaries)
        ss = sum(s.ss[k] for s in summaries if s.df[k] > 0)
        sd.append(math.sqrt(ss / df) if df > 0 else math.nan)
        dfs.append(df)
    return tuple(sd), tuple(dfs)


def prob_dominates(mu_j: Sequence[float], mu_i: Sequence[float], sd: Sequence[float], n_j: int, n_i: int,
                   signs: Sequence[int], df: Optional[Sequence[float]] = None) -> float:
    """P(j ≻ i): the product over objectives of P(j better than i on k) under Gaussian seed noise.

    signs: +1 for objectives to maximise, −1 to minimise; df: degrees of freedom of each σ
    (inf or None: σ is taken as known). A zero sd makes the factor a step (exact comparison);
    a NaN value or sd gives 0 (no evidence, no stop).
    """
    p = 1.0
    for k, (a, b, s, sign) in enumerate(zip(mu_j, mu_i, sd, signs)):
        if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(s)):
            return 0.0
        delta = sign * (a - b)
        scale = s * math.sqrt(1.0 / n_j + 1.0 / n_i)
        if scale <= 0:
            p *= 1.0 if delta > 0 else 0.0
            continue
        nu = math.inf if df is None else float(df[k])
        p *= _N01.cdf(delta / scale) if math.isinf(nu) else float(stdtr(nu, delta / scale))
    return p


def mean_interval(mean: float, sd: float, n: int, confidence: float = 0.95,
                  df: float = math.inf) -> tuple[float, float]:
    """Two-sided interval of a seed mean of n seeds with per-seed sd estimated with `df` degrees of
    freedom (Student's t; normal when df is inf); NaN when anything is unknown."""
    if not (math.isfinite(mean) and math.isfinite(sd)) or n < 1 or df <= 0:
        return math.nan, math.nan
    q = 0.5 + confidence / 2
    z = _N01.inv_cdf(q) if math.isinf(df) else float(stdtrit(df, q))
    half = z * sd / math.sqrt(n)
    return mean - half, mean + half


def noise_for(step: int, by_step: Mapping[int, tuple[tuple[float, ...], tuple[int, ...]]],
              prior: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...], Optional[str]]:
    """(σ, df, source) per objective at `step` (see the module docstring), objective by objective:
    replicates at the step, else the prior (df inf), else carried from the latest earlier step."""
    n_obj = len(prior)
    out, dfs, sources = [], [], set()
    earlier = sorted((s for s in by_step if s <= step), reverse=True)
    for k in range(n_obj):
        got = None
        for s in earlier:
            sd, df = by_step[s]
            if df[k] > 0 and math.isfinite(sd[k]) and (s == step or not math.isfinite(prior[k])):
                got = (sd[k], float(df[k]), f"replicates@{s}" if s == step else f"carried@{s}")
                break
        if got is None and math.isfinite(prior[k]):
            got = (prior[k], math.inf, "prior")
        if got is None:
            nan = tuple(math.nan for _ in range(n_obj))
            return nan, nan, None
        out.append(got[0])
        dfs.append(got[1])
        sources.add(got[2])
    return tuple(out), tuple(dfs), "+".join(sorted(sources))
