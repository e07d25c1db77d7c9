"""`rayq eval` and `rayq analyze`: judge a checkpoint from the command line.

    rayq eval CKPT [--schemes w8a8-vectorwise,w4-colwise] [--tasks heldout-lambada,piqa]
                   [--task-path piqa=~/data/piqa/valid.jsonl] [--set eval.task_size=500] [--json]
    rayq analyze CKPT --out DIR [--batches 4] [--threshold 6] [--z 6] [--json]

CKPT is a checkpoint directory, a run directory (its latest checkpoint) or its checkpoints/. The
checkpoint's own config says what to evaluate; flags and `--set` override it. The tokenizer and
held-out text come from the config's prepared data (`rayq data prepare`), or from `--tokenizer`
and `--heldout` files. Results go to stdout (a table, or JSON with `--json`); progress to stderr.
Bad input raises `UserError` (exit 2 through `rayq.cli`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from rayq import checkpoint as ckpt_io
from rayq import config as config_io
from rayq.errors import UserError
from rayq.precision import PrecisionPolicy
from rayq.run_dir import dumps


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parser(prog: str, description: str):
    from rayq.commands import make_parser

    parser = make_parser(prog, description)
    parser.add_argument("checkpoint", help="checkpoint dir, run dir (latest checkpoint) or its checkpoints/")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override a key of the checkpoint's config, e.g. --set eval.task_size=500")
    parser.add_argument("--tokenizer", metavar="FILE", help="SentencePiece .model (default: the prepared data's)")
    parser.add_argument("--heldout", metavar="FILE", action="append", default=[],
                        help="held-out text file for built-in tasks and KL (repeatable; default: prepared data)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: train.device of the config)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _split(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _load(args: Any, values: dict) -> tuple:
    """(checkpoint dir, step, config, model, policy, device) of the CLI arguments. The model is the
    checkpoint's (`rayq.checkpoint.load_model`); the config is its config.yaml with `--set` and
    the flags applied, which say what to evaluate."""
    path = ckpt_io.resolve_checkpoint(args.checkpoint)
    cfg = config_io.resolve(config_file=path / "config.yaml", overrides=args.overrides, values=values)
    device = ckpt_io.resolve_device(args.device or cfg.train.device)
    loaded = ckpt_io.load_model(path, device)
    precision = getattr(args, "precision", "recipe")
    policy = None if precision == "fp32" else PrecisionPolicy.from_recipe(cfg.recipe, device.type)
    return loaded.path, loaded.step, cfg, loaded.model, policy, device


def _run_tokenizer(ckpt_dir: Path) -> Optional[Path]:
    """The tokenizer a run directory carries (`RUN/tokenizer.model`, next to checkpoints/)."""
    for d in (ckpt_dir, ckpt_dir.parent, ckpt_dir.parent.parent):
        if (d / "tokenizer.model").is_file():
            return d / "tokenizer.model"
    return None


def _data_parts(args: Any, cfg: Any, ckpt_dir: Optional[Path] = None) -> dict:
    """tokenizer / heldout_texts / heldout_tokens from files, or the prepared data of the config;
    where that data cannot be prepared (another machine), the run's own tokenizer.model."""
    if args.tokenizer or args.heldout:
        parts: dict = {}
        if args.tokenizer:
            p = Path(args.tokenizer).expanduser()
            if not p.is_file():
                raise UserError(f"--tokenizer {p}: file not found")
            import sentencepiece as spm

            try:
                parts["tokenizer"] = spm.SentencePieceProcessor(model_file=str(p))
            except (OSError, RuntimeError) as exc:
                raise UserError(f"--tokenizer {p}: not a SentencePiece model ({exc})") from None
        texts = {}
        for f in args.heldout:
            p = Path(f).expanduser()
            if not p.is_file():
                raise UserError(f"--heldout {p}: file not found")
            texts[p.stem] = p.read_text(encoding="utf-8")
        parts["heldout_texts"] = texts or None
        if "tokenizer" not in parts:
            parts["tokenizer"] = _prepared(cfg).tokenizer()
        return parts
    carried = _run_tokenizer(ckpt_dir) if ckpt_dir is not None else None
    try:
        data = _prepared(cfg)
    except UserError as exc:
        if carried is None:
            raise
        _progress(f"rayq eval: no prepared data here ({exc}); using the run's {carried} "
                  "(held-out text for built-in tasks and KL: --heldout FILE)")
        args.tokenizer = str(carried)
        return _data_parts(args, cfg)
    return {"data": data}


