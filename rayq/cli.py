"""`rayq` command line: a lazy registry of subcommands, each owned by its room's commands.py.

The registry holds "module:function" strings only, so `rayq --help` imports nothing heavy
(no torch, no ray) and no import runs back up the house. Each command function takes its own
argv and returns an exit code. Exit codes: 0 success, 2 bad input (one line, no traceback),
1 internal failure.
"""

from __future__ import annotations

import importlib
import sys

# name -> (target, one-line help). Rooms add their commands here as they land.
COMMANDS: dict[str, tuple[str, str]] = {
    "search": ("rayq.search.commands:search", "multi-objective recipe search on Ray Tune (FP accuracy vs PTQ degradation)"),
    "train": ("rayq.cluster.commands:train", "train a recipe: in-process, or on Ray Train workers (--workers N)"),
    "eval": ("rayq.eval.commands:eval_", "score a checkpoint: FP vs INT8 schemes, degradation with CI, KL"),
    "lm-eval": ("rayq.eval.lm_eval_cli:lm_eval", "lm-evaluation-harness's CLI with rayq checkpoints as --model rayq"),
    "analyze": ("rayq.eval.commands:analyze", "weight/activation diagnostics of a checkpoint (JSON + PNG plots)"),
    "export": ("rayq.search.commands:export_", "write the best recipes of a search as launchable recipe files"),
    "report": ("rayq.search.commands:report", "plots and a summary of a search"),
    "plan": ("rayq.cluster.commands:plan", "memory per device and tokens/s a full-scale run needs"),
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
    from rayq.errors import UserError

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
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"rayq: unknown command {name!r}{hint}", file=sys.stderr)
        return 2
    try:
        return int(load(COMMANDS[name][0])(rest) or 0)
    except KeyboardInterrupt:
        print("rayq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place where errors become exit codes
        if isinstance(exc, _user_error_types()):
            print(f"rayq {name}: {exc}", file=sys.stderr)
            return 2
        raise


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
