"""`rayq bench search`: how well each stopping rule keeps the best recipes, and at what compute.

    rayq bench search --offline --seeds 200 --json [--plot FILE]     # the figure (Ray-free)
    rayq bench search [--seeds 20] [--quick]                          # Tune mode: confirms it
    rayq bench search --replay DIR [DIR ...] --seeds 200 --json       # over recorded curves
    rayq bench search --offline --calibrate-from DIR [DIR ...] --json  # noise measured in a study

Each simulated search runs the paper-axes grid (11 recipes of Table A.3, 75000 steps, an
evaluation every 5000; `simulate.py` for the curves and noise, `offline.py` for the strategies)
and is scored at the recipes' TRUE (noise-free) values:
- `compute_fraction`: trial-steps spent (pilot seeds included) / the grid run to the end;
- `recovered_knee` (+ `recovered_knee_ci`): the noise-free knee (the paper's bf16 / wd 0.1 /
  clip 1.0 control) is on the returned front (completed, never-stopped recipes);
- `pick_truly_pareto`: the exported pick (the knee of the measured front) is truly Pareto-optimal;
- `hv_regret`: 1 − HV(returned front at true values) / HV(true front), reference point
  (64.0 acc, −2.0 degradation);
- `front_recall`: share of the true front on the returned front.
Rates carry Wilson 95% intervals, means a percentile bootstrap 95% interval (2000 resamples).
Searches of one seed see the same curves under every strategy (common random numbers).

Offline output: `strategies` (each at its default dial), `curves` (each strategy over its dial:
p for dominance, η for the ASHA family), `noise_sweep` (0.25x-2x the simulator's noise),
`late_reranking` (a third of the recipes' degradation jumps during the LR decay),
`equal_compute` (the dominance curve interpolated at each baseline's own compute) and
`targets`. `--plot FILE` draws compute vs knee recovery and HV regret (PNG).

Replay (`--replay`, `replay.py`): the same strategies over the curves real `rayq search` runs
recorded, scored at their recorded final values (seed means); the output's `replay` key.

Calibrated (`--offline --calibrate-from DIR...`, `calibrate.py`): the offline benchmark with the
simulator's noise scaled per objective so that its between-seed / between-recipe SD ratio matches
the one measured in those study directories (what was measured is printed on stderr and kept
under `calibration`); the dominance prior follows the calibrated model, and `--noise` and the
noise sweep scale the calibrated model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from typing import Sequence

from rayq.errors import UserError
from rayq.search.outcomes import summarise

DEFAULT_P = 0.9  # search.stop_confidence default, chosen from the curves (see README)
TARGET = {"knee_min": 0.90, "compute_max": 0.50, "pick_truly_pareto_min": 0.85, "pick_compute": 0.25}
NOISE_SCALES = (0.25, 0.5, 1.0, 2.0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayq bench search", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the JSON only (default: JSON plus a table on stderr)")
    p.add_argument("--seeds", type=int, default=None, help="searches per strategy (default: offline and replay 200, "
                   "Tune 20; --quick 1)")
    p.add_argument("--quick", action="store_true", help="one seed, four strategies, no curves: a smoke run")
    p.add_argument("--offline", action="store_true", help="no Ray: the lockstep loop with the real scheduler classes")
    p.add_argument("--strategies", default=None, help="comma list (default: all) of "
                   "dominance,dominance-pilot,dominance-sync,moasha,weighted-asha,no-stopping")
    p.add_argument("--p", type=float, default=DEFAULT_P, help="stop confidence of the dominance rule's default point")
    p.add_argument("--eta", type=float, default=3.0, help="eta of the ASHA family's default point")
    p.add_argument("--noise", type=float, default=1.0, help="scale of all simulated noise")
    p.add_argument("--no-curves", action="store_true", help="offline: only the default points (no dial sweeps)")
    p.add_argument("--plot", default=None, help="write the compute-vs-quality curves to this PNG (offline)")
    p.add_argument("--replay", nargs="+", metavar="DIR", default=None,
                   help="replay the evaluations recorded in these search directories (no simulator)")
    p.add_argument("--per-search", type=int, default=8, help="concurrent trials of one search (its workers)")
    p.add_argument("--calibrate-from", nargs="+", metavar="DIR", default=None,
                   help="offline: measure the between-seed / between-recipe SD ratio of eval loss and log KL in "
                   "these study directories (any number; search/calibrate.py), print it, and run with the "
                   "simulator's accuracy and degradation noise scaled to match it (the dominance prior "
                   "follows; --noise scales the calibrated model)")
    return p


def _offline(strategy, seeds, *, noise: float, late: bool = False, per_search: int = 8, model=None) -> dict:
    from rayq.search import offline
    from rayq.search import simulate as sim

    return summarise([offline.run_offline(strategy, s, max_concurrent=per_search, noise=noise, late=late,
                                          model=model or sim.NOISE) for s in seeds])


def _defaults(families: Sequence[str], p: float, eta: float, weights: Sequence[float] = ()) -> list:
    from rayq.search.offline import WEIGHTS, Strategy

    weights = weights or WEIGHTS
    out = []
    for f in families:
        if f in ("dominance", "dominance-pilot", "dominance-sync"):
            out.append(Strategy(f, p))
        elif f == "moasha":
            out.append(Strategy(f, eta))
        elif f == "weighted-asha":
            out += [Strategy(f, eta, w) for w in weights]
        else:
            out.append(Strategy(f))
    return out


def run_offline_bench(families: Sequence[str], seeds: Sequence[int], *, p: float, eta: float, noise: float,
                      curves: bool, per_search: int, progress=None, model=None) -> dict:
    from rayq.search import offline

    def say(msg: str) -> None:
        if progress:
            progress(msg)

    def one(strategy, scale=noise, late=False) -> dict:
        t0 = time.time()
        r = _offline(strategy, seeds, noise=scale, late=late, per_search=per_search, model=model)
        say(f"{strategy.label:24s} noise {scale:g}{' late' if late else ''}: compute {r['compute_fraction']:.3f} "
            f"knee {r['recovered_knee']:.3f} pick {r['pick_truly_pareto']:.3f} hv {r['hv_regret']:.3f} "
            f"({time.time() - t0:.0f}s)")
        return r

    points = _defaults(families, p, eta)
    out: dict = {"strategies": {}, "curves": {}, "noise_sweep": {}, "late_reranking": {}}
    for s in points:
        out["strategies"][s.name] = {"dial": s.dial, **one(s)}
    if not curves:
        return out
    for s in points:
        dials = offline.DIALS[s.family]
        out["curves"][s.name] = [
            {"dial": d, **(out["strategies"][s.name] if d == s.dial else one(offline.Strategy(s.family, d, s.weight)))}
            for d in dials]
    sweep = [s for s in points if s.family in ("dominance", "dominance-pilot", "dominance-sync", "moasha", "no-stopping")
             or (s.family == "weighted-asha" and s.weight == 1.0)]
    for scale in NOISE_SCALES:
        out["noise_sweep"][f"{scale:g}"] = {
            s.name: (out["strategies"][s.name] if scale == noise else one(s, scale)) for s in sweep}
    for s in sweep:
        out["late_reranking"][s.name] = one(s, noise, late=True)
    out["equal_compute"] = _equal_compute(out)
    return out


def _equal_compute(out: dict) -> dict:
    """Dominance at each baseline's own compute: the dominance curve (over p) interpolated
    linearly in compute at the baseline's compute, beside the baseline."""
    curve = sorted(out["curves"].get("dominance", []), key=lambda c: c["compute_fraction"])
    res = {}
    for name, base in out["strategies"].items():
        if name.startswith("dominance") or name == "no-stopping":
            continue
        x = base["compute_fraction"]
        lo = [c for c in curve if c["compute_fraction"] <= x]
        hi = [c for c in curve if c["compute_fraction"] >= x]
        if not lo or not hi:
            res[name] = {"baseline": _brief(base), "dominance": None,
                         "note": "baseline compute outside the swept dominance curve"}
            continue
        a, b = lo[-1], hi[0]
        span = b["compute_fraction"] - a["compute_fraction"]
        t = 0.0 if span <= 0 else (x - a["compute_fraction"]) / span
        at = {k: round(a[k] + t * (b[k] - a[k]), 4) for k in ("recovered_knee", "hv_regret", "pick_truly_pareto")}
        res[name] = {"baseline": _brief(base),
                     "dominance": {"compute_fraction": x, **at, "between_p": [a["dial"], b["dial"]]},
                     "no_worse_knee": at["recovered_knee"] >= base["recovered_knee"],
                     "no_worse_hv_regret": at["hv_regret"] <= base["hv_regret"]}
    return res


