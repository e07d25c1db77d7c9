"""`rayq` command line: a lazy registry of subcommands, each owned by its room's commands.py.

The registry holds "module:function" strings only, so `rayq --help` imports nothing heavy
(no torch, no ray) and no import runs back up the house. Each command function takes its own
argv and returns an exit code; after --help it raises `HelpShown` (exit code 0). Exit codes:
0 success, 2 bad input (one line, no traceback), 1 internal failure.
"""

from __future__ import annotations

import importlib
import os
import sys

from rayq.errors import HelpShown, UserError, did_you_mean

# name -> (target, one-line help): each room registers its subcommands here.
COMMANDS: dict[str, tuple[str, str]] = {
    "search": ("rayq.search.commands:search", "multi-objective recipe search on Ray Tune (FP accuracy vs PTQ degradation)"),
    "train": ("rayq.cluster.commands:train", "train a recipe: in-process, or on Ray Train workers (--workers N)"),
    "eval": ("rayq.eval.commands:eval_", "score a checkpoint: FP vs INT8 schemes, degradation with CI, KL"),
    "lm-eval": ("rayq.eval.lm_eval_cli:lm_eval", "lm-evaluation-harness's CLI with rayq checkpoints as --model rayq"),
    "analyze": ("rayq.eval.commands:analyze", "weight/activation diagnostics of a checkpoint (JSON + PNG plots)"),
    "export": ("rayq.search.commands:export_", "write the best recipes of a search as launchable recipe files"),
    "report": ("rayq.search.commands:report", "plots and a summary of a search"),
    "study": ("rayq.search.commands:study", "read a study's searches against its gates (regime: Gate A, contrast: Gate B)"),
    "plan": ("rayq.cluster.plan:plan_command", "memory per device and tokens/s a full-scale run needs"),
    "data": ("rayq.commands:data", "prepare the corpus: tokenizer + Parquet token shards (data prepare)"),
    "ls": ("rayq.commands:ls", "list presets, quantization schemes, tasks"),
    "validate": ("rayq.commands:validate", "check a config file (and --set overrides) without running it"),
    "bench": ("rayq.commands:bench", "benchmarks that print JSON: train, int8, eval, search"),
}

USAGE = "usage: rayq <command> [options]    (rayq <command> --help for a command's options)"


def _help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [USAGE, "", "rayq finds pre-training recipes that make LLMs robust to INT8 quantization.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _user_error_types() -> tuple[type, ...]:
    types: list[type] = [UserError]
    if "rayq.kernels" in sys.modules:  # kernels imports only torch, so it has its own error type
        from rayq.kernels import SchemeError

        types.append(SchemeError)
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from rayq import __version__

        print(f"rayq {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rayq: unknown command {name!r}{did_you_mean(name, COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return int(load(COMMANDS[name][0])(rest) or 0)
    except HelpShown:
        return 0
    except KeyboardInterrupt:
        print("rayq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place where errors become exit codes
        if isinstance(exc, _user_error_types()):
            print(f"rayq {name}: {exc}", file=sys.stderr)
            return 2
        raise


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `rayq ls presets | head -1`: the reader left; that is not a failure
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    entry()
