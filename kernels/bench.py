"""`rayq bench int8`: the W8A8 vector-wise linear against bf16 and fp32 `nn.Linear`, per CPU.

Prints JSON on stdout (--json) or a table; progress goes to stderr. In each comparison the
candidates run in the same process, interleaved round-robin (fp32, bf16, W8A8, ... then again),
and the median of the rounds is reported: on a shared 2-core machine, load from other processes
then hits all candidates alike. The allocator moves results ~2x, so the bench runs twice: in this
process with pages kept (`rayq.kernels.allocator.keep_pages`, "tuned") and in a child process
with the system allocator untouched ("system"); both are reported.

The W8A8 figures include activation quantization, the INT8 GEMM, dequantization and the bias:
what a `W8A8Linear` forward costs. `w8a8_auto_ms` is the module as users run it (the path the
per-machine probe chose, `rayq.kernels.backends`); every exact path is timed too, eagerly, plus
the torch.compile-fused `_int_mm` and oneDNN forms and torchao's compiled int8 linear when torchao
is importable (not a project dependency). `w8a8_bf16io_*` take and return bf16 like the bf16
`nn.Linear` they are compared with; the others take and return fp32. A leg 20x slower than the
fastest on its first call (`_int_mm` where it is a scalar loop) is timed once (`timed_once`), not
raced. The probe's choices, CPU model and flags are recorded.
Whole-model timings are `rayq bench eval` (rayq.eval.bench).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import allocator, backends, gemm, machine
from .quantize import quantize_
from .schemes import W8A8Vectorwise
from .timing import race, race_with_scout

FULL_SHAPES = ((256, 4096, 4096), (2048, 4096, 4096))
QUICK_SHAPES = ((16, 256, 256), (64, 512, 256))
LEGS = ("tuned", "system")
SCOUT_FACTOR = 20.0  # a leg this many times slower than the fastest on its first call is timed once


def _log(msg: str) -> None:
    print(f"[bench int8] {msg}", file=sys.stderr, flush=True)


def _timed_first_call(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return round(time.perf_counter() - t0, 3)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a and b else None


def _w8a8(linear: nn.Linear, backend: str) -> nn.Module:
    return quantize_(nn.Sequential(linear), W8A8Vectorwise(), inplace=False, backend=backend)


def _forced(module: nn.Module, form: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Call `module` with the CPU W8A8 form forced, restoring the previous setting after."""
    def call(x):
        before = gemm.cpu_kernel()
        gemm.set_cpu_kernel(form)
        try:
            return module(x)
        finally:
            gemm.set_cpu_kernel(before)

    return call


