"""`rayq train` (in-process, or on Ray Train workers) and the launch arguments `rayq plan` shares
(`rayq plan` itself is `rayq.cluster.plan:plan_command`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rayq import checkpoint as ckpt_io
from rayq import data as data_io
from rayq import metrics as names
from rayq import run_dir as run_files
from rayq import train as train_loop
from rayq.allocator import keep_pages
from rayq.cluster import evaluator
from rayq.commands import add_config_args, config_from_args, make_parser, parse_args
from rayq.config import cluster_values, recipe_values  # noqa: F401 - re-exported for the cluster room's callers
from rayq.progress import say
from rayq.schema import Config

EXIT_DIVERGED = 3  # documented in `rayq train --help` and the README's exit codes

EPILOG = """exit codes: 0 trained (or already at recipe.steps), 2 bad input (one line), 3 the run
diverged (non-finite loss; the step and the last good checkpoint are printed), 1 internal failure.
Rerunning into --out resumes it; the same config with a higher --steps extends a finished run."""


def train(argv: list[str]) -> int:
    parser = make_parser("rayq train", "Train a recipe into a run directory "
                         "(config.yaml, metrics.jsonl, tokenizer.model, checkpoints/step_N/). Rerunning resumes.")
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_args(parser)
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                        help="run the INT8 evaluator (tasks, KL, degradation) at eval steps")
    parser.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    parser.add_argument("--verbose", action="store_true",
                        help="print every report as key=value (default: one progress line per report)")
    args = parse_args(parser, argv)
    cfg = config_from_args(args)
    out = Path(args.out)
    reuse = run_files.check_reuse(out, cfg)
    if reuse.kind == "finished":
        say(f"rayq train: {reuse.describe(out, cfg)}")
        last = next((r for r in reversed(run_files.read_metrics(out)) if r.get("step") == reuse.step), {"step": reuse.step})
        _print_result(cfg, out, last, as_json=args.json)
        return 0
    run_files.make_run_dir(out)
    if reuse.kind != "fresh":
        say(f"rayq train: {reuse.describe(out, cfg)}")

    keep_pages()
    if cfg.cluster.workers == 0:
        metrics = _train_in_process(cfg, out, evaluate=args.evaluate, verbose=args.verbose)
    else:
        from rayq.cluster.trainer import fit  # imports ray: only runs on Ray pay for it

        metrics = fit(cfg, out, evaluate=args.evaluate, verbose=args.verbose)
    if metrics.get(names.DIVERGED):
        return _report_divergence(out, metrics, as_json=args.json)
    _print_result(cfg, out, metrics, as_json=args.json)
    return 0


def _print_result(cfg: Config, out: Path, metrics: dict, *, as_json: bool) -> None:
    if as_json:
        print(run_files.dumps(metrics))
        return
    loss, eval_loss = metrics.get(names.TRAIN_LOSS), metrics.get(names.EVAL_LOSS)
    detail = [f"train/loss {loss:.4f}" if isinstance(loss, (int, float)) else "",
              f"eval/loss {eval_loss:.4f}" if isinstance(eval_loss, (int, float)) else ""]
    detail = [d for d in detail if d]
    print(f"trained {cfg.name} to step {metrics.get(names.STEP)} in {out}" + (f" ({', '.join(detail)})" if detail else ""))


def _report_divergence(out: Path, metrics: dict, *, as_json: bool) -> int:
    """A diverged run: the step, the last good checkpoint, exit code 3."""
    good = ckpt_io.latest(out / "checkpoints")
    where = f"last good checkpoint: {good}" if good is not None else "no checkpoint was written before it"
    say(f"rayq train: diverged at step {metrics.get(names.STEP)} (non-finite loss); {where}")
    if as_json:
        print(run_files.dumps({**metrics, "last_good_checkpoint": None if good is None else str(good)}))
    return EXIT_DIVERGED


def _train_in_process(cfg: Config, out: Path, *, evaluate: bool, verbose: bool = False) -> dict:
    # the cluster room, not the loop, decides whether the loop evaluates (eval.placement)
    evaluator.check(cfg, evaluate=evaluate, on_ray=False)
    data = prepare_data(cfg, out)
    hook = evaluator.loop_hook(cfg, data, evaluate=evaluate)
    say(f"rayq train: {cfg.name} to step {cfg.recipe.steps} into {out}")
    result = train_loop.run(cfg, train_loop.LocalReporter(out, cfg, verbose=verbose), data=data, evaluator=hook)
    return result.last_metrics


def prepare_data(cfg: Config, out: Path) -> data_io.PreparedData:
    """The prepared corpus (saying what it does: tokenizer training takes a while), with its
    tokenizer copied into the run directory, so the run can be evaluated on another machine."""
    data = data_io.prepare(cfg.data, cfg.model.vocab_size, progress=lambda m: say(f"rayq train: data: {m}"))
    data_io.copy_tokenizer(data, out)
    return data
