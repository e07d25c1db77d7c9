"""The core's subcommands: `rayq data`, `rayq ls`, `rayq validate`, `rayq bench`.

Each takes its argv and returns an exit code (see `rayq.cli`). Results go to stdout (`--json`
for machines), progress to stderr. Bad input raises `UserError`, which the CLI prints as one line
with exit code 2; that includes argparse's own errors (`ArgumentParser.error` is overridden,
because argparse would print a usage block and call `sys.exit`).

The config flags shared by every command that runs a config (`rayq train`, `search`, `eval`,
`data prepare`, `validate`) come from `add_config_args` / `config_from_args`, so they read the
same everywhere:

    parser = make_parser("rayq train", "train a recipe")
    add_config_args(parser)
    args = parse_args(parser, argv)          # an int exit code for --help
    if isinstance(args, int): return args
    cfg = config_from_args(args)
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
from typing import Any, Sequence

from rayq.errors import UserError

__all__ = [
    "make_parser",
    "parse_args",
    "add_config_args",
    "config_from_args",
    "data",
    "ls",
    "validate",
    "bench",
    "BENCH_TARGETS",
]


# ============================================================================ shared helpers


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line `UserError`s instead of usage + exit(2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def make_parser(prog: str, description: str = "") -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """Parse argv; returns the exit code instead of exiting when argparse prints --help."""
    try:
        return parser.parse_args(list(argv))
    except SystemExit as exc:  # --help / --version: argparse already printed
        return int(exc.code or 0)


def add_config_args(parser: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    """--preset NAME, --config FILE, --set key=value (repeatable): defaults < preset < file < --set."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", metavar="NAME", help="start from a shipped preset (rayq ls presets)")
    group.add_argument("--config", metavar="FILE", required=config_required,
                       help="a YAML config file (e.g. a run directory's config.yaml)")
    group.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                       help="override a dotted config key, e.g. --set recipe.weight_decay=0.1 (repeatable)")


def config_from_args(args: argparse.Namespace, values: dict[str, Any] | None = None):
    """The resolved, validated `Config` of the flags added by `add_config_args`."""
    from rayq.config import resolve

    return resolve(preset=args.preset, config_file=args.config, overrides=args.overrides, values=values)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _closest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# ============================================================================ rayq data


def data(argv: Sequence[str]) -> int:
    parser = make_parser("rayq data", "prepare the corpus: SentencePiece tokenizer + Parquet token shards")
    sub = parser.add_subparsers(dest="action", metavar="prepare", parser_class=_Parser)
    sub.required = True
    prep = sub.add_parser("prepare", help="build (or reuse) the prepared data of a config")
    add_config_args(prep)
    prep.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args

    from rayq import data as data_io

    cfg = config_from_args(args)
    prepared = data_io.prepare(cfg.data, cfg.model.vocab_size, progress=_progress)
    summary = prepared.summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    tr, ho = summary["splits"]["train"], summary["splits"]["heldout"]
    held = ", ".join(summary["heldout_documents"][:5]) + (" ..." if len(summary["heldout_documents"]) > 5 else "")
    print(f"prepared data: {summary['dir']}")
    print(f"  documents: {summary['documents']:,} ({summary['chars']:,} characters)")
    print(f"  tokenizer: {summary['tokenizer']}, {summary['vocab_size']:,} pieces")
    print(f"  train:     {tr['tokens']:>12,} tokens  {tr['documents']:>6,} documents  {tr['shards']} shards")
    print(f"  heldout:   {ho['tokens']:>12,} tokens  {ho['documents']:>6,} documents  {held}")
    return 0


# ============================================================================ rayq ls


def _preset_descriptions() -> list[tuple[str, str]]:
    from importlib import resources

    from rayq.config import PRESET_PACKAGE, list_presets

    out = []
    for name in list_presets():
        text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        desc = first.lstrip("#").strip() if first.lstrip().startswith("#") else ""
        if desc.startswith(f"{name}:"):
            desc = desc[len(name) + 1 :].strip()
        out.append((name, desc))
    return out


def _registry(module: str, func: str) -> list[tuple[str, str]]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise UserError(f"{module} is not installed in this rayq") from None
        raise
    if not hasattr(mod, func):
        raise UserError(f"{module}.{func} is not available in this rayq")
    return [_name_and_description(item) for item in getattr(mod, func)()]


