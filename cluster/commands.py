"""`rayq train` (in-process, or on Ray Train workers) and the launch arguments `rayq plan` shares
(`rayq plan` itself is `rayq.cluster.plan:plan_command`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rayq import config as config_io
from rayq import data as data_io
from rayq import train as train_loop
from rayq.allocator import keep_pages
from rayq.cluster import evaluator
from rayq.commands import add_config_args, config_from_args, make_parser, parse_args
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

    keep_pages()
    if cfg.cluster.workers == 0:
        metrics = _train_in_process(cfg, out, evaluate=args.evaluate)
    else:
        from rayq.cluster.trainer import fit  # imports ray: only runs on Ray pay for it

        metrics = fit(cfg, out, evaluate=args.evaluate)
    if args.json:
        print(json.dumps(metrics, default=float))
    else:
        loss = metrics.get("train/loss")
        print(f"trained {cfg.name} to step {metrics.get('step')} in {out}"
              + (f" (train/loss {loss:.4f}, eval/loss {metrics.get('eval/loss', float('nan')):.4f})" if loss else ""))
    return 0


def _train_in_process(cfg: Config, out: Path, *, evaluate: bool) -> dict:
    # the cluster room, not the loop, decides whether the loop evaluates (eval.placement)
    evaluator.check(cfg, evaluate=evaluate, on_ray=False)
    data = data_io.prepare(cfg.data, cfg.model.vocab_size)
    hook = evaluator.loop_hook(cfg, data, evaluate=evaluate)
    result = train_loop.run(cfg, train_loop.LocalReporter(out, cfg), data=data, evaluator=hook)
    if result.diverged:
        print(f"rayq train: diverged at step {result.step} (non-finite loss); last good checkpoint: "
              f"{result.checkpoint}", file=sys.stderr)
    return result.last_metrics