def _prepared(cfg: Any):
    from rayq import data as data_io

    return data_io.prepare(cfg.data, cfg.model.vocab_size, progress=_progress)


# ============================================================================ rayq eval


def _fmt_ci(d: Optional[dict]) -> str:
    if d is None or d["estimate"] is None or math.isnan(d["estimate"]):
        return "n/a"
    return f"{d['estimate']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def format_table(doc: dict) -> str:
    """The human-readable `rayq eval` table of an `EvalResult.to_dict()` document."""
    schemes = list(doc["schemes"])
    fp_col = doc.get("fp_label", "fp")
    rows = [["task", "items", "metric", fp_col] + schemes]
    for name, s in doc["fp"].items():
        key = s["primary"]
        row = [name, str(s["n"]), key, f"{s[key]:.4f}"]
        for scheme in schemes:
            q = doc["schemes"][scheme]["tasks"][name][key]
            rel = f" ({(q - s[key]) / s[key] * 100:+.2f}%)" if s[key] and s["kind"] != "perplexity" else ""
            row.append(f"{q:.4f}{rel}")
        rows.append(row)
    m = doc["metrics"]
    if "fp/acc" in m:
        rows.append(["mean acc", "", "", f"{m['fp/acc']:.4f}"] + [f"{m.get(f'q/{s}/acc', float('nan')):.4f}" for s in schemes])
    if schemes:
        conf = int(round(doc["confidence"] * 100))
        rows.append([f"degradation % [{conf}% CI]", "", "", ""] + [_fmt_ci(doc["schemes"][s]["degradation_pct"]) for s in schemes])
        kls = [doc["schemes"][s]["kl"] for s in schemes]
        if any(k is not None for k in kls):
            rows.append(["KL(FP||Q) nats ± se", "", "", ""] + [f"{k['kl']:.3g} ± {k['kl_se']:.2g}" if k else "n/a" for k in kls])
            rows.append(["top-1 agreement", "", "", ""] + [f"{k['top1_agree'] * 100:.2f}%" if k else "n/a" for k in kls])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r, row in enumerate(rows):
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if r == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def eval_(argv: Sequence[str]) -> int:
    from rayq.commands import parse_args

    parser = _parser("rayq eval", "score a checkpoint in full precision and under each quantization scheme")
    parser.add_argument("--schemes", help="comma-separated schemes (rayq ls quant); default: eval.schemes; '' for none")
    parser.add_argument("--tasks", help="comma-separated tasks (rayq ls tasks); default: eval.tasks")
    parser.add_argument("--task-path", metavar="NAME=PATH", action="append", default=[],
                        help="local file of a task's released format, e.g. piqa=~/piqa/valid.jsonl (repeatable)")
    parser.add_argument("--task-size", type=int, help="items per built-in task (eval.task_size)")
    parser.add_argument("--kl-tokens", type=int, help="held-out tokens for KL (eval.kl_tokens)")
    parser.add_argument("--batch-size", type=int, help="sequences per scoring batch (eval.batch_size)")
    parser.add_argument("--bootstrap", type=int, help="bootstrap resamples (eval.bootstrap_samples)")
    parser.add_argument("--precision", choices=["recipe", "fp32"], default="recipe",
                        help="compute of the forward passes: the recipe's precision (as at train time) or fp32")
    parser.add_argument("--backend", choices=["auto", "eager", "compiled", "reference"], default="auto",
                        help="rayq.kernels GEMM path of the quantized models (default auto)")
    parser.add_argument("--diagnostics", action="store_true", help="also compute the paper's §5 diagnostics")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="score only the first N items of every task (quick checks; lm-eval's --limit)")
    parser.add_argument("--output-path", metavar="FILE",
                        help="also write the results as JSON to FILE (a directory: eval_step_<N>.json in it)")
    args = parse_args(parser, argv)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: expected a whole number >= 1")

    values: dict[str, Any] = {}
    if args.schemes is not None:
        values["eval.schemes"] = _split(args.schemes)
    if args.tasks is not None:
        values["eval.tasks"] = _split(args.tasks)
    for text in args.task_path:
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--task-path {text}: expected NAME=PATH")
        values[f"eval.task_paths.{name.strip().lower()}"] = path.strip()
    for flag, key in (("task_size", "task_size"), ("kl_tokens", "kl_tokens"), ("batch_size", "batch_size"),
                      ("bootstrap", "bootstrap_samples")):
        if getattr(args, flag) is not None:
            values[f"eval.{key}"] = getattr(args, flag)
    if args.diagnostics:
        values["eval.diagnostics"] = True

    from rayq.eval.evaluate import check_schemes, default_quantizer, eval_inputs, evaluate
    from rayq.eval.tasks import get_spec

    # cheap checks first: names of tasks and schemes, before loading the model or preparing data
    for name in values.get("eval.tasks", []):
        get_spec(name)
    path, step, cfg, model, policy, device = _load(args, values)
    check_schemes(cfg.eval.schemes)
    for name in cfg.eval.tasks:
        get_spec(name)
    _progress(f"rayq eval: {path} (step {step}) on {device}, tasks {', '.join(cfg.eval.tasks)}, "
              f"schemes {', '.join(cfg.eval.schemes) or 'none'}")
    inputs = eval_inputs(cfg, **_data_parts(args, cfg, path))
    if args.limit is not None:
        inputs.tasks[:] = [dataclasses.replace(t, items=t.items[:args.limit]) for t in inputs.tasks]
    result = evaluate(model, inputs.tasks, cfg.eval, tokenizer=inputs.tokenizer, kl_batches=inputs.kl_batches,
                      policy=policy, progress=_progress,
                      quantizer=default_quantizer(inputs.kl_batches[:2] or None, backend=args.backend))
    doc = {"checkpoint": str(path), "step": step,
           "precision": "fp32" if policy is None else policy.precision, **result.to_dict()}
    if result.diagnostics is not None:
        doc["diagnostics"] = result.diagnostics.report()
    if args.limit is not None:
        doc["limit"] = args.limit
    if args.output_path:
        written = _write_output(Path(args.output_path).expanduser(), doc, step)
        _progress(f"rayq eval: wrote {written}")
    if args.json:
        print(dumps(doc))
    else:
        doc["fp_label"] = f"fp ({doc['precision']})"
        print(f"{path} (step {step})")
        print(format_table(doc))
        if result.diagnostics is not None:
            print(format_diagnostics(doc["diagnostics"]))
    return 0