def _name_and_description(item: Any) -> tuple[str, str]:
    """Registries return (name, description) pairs, mappings, or spec objects with those fields."""
    if isinstance(item, dict):
        return str(item["name"]), str(item.get("description", ""))
    if hasattr(item, "name"):
        return str(item.name), str(getattr(item, "description", "") or "")
    name, desc = item
    return str(name), str(desc)


LS_TOPICS = {
    "presets": _preset_descriptions,
    "quant": lambda: _registry("rayq.kernels", "list_schemes"),
    "tasks": lambda: _registry("rayq.eval.tasks", "list_tasks"),
}


def ls(argv: Sequence[str]) -> int:
    parser = make_parser("rayq ls", "list presets, quantization schemes or eval tasks")
    parser.add_argument("topic", metavar="{presets,quant,tasks}", help="what to list")
    parser.add_argument("--json", action="store_true", help="print [{name, description}] as JSON")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    if args.topic not in LS_TOPICS:
        raise UserError(f"ls {args.topic}: unknown topic{_closest(args.topic, list(LS_TOPICS))} "
                        f"(choose from {', '.join(LS_TOPICS)})")
    rows = LS_TOPICS[args.topic]()
    if args.json:
        print(json.dumps([{"name": n, "description": d} for n, d in rows]))
        return 0
    width = max((len(n) for n, _ in rows), default=0)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}".rstrip())
    return 0


# ============================================================================ rayq validate


def _check_local_sources(sources: Sequence[str]) -> None:
    """Local globs must match something; remote URIs are checked when the data is prepared."""
    import glob
    import os

    for source in sources:
        if "://" not in source and not glob.glob(os.path.expanduser(source), recursive=True):
            raise UserError(f"data.sources: no file matches {source}")


def _summary_lines(cfg) -> list[str]:
    m, r, d = cfg.model, cfg.recipe, cfg.data
    clip = "none" if r.grad_clip is None else f"{r.grad_clip:g}"
    data_src = ", ".join(d.sources) if d.sources else "embedded corpus"
    return [
        f"model:  {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, vocab {m.vocab_size}, seq_len {m.seq_len}",
        f"recipe: weight_decay {r.weight_decay:g}, grad_clip {clip}, dropout {r.dropout:g}, "
        f"{r.precision} ({r.precision_mode}), lr {r.lr:g}, batch {r.batch_size}, {r.steps} steps",
        f"data:   {data_src}; held out: {', '.join(d.heldout_documents) or 'none'}"
        + (f" + {d.heldout_fraction:g} of each document" if d.heldout_fraction else ""),
        f"cluster: {cfg.cluster.workers or 'in-process'} workers on {cfg.cluster.device}",
    ]


def validate(argv: Sequence[str]) -> int:
    parser = make_parser("rayq validate", "check a config (file, preset, --set overrides) without running it")
    add_config_args(parser)
    parser.add_argument("--json", action="store_true", help="print the resolved config as JSON")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    from rayq.config import to_dict

    cfg = config_from_args(args)
    _check_local_sources(cfg.data.sources)
    if args.json:
        print(json.dumps(to_dict(cfg)))
        return 0
    print(f"ok: {cfg.name}")
    for line in _summary_lines(cfg):
        print(f"  {line}")
    return 0


# ============================================================================ rayq bench

# target -> "module:function" of the room that owns what is measured
BENCH_TARGETS = {
    "train": "rayq.cluster.bench:main",
    "int8": "rayq.kernels.bench:main",
    "eval": "rayq.eval.bench:main",
    "search": "rayq.search.bench:main",
}


def bench(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rayq bench {" + ",".join(BENCH_TARGETS) + "} [options]    (JSON results on stdout)")
        for name, target in BENCH_TARGETS.items():
            print(f"  {name:<7} {target.split(':')[0]}")
        return 0
    target, rest = argv[0], argv[1:]
    if target not in BENCH_TARGETS:
        raise UserError(f"bench {target}: unknown target{_closest(target, list(BENCH_TARGETS))} "
                        f"(choose from {', '.join(BENCH_TARGETS)})")
    module, _, func = BENCH_TARGETS[target].partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise UserError(f"bench {target}: {module} is not available in this rayq") from None
        raise
    return int(getattr(mod, func)(rest) or 0)
