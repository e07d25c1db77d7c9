"""The core's subcommands: `rayq data`, `rayq ls`, `rayq validate`, `rayq bench`.

Each takes its argv and returns an exit code (see `rayq.cli`). Results go to stdout (`--json`
for machines), progress to stderr. Bad input raises `UserError`, which the CLI prints as one line
with exit code 2; that includes argparse's own errors (`ArgumentParser.error` is overridden,
because argparse would print a usage block and call `sys.exit`). `--help` raises `HelpShown`,
which the CLI turns into exit code 0.

The config flags shared by every command that runs a config (`rayq train`, `search`, `plan`,
`data prepare`, `validate`) come from `add_config_args` / `config_from_args`, so they read the
same everywhere and the `Config` is built by one `resolve()`:

    parser = make_parser("rayq train", "train a recipe")
    add_config_args(parser)                  # --preset --config --set --recipe --cluster + SHORTCUTS
    args = parse_args(parser, argv)          # raises HelpShown after --help
    cfg = config_from_args(args)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import textwrap
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from rayq.errors import HelpShown, UserError, did_you_mean
from rayq.progress import say

__all__ = [
    "make_parser",
    "parse_args",
    "add_config_args",
    "config_from_args",
    "SHORTCUTS",
    "Shortcut",
    "SECTION_CHECKS",
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


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse argv; after --help (argparse printed it and exits) raise `HelpShown` (exit code 0)."""
    try:
        return parser.parse_args(list(argv))
    except SystemExit as exc:
        if exc.code in (0, None):
            raise HelpShown() from None
        raise UserError(f"{parser.prog}: invalid arguments (see {parser.prog} --help)") from None


@dataclass(frozen=True)
class Shortcut:
    """A flag that is a short spelling of one dotted config key (`--steps N` = `--set recipe.steps=N`)."""

    flag: str
    key: str
    type: type
    help: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


SHORTCUTS: dict[str, Shortcut] = {s.dest: s for s in (
    Shortcut("--steps", "recipe.steps", int, "optimizer steps"),
    Shortcut("--workers", "cluster.workers", int, "Ray Train workers (0 = in-process without Ray)"),
    Shortcut("--address", "cluster.address", str, "Ray cluster address (default: an embedded local Ray)"),
)}


