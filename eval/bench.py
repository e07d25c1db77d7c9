"""`rayq bench eval`: evaluation throughput (scored tokens/s), FP32 vs bf16 vs W8A8, in the same run.

The measured path is the evaluator's own: `score_tokens` on full-length requests (forward pass,
log-softmax, gather of the continuation log-probabilities), for the FP32 model and for its
`rayq.kernels` quantized copy, and for the FP32 model under bf16 autocast (the speed a user would
get by simply evaluating in bf16: W8A8 must be at least as fast to be worth it). Repeats
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
import platform
import statistics
import sys
import time
from typing import Sequence


def main(argv: Sequence[str]) -> int:
    from rayq import allocator

    alloc = allocator.keep_pages()  # before any large tensor exists

    import torch

    from rayq.commands import make_parser, parse_args
    from rayq.config import resolve
    from rayq.eval.evaluate import check_schemes, default_quantizer
    from rayq.eval.scoring import score_tokens
    from rayq.kernels import backends as kernel_backends
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
    if isinstance(args, int):
        return args
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
    tokens = args.sequences * seq_len

    def precision(name: str):
        return torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()

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
        "machine": platform.machine(),
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
