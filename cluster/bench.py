"""`rayq bench train`: tokens/s of the one train loop on Ray Train, without Ray, and of a bare
PyTorch loop on the same model and data, plus bf16 vs fp32 — all in one process run.

Figures are steady-state medians of the loop's own `train/tokens_per_s` reports (the first
report, which holds warm-up, is dropped). The bare loop is the comparison point the overhead is
measured against: plain AdamW + cross-entropy on the same batches, nothing else.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _bare_loop(cfg, data, steps: int) -> float:
    """tokens/s of a minimal fp32 PyTorch loop on the same model, batches and optimizer."""
    import torch

    from rayq import data as data_io
    from rayq.train import build_model, build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(model, cfg.recipe)
    batches = data_io.train_batches(data, cfg.recipe.batch_size, cfg.model.seq_len, seed=cfg.train.seed)
    rates = []
    for i in range(steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= 2:
            rates.append(x.numel() / (time.perf_counter() - t0))
    return statistics.median(rates)


def _steady(history: list[dict]) -> float:
    rates = [m["train/tokens_per_s"] for m in history if "train/tokens_per_s" in m][1:]
    return statistics.median(rates) if rates else float("nan")


def _local(cfg, data) -> float:
    from rayq.train import LocalReporter, run

    with tempfile.TemporaryDirectory() as d:
        return _steady(run(cfg, LocalReporter(d, cfg, echo=False), data=data).history)


def _ray(cfg) -> float:
    from rayq.cluster.trainer import fit

    with tempfile.TemporaryDirectory() as d:
        fit(cfg, Path(d) / "run", evaluate=False)
        rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    return _steady(rows)


def precision_report(cfg, data, fp32_tokens_per_s: float, say, fused: bool = True) -> dict:
    """bf16 native vs emulated, emulated fp16 (eager and fused rounding) and what
    `precision_mode: auto` picks on this CPU, each as tokens/s of the rayq loop (same data)."""
    from rayq import config as config_io
    from rayq import precision

    def rate(prec: str, mode: str) -> float:
        return _local(config_io.with_values(cfg, {"recipe.precision": prec, "recipe.precision_mode": mode}), data)

    out: dict = {"fp32_tokens_per_s": fp32_tokens_per_s}
    for prec, mode in (("bf16", "native"), ("bf16", "emulated"), ("fp16", "emulated")):
        say(f"rayq loop without Ray ({mode} {prec})")
        out[f"{prec}_{mode}_tokens_per_s"] = rate(prec, mode)
    if not fused:  # the compile alone takes 40 s or more here: not in a smoke test
        out["fp16_emulated_fused_tokens_per_s"] = None
    else:
        say("rayq loop without Ray (emulated fp16, fused compiled rounding; includes one compile in warm-up)")
        out.update(_fused_fp16(rate))
    probe = precision.native_bf16_probe()
    auto = precision.PrecisionPolicy.from_recipe(config_io.with_values(cfg, {"recipe.precision": "bf16"}).recipe, "cpu")
    out["auto_bf16_mode"], out["auto_bf16_reason"], out["bf16_probe"] = auto.mode, auto.reason, probe
    bf16 = out["bf16_native_tokens_per_s"]
    out["bf16_native_vs_fp32"] = bf16 / fp32_tokens_per_s
    out["bf16_native_slower_than_fp32"] = bf16 < fp32_tokens_per_s  # where true, auto should emulate
    out["fp16_emulated_vs_bf16_native"] = out["fp16_emulated_tokens_per_s"] / bf16
    if out["fp16_emulated_fused_tokens_per_s"]:
        out["fp16_emulated_fused_vs_bf16_native"] = out["fp16_emulated_fused_tokens_per_s"] / bf16
        out["fp16_fused_vs_eager_rounding"] = out["fp16_emulated_fused_tokens_per_s"] / out["fp16_emulated_tokens_per_s"]
    return out


def _fused_fp16(rate) -> dict:
    """Emulated fp16 with RAYQ_FUSED_ROUNDING=1 for this one run (the env is restored after)."""
    import os

    from rayq import precision

    before = os.environ.get("RAYQ_FUSED_ROUNDING")
    os.environ["RAYQ_FUSED_ROUNDING"] = "1"
    try:
        return {"fp16_emulated_fused_tokens_per_s": rate("fp16", "emulated"),
                "fused_rounding_active": precision.fused_round() is not None}
    finally:
        if before is None:
            os.environ.pop("RAYQ_FUSED_ROUNDING", None)
        else:
            os.environ["RAYQ_FUSED_ROUNDING"] = before


def main(argv: list[str]) -> int:
    from rayq.commands import add_config_args, make_parser, parse_args

    parser = make_parser("rayq bench train", "tokens/s: Ray Train vs no Ray vs a bare loop; bf16 vs fp32")
    add_config_args(parser, shortcuts=())
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="tiny preset, few steps, no Ray (a smoke test)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Train measurement")
    parser.add_argument("--no-precision", action="store_true",
                        help="skip the bf16 native/emulated and emulated-fp16 (eager/fused rounding) runs")
    parser.add_argument("--json", action="store_true")
    args = parse_args(parser, argv)
    import torch

    from rayq import config as config_io
    from rayq import data as data_io
    from rayq.allocator import describe, keep_pages

    keep_pages()
    if args.preset is None and args.config is None:
        args.preset = "tiny" if args.quick else "small"
    steps = 8 if args.quick else args.steps
    threads = torch.get_num_threads()
    cfg = config_io.resolve(preset=args.preset, config_file=args.config, overrides=args.overrides, values={
        "recipe.steps": steps, "train.log_every": max(2, steps // 8), "train.eval_every": 0,
        "train.checkpoint_every": 0, "recipe.precision": "fp32", "cluster.workers": 1,
        "cluster.cpus_per_worker": float(threads), "train.threads": threads})
    say = lambda msg: print(f"[bench train] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    data = data_io.prepare(cfg.data, cfg.model.vocab_size, progress=say)
    out: dict = {"preset": args.preset, "steps": steps, "threads": threads, **describe(),
                 "tokens_per_step": cfg.recipe.batch_size * cfg.model.seq_len}
    say("bare PyTorch loop (fp32)")
    out["bare_fp32_tokens_per_s"] = _bare_loop(cfg, data, steps)
    say("rayq loop without Ray (fp32)")
    out["rayq_fp32_tokens_per_s"] = _local(cfg, data)
    say("rayq loop without Ray (bf16 autocast)")
    out["rayq_bf16_tokens_per_s"] = _local(config_io.with_values(cfg, {"recipe.precision": "bf16"}), data)
    if not (args.quick or args.no_ray):
        say("rayq loop on Ray Train, 1 worker (fp32)")
        out["ray_fp32_tokens_per_s"] = _ray(cfg)
        out["ray_overhead_vs_local"] = 1 - out["ray_fp32_tokens_per_s"] / out["rayq_fp32_tokens_per_s"]
    out["loop_overhead_vs_bare"] = 1 - out["rayq_fp32_tokens_per_s"] / out["bare_fp32_tokens_per_s"]
    out["bf16_speedup_vs_fp32"] = out["rayq_bf16_tokens_per_s"] / out["rayq_fp32_tokens_per_s"]
    if not args.no_precision:
        out["precision"] = precision_report(cfg, data, out["rayq_fp32_tokens_per_s"], say, fused=not args.quick)
    print(json.dumps(out, indent=None if args.json else 1))
    return 0
