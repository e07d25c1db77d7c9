"""`rayq bench int8`: speed of the W8A8 vector-wise linear and of whole quantized models.

Prints JSON on stdout (--json) or a table; progress goes to stderr. Every comparison is made in
the same process with the candidates interleaved round-robin (fp32, bf16, W8A8, ... then again),
and the median is reported: on a shared 2-core machine, load from other processes then hits all
candidates alike instead of whichever happened to run during a spike. The allocator is set to
keep pages first (`rayq.allocator.keep_pages`) and recorded, since it moves the results ~2x.

The W8A8 figure includes activation quantization, the INT8 GEMM, dequantization and the bias:
what a `W8A8Linear` forward costs. `w8a8_ms` is the backend "auto" picks; eager and compiled are
listed too, with the first-call compile time. torchao / bitsandbytes run side by side only if
importable (they are not project dependencies).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import gemm
from .quantize import quantize_
from .schemes import W8A8Vectorwise

FULL_M = (1, 16, 256, 2048)
FULL_KN = ((1024, 1024), (4096, 4096), (4096, 16384))
QUICK_SHAPES = ((16, 1024, 1024), (256, 1024, 1024))


def _log(msg: str) -> None:
    print(f"[bench int8] {msg}", file=sys.stderr, flush=True)


def race(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median ms per candidate, the candidates interleaved round-robin."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


def _timed_first_call(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return round(time.perf_counter() - t0, 3)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a and b else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _w8a8(linear: nn.Linear, backend: str) -> nn.Module:
    return quantize_(nn.Sequential(linear), W8A8Vectorwise(), layers="all", inplace=False, backend=backend)


def bench_linear(M: int, K: int, N: int, repeats: int, compiled: bool, bf16_frozen: bool) -> dict:
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    lin_bf16 = nn.Linear(K, N).to(torch.bfloat16)
    lin_bf16.load_state_dict(lin.state_dict())
    x = torch.randn(M, K)
    xb = x.to(torch.bfloat16)
    row: dict = {"M": M, "K": K, "N": N}
    q_eager = _w8a8(lin, "eager")
    q_auto = _w8a8(lin, "auto")
    layer = q_auto[0]
    row["auto_backend"] = "compiled" if layer._use_compiled(x) else "eager"
    xq = gemm.quantize_symmetric(x, gemm.absmax_rows(x))
    wq = layer.qweight
    fns: dict[str, Callable[[], object]] = {
        "fp32_ms": lambda: lin(x),
        "bf16_ms": lambda: lin_bf16(xb),
        "w8a8_eager_ms": lambda: q_eager(x),
        "int_mm_s8_ms": lambda: torch._int_mm(xq, wq.t()),
    }
    if gemm.supports_u8():
        fns["int_mm_u8_ms"] = lambda: torch._int_mm(xq.view(torch.uint8) ^ 128, wq.t())
    if compiled:
        q_comp = _w8a8(lin, "compiled")
        row["compile_first_call_s"] = _timed_first_call(lambda: q_comp(x))
        fns["w8a8_compiled_ms"] = lambda: q_comp(x)
    if bf16_frozen:
        # the strongest bf16 baseline here: Inductor with freezing packs the weight for oneDNN.
        # (freezing is fine for bf16; it is the INT8 pattern that it sends to a scalar kernel)
        frozen = torch.compile(lin_bf16, options={"freezing": True})
        _timed_first_call(lambda: frozen(xb))
        fns["bf16_frozen_ms"] = lambda: frozen(xb)
    with torch.no_grad():
        row.update(race(fns, repeats))
    row["w8a8_ms"] = row.get("w8a8_compiled_ms") if row["auto_backend"] == "compiled" and compiled else row["w8a8_eager_ms"]
    best_w8a8 = min(v for k, v in row.items() if k in ("w8a8_eager_ms", "w8a8_compiled_ms"))
    row["w8a8_best_ms"] = best_w8a8
    row["speedup_vs_fp32"] = _ratio(row["fp32_ms"], row["w8a8_ms"])
    row["speedup_vs_bf16"] = _ratio(row["bf16_ms"], row["w8a8_ms"])
    row["best_speedup_vs_fp32"] = _ratio(row["fp32_ms"], best_w8a8)
    row["best_speedup_vs_bf16"] = _ratio(row["bf16_ms"], best_w8a8)
    if "bf16_frozen_ms" in row:
        row["best_speedup_vs_bf16_frozen"] = _ratio(row["bf16_frozen_ms"], best_w8a8)
    row["int_mm_speedup_vs_fp32"] = _ratio(row["fp32_ms"], row["int_mm_s8_ms"])
    return row


def _model_configs(quick: bool) -> list[tuple[str, object, int]]:
    from rayq.schema import ModelConfig

    if quick:
        return [("quick-2L-d256-seq64-b2", ModelConfig(vocab_size=1024, seq_len=64, n_layer=2, d_model=256, n_head=4), 2)]
    from rayq.config import resolve

    small = resolve("small")
    return [
        ("4L-d1024-seq512-b4", ModelConfig(vocab_size=4096, seq_len=512, n_layer=4, d_model=1024, n_head=16), 4),
        ("small-preset", small.model, small.recipe.batch_size),
    ]


def bench_model(name: str, cfg, batch: int, repeats: int, compiled: bool) -> dict:
    from rayq.model import GPT

    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    row: dict = {"name": name, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "seq_len": cfg.seq_len, "batch": batch, "quantized": "block linears"}
    q_eager = quantize_(model, W8A8Vectorwise(), inplace=False, backend="eager")

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(idx)

    fns: dict[str, Callable[[], object]] = {"fp32_ms": lambda: model(idx), "bf16_autocast_ms": bf16, "w8a8_eager_ms": lambda: q_eager(idx)}
    if compiled:
        q_comp = quantize_(model, W8A8Vectorwise(), inplace=False, backend="compiled")
        row["compile_first_call_s"] = _timed_first_call(lambda: q_comp(idx))
        fns["w8a8_compiled_ms"] = lambda: q_comp(idx)
    with torch.no_grad():
        row.update(race(fns, repeats))
    w8 = min(v for k, v in row.items() if k in ("w8a8_eager_ms", "w8a8_compiled_ms"))
    row["w8a8_ms"] = w8
    row["speedup_vs_fp32"] = _ratio(row["fp32_ms"], w8)
    row["speedup_vs_bf16"] = _ratio(row["bf16_autocast_ms"], w8)
    return row


def bench_peers(M: int, K: int, N: int, repeats: int) -> dict:
    """torchao Int8DynamicActivationInt8WeightConfig (eager, compiled) and bitsandbytes'
    Linear8bitLt(threshold=0) on one shape, against fp32 and our W8A8 in the same race."""
    out: dict = {"shape": [M, K, N]}
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    x = torch.randn(M, K)
    ours = _w8a8(lin, "auto")
    fns: dict[str, Callable[[], object]] = {"fp32_ms": lambda: lin(x), "rayq_w8a8_ms": lambda: ours(x)}
    try:
        import copy

        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        from torchao.quantization import quantize_ as ao_quantize_

        ao = nn.Sequential(copy.deepcopy(lin))
        ao_quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        ao_c = torch.compile(ao)
        out["torchao_compile_first_call_s"] = _timed_first_call(lambda: ao_c(x))
        fns["torchao_eager_ms"] = lambda: ao(x)
        fns["torchao_compiled_ms"] = lambda: ao_c(x)
    except Exception as exc:  # noqa: BLE001 - optional peer: absent or broken is a finding, not a failure
        out["torchao"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    try:
        import bitsandbytes as bnb

        bl = bnb.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=0.0)
        bl.weight = bnb.nn.Int8Params(lin.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        bl.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        bl = bl.to("cpu")
        fns["bnb_int8_ms"] = lambda: bl(x)
    except Exception as exc:  # noqa: BLE001
        out["bitsandbytes"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    if len(fns) > 2:
        with torch.no_grad():
            out.update(race(fns, repeats))
        for k in [k for k in out if k.endswith("_ms") and k != "fp32_ms"]:
            out[k.replace("_ms", "_speedup_vs_fp32")] = _ratio(out["fp32_ms"], out[k])
    return out


def _have(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def run(quick: bool, repeats: int, compiled: bool, shapes: Optional[list[tuple[int, int, int]]] = None, models: bool = True) -> dict:
    from rayq import allocator

    alloc = allocator.keep_pages()  # before any large tensor exists
    result: dict = {
        "bench": "int8",
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": _cpu_name(),
            "allocator": allocator.describe() or alloc,
            "cpu_kernel": gemm.cpu_kernel(),
            "quick": quick,
            "repeats": repeats,
            "compiled": compiled,
        },
    }
    if shapes is None:
        shapes = list(QUICK_SHAPES if quick else ((M, K, N) for M in FULL_M for K, N in FULL_KN))
    result["linear"] = []
    for M, K, N in shapes:
        _log(f"linear M={M} K={K} N={N}")
        bf16_frozen = not quick and M >= 256 and K == N == 4096
        result["linear"].append(bench_linear(M, K, N, repeats, compiled, bf16_frozen))
    result["model"] = []
    for name, cfg, batch in _model_configs(quick) if models else []:
        _log(f"model {name}")
        result["model"].append(bench_model(name, cfg, batch, max(3, repeats // 2 + 1), compiled))
    result["peers"] = None
    if not quick and models and (_have("torchao") or _have("bitsandbytes")):
        _log("peers (torchao / bitsandbytes)")
        result["peers"] = bench_peers(2048, 4096, 4096, repeats)
    result["targets"] = _targets(result)
    return result


def _targets(result: dict) -> dict:
    """The issue's targets, evaluated on this run (None where the run did not measure them)."""
    key = [r for r in result["linear"] if r["M"] >= 256 and r["K"] == r["N"] == 4096]
    models = [m for m in result["model"] if m["name"].startswith("4L-d1024")]
    t: dict = {
        "linear_M>=256_K=N=4096_ge_4x_fp32": all(r["speedup_vs_fp32"] >= 4 for r in key) if key else None,
        "linear_M>=256_K=N=4096_ge_1.5x_bf16": all(r["speedup_vs_bf16"] >= 1.5 for r in key) if key else None,
        "model_ge_2.5x_fp32": all(m["speedup_vs_fp32"] >= 2.5 for m in models) if models else None,
        "model_ge_1.3x_bf16": all(m["speedup_vs_bf16"] >= 1.3 for m in models) if models else None,
    }
    peers = result.get("peers") or {}
    if "torchao_compiled_ms" in peers:
        t["not_slower_than_torchao_compiled"] = peers["rayq_w8a8_ms"] <= peers["torchao_compiled_ms"]
    return t


