"""Read a study's searches against the gates it stated before running (`rayq study`).

A study is one or more `rayq search` directories whose trials are recipe-seeds: one seed per
trial (`search.seeds_per_recipe: 1`, `train.seed` among the searched values), so every seed's
curve is a row set of its own and seeds pair across recipes by `train.seed` (the same
initialization and data order). Two readings, each a pure function of the rows:

* `regime` (stage 1, one seed over learning rates; Gate A): does quantization damage grow with
  training (Spearman rank correlation of KL with step >= GROWS_RHO in every run), and which is
  the stress lr: the largest lr whose train loss has no spike (a report more than SPIKE_NATS above
  the lowest loss reported before it, after warm-up) and whose eval loss does not diverge (rises by
  more than DIVERGE_NATS between consecutive evaluations).
* `contrast` (stages 2 and 3; Gate B): per seed, the difference of log KL between a recipe and the
  reference recipe at equal steps; a recipe separates when the mean difference is at least
  GATE_SDS paired-seed standard deviations away from 0, with at least MIN_SEEDS seeds.

These thresholds are the gates the proxy study stated before its runs were read; changing one
afterwards would tune the story, so they are constants, not options.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence

from rayq.errors import UserError
from rayq.search.results import read_rows

GROWS_RHO = 0.5
SPIKE_NATS = 0.3
DIVERGE_NATS = 0.05
GATE_SDS = 3.0
MIN_SEEDS = 3
SEED = "config/train.seed"
EVALUATED = "eval/seconds"  # present in the rows of an evaluation only


def _num(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def load(dirs: Sequence[str | os.PathLike]) -> list[dict]:
    """Every row of every search directory, tagged with `study/dir`."""
    rows: list[dict] = []
    for d in dirs:
        got = read_rows(d)
        if not got:
            raise UserError(f"{d}: no results.parquet rows (not a search directory, or nothing reported yet)")
        rows += [{**r, "study/dir": os.path.basename(os.path.normpath(str(d)))} for r in got]
    return rows


def recipe_label(row: dict, varying: Sequence[str]) -> str:
    """A recipe's name from the config values that vary across the study (the seed excluded)."""
    parts = [f"{k.removeprefix('config/').removeprefix('recipe.')}={row.get(k)}" for k in varying]
    return " ".join(parts) if parts else "recipe"


def varying_keys(rows: Iterable[dict]) -> list[str]:
    values: dict[str, set] = defaultdict(set)
    for r in rows:
        for k, v in r.items():
            if k.startswith("config/") and k != SEED:
                values[k].add(repr(v))
    return sorted(k for k, vs in values.items() if len(vs) > 1)


