"""`rayq bench eval`: evaluation throughput (scored tokens/s), FP32 vs bf16 vs W8A8, in the same run.

The measured path is the evaluator's own: `score_tokens` on full-length requests (forward pass,
log-softmax, gather of the continuation log-probabilities), for the FP32 model and for its
`rayq.kernels` quantized copy, and for the FP32 model under bf16 autocast (the speed a user would
get by simply evaluating in bf16: W8A8 must be at least as fast to be worth it). The quantized
copy is measured in fp32 and under bf16 autocast ("@bf16": the rest of the model in bf16 like the
bf16 leg, the INT8 GEMMs writing bf16), the like-for-like comparison with bf16. Repeats
alternate the models so that all see the same machine
state (a busy neighbour slows both, not one); the median of the repeats is reported. The weights
are a seeded random init of the preset: throughput does not depend on what the weights learned.
`rayq.allocator.keep_pages()` runs first and its `describe()` is recorded with the figures.

The quantized model is measured on each requested kernels backend (default: `auto`, the kernels'
own choice, and `compiled`, the torch.compile-fused quantize/GEMM/dequant); the one-time compile
shows up in `warmup_s`, not in the throughput. The CPU (model, flags) and the kernels' per-machine
GEMM choices are recorded with the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from typing import Sequence

BF16_SUFFIX = "@bf16"  # a quantized model measured under bf16 autocast


def main(argv: Sequence[str]) -> int:
    if "--diagnostics" in argv:  # a separate measurement: the per-eval diagnostics' cost
        return diagnostics_cost([a for a in argv if a != "--diagnostics"])
    from rayq import allocator

    alloc = allocator.keep_pages()  # before any large tensor exists

    import torch

    from rayq.commands import make_parser, parse_args
    from rayq.config import resolve
    from rayq.eval.evaluate import check_schemes, default_quantizer
    from rayq.eval.scoring import score_tokens
    from rayq.kernels import backends as kernel_backends
    from rayq.kernels import machine
    from rayq.model import GPT, count_parameters

    parser = make_parser("rayq bench eval", "evaluation throughput: FP32 vs a quantization scheme (JSON on stdout)")
    parser.add_argument("--preset", default="small", help="model preset (default: small)")
    parser.add_argument("--scheme", default="w8a8-vectorwise", help="quantization scheme (default: w8a8-vectorwise)")
    parser.add_argument("--sequences", type=int, default=64, help="full-length requests per repeat (default 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="scoring batch (default: eval.batch_size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model (default 5)")
    parser.add_argument("--backends", default="auto,compiled",
                        help="kernels backends to measure the scheme on (default: auto,compiled)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parse_args(parser, argv)
    if args.sequences < 1 or args.repeats < 1:
        from rayq.errors import UserError

        raise UserError("--sequences and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_schemes([args.scheme])

    cfg = resolve(preset=args.preset)
    batch_size = args.batch_size or cfg.eval.batch_size
    torch.manual_seed(0)
    fp = GPT(cfg.model).eval()
    seq_len = cfg.model.seq_len
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.model.vocab_size, (args.sequences, seq_len + 1), generator=gen)
    # a request scores every position but the first: the whole window goes through the model
    requests = [(row[:1].tolist(), row[1:].tolist()) for row in ids]
    calibration = [ids[:batch_size, :seq_len]]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    models = {"fp32": fp, "bf16": fp}  # the same FP32 model; "bf16" runs it under autocast
    for backend in backends:
        name = args.scheme if backend == "auto" else f"{args.scheme}+{backend}"
        models[name] = default_quantizer(calibration, backend=backend)(fp, args.scheme)
        # the quantized model under bf16 autocast, as a bf16 recipe's evaluation runs it: what
        # is not an INT8 GEMM (attention, norms, the head) runs in bf16 as in "bf16"
        models[f"{name}{BF16_SUFFIX}"] = models[name]
    tokens = args.sequences * seq_len

    def precision(name: str):
        bf16 = name == "bf16" or name.endswith(BF16_SUFFIX)
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def run(name: str) -> float:
        t0 = time.perf_counter()
        with precision(name):
            score_tokens(models[name], requests, batch_size=batch_size, max_len=seq_len)
        return tokens / (time.perf_counter() - t0)

    warmup = {}
    for name, model in models.items():  # warm-up: first-call allocations, kernel selection, compilation
        t0 = time.perf_counter()
        with precision(name):
            score_tokens(model, requests[:2 * batch_size], batch_size=batch_size, max_len=seq_len)
        warmup[name] = time.perf_counter() - t0
    samples: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            samples[name].append(run(name))
        print(f"bench eval: repeat {r + 1}/{args.repeats}: "
              + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in samples.items()), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    doc = {
        "bench": "eval",
        "preset": args.preset,
        "parameters": count_parameters(cfg.model),
        "model": {"n_layer": cfg.model.n_layer, "d_model": cfg.model.d_model, "vocab_size": cfg.model.vocab_size,
                  "seq_len": seq_len},
        "scheme": args.scheme,
        "sequences": args.sequences,
        "batch_size": batch_size,
        "repeats": args.repeats,
        "tokens_per_repeat": tokens,
        "results": {k: {"tokens_per_s_median": med[k], "tokens_per_s": samples[k], "warmup_s": warmup[k],
                        "ratio_to_fp32": med[k] / med["fp32"], "ratio_to_bf16": med[k] / med["bf16"]} for k in models},
        "ratio": {k: med[k] / med["fp32"] for k in models if k != "fp32"},
        "ratio_to_bf16": {k: med[k] / med["bf16"] for k in models if k not in ("fp32", "bf16")},
        # the target: whole-model W8A8 evaluation at least as fast as bf16 evaluation
        "target_ge_bf16": {k: med[k] >= med["bf16"] for k in models if k not in ("fp32", "bf16")},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": machine.describe(),
        "cpu": kernel_backends.describe(probe=False),
        "allocator": alloc,
        "load_average": list(os.getloadavg()),  # a shared machine slows everything: read the figures with it
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"eval throughput, preset {args.preset} ({doc['parameters'] / 1e6:.1f}M parameters), "
              f"{args.sequences} x {seq_len} tokens, batch {batch_size}, {doc['threads']} threads")
        for k in models:
            print(f"  {k:<28} {med[k]:>12,.0f} tokens/s  ({med[k] / med['fp32']:.2f}x fp32, {med[k] / med['bf16']:.2f}x bf16)")
    return 0


def diagnostics_cost(argv: Sequence[str]) -> int:
    """`rayq bench eval --diagnostics`: what the per-eval diagnostics cost, against the FP forward
    pass over the same held-out batches (what `evaluate` gives `analyze`: 2 batches of
    eval.batch_size x seq_len). Repeats alternate the variants; medians are reported:
    `forward` (the baseline), `outliers` (forward + the outlier-statistics hooks),
    `analyze_no_probes` (all of `rayq.eval.diagnostics.analyze` but the probes: + spectral norms,
    histograms, Dettmers outliers) and `analyze` (+ quantizing and scoring the five probes); for
    scale, `eval_kl_step`: the KL(FP || Q) part of an eval step without diagnostics (eval.kl_tokens
    held-out tokens, one scheme, no tasks: a lower bound of an eval step's cost)."""
    import torch

    from rayq.commands import make_parser, parse_args
    from rayq.config import resolve
    from rayq.eval.diagnostics import analyze
    from rayq.eval.evaluate import evaluate
    from rayq.eval.outliers import OutlierCollector
    from rayq.kernels import machine
    from rayq.model import GPT, count_parameters
    from rayq.schema import EvalConfig

    parser = make_parser("rayq bench eval --diagnostics", "cost of the per-eval diagnostics vs the FP forward (JSON)")
    parser.add_argument("--preset", default="small", help="model preset (default: small)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override a preset key, e.g. --set model.d_model=128 (repeatable)")
    parser.add_argument("--batches", type=int, default=2, help="held-out batches (default 2, as at each eval step)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: eval.batch_size)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parse_args(parser, argv)
    if args.batches < 2 or args.repeats < 1:
        from rayq.errors import UserError

        raise UserError("--batches must be >= 2 (one calibrates the probes) and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve(preset=args.preset, overrides=args.overrides)
    batch_size = args.batch_size or cfg.eval.batch_size
    seq_len = cfg.model.seq_len
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len), generator=gen) for _ in range(args.batches)]

    def forward() -> None:
        with torch.inference_mode():
            for x in batches:
                model(x)

    def outliers() -> None:
        collector = OutlierCollector(model)
        with torch.inference_mode(), collector.attached():
            for x in batches:
                model(x)
        collector.result()

    # context: the KL part of an eval step without diagnostics (eval.kl_tokens, the first scheme; no tasks)
    kl_batches = [torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len), generator=gen)
                  for _ in range(max(1, cfg.eval.kl_tokens // (batch_size * seq_len)))]
    scheme = cfg.eval.schemes[0] if cfg.eval.schemes else "w8a8-vectorwise"
    variants = {"forward": forward, "outliers": outliers,
                "analyze_no_probes": lambda: analyze(model, batches, probes=None),
                "analyze": lambda: analyze(model, batches),
                "eval_kl_step": lambda: evaluate(model, [], EvalConfig(schemes=[scheme], bootstrap_samples=100),
                                                 kl_batches=kl_batches)}
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            t0 = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - t0)
        print(f"bench eval --diagnostics: repeat {r + 1}/{args.repeats}: "
              + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in samples.items()), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    doc = {
        "bench": "eval-diagnostics",
        "preset": args.preset,
        "overrides": list(args.overrides),
        "parameters": count_parameters(cfg.model),
        "model": {"n_layer": cfg.model.n_layer, "d_model": cfg.model.d_model, "n_head": cfg.model.n_head,
                  "vocab_size": cfg.model.vocab_size, "seq_len": seq_len},
        "batches": args.batches,
        "batch_size": batch_size,
        "tokens": args.batches * batch_size * seq_len,
        "eval_kl_tokens": len(kl_batches) * batch_size * seq_len,
        "repeats": args.repeats,
        "results": {k: {"seconds_median": med[k], "seconds": samples[k], "ratio_to_forward": med[k] / med["forward"]}
                    for k in variants},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": machine.describe(),
        "load_average": list(os.getloadavg()),
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"diagnostics cost, preset {args.preset} ({doc['parameters'] / 1e6:.1f}M parameters), "
              f"{args.batches} x {batch_size} x {seq_len} tokens, {doc['threads']} threads")
        for k in variants:
            print(f"  {k:<18} {med[k]:>9.3f} s  ({med[k] / med['forward']:.1f}x the FP forward)")
    return 0
