"""`rayq train` (in-process, or on Ray Train workers) and `rayq plan`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rayq import config as config_io
from rayq.config import cluster_values, recipe_values  # noqa: F401 - re-exported for the cluster room's callers
from rayq.errors import UserError
from rayq.schema import Config


def _check_run_dir(out: Path, cfg: Config) -> None:
    """Rerunning into a run directory resumes it, but only with the same config."""
    saved = out / "config.yaml"
    if saved.exists():
        previous = config_io.resolve(config_file=saved)
        if config_io.config_hash(previous) != config_io.config_hash(cfg):
            raise UserError(f"{out}: holds a run of a different config; use a new --out "
                            f"(or --config {saved} to resume it)")


def train(argv: list[str]) -> int:
    from rayq.commands import add_config_args, config_from_args, make_parser, parse_args

    parser = make_parser("rayq train", "Train a recipe into a run directory "
                         "(config.yaml, metrics.jsonl, checkpoints/step_N/). Rerunning resumes.")
    add_config_args(parser)
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                        help="run the INT8 evaluator (tasks, KL, degradation) at eval steps")
    parser.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    args = parse_args(parser, argv)
    cfg = config_from_args(args)
    out = Path(args.out)
    _check_run_dir(out, cfg)

    from rayq.allocator import keep_pages

    keep_pages()
    if cfg.cluster.workers == 0:
        metrics = _train_in_process(cfg, out, evaluate=args.evaluate)
    else:
        from rayq.cluster.trainer import fit

        metrics = fit(cfg, out, evaluate=args.evaluate)
    if args.json:
        print(json.dumps(metrics, default=float))
    else:
        loss = metrics.get("train/loss")
        print(f"trained {cfg.name} to step {metrics.get('step')} in {out}"
              + (f" (train/loss {loss:.4f}, eval/loss {metrics.get('eval/loss', float('nan')):.4f})" if loss else ""))
    return 0


def _train_in_process(cfg: Config, out: Path, *, evaluate: bool) -> dict:
    from rayq import data as data_io
    from rayq import train as train_loop

    data = data_io.prepare(cfg)
    evaluator = None
    if evaluate:
        from rayq.eval import make_eval_hook

        evaluator = make_eval_hook(cfg, data)
    result = train_loop.run(cfg, train_loop.LocalReporter(out, cfg), data=data, evaluator=evaluator)
    if result.diverged:
        print(f"rayq train: diverged at step {result.step} (non-finite loss); last good checkpoint: "
              f"{result.checkpoint}", file=sys.stderr)
    return result.last_metrics


def plan(argv: list[str]) -> int:
    """`rayq plan`: memory per device and the tokens/s a full-scale run needs (cluster/plan.py)."""
    from rayq.cluster.plan import plan_command

    return plan_command(argv)