def _table(result: dict) -> str:
    lines = [f"allocator={result['env']['allocator']['allocator']} threads={result['env']['threads']} cpu={result['env']['cpu']}",
             f"{'M':>5} {'K':>5} {'N':>6} {'fp32 ms':>9} {'bf16 ms':>9} {'w8a8 ms':>9} {'x fp32':>7} {'x bf16':>7} backend"]
    for r in result["linear"]:
        lines.append(f"{r['M']:>5} {r['K']:>5} {r['N']:>6} {r['fp32_ms']:>9.2f} {r['bf16_ms']:>9.2f} {r['w8a8_ms']:>9.2f} "
                     f"{r['speedup_vs_fp32']:>7.2f} {r['speedup_vs_bf16']:>7.2f} {r['auto_backend']}")
    for m in result["model"]:
        lines.append(f"model {m['name']}: fp32 {m['fp32_ms']:.1f} ms, bf16 autocast {m['bf16_autocast_ms']:.1f} ms, "
                     f"w8a8 {m['w8a8_ms']:.1f} ms ({m['speedup_vs_fp32']:.2f}x fp32, {m['speedup_vs_bf16']:.2f}x bf16)")
    lines.append(f"targets: {result['targets']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="rayq bench int8", description="W8A8 linear and whole-model speed vs fp32 and bf16 (JSON on stdout with --json)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quick", action="store_true", help="a small subset (smoke test): 2 shapes, a 2-layer model, eager only")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per candidate (median reported; default 7, quick 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd W8A8 path")
    p.add_argument("--shape", action="append", default=None, metavar="MxKxN", help="only this linear shape (repeatable), e.g. 2048x4096x4096")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model forwards and the peers")
    p.add_argument("--kernel", choices=("s8s8", "u8s8"), default=None, help="CPU integer GEMM form for the W8A8 modules")
    args = p.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    if repeats < 1:
        p.error("--repeats must be >= 1")
    shapes = None
    if args.shape:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shape]
            assert all(len(t) == 3 and min(t) >= 1 for t in shapes)
        except (ValueError, AssertionError):
            p.error(f"--shape expects MxKxN with positive integers, got {args.shape}")
    if args.kernel:
        gemm.set_cpu_kernel(args.kernel)
    result = run(quick=args.quick, repeats=repeats, compiled=not (args.quick or args.no_compile), shapes=shapes, models=not args.no_model)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