def format_diagnostics(report: dict) -> str:
    """The human-readable `--diagnostics` part of `rayq eval`: outlier statistics per site (all
    positions / without position 0), per block, and the quantizer probes' damage with CIs."""
    lines = ["", "outlier diagnostics (all positions | without position 0)"]
    header = ["site", "kurtosis", "max/median", "crest", "zero-median"]
    rows = [header]
    for site, st in report["sites"].items():
        rows.append([site] + [f"{st[k]:.3g} | {st[k + '_nopos0']:.3g}" for k in ("kurtosis", "max_median", "crest")]
                    + [f"{st['zero_median_frac']:.2%}"])
    for block, st in report["blocks"].items():
        rows.append([block, f"sink rate {st['sink_rate']:.2f}", f"first-token norm / median {st['bos_norm_ratio']:.3g}", "", ""])
    for ln, st in report["layernorms"].items():
        rows.append([ln, f"gain max/median {st['gain_max_median']:.3g}", "", "", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if report["probes"]:
        lines += ["", "quantizer probes: KL(FP||Q) and delta CE, nats [CI]"]
        for label, d in report["probes"].items():
            kl, ce = d["kl"], d["delta_ce"]
            lines.append(f"  {label:<20} KL {kl['estimate']:.3g} [{kl['low']:.3g}, {kl['high']:.3g}]   "
                         f"dCE {ce['estimate']:+.3g} [{ce['low']:+.3g}, {ce['high']:+.3g}]")
    return "\n".join(lines)


def _write_output(target: Path, doc: dict, step: int) -> Path:
    """The results as strict JSON (NaN written as null) at `target`, or in it when it is a directory."""
    from rayq.config import atomic_write_text
    from rayq.fs import os_error_message

    if target.is_dir() or str(target).endswith(("/", "\\")):
        target = target / f"eval_step_{step}.json"
    if target.parent.exists() and not target.parent.is_dir():
        raise UserError(f"--output-path {target}: {target.parent} is a file, not a directory")
    try:
        atomic_write_text(target, dumps(doc, indent=1) + "\n")
    except OSError as exc:
        raise UserError(f"--output-path {os_error_message(exc, target, 'the results')}") from None
    return target


# ============================================================================ rayq analyze


def analyze(argv: Sequence[str]) -> int:
    from rayq.commands import parse_args

    parser = _parser("rayq analyze", "weight and activation diagnostics of a checkpoint (paper §5): JSON + PNG plots")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for diagnostics.json and the plots")
    parser.add_argument("--batches", type=int, default=4, help="held-out batches to run (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--threshold", type=float, default=6.0, help="outlier magnitude |x| (Dettmers: 6)")
    parser.add_argument("--z", type=float, default=6.0, help="outlier z-score of the z-score rule (default 6)")
    parser.add_argument("--layer-frac", type=float, default=0.25, help="fraction of sites (Dettmers: 0.25)")
    parser.add_argument("--token-frac", type=float, default=0.06, help="fraction of tokens (Dettmers: 0.06)")
    parser.add_argument("--no-plots", action="store_true", help="write diagnostics.json only")
    args = parse_args(parser, argv)
    if args.batches < 1 or args.batch_size < 1:
        raise UserError("--batches and --batch-size must be >= 1")
    if not (0 < args.layer_frac <= 1 and 0 < args.token_frac <= 1):
        raise UserError("--layer-frac and --token-frac must be in (0, 1]")

    from rayq.config import atomic_write_text
    from rayq.eval.degradation import token_batches
    from rayq.eval.diagnostics import analyze as run_analysis
    from rayq.eval.plots import plot_diagnostics
    from rayq.eval.scoring import as_tokenizer

    path, step, cfg, model, _, device = _load(args, {})
    parts = _data_parts(args, cfg, path)
    if "data" in parts:
        tokens = parts["data"].tokens("heldout")
    else:
        if not parts.get("heldout_texts"):
            raise UserError("rayq analyze needs held-out text: --heldout FILE (or the prepared data)")
        tok = as_tokenizer(parts["tokenizer"])
        tokens = [i for _, text in sorted(parts["heldout_texts"].items()) for i in tok.encode(text)]
    seq_len = cfg.model.seq_len
    try:
        batches = token_batches(tokens, args.batches * args.batch_size * seq_len, seq_len, args.batch_size)
    except ValueError as exc:
        raise UserError(f"rayq analyze: {exc}") from None
    _progress(f"rayq analyze: {path} (step {step}) on {sum(b.numel() for b in batches)} held-out tokens")
    diag = run_analysis(model, batches, threshold=args.threshold, z=args.z, layer_frac=args.layer_frac,
                        token_frac=args.token_frac)
    out = Path(args.out).expanduser()
    doc = {"checkpoint": str(path), "step": step, "summary": diag.summary(), **diag.to_dict()}
    atomic_write_text(out / "diagnostics.json", json.dumps(doc, indent=1))
    written = [str(out / "diagnostics.json")]
    if not args.no_plots:
        schemes = ", ".join(cfg.eval.schemes) or "none"
        written += plot_diagnostics(diag, out, source=f"checkpoint {path} · step {step} · eval schemes: {schemes}")
    if args.json:
        print(json.dumps({"checkpoint": str(path), "step": step, "files": written, "summary": diag.summary()}))
    else:
        print(f"{path} (step {step})")
        for k, v in diag.summary().items():
            print(f"  {k:<24} {v:.4g}")
        print(f"  outlier dims (|x|>={args.threshold:g}): {diag.outliers.dims or 'none'}; "
              f"z-score rule (z>={args.z:g}): {diag.outliers_z.dims or 'none'}")
        print("wrote " + ", ".join(written))
    return 0
