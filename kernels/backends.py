"""Every exact INT8 GEMM path torch offers, and the choice of the fastest one for this machine.

The same W8A8 arithmetic can run through several integer kernels, and which one wins depends on
the CPU (VNNI only, AVX-512, AMX) and on the torch build. Each path is registered here as an
`Int8Backend`; on first use on a CPU, `choose(M, K, N)` probes once per (machine, shape class):

1. exactness: the backend's integer GEMM must equal the int64 reference bit for bit on awkward
   shapes (M = 1, odd K and N) — a path that is not exact is never used, however fast;
2. speed: a few interleaved timed calls of the whole eager W8A8 linear (quantize, GEMM, dequant)
   on a shape of the class, and of the GEMM with one dequant pass on ready codes (what a compiled
   call runs besides its one fused quantize pass: the ranking for compiled calls); a path more than `REFERENCE_KERNEL_SLOWDOWN` times slower than plain
   `_int_mm` is oneDNN's scalar reference kernel (`ref_int8`, ~1000x slower: what Inductor's
   `freezing=True` int8 rewrite runs on CPUs without AMX) and is excluded by name;
3. the fastest surviving path is stored in the machine's probe cache (`rayq.kernels.machine`)
   and recorded by every bench (`describe()`).

Paths (device: name):
- cpu: `int_mm_s8s8` (`torch._int_mm` s8 x s8), `int_mm_u8s8` (u8 x s8 with the 128 * colsum(W)
  zero-point correction in int32), `onednn_qlinear` (`torch.ops.onednn.qlinear_pointwise` on a
  prepacked s8 weight, u8 activation with zero point 128, the per-channel weight scale fused into
  the GEMM's fp32 or bf16 output; the per-token scale and the bias follow in place),
  `fp32_exact` (the codes multiplied by the fp32 GEMM in K-chunks whose partial sums stay exact
  integers: the fast exact path on CPUs without VNNI, where `_int_mm` is a scalar loop and oneDNN's
  u8 x s8 kernel saturates; never used while fp32 matmuls may run in bf16/tf32).
  Large calls of every path run the torch.compile-fused quantize/dequant around the GEMM
  (`rayq.kernels.quantize.AUTO_COMPILE_WORK`).
- cuda: `cuda_int_mm` (`_int_mm` with zero padding to its M > 16, K, N multiple-of-8 rules).
- xla: `xla_dot` (an XLA DotGeneral of int8 operands with int32 accumulation).
- anything else: `fp64` (the integer codes multiplied in float64, exact below 2^53).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import gemm, machine
from .timing import race

Tensor = torch.Tensor

REFERENCE_KERNEL_SLOWDOWN = 20.0  # oneDNN's ref_int8 is ~1000x slower; real kernels are within ~3x
PROBE_ROUNDS = 5
PROBE_KN = 1024  # K = N of the timed probe shape: ~1 G multiply-adds at M = 1024, a few ms
# shape classes by tokens per call: decode-like, eval batches, large prefill
GEMM_ONLY = "/gemm"  # the probe's name suffix of a GEMM-with-dequant timing
SHAPE_CLASSES = (("m<=32", 32, 16), ("m<=512", 512, 256), ("m>512", None, 1024))
EXACT_SHAPES = ((1, 7, 5), (19, 67, 33), (33, 130, 17), (64, 1031, 40))


@dataclass(frozen=True)
class Int8Backend:
    """One exact integer GEMM path: `gemm(a, w)` is X_q [M, K] @ W_q^T for int8 w [N, K], as
    int32 (or fp32 holding the exact integers, for paths whose output is float)."""

    name: str
    device: str
    available: Callable[[], bool]
    gemm: Callable[[Tensor, Tensor], Tensor]
    description: str


_REGISTRY: dict[str, Int8Backend] = {}


def register_backend(backend: Int8Backend) -> Int8Backend:
    if backend.name in _REGISTRY:
        raise ValueError(f"int8 backend registered twice: {backend.name!r}")
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Int8Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown int8 backend {name!r} (known: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def list_backends(device: Optional[str] = None, available_only: bool = True) -> list[Int8Backend]:
    return [b for b in _REGISTRY.values()
            if (device is None or b.device == device) and (not available_only or b.available())]


def _onednn_gemm(a: Tensor, w: Tensor) -> Tensor:
    packed = gemm.onednn_prepack(w, a.shape[0])
    return gemm.onednn_qlinear(a.view(torch.uint8) ^ 128, packed, torch.ones(w.shape[0]), torch.float32)


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _xla_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_xla") is not None


register_backend(Int8Backend("int_mm_s8s8", "cpu", lambda: True, lambda a, w: gemm.int8_mm(a, w, kernel="s8s8"),
                             "torch._int_mm s8 x s8 -> s32 (oneDNN)"))
register_backend(Int8Backend("int_mm_u8s8", "cpu", gemm.supports_u8, lambda a, w: gemm.int8_mm(a, w, kernel="u8s8"),
                             "torch._int_mm u8 x s8 -> s32, minus 128 * colsum(W)"))
register_backend(Int8Backend("onednn_qlinear", "cpu", gemm.onednn_available, _onednn_gemm,
                             "oneDNN qlinear_pointwise, prepacked s8 weight, u8 activation, dequant fused, fp32 out"))
register_backend(Int8Backend("fp32_exact", "cpu", gemm.fp32_gemm_is_ieee,
                             lambda a, w: gemm.f32_exact_mm(a.float(), w.float().t()),
                             "integer codes through the fp32 GEMM in K-chunks of 1024 (partial sums exact below 2^24)"))
register_backend(Int8Backend("cuda_int_mm", "cuda", _cuda_available, lambda a, w: gemm.int8_mm(a, w),
                             "torch._int_mm on CUDA, zero-padded to M > 16 and K, N multiples of 8"))
register_backend(Int8Backend("xla_dot", "xla", _xla_available, lambda a, w: gemm.int8_mm(a, w),
                             "XLA DotGeneral int8 x int8 -> int32"))
register_backend(Int8Backend("fp64", "any", lambda: True, lambda a, w: (a.double() @ w.double().t()).to(torch.int64),
                             "integer codes multiplied in float64 (exact below 2^53)"))

# CPU W8A8 linear form behind each CPU backend (see rayq.kernels.quantize.W8A8Linear)
CPU_FORMS = {"int_mm_s8s8": "s8s8", "int_mm_u8s8": "u8s8", "onednn_qlinear": "onednn", "fp32_exact": "f32"}


# --------------------------------------------------------------------------- checks


def _codes(shape: tuple[int, int], gen: torch.Generator) -> Tensor:
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


def check_exact(backend: Int8Backend, shapes=EXACT_SHAPES, device: str = "cpu") -> Optional[str]:
    """None when `backend` equals the int64 reference on every shape, else why not."""
    gen = torch.Generator().manual_seed(1234)
    for M, K, N in shapes:
        a, w = _codes((M, K), gen), _codes((N, K), gen)
        try:
            got = backend.gemm(a.to(device), w.to(device)).cpu()
        except Exception as exc:  # noqa: BLE001 - a path that raises is a path we cannot use
            return f"raised {type(exc).__name__}: {str(exc)[:120]}"
        ref = gemm.int_mm_reference(a, w)
        if got.is_floating_point():  # fp32 output: exact while |acc| < 2^24, true on these shapes
            ok = got.shape == ref.shape and torch.equal(got.double(), ref.double())
        else:
            ok = torch.equal(got.to(torch.int64), ref)
        if not ok:
            return f"not bit-exact vs the int64 reference at {M}x{K}x{N}"
    return None


_form_checks: dict[str, Optional[str]] = {}


def inexact_reason(form: str) -> Optional[str]:
    """Why the CPU W8A8 `form` is not usable on this machine (not in this build, or not bit-exact:
    oneDNN's u8 x s8 kernel saturates its pair sums on CPUs without VNNI), None when it is;
    checked once per process. Forcing a form (`gemm.set_cpu_kernel`) bypasses the probe: this is
    what tests and benches ask first."""
    if form not in _form_checks:
        backend = get_backend(next(name for name, f in CPU_FORMS.items() if f == form))
        _form_checks[form] = "not available in this torch build" if not backend.available() else check_exact(backend)
    return _form_checks[form]


def shape_class(M: int) -> str:
    for name, upper, _ in SHAPE_CLASSES:
        if upper is None or M <= upper:
            return name
    raise AssertionError("unreachable")


def probe_key(cls: str, out_dtype: torch.dtype = torch.float32) -> str:
    """The probe's key: the shape class, and "/bf16" where the linear writes bf16 (on AMX machines
    oneDNN's bf16 output is much faster than its fp32 one, so the ranking may differ)."""
    return f"{cls}/bf16" if out_dtype == torch.bfloat16 else cls


def _probe_shape(key: str) -> tuple[int, int, int]:
    cls = key.partition("/")[0]
    M = next(rep for name, _, rep in SHAPE_CLASSES if name == cls)
    return M, PROBE_KN, PROBE_KN


def _linear_runner(form: str, M: int, K: int, N: int, bf16: bool = False) -> Callable[[], object]:
    """A whole eager W8A8 linear (quantize, GEMM, dequant, bias) in `form`, on random data; with
    `bf16`, bf16 activations in and out (as under a bf16 recipe's autocast)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen)
    if bf16:
        x = x.to(torch.bfloat16)
    w = _codes((N, K), gen)
    w_scale = torch.rand(N, generator=gen) * 1e-2
    bias = torch.randn(N, generator=gen)
    if form == "onednn":
        packed = gemm.onednn_prepack(w, M)
        out = torch.bfloat16 if bf16 else torch.float32
        return lambda: gemm.w8a8_onednn(x, packed, w_scale, bias, None, None, False, out)
    if form == "f32":
        wf = w.float()
        run = lambda: gemm.w8a8_f32(x, wf, w_scale, bias, None, None, False)[0]  # noqa: E731
        return (lambda: run().to(torch.bfloat16)) if bf16 else run
    comp = w.sum(1, dtype=torch.int32) * 128 if form == "u8s8" else None
    if bf16:
        return lambda: gemm.w8a8_core(x, w, w_scale, bias, None, None, False, comp)[0].to(torch.bfloat16)
    return lambda: gemm.w8a8_core(x, w, w_scale, bias, None, None, False, comp)


def _gemm_runner(form: str, M: int, K: int, N: int, bf16: bool = False) -> Callable[[], object]:
    """What a compiled W8A8 call of `form` does besides its one fused quantize pass: the GEMM on
    ready codes and one dequant pass over its output (the fused epilogue's traffic)."""
    gen = torch.Generator().manual_seed(0)
    w = _codes((N, K), gen)
    xq = _codes((M, K), gen)
    w_scale = torch.rand(N, generator=gen) * 1e-2
    token_scale = torch.rand(M, 1, generator=gen) * 1e-2
    if form == "onednn":
        packed = gemm.onednn_prepack(w, M)
        xu8 = xq.view(torch.uint8) ^ 128
        out = torch.bfloat16 if bf16 else torch.float32
        return lambda: gemm.onednn_qlinear(xu8, packed, w_scale, out).mul_(token_scale)
    if form == "f32":
        xf, wf = xq.float(), w.float()
        return lambda: gemm.f32_exact_mm(xf, wf.t()).mul_(token_scale * w_scale)
    if form == "u8s8":
        xu8, comp = xq.view(torch.uint8) ^ 128, w.sum(1, dtype=torch.int32) * 128
        return lambda: torch._int_mm(xu8, w.t()).sub_(comp) * (token_scale * w_scale)
    return lambda: torch._int_mm(xq, w.t()) * (token_scale * w_scale)


def reference_kernels(times_ms: dict[str, float], base: str = "int_mm_s8s8") -> dict[str, str]:
    """The paths so much slower than plain `_int_mm` that oneDNN must be running its scalar
    reference kernel (`ref_int8`), with the reason; `base` itself is never excluded."""
    ref = times_ms.get(base)
    if not ref:
        return {}
    return {name: f"{t / ref:.0f}x slower than _int_mm: oneDNN reference kernel (ref_int8)"
            for name, t in times_ms.items() if name != base and t > REFERENCE_KERNEL_SLOWDOWN * ref}


def probe_cpu(key: str, rounds: int = PROBE_ROUNDS) -> dict[str, Any]:
    """Measure the CPU paths for one probe key (`probe_key`): exactness, then interleaved timings."""
    M, K, N = _probe_shape(key)
    bf16 = key.endswith("/bf16")
    excluded: dict[str, str] = {}
    runners: dict[str, Callable[[], object]] = {}
    for b in list_backends("cpu", available_only=False):
        if not b.available():
            excluded[b.name] = "not available in this torch build"
            continue
        why = check_exact(b)
        if why:
            excluded[b.name] = why
            continue
        runners[b.name] = _linear_runner(CPU_FORMS[b.name], M, K, N, bf16)
        runners[f"{b.name}{GEMM_ONLY}"] = _gemm_runner(CPU_FORMS[b.name], M, K, N, bf16)
    with torch.no_grad():
        timed = race(runners, rounds, digits=4)
    med = {k: v for k, v in timed.items() if not k.endswith(GEMM_ONLY)}
    gemm_med = {k.removesuffix(GEMM_ONLY): v for k, v in timed.items() if k.endswith(GEMM_ONLY)}
    excluded.update(reference_kernels(med))
    usable = {k: v for k, v in med.items() if k not in excluded}
    usable_gemm = {k: v for k, v in gemm_med.items() if k not in excluded}
    best = min(usable, key=usable.get) if usable else "int_mm_s8s8"
    best_compiled = min(usable_gemm, key=usable_gemm.get) if usable_gemm else best
    return {"backend": best, "backend_compiled": best_compiled, "candidates": _candidates(), "shape": [M, K, N], "bf16_io": bf16,
            "times_ms": med, "gemm_times_ms": gemm_med, "excluded": excluded,
            "threads": torch.get_num_threads(), "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


_memo: dict[str, dict[str, Any]] = {}
_memo_lock = threading.Lock()


def _valid(entry: Optional[dict[str, Any]]) -> bool:
    """A cached entry is used when its picks are known, available paths and it weighed every path
    available now (one probed before a path existed, or was available, is probed again)."""
    picks = [entry.get(k) for k in ("backend", "backend_compiled")] if entry else [None]
    if not all(isinstance(p, str) and p in CPU_FORMS for p in picks):
        return False
    weighed = entry.get("candidates")
    if not isinstance(weighed, list) or not set(_candidates()) <= set(weighed):
        return False
    return all(get_backend(p).available() for p in picks)


def _candidates() -> list[str]:
    return sorted(b.name for b in list_backends("cpu"))


def choice(key: str) -> dict[str, Any]:
    """The probe entry of a probe key (`probe_key`): from memory, else the disk cache, else a probe."""
    with _memo_lock:
        entry = _memo.get(key)
        if entry is None:
            entry = machine.lookup(f"int8/{key}")
            if not _valid(entry):
                entry = probe_cpu(key)
                machine.store(f"int8/{key}", entry)
            _memo[key] = entry
        return entry


def choose(M: int, out_dtype: torch.dtype = torch.float32, compiled: bool = False) -> str:
    """The CPU W8A8 form ("s8s8", "u8s8" or "onednn") for a call with M tokens writing
    `out_dtype`: the probe's fastest eager linear, or for a compiled call (whose quantize pass is
    one fused pass whatever the form) the fastest GEMM with its dequant pass. On AMX machines
    the two differ: oneDNN's eager quantize is slow, its compiled form the fastest."""
    entry = choice(probe_key(shape_class(M), out_dtype))
    return CPU_FORMS[entry["backend_compiled" if compiled else "backend"]]


def forget() -> None:
    """Drop the in-process choices (the disk cache stays): the next call reads or probes again."""
    with _memo_lock:
        _memo.clear()


def describe(probe: bool = True) -> dict[str, Any]:
    """The choices for every shape class (probing where needed), for bench JSON."""
    keys = [probe_key(name, dtype) for dtype in (torch.float32, torch.bfloat16) for name, _, _ in SHAPE_CLASSES]
    classes = {key: (choice(key) if probe else _memo.get(key)) for key in keys}
    return {"machine": machine.describe(), "forced_cpu_kernel": gemm.cpu_kernel(), "cpu_choices": classes,
            "available": [b.name for b in list_backends()]}