def add_config_args(
    parser: argparse.ArgumentParser,
    *,
    config_required: bool = False,
    shortcuts: Iterable[str] = tuple(SHORTCUTS),
) -> None:
    """The config flags; precedence defaults < --preset < --config < --recipe < --cluster < --set
    < shortcut flags. `shortcuts` picks the `SHORTCUTS` a command offers (a command with its own
    `--steps` meaning passes the others)."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", metavar="NAME", help="start from a shipped preset (rayq ls presets)")
    group.add_argument("--config", metavar="FILE", required=config_required,
                       help="a YAML config file (e.g. a run directory's config.yaml)")
    group.add_argument("--recipe", metavar="FILE", help="an exported recipe YAML (rayq export) on top of the preset")
    group.add_argument("--cluster", metavar="NAME|FILE",
                       help="a cluster file, or the name of a shipped one (gcp-tpu, gcp-gpu, aws-gpu, kuberay-gpu, ...)")
    group.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                       help="override a dotted config key, e.g. --set recipe.weight_decay=0.1 (repeatable)")
    for name in shortcuts:
        s = SHORTCUTS[name]
        group.add_argument(s.flag, dest=s.dest, type=s.type, metavar=s.key.split(".")[-1].upper(),
                           help=f"{s.help} (= --set {s.key}=...)")


def config_from_args(args: argparse.Namespace, values: dict[str, Any] | None = None):
    """The resolved, validated `Config` of the flags added by `add_config_args` (one `resolve()`);
    `values` (dotted, already typed) win over every flag."""
    from rayq.config import cluster_values, recipe_values, resolve

    files: dict[str, Any] = {}
    if getattr(args, "recipe", None):
        files.update(recipe_values(args.recipe))
    if getattr(args, "cluster", None):
        files.update(cluster_values(args.cluster))
    flags = {s.key: getattr(args, s.dest) for s in SHORTCUTS.values() if getattr(args, s.dest, None) is not None}
    return resolve(preset=args.preset, config_file=args.config, overrides=args.overrides,
                   file_values=files, values={**flags, **(values or {})})


# ============================================================================ rayq data


def data(argv: Sequence[str]) -> int:
    parser = make_parser("rayq data", "prepare the corpus: SentencePiece tokenizer + Parquet token shards")
    sub = parser.add_subparsers(dest="action", metavar="prepare", parser_class=_Parser)
    sub.required = True
    prep = sub.add_parser("prepare", help="build (or reuse) the prepared data of a config")
    add_config_args(prep)
    prep.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parse_args(parser, argv)

    from rayq import data as data_io

    cfg = config_from_args(args)
    prepared = data_io.prepare(cfg.data, cfg.model.vocab_size, progress=say)
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
    """Each preset's leading comment block, whole: a description stops at a sentence's end, never
    at the end of the first line."""
    from importlib import resources

    from rayq.config import PRESET_PACKAGE, list_presets

    out = []
    for name in list_presets():
        text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
        block: list[str] = []
        for line in text.splitlines():
            if not line.lstrip().startswith("#"):
                if block or line.strip():
                    break
                continue
            block.append(line.lstrip().lstrip("#").strip())
        desc = " ".join(part for part in block if part)
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
    if args.topic not in LS_TOPICS:
        raise UserError(f"ls {args.topic}: unknown topic{did_you_mean(args.topic, LS_TOPICS)} "
                        f"(choose from {', '.join(LS_TOPICS)})")
    rows = LS_TOPICS[args.topic]()
    if args.json:
        print(json.dumps([{"name": n, "description": d} for n, d in rows]))
        return 0
    width = max((len(n) for n, _ in rows), default=0)
    for name, desc in rows:
        # long descriptions wrap under their own column instead of being cut
        print(textwrap.fill(desc, width=max(100, width + 40), initial_indent=f"{name:<{width}}  ",
                            subsequent_indent=" " * (width + 2), break_on_hyphens=False) if desc else name)
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


# Checks of the sections owned by rooms above the core, as lazy "module:function" names (the
# cli's registry pattern): each takes the whole Config and raises UserError. `rayq validate` runs
# them so it refuses what `rayq search`/`rayq eval` would refuse; `rayq --help` imports none.
SECTION_CHECKS: dict[str, str] = {
    "eval": "rayq.eval.evaluate:check_config",
    "search": "rayq.search.space:check_config",
}


def _run_section_checks(cfg) -> None:
    from rayq.cli import load

    for target in SECTION_CHECKS.values():
        load(target)(cfg)


def explain(key: str) -> str:
    """Type, default and doc of a dotted config key, as `rayq validate --explain KEY` prints it."""
    from rayq.config import type_name, unknown_key_hint
    from rayq.schema import field_info

    try:
        info = field_info(key)
    except KeyError:
        raise UserError(f"--explain {key}: unknown config key{unknown_key_hint(key)}") from None
    if dataclasses.is_dataclass(info.default):
        fields = ", ".join(f.name for f in dataclasses.fields(info.default))
        return f"{key}: section ({fields})\n  {info.doc}"
    return f"{key}: {type_name(info.type)} = {json.dumps(info.default)}\n  " + info.doc.replace("\n", "\n  ")


def validate(argv: Sequence[str]) -> int:
    parser = make_parser("rayq validate", "check a config (file, preset, --set overrides) without running it")
    add_config_args(parser)
    parser.add_argument("--json", action="store_true", help="print the resolved config as JSON")
    parser.add_argument("--explain", metavar="KEY", action="append", default=[],
                        help="print the type, default and meaning of a dotted config key (repeatable)")
    args = parse_args(parser, argv)
    if args.explain:
        print("\n".join(explain(key) for key in args.explain))
        return 0
    from rayq.config import to_dict

    cfg = config_from_args(args)
    _check_local_sources(cfg.data.sources)
    _run_section_checks(cfg)
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
        raise UserError(f"bench {target}: unknown target{did_you_mean(target, BENCH_TARGETS)} "
                        f"(choose from {', '.join(BENCH_TARGETS)})")
    module, _, func = BENCH_TARGETS[target].partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise UserError(f"bench {target}: {module} is not available in this rayq") from None
        raise
    return int(getattr(mod, func)(rest) or 0)