def _torchao_compiled(linear: nn.Linear, x: torch.Tensor, row: dict) -> Optional[Callable[[], object]]:
    try:
        import copy

        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        from torchao.quantization import quantize_ as ao_quantize_

        ao = nn.Sequential(copy.deepcopy(linear))
        ao_quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        ao_c = torch.compile(ao)
        row["torchao_compile_first_call_s"] = _timed_first_call(lambda: ao_c(x))
        return lambda: ao_c(x)
    except Exception as exc:  # noqa: BLE001 - optional peer: absent or broken is a finding, not a failure
        row["torchao"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
        return None


def bench_linear(M: int, K: int, N: int, rounds: int, compiled: bool, peers: bool) -> dict:
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    lin_bf16 = nn.Linear(K, N).to(torch.bfloat16)
    lin_bf16.load_state_dict(lin.state_dict())
    x = torch.randn(M, K)
    xb = x.to(torch.bfloat16)
    row: dict = {"M": M, "K": K, "N": N, "shape_class": backends.shape_class(M)}
    q_auto = _w8a8(lin, "auto")
    q_eager = _w8a8(lin, "eager")
    q_auto(x)  # the probe (or the cached choice) runs here, outside the timings
    row["auto_form"] = q_auto[0]._cpu_form(x)
    row["auto_compiled"] = q_auto[0]._use_compiled(x)
    layer = q_auto[0]
    xq = gemm.quantize_symmetric(x, gemm.absmax_rows(x))
    fns: dict[str, Callable[[], object]] = {
        "fp32_ms": lambda: lin(x),
        "bf16_ms": lambda: lin_bf16(xb),
        "w8a8_auto_ms": lambda: q_auto(x),
        "w8a8_s8s8_eager_ms": lambda: _forced(q_eager, "s8s8")(x),
        "int_mm_s8s8_ms": lambda: torch._int_mm(xq, layer.qweight.t()),
    }
    if gemm.supports_u8():
        fns["w8a8_u8s8_eager_ms"] = lambda: _forced(q_eager, "u8s8")(x)
    if gemm.onednn_available():
        fns["w8a8_onednn_eager_ms"] = lambda: _forced(q_eager, "onednn")(x)
    if backends.inexact_reason("f32") is None:
        fns["w8a8_f32_eager_ms"] = lambda: _forced(q_eager, "f32")(x)
    # forms timed but not exact on this CPU (oneDNN's u8 x s8 without VNNI): never the best
    row["inexact_forms"] = {f: why for f in ("u8s8", "onednn", "f32") if (why := backends.inexact_reason(f))}
    # bf16 in and out, like the bf16 nn.Linear it is compared with (a bf16 model's activations)
    q_auto(xb)  # the bf16-output probe runs here
    row["auto_form_bf16io"] = q_auto[0]._cpu_form(xb, torch.bfloat16)
    fns["w8a8_bf16io_auto_ms"] = lambda: q_auto(xb)
    if compiled:
        q_comp = _w8a8(lin, "compiled")
        row["compile_first_call_s"] = _timed_first_call(lambda: q_comp(x))
        fns["w8a8_compiled_ms"] = lambda: q_comp(x)
        if gemm.onednn_available():
            q_comp_dnn = _forced(q_comp, "onednn")
            row["onednn_compile_first_call_s"] = _timed_first_call(lambda: (q_comp_dnn(x), q_comp_dnn(xb)))
            fns["w8a8_onednn_compiled_ms"] = lambda: q_comp_dnn(x)
            fns["w8a8_bf16io_onednn_compiled_ms"] = lambda: q_comp_dnn(xb)
    if peers:
        ao = _torchao_compiled(lin, x, row)
        if ao is not None:
            fns["torchao_compiled_ms"] = ao
    with torch.no_grad():
        times, row["timed_once"] = race_with_scout(fns, rounds, SCOUT_FACTOR)
    row.update(times)
    row["w8a8_best_ms"] = min(v for k, v in row.items() if k.startswith("w8a8_") and "bf16io" not in k
                              and k.endswith("_ms") and not any(f"_{f}_" in k for f in row["inexact_forms"]))
    row["speedup_vs_fp32"] = _ratio(row["fp32_ms"], row["w8a8_auto_ms"])
    row["speedup_vs_bf16"] = _ratio(row["bf16_ms"], row["w8a8_auto_ms"])
    # like for like: bf16 activations in and out on both sides
    row["bf16io_speedup_vs_bf16"] = _ratio(row["bf16_ms"], row["w8a8_bf16io_auto_ms"])
    row["bf16_vs_fp32"] = _ratio(row["fp32_ms"], row["bf16_ms"])
    row["int_mm_speedup_vs_fp32"] = _ratio(row["fp32_ms"], row["int_mm_s8s8_ms"])
    if "torchao_compiled_ms" in row:
        row["speedup_vs_torchao_compiled"] = _ratio(row["torchao_compiled_ms"], row["w8a8_auto_ms"])
    return row


def bench_linear_cuda(M: int, K: int, N: int, rounds: int) -> dict:
    """The W8A8 linear on CUDA (`_int_mm` with padding) against fp32, bf16 and fp16 `nn.Linear`
    on the same GPU; every timed call ends with a synchronize, so the times are the kernels'."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    lin = nn.Linear(K, N).to(dev)
    halves = {name: nn.Linear(K, N).to(dev, dtype) for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))}
    for half in halves.values():
        half.load_state_dict(lin.state_dict())
    x = torch.randn(M, K, device=dev)
    q = _w8a8(lin, "eager")

    def synced(f: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            out = f()
            torch.cuda.synchronize()
            return out
        return call

    fns = {"fp32_ms": synced(lambda: lin(x)), "w8a8_ms": synced(lambda: q(x))}
    for name, half in halves.items():
        xh = x.to(next(half.parameters()).dtype)
        fns[f"{name}_ms"] = synced(lambda half=half, xh=xh: half(xh))
    with torch.no_grad():
        row: dict = {"M": M, "K": K, "N": N, "device": torch.cuda.get_device_name(0), **race(fns, rounds)}
    for name in ("fp32", "bf16", "fp16"):
        row[f"speedup_vs_{name}"] = _ratio(row[f"{name}_ms"], row["w8a8_ms"])
    return row


def cpu_kind() -> str:
    flags = set(machine.cpu_info()["kernel_flags"])
    if "amx_int8" in flags:
        return "amx"
    return "vnni" if flags & {"avx512_vnni", "avx_vnni"} else "other"


def targets(rows: list[dict]) -> dict:
    """The issue's targets at M = 2048, K = N = 4096 on this CPU kind (None: not measured)."""
    key = [r for r in rows if r["M"] == 2048 and r["K"] == r["N"] == 4096]
    if not key:
        return {"cpu_kind": cpu_kind(), "measured": False}
    r = key[0]
    t: dict = {"cpu_kind": cpu_kind(), "measured": True, "ge_4x_fp32": r["speedup_vs_fp32"] >= 4}
    if cpu_kind() == "amx":
        # against bf16 nn.Linear, bf16 activations in and out (fp32 in and out: speedup_vs_bf16)
        t["ge_1.3x_bf16"] = r["bf16io_speedup_vs_bf16"] >= 1.3
    if "torchao_compiled_ms" in r:
        t["ge_torchao_compiled"] = r["w8a8_auto_ms"] <= r["torchao_compiled_ms"]
    return t


def run_leg(shapes, rounds: int, compiled: bool, peers: bool) -> dict:
    alloc = allocator.keep_pages()  # before any large tensor exists; RAYQ_ALLOCATOR=system leaves it
    rows = []
    for M, K, N in shapes:
        _log(f"[{alloc['allocator']}] linear M={M} K={K} N={N}")
        rows.append(bench_linear(M, K, N, rounds, compiled, peers))
    return {"allocator": alloc, "load_average": list(os.getloadavg()), "linear": rows, "targets": targets(rows)}


def _system_leg(argv: list[str]) -> dict:
    """The same bench in a child process whose allocator is left as the system set it."""
    env = {**os.environ, "RAYQ_ALLOCATOR": "system"}
    cmd = [sys.executable, "-m", "rayq.kernels.bench", *argv, "--leg", "system", "--json"]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        return {"error": f"child exited {done.returncode}"}
    return json.loads(done.stdout)["legs"]["system"]


def _table(result: dict) -> str:
    env = result["env"]
    lines = [f"cpu={env['machine']['model']} flags={','.join(env['machine']['kernel_flags'])} threads={env['machine']['threads']} "
             f"torch={env['machine']['torch']}"]
    for leg, doc in result["legs"].items():
        if "linear" not in doc:
            lines.append(f"[{leg}] {doc}")
            continue
        lines.append(f"[{leg}: {doc['allocator']['allocator']}]  {'M':>5} {'K':>5} {'N':>5} {'fp32':>9} {'bf16':>9} {'w8a8':>9} "
                     f"{'x fp32':>7} {'x bf16':>7} {'bf16io':>7} form")
        for r in doc["linear"]:
            lines.append(f"{'':>{len(leg) + len(doc['allocator']['allocator']) + 5}}{r['M']:>5} {r['K']:>5} {r['N']:>5} "
                         f"{r['fp32_ms']:>9.2f} {r['bf16_ms']:>9.2f} {r['w8a8_auto_ms']:>9.2f} {r['speedup_vs_fp32']:>7.2f} "
                         f"{r['speedup_vs_bf16']:>7.2f} {r['bf16io_speedup_vs_bf16']:>7.2f} {r['auto_form']}{'+compiled' if r['auto_compiled'] else ''}")
        lines.append(f"  targets: {doc['targets']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="rayq bench int8",
                                description="W8A8 linear vs bf16 and fp32 nn.Linear, both allocators (JSON on stdout with --json)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quick", action="store_true", help="small shapes, eager only, no peers (a smoke test)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (median reported; default 5, quick 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd W8A8 path")
    p.add_argument("--no-peers", action="store_true", help="skip torchao even when it is importable")
    p.add_argument("--shape", action="append", default=None, metavar="MxKxN", help="only this linear shape (repeatable)")
    p.add_argument("--allocator", choices=("both", *LEGS), default="both", help="which allocator legs to run (default both)")
    p.add_argument("--leg", choices=LEGS, default=None, help=argparse.SUPPRESS)  # the child process of the system leg
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the W8A8 linear (CUDA _int_mm, padded) vs fp32/bf16/fp16 nn.Linear on the GPU")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here (a CPU build of torch, or no GPU)")
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    if rounds < 1:
        p.error("--rounds must be >= 1")
    shapes = list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    if args.shape:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shape]
            if not all(len(t) == 3 and min(t) >= 1 for t in shapes):
                raise ValueError
        except ValueError:
            p.error(f"--shape expects MxKxN with positive integers, got {args.shape}")
    if args.device == "cuda":
        rows = [bench_linear_cuda(M, K, N, rounds) for M, K, N in shapes]
        result = {"bench": "int8", "device": "cuda", "env": {"machine": machine.describe(), "rounds": rounds},
                  "linear": rows, "backends": backends.describe(probe=False)}
        print(json.dumps(result, indent=2 if args.json else 1))
        return 0
    compiled, peers = not (args.quick or args.no_compile), not (args.quick or args.no_peers)
    legs = [args.leg] if args.leg else (list(LEGS) if args.allocator == "both" else [args.allocator])
    result: dict = {"bench": "int8", "env": {"machine": machine.describe(), "cpu_kind": cpu_kind(), "quick": args.quick,
                                             "rounds": rounds, "compiled": compiled}, "legs": {}}
    if "tuned" in legs:
        result["legs"]["tuned"] = run_leg(shapes, rounds, compiled, peers)
    if "system" in legs:
        child = [a for a in argv if a not in ("--json",)]
        result["legs"]["system"] = run_leg(shapes, rounds, compiled, peers) if args.leg == "system" else _system_leg(child)
    result["env"]["backends"] = backends.describe(probe=False)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