def _brief(r: dict) -> dict:
    return {k: r[k] for k in ("compute_fraction", "recovered_knee", "recovered_knee_ci", "hv_regret",
                              "pick_truly_pareto")}


def _targets(out: dict) -> dict:
    d = out["strategies"].get("dominance")
    if d is None:
        return {}
    curve = out["curves"].get("dominance", [])
    near = min(curve, key=lambda c: abs(c["compute_fraction"] - TARGET["pick_compute"])) if curve else None
    return {
        "knee_at_default": {"knee": d["recovered_knee"], "knee_ci": d["recovered_knee_ci"],
                            "compute": d["compute_fraction"],
                            "met": d["recovered_knee"] >= TARGET["knee_min"] and d["compute_fraction"] <= TARGET["compute_max"]},
        "pick_at_quarter_compute": None if near is None else {
            "p": near["dial"], "compute": near["compute_fraction"], "pick_truly_pareto": near["pick_truly_pareto"],
            "pick_ci": near["pick_truly_pareto_ci"], "met": near["pick_truly_pareto"] >= TARGET["pick_truly_pareto_min"]},
        "no_worse_than_baselines_at_their_compute": {
            k: bool(v.get("no_worse_knee") and v.get("no_worse_hv_regret")) for k, v in out.get("equal_compute", {}).items()},
    }