def curves(rows: Sequence[dict], metric: str) -> dict[tuple[str, float], dict[float, float]]:
    """(recipe label, seed) -> {step: metric} over the rows that report `metric`. A search
    carries its objectives forward between evaluations (Tune wants them in every report), so
    evaluation metrics are read only from the rows that evaluated (`eval/seconds` present)."""
    varying = varying_keys(rows)
    evaluated_only = not metric.startswith(("train/", "data/")) and any(_num(r.get(EVALUATED)) is not None for r in rows)
    out: dict[tuple[str, float], dict[float, float]] = defaultdict(dict)
    for r in rows:
        v, step = _num(r.get(metric)), _num(r.get("step"))
        if v is None or step is None or (evaluated_only and _num(r.get(EVALUATED)) is None):
            continue
        out[(recipe_label(r, varying), _num(r.get(SEED)) or 0.0)][step] = v
    return dict(out)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None below 3 points or if constant."""
    if len(xs) < 3:
        return None

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def spikes(loss: dict[float, float], after_step: float) -> list[float]:
    """Steps whose loss exceeds the lowest earlier loss by more than SPIKE_NATS (after warm-up)."""
    out, lowest = [], math.inf
    for step in sorted(loss):
        if step > after_step and loss[step] > lowest + SPIKE_NATS:
            out.append(step)
        lowest = min(lowest, loss[step])
    return out


def diverges(eval_loss: dict[float, float]) -> bool:
    steps = sorted(eval_loss)
    return any(eval_loss[b] > eval_loss[a] + DIVERGE_NATS for a, b in zip(steps, steps[1:]))


def regime(rows: Sequence[dict], kl_metrics: Sequence[str], warmup_steps: float = 0.0) -> dict:
    """Gate A over the runs in `rows` (see the module docstring)."""
    train, evals = curves(rows, "train/loss"), curves(rows, "eval/loss")
    kl_curves = {metric: curves(rows, metric) for metric in kl_metrics}
    varying = varying_keys(rows)
    lr_of = {}
    for r in rows:
        lr_of.setdefault(recipe_label(r, varying), _num(r.get("config/recipe.lr")))
    runs: dict[str, dict] = {}
    grows = True
    for (label, seed), loss in sorted(train.items()):
        run: dict[str, Any] = {"lr": lr_of.get(label), "seed": seed,
                               "spikes": spikes(loss, warmup_steps),
                               "eval_diverges": diverges(evals.get((label, seed), {})),
                               "final_eval_loss": _last(evals.get((label, seed), {}))}
        for metric in kl_metrics:
            kl = kl_curves[metric].get((label, seed), {})
            steps = sorted(kl)
            rho = spearman(steps, [kl[s] for s in steps])
            run[metric] = {"spearman_with_step": rho, "first": _first(kl), "last": _last(kl)}
            grows = grows and rho is not None and rho >= GROWS_RHO
        run["stable"] = not run["spikes"] and not run["eval_diverges"]
        runs[f"{label} seed={seed:g}"] = run
    stable = [r["lr"] for r in runs.values() if r["stable"] and r["lr"] is not None]
    stress = max(stable) if stable else None
    return {"gate": "A", "kl_grows_with_training": grows, "stress_lr": stress,
            "gate_passed": bool(grows and stress is not None), "runs": runs,
            "thresholds": {"grows_rho": GROWS_RHO, "spike_nats": SPIKE_NATS, "diverge_nats": DIVERGE_NATS}}


def _first(curve: dict[float, float]) -> Optional[float]:
    return curve[min(curve)] if curve else None


def _last(curve: dict[float, float]) -> Optional[float]:
    return curve[max(curve)] if curve else None


def mean_sd(values: Sequence[float]) -> list[Optional[float]]:
    if not values:
        return [None, None]
    return [statistics.fmean(values), statistics.stdev(values) if len(values) >= 2 else None]


def contrast(rows: Sequence[dict], reference: str, gate_metric: str, metrics: Sequence[str],
             step: Optional[float] = None) -> dict:
    """Gate B: each recipe against `reference` (a recipe label) on paired seeds at `step` (default:
    the furthest step any run reached; a run short of it, still in progress, is left out). Separation is reported in paired-seed SDs of the log-KL
    difference; `ordering` holds every recipe's mean and SD per metric."""
    gate = curves(rows, gate_metric)
    labels = sorted({label for label, _ in gate})
    if reference not in labels:
        raise UserError(f"rayq study: reference recipe {reference!r} not among {labels}")
    if step is None:  # the furthest step reached: runs still short of it (in progress) drop out
        step = max(max(c) for c in gate.values())
    by_metric = {metric: curves(rows, metric) for metric in [gate_metric, *metrics]}
    ordering = {label: {metric: mean_sd([c[k][step] for k in c if k[0] == label and step in c[k]])
                        for metric, c in by_metric.items()} for label in labels}
    separations = {}
    for label in labels:
        if label == reference:
            continue
        seeds = sorted({s for lab, s in gate if lab == label} & {s for lab, s in gate if lab == reference})
        diffs = [math.log(gate[(label, s)][step]) - math.log(gate[(reference, s)][step]) for s in seeds
                 if step in gate[(label, s)] and step in gate[(reference, s)]
                 and gate[(label, s)][step] > 0 and gate[(reference, s)][step] > 0]
        mean, sd = mean_sd(diffs)
        sds = abs(mean) / sd if mean is not None and sd else None
        separations[label] = {"seeds": len(diffs), "log_kl_diff_mean": mean, "log_kl_diff_sd": sd,
                              "ratio": math.exp(mean) if mean is not None else None, "separation_sds": sds,
                              # the gate is two-sided; which way it went is the finding
                              "more_damaged": None if not mean else (label if mean > 0 else reference),
                              "separates": bool(sds is not None and sds >= GATE_SDS and len(diffs) >= MIN_SEEDS)}
    return {"gate": "B", "metric": gate_metric, "reference": reference, "step": step, "ordering": ordering,
            "separations": separations, "thresholds": {"gate_sds": GATE_SDS, "min_seeds": MIN_SEEDS}}


