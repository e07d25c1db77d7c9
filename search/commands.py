"""`rayq search`, `rayq export`, `rayq report`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence


def _front_table(front: list[dict], names: list[str]) -> str:
    if not front:
        return "no completed recipe: the Pareto front is empty"
    cols = sorted({k for r in front for k in r if k.startswith("config/")})
    header = ["trial", *[c.split(".")[-1] for c in cols], *names]
    lines = ["  ".join(f"{h:>14}" for h in header)]
    for r in front:
        cells = [str(r["trial_id"])[:14], *[str(r.get(c)) for c in cols],
                 *[f"{r.get(n, float('nan')):.6g}" for n in names]]
        lines.append("  ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def search(argv: Sequence[str]) -> int:
    from rayq.commands import add_config_args, config_from_args, make_parser, parse_args

    parser = make_parser("rayq search", "Multi-objective recipe search on Ray Tune: maximize FP accuracy, "
                         "minimize PTQ degradation; a recipe stops early once another dominates it beyond seed noise.")
    add_config_args(parser)
    parser.add_argument("--out", required=True, help="search directory (results.parquet, pareto.csv, ...)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    parser.add_argument("--export-top", type=int, default=1, help="export this many front recipes at the end")
    parser.add_argument("--json", action="store_true", help="print the front as JSON")
    parser.add_argument("--dashboard", action="store_true",
                        help="start Ray's dashboard on 127.0.0.1 and print its URL (needs ray[default])")
    args = parse_args(parser, argv)
    out = Path(args.out)
    if args.resume and args.preset is None and args.config is None and (out / "config.yaml").exists():
        args.config = str(out / "config.yaml")  # `rayq search --resume --out DIR` reuses the saved config
    cfg = config_from_args(args)

    from rayq.allocator import keep_pages
    from rayq.search.tuner import run_search

    keep_pages()
    outcome = run_search(cfg, out, resume=args.resume, dashboard=args.dashboard)
    names = [o.name for o in outcome.objectives]
    counts: dict[str, int] = {}
    for s in outcome.status.values():
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    if args.json:
        print(json.dumps({"front": outcome.front, "trials": counts}, default=str))
    else:
        print(f"trials: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}")
        print(f"Pareto front of completed recipes ({out / 'pareto.csv'}):")
        print(_front_table(outcome.front, names))
    if outcome.front and args.export_top > 0:
        from rayq.search.export import export

        written = export(out, out / "recipes", top=args.export_top)
        for path in written:
            print(f"exported {path}", file=sys.stderr)
    return 0


def export_(argv: Sequence[str]) -> int:
    from rayq.commands import make_parser, parse_args
    from rayq.search.export import PICKS, export

    parser = make_parser("rayq export", "Write recipe YAMLs of the best recipes of a search, ready for "
                         "rayq train --recipe FILE --preset 6b --cluster ...")
    parser.add_argument("search_dir")
    parser.add_argument("--out", required=True, help="directory for the recipe files")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--top", type=int, help="the K best recipes of the front (knee first)")
    group.add_argument("--pick", choices=PICKS, help="one recipe: the knee, max FP accuracy or min degradation")
    parser.add_argument("--preset", default="6b", help="model preset of the full-scale launch (default 6b)")
    parser.add_argument("--cluster", default="gcp-tpu",
                        help="cluster file, or the name of a shipped one, of the full-scale launch (default gcp-tpu)")
    parser.add_argument("--force", action="store_true", help="overwrite existing recipe files in --out")
    args = parse_args(parser, argv)
    for path in export(args.search_dir, args.out, top=args.top, pick=args.pick, preset=args.preset,
                       cluster=args.cluster, force=args.force):
        print(path)
    return 0


def report(argv: Sequence[str]) -> int:
    from rayq.commands import make_parser, parse_args
    from rayq.search.report import write_report

    parser = make_parser("rayq report", "Plots and a Markdown summary of a search")
    parser.add_argument("search_dir")
    parser.add_argument("--out", required=True, help="report directory")
    args = parse_args(parser, argv)
    print(write_report(args.search_dir, args.out))
    return 0


def study(argv: Sequence[str]) -> int:
    from rayq.commands import make_parser, parse_args
    from rayq.search import study as study_lib

    parser = make_parser("rayq study", "Read a study's searches against its gates: 'regime' (Gate A: KL grows with "
                         "training, the stress lr) or 'contrast' (Gate B: paired-seed separation of log KL)")
    parser.add_argument("reading", choices=("regime", "contrast"))
    parser.add_argument("dirs", nargs="+", help="search directories (one seed per trial, train.seed searched)")
    parser.add_argument("--metric", default="ptq/w8a8-tensor/kl", help="the gate's KL metric")
    parser.add_argument("--also", action="append", default=None,
                        help="more metrics to report beside it (default: vector-wise KL and eval/loss)")
    parser.add_argument("--reference", default=None, help="contrast: the reference recipe's label (see the regime "
                        "reading's run names); default: the recipe listed last")
    parser.add_argument("--step", type=float, default=None, help="contrast: compare at this step (default: the "
                        "furthest step reached; runs short of it are left out)")
    parser.add_argument("--out", default=None, help="write the reading (contrast: the study's summary.json) here")
    parser.add_argument("--plot", default=None, help="contrast: write KL vs step and KL vs eval loss, every "
                        "recipe-seed, to this PNG")
    args = parse_args(parser, argv)
    rows = study_lib.load(args.dirs)
    cfg = _saved_config(args.dirs[0])
    also = args.also or ["ptq/w8a8-vectorwise/kl", "eval/loss"]
    if args.reading == "regime":
        doc = study_lib.regime(rows, [args.metric, *[m for m in also if "/kl" in m]], float(cfg.recipe.warmup_steps))
    else:
        labels = sorted({label for label, _ in study_lib.curves(rows, args.metric)})
        if not labels:
            from rayq.errors import UserError

            raise UserError(f"rayq study: no run reports {args.metric}")
        reading = study_lib.contrast(rows, args.reference or labels[-1], args.metric, also, args.step)
        from rayq.model import count_parameters

        doc = study_lib.summary(rows, reading, count_parameters(cfg.model))
        doc["loss_matched"] = study_lib.loss_matched(rows, reading["reference"], args.metric, reading["step"])
        if args.plot:
            from rayq.search.study_plots import plot_contrast

            names = " ".join(os.path.basename(os.path.normpath(d)) for d in args.dirs)
            plot_contrast(rows, args.metric, args.plot, reference=reading["reference"], step=reading["step"],
                          provenance=f"rayq study contrast {names}")
    text = json.dumps(doc, indent=2, default=str)
    if args.out:
        from rayq.config import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    print(text)
    return 0


def _saved_config(search_dir: str):
    from rayq.config import resolve
    from rayq.errors import UserError

    path = Path(search_dir) / "config.yaml"
    if not path.exists():
        raise UserError(f"{path}: missing (not a search directory)")
    return resolve(config_file=path)