def plot(out: dict, path: str) -> None:
    """Compute vs knee recovery and vs HV regret, one line per strategy over its dial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayq.config import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in out["curves"].items():
        xs = [c["compute_fraction"] for c in curve]
        for ax, key in zip(axes, ("recovered_knee", "hv_regret")):
            ys = [c[key] for c in curve]
            if len(curve) == 1:
                ax.plot(xs, ys, "*", ms=12, label=name)
            else:
                ax.plot(xs, ys, "o-", label=name, ms=4)
                for c, x, y in zip(curve, xs, ys):
                    ax.annotate(f"{c['dial']:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            if key == "recovered_knee":
                lo = [c["recovered_knee_ci"][0] for c in curve]
                hi = [c["recovered_knee_ci"][1] for c in curve]
                ax.fill_between(xs, lo, hi, alpha=0.12)
    axes[0].axhline(TARGET["knee_min"], color="grey", lw=0.8, ls="--")
    axes[0].axvline(TARGET["compute_max"], color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="compute (fraction of the grid)", ylabel="knee on the returned front",
                title="knee recovery (Wilson 95% band)")
    axes[1].set(xlabel="compute (fraction of the grid)", ylabel="HV regret at true values", title="hypervolume regret")
    axes[1].legend(fontsize=7)
    n = next(iter(out["strategies"].values()))["seeds"]
    fig.suptitle(f"rayq bench search --offline: {n} simulated searches per point (labels: p or eta)", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv or []))
    from rayq.search import offline, simulate_tune
    from rayq.search import simulate as sim

    families = tuple(args.strategies.split(",")) if args.strategies else (
        ("dominance", "moasha", "weighted-asha", "no-stopping") if args.quick else offline.STRATEGIES)
    for s in families:
        if s not in offline.STRATEGIES:
            raise UserError(f"--strategies: unknown strategy {s!r} (known: {', '.join(offline.STRATEGIES)})")
    if not 0.5 <= args.p < 1:
        raise UserError(f"--p: expected in [0.5, 1), got {args.p}")
    if args.eta <= 1:
        raise UserError(f"--eta: expected > 1, got {args.eta}")
    if args.noise < 0:
        raise UserError(f"--noise: expected >= 0, got {args.noise}")
    n = args.seeds if args.seeds is not None else (1 if args.quick else 200 if args.offline or args.replay else 20)
    if n < 1:
        raise UserError(f"--seeds: expected >= 1, got {n}")
    if args.plot and not args.offline:
        raise UserError("--plot: curves are drawn from the offline benchmark; add --offline")
    if args.calibrate_from and not args.offline:
        raise UserError("--calibrate-from: calibrates the offline benchmark's simulator; add --offline")
    seeds = list(range(n))
    if args.replay:
        if args.offline or args.strategies:
            raise UserError("--replay: runs its own strategies offline; drop --offline and --strategies")
        return _replay(args, seeds)

    t0 = time.time()
    model, calibration = sim.NOISE, None
    if args.calibrate_from:
        from rayq.search import calibrate

        calibration = calibrate.calibrate(args.calibrate_from, progress=lambda m: print(
            f"[bench search] {m}", file=sys.stderr, flush=True))
        for line in calibrate.describe(calibration):
            print(f"[bench search] {line}", file=sys.stderr)
        model = calibrate.model_of(calibration)
    print(f"[bench search] {n} seeds x ({', '.join(families)}), "
          f"{'offline loop' if args.offline else 'Ray Tune'}", file=sys.stderr)
    result = {
        "benchmark": "search",
        "default_strategy": "dominance",
        "default_settings": {"rule": "dominance", "stop_confidence": args.p, "seeds_per_recipe": 1,
                             "noise_source": "configured prior (search.noise_prior): between-seed sd of the final "
                             f"values under the {'calibrated' if calibration else 'default'} noise model, fixed "
                             "across the noise sweep",
                             "noise_prior": sim.seed_sd(model=model)},
        "grid": "paper-axes (11 recipes of Table A.3), 75000 steps, an evaluation every 5000",
        "objectives": sim.OBJECTIVES,
        "true_pareto": sim.true_front(),
        "true_best_knee": sim.knee(),
        "hv_reference": list(sim.HV_REFERENCE),
        "noise_model": {"scale": args.noise, **model.__dict__},
        "targets": TARGET,
    }
    if calibration:
        result["calibration"] = calibration
    if args.offline:
        body = run_offline_bench(families, seeds, p=args.p, eta=args.eta, noise=args.noise,
                                 curves=not (args.no_curves or args.quick), per_search=args.per_search,
                                 progress=lambda m: print(f"[bench search] {m}", file=sys.stderr, flush=True),
                                 model=model)
        result.update(body)
        result["targets_met"] = _targets(body)
        info = {"runner": "offline lockstep loop (no Ray), real scheduler classes"}
    else:
        import ray

        points = _defaults(families, args.p, args.eta, (1.0,) if args.quick else ())
        with _stdout_to_stderr():  # Tune and raylet print banners on stdout: keep it JSON only
            outcomes, info = simulate_tune.run_tune(points, seeds, per_search=args.per_search, noise=args.noise)
        result["strategies"] = {s.name: {"dial": s.dial, **summarise([o for o in outcomes if o.strategy == s.label])}
                                for s in points}
        info["runner"] = f"ray {ray.__version__} Tune, one Tuner.fit() per seed (all strategies in it)"
    result["timing"] = {**info, "total_s": round(time.time() - t0, 1)}
    result["machine"] = {"cpus": _cpus(), "python": platform.python_version()}
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result, indent=None if args.json else 2))
    if not args.json:
        for s, r in result["strategies"].items():
            print(f"  {s:22s} compute {r['compute_fraction']:.3f}  knee {r['recovered_knee']:.2f} "
                  f"{r['recovered_knee_ci']}  pick {r['pick_truly_pareto']:.2f}  hv {r['hv_regret']:.3f}  "
                  f"recall {r['front_recall']:.2f}", file=sys.stderr)
    return 0


def _replay(args: argparse.Namespace, seeds: Sequence[int]) -> int:
    from rayq.search import replay

    t0 = time.time()
    print(f"[bench search] replay of {', '.join(args.replay)}: {len(seeds)} searches per strategy", file=sys.stderr)
    body = replay.run_replay_bench(args.replay, seeds, p=args.p, eta=args.eta, per_search=args.per_search,
                                   curves=not (args.no_curves or args.quick),
                                   progress=lambda m: print(f"[bench search] {m}", file=sys.stderr, flush=True))
    result = {"benchmark": "search", "replay": body,
              "timing": {"runner": "offline lockstep loop (no Ray) over recorded evaluations, real scheduler classes",
                         "total_s": round(time.time() - t0, 1)},
              "machine": {"cpus": _cpus(), "python": platform.python_version()}}
    print(json.dumps(result, indent=None if args.json else 2))
    if not args.json:
        for s, r in body["strategies"].items():
            stops = ", ".join(f"{k} @{v['step']}" for k, v in r["most_common_outcome"]["stopped"].items()) or "none"
            print(f"  {s:12s} compute {r['compute_fraction']:.3f}  knee {r['recovered_knee']:.2f} "
                  f"{r['recovered_knee_ci']}  stopped: {stops}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _stdout_to_stderr():
    """Point file descriptor 1 at stderr (Python's and subprocesses' writes alike), then restore."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # when sys.stdout is not fd 1 (pytest, notebooks)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
