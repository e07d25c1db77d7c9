"""`rayq lm-eval ARGS...`: lm-evaluation-harness's own command line, with rayq's model registered.

    rayq lm-eval --model_args pretrained=runs/demo --tasks piqa --output_path results/
    rayq lm-eval --schemes fp,w8a8-vectorwise --model_args pretrained=runs/demo \\
                 --tasks my_task --include_path tasks/ --limit 100 --log_samples --output_path results/

lm-eval's CLI imports nothing of rayq, so `lm_eval --model rayq` cannot find the model; this
command imports the adapter (which registers "rayq") and hands the arguments to lm-eval's CLI
unchanged, except:
- `--model` defaults to `rayq`;
- `checkpoint=` in `--model_args` is passed as `pretrained=`, the key lm-eval names its results
  folder after (so results land in `OUT/<checkpoint path, sanitized>/`, not `OUT/None/`);
- `--schemes fp,w8a8-vectorwise` (rayq's only own flag) runs lm-eval once per scheme, each with
  `scheme=S` in the model arguments and its results under `OUT/<scheme>/`, so the FP and every
  quantized model get separate result files.
Every other flag (`--tasks --include_path --output_path --log_samples --limit --batch_size ...`)
is lm-eval's own: see `rayq lm-eval --help`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Sequence

from rayq.errors import UserError

SUBCOMMANDS = ("run", "ls", "validate")
MODEL_ARGS_FLAGS = ("--model_args", "-a")
OUTPUT_FLAGS = ("--output_path", "-o")
FP = "fp"


def _is_flag(token: str) -> bool:
    return token.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", token)


def _take_schemes(args: list[str]) -> tuple[list[str], list[str] | None]:
    """Remove rayq's `--schemes A,B` from args; returns (rest, schemes or None)."""
    rest: list[str] = []
    schemes: list[str] | None = None
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--schemes" or token.startswith("--schemes="):
            value = token.partition("=")[2] if "=" in token else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in token else 2
            schemes = [s.strip() for s in value.split(",") if s.strip()]
            if not schemes:
                raise UserError("--schemes: expected a comma-separated list such as fp,w8a8-vectorwise")
            continue
        rest.append(token)
        i += 1
    return rest, schemes


def _checkpoint_as_pretrained(token: str) -> str:
    """`checkpoint=X` → `pretrained=X` in one model_args token (key=value list or a JSON object)."""
    if token.lstrip().startswith("{"):
        try:
            obj = json.loads(token)
        except ValueError:
            return token
        if isinstance(obj, dict) and "checkpoint" in obj and "pretrained" not in obj:
            obj["pretrained"] = obj.pop("checkpoint")
        return json.dumps(obj)
    return re.sub(r"(^|,)checkpoint=", r"\1pretrained=", token)


def _rewrite_model_args(args: list[str]) -> list[str]:
    out: list[str] = []
    in_model_args = False
    for token in args:
        if _is_flag(token):
            in_model_args = token in MODEL_ARGS_FLAGS
            if token.startswith("--model_args="):
                token = "--model_args=" + _checkpoint_as_pretrained(token.partition("=")[2])
        elif in_model_args:
            token = _checkpoint_as_pretrained(token)
        out.append(token)
    return out


def _has_flag(args: list[str], *names: str) -> bool:
    return any(a in names or any(a.startswith(n + "=") for n in names if n.startswith("--")) for a in args)


def _output_path(args: list[str]) -> tuple[int, str] | None:
    """(index of the value, value) of --output_path/-o, if given."""
    for i, token in enumerate(args):
        if token in OUTPUT_FLAGS and i + 1 < len(args):
            return i + 1, args[i + 1]
        if token.startswith("--output_path="):
            return i, token
    return None


def _for_scheme(args: list[str], scheme: str) -> list[str]:
    """The argv of one scheme's run: `scheme=S` added to the model args, results under OUT/S/."""
    out = list(args) + ["--model_args", f"scheme={scheme}"]
    found = _output_path(out)
    if found is not None:
        index, value = found
        if value.startswith("--output_path="):
            out[index] = "--output_path=" + os.path.join(value.partition("=")[2], scheme)
        else:
            out[index] = os.path.join(value, scheme)
    return out


def lm_eval_argv(argv: Sequence[str]) -> list[list[str]]:
    """The lm-eval argv lists (without the program name) that `rayq lm-eval argv` runs, in order."""
    args, schemes = _take_schemes(list(argv))
    if args and args[0] in ("-h", "--help"):
        return [args]
    subcommand = args[0] if args and args[0] in SUBCOMMANDS else "run"
    rest = args[1:] if args and args[0] in SUBCOMMANDS else args
    if subcommand != "run":
        if schemes:
            raise UserError(f"--schemes applies to `rayq lm-eval run`, not {subcommand!r}")
        return [[subcommand, *rest]]
    rest = _rewrite_model_args(rest)
    if not _has_flag(rest, "--model", "-M"):
        rest = ["--model", "rayq", *rest]
    if not schemes:
        return [["run", *rest]]
    return [["run", *_for_scheme(rest, s)] for s in schemes]


def lm_eval(argv: Sequence[str]) -> int:
    """Run lm-eval's CLI with the "rayq" model registered (see the module docstring)."""
    from rayq.eval import lm_eval_adapter

    if not lm_eval_adapter.register():
        raise UserError("rayq lm-eval needs lm-evaluation-harness: pip install 'rayq[lm-eval]'")
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    try:
        for args in lm_eval_argv(argv):
            sys.argv = ["lm-eval", *args]
            try:
                cli_evaluate()
            except SystemExit as exc:  # argparse --help / bad flag: lm-eval already printed why
                if exc.code not in (None, 0):
                    return int(exc.code) if isinstance(exc.code, int) else 2
                return 0
    finally:
        sys.argv = saved
    return 0