def summary(rows: Sequence[dict], reading: dict, parameters: int) -> dict:
    """The study's summary.json: Gate B's verdict over every compared recipe, the smallest
    separation in paired-seed SDs, the seeds behind it, each recipe's mean and SD per metric,
    and the data regime (tokens per parameter, epochs) at the step read (a run that went further
    does not count its later tokens)."""
    seps = reading["separations"].values()
    read = [r for r in rows if (_num(r.get("step")) or 0.0) <= reading["step"]] or list(rows)
    # data/tokens is the train split's size, data/epochs the passes over it so far
    epochs = max((_num(r.get("data/epochs")) or 0.0) for r in read)
    tokens = max((_num(r.get("data/tokens")) or 0.0) * (_num(r.get("data/epochs")) or 0.0) for r in read)
    sds = [s["separation_sds"] for s in seps]
    return {"gate_passed": bool(seps) and all(s["separates"] for s in seps),
            "contrast_sd": min(sds) if sds and None not in sds else None,
            "seeds": min((s["seeds"] for s in seps), default=0),
            "ordering": reading["ordering"],
            "tokens_per_param": tokens / parameters if parameters else None,
            "epochs": epochs, "tokens_seen": tokens, "parameters": parameters, "step": reading["step"],
            "metric": reading["metric"], "reference": reading["reference"], "separations": reading["separations"],
            "thresholds": reading["thresholds"]}


def loss_matched(rows: Sequence[dict], reference: str, gate_metric: str, step: float) -> dict:
    """Each recipe's KL at `step` against the reference's KL at the same eval loss, per paired seed:
    the reading against eval loss that stage 2's confound calls for (a recipe that trains worse
    is compared with the reference where the reference was equally well trained). Reported, not
    gated. Per seed, with the other run's eval loss L at `step`:
    - `interpolated`: L lies within the reference run's eval losses; its log KL is interpolated
      linearly in loss between the two evaluations that bracket L (the first crossing);
    - `at_least`: L is above every loss the reference evaluated (it was better trained already at
      its first evaluation); with KL growing over training (Gate A), the reference's KL at loss L
      is at most its first evaluation's, so the ratio is at least the one given;
    - `at_most`: L is below every reference loss; the ratio is at most the one given."""
    kl, loss = curves(rows, gate_metric), curves(rows, "eval/loss")
    out: dict[str, dict] = {}
    for label in sorted({lab for lab, _ in kl} - {reference}):
        seeds = sorted({s for lab, s in kl if lab == label} & {s for lab, s in kl if lab == reference})
        per_seed = {}
        for s in seeds:
            other_kl, other_loss = kl[(label, s)].get(step), loss.get((label, s), {}).get(step)
            ref = [(loss[(reference, s)][t], kl[(reference, s)][t]) for t in sorted(kl[(reference, s)])
                   if t in loss.get((reference, s), {}) and kl[(reference, s)][t] > 0]
            if other_kl is None or other_loss is None or not ref or other_kl <= 0:
                continue
            per_seed[f"{s:g}"] = {"eval_loss": other_loss, **_at_loss(ref, other_loss, other_kl)}
        kinds = {v["kind"] for v in per_seed.values()}
        logs = [math.log(v["ratio"]) for v in per_seed.values()]
        out[label] = {"seeds": per_seed, "kind": kinds.pop() if len(kinds) == 1 else "mixed",
                      "ratio_geomean": math.exp(statistics.fmean(logs)) if logs else None}
    return {"reference": reference, "metric": gate_metric, "step": step, "recipes": out}


def _at_loss(ref: list[tuple[float, float]], target: float, other_kl: float) -> dict:
    """The ratio other_kl / (reference KL at eval loss `target`) from the reference's (loss, KL)
    evaluations in step order, and how it was obtained (see `loss_matched`)."""
    for (l0, k0), (l1, k1) in zip(ref, ref[1:]):
        if min(l0, l1) <= target <= max(l0, l1):
            w = 0.0 if l0 == l1 else (l0 - target) / (l0 - l1)
            at = math.exp((1 - w) * math.log(k0) + w * math.log(k1))
            return {"kind": "interpolated", "ratio": other_kl / at, "reference_kl": at}
    if len(ref) == 1 and ref[0][0] == target:
        return {"kind": "interpolated", "ratio": other_kl / ref[0][1], "reference_kl": ref[0][1]}
    if target > max(lo for lo, _ in ref):  # the reference's least trained evaluation bounds it
        at = max(ref)[1]
        return {"kind": "at_least", "ratio": other_kl / at, "reference_kl": at}
    at = min(ref)[1]
    return {"kind": "at_most", "ratio": other_kl / at, "reference_kl": at}
