"""INT8 GEMM per device, the quantize/dequantize arithmetic around it, and the fp64 reference.

Layout: a quantized weight is stored like `nn.Linear.weight`, int8 [N, K] (one row per output
channel); the GEMM computes X_q [M, K] @ W_q^T -> [M, N]. `torch._int_mm` takes the transposed
view without a copy (measured here: no faster with a [K, N] contiguous copy, which would double
the stored bytes).

Devices
- cpu: `torch._int_mm` (oneDNN s8 x s8 -> s32, VNNI), exact for any shape since torch 2.6.
  Optionally the u8 x s8 form: X_u8 = X_s8 + 128 (a byte XOR 0x80), and
  X_s8 W = X_u8 W - 128 * colsum(W). VNNI's instruction is u8 x s8, so the s8 x s8 GEMM pays
  the same compensation internally; `rayq bench int8` measures both (kernel="u8s8").
- cuda: `torch._int_mm` needs M > 16 and K, N multiples of 8 (K >= 16): we zero-pad, never fail.
- xla: `torch_xla._XLAC._xla_dot_general(..., preferred_element_type=torch.int32)`, an XLA
  DotGeneral of int8 operands with int32 accumulation (what torch-xla's own
  `quantized_matmul(quantize_activation=True)` emits); if that binding is absent, an int32 matmul
  (exact, wider operands).
- anything else: fp64 matmul of the integer codes (exact while |acc| < 2^53, always true here).
- cpu, without a fast integer GEMM: the codes multiplied by the fp32 GEMM (`f32_exact_mm`): with
  |code| <= 128 every partial sum of a K-chunk of 1024 is an integer below 2^24, which fp32 holds
  exactly whatever the summation order, so the result is the int32 accumulator's, bit for bit.
  On CPUs without VNNI (AVX2 only) `_int_mm` runs a scalar loop, ~80x slower than fp32 (measured on
  an AVX2 EPYC) and oneDNN's u8 x s8 kernel saturates (not exact): there this is the fast path.

INT32 overflow: with codes in [-127, 127], |acc| <= 127 * 127 * K <= 2^31 - 1 for K <= 133,144
(s8 x s8); the u8 form reaches 255 * 127 * K, safe for K <= 66,311. `int8_mm` accepts any int8
(-128 included), so it splits K conservatively at 128 * 128 * K (K <= 131,071) and
255 * 128 * K (K <= 65,793) and sums the exact int32 partials in int64.

Activations: per-token absmax; an all-zero row gets the epsilon absmax `EPS_ABSMAX`
(bitsandbytes divides by zero there and returns NaN), so its codes and output are exactly 0 (+bias).
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

QMAX8 = 127  # symmetric INT8: codes in [-127, 127]; -128 unused so that -q is always representable
QMAX4 = 7  # symmetric INT4: codes in [-7, 7]
MAX_K_S8 = (2**31 - 1) // (127 * 127)  # 133,144: largest K whose s8 x s8 accumulator of [-127, 127] codes cannot overflow
MAX_K_U8 = (2**31 - 1) // (255 * 127)  # 66,311 for the u8 x s8 form
_SPLIT_K_S8 = (2**31 - 1) // (128 * 128)  # 131,071: any int8 operands, -128 included
_SPLIT_K_U8 = (2**31 - 1) // (255 * 128)  # 65,793
# absmax floor: keeps 127 / absmax finite in fp32 (an all-zero row quantizes to zeros, not NaN)
EPS_ABSMAX = 1e-12

_KERNELS = ("s8s8", "u8s8", "onednn", "f32")
# |code| <= 128: 128 * 128 * 1024 = 2^24, so every partial sum of a chunk is an exact fp32 integer
F32_EXACT_K = 1024
# None: the W8A8 modules use the form `rayq.kernels.backends` measured fastest on this machine
_default_kernel: dict[str, Optional[str]] = {"cpu": None}


@functools.lru_cache(maxsize=None)
def supports_u8() -> bool:
    """Whether this torch's CPU `_int_mm` takes a uint8 first operand (2.13 does; 2.9 refuses)."""
    try:
        torch._int_mm(torch.zeros(1, 8, dtype=torch.uint8), torch.zeros(8, 1, dtype=torch.int8))
        return True
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch has oneDNN's quantized linear (x86 CPU builds with mkldnn)."""
    try:
        torch.ops.onednn.qlinear_pointwise  # noqa: B018 - the lookup is the check
        torch.ops.onednn.qlinear_prepack  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def fp32_gemm_is_ieee() -> bool:
    """Whether CPU fp32 matmuls run in IEEE fp32, on which the f32 form's exactness rests: not where
    `torch.set_float32_matmul_precision("high"/"medium")` or mkldnn's `fp32_precision` lets oneDNN
    compute fp32 GEMMs in bf16 or tf32."""
    try:
        mkldnn = torch.backends.mkldnn.matmul.fp32_precision
    except AttributeError:
        mkldnn = "none"
    if mkldnn != "none":
        return mkldnn == "ieee"
    return torch.get_float32_matmul_precision() == "highest"


def set_cpu_kernel(kernel: Optional[str]) -> None:
    """Force the CPU W8A8 form ("s8s8", "u8s8", "onednn" or "f32"), or None to let the per-machine probe
    (`rayq.kernels.backends`) choose; the bench measures every form."""
    if kernel is not None and kernel not in _KERNELS:
        raise ValueError(f"cpu kernel must be one of {_KERNELS} or None (probe), got {kernel!r}")
    if kernel == "u8s8" and not supports_u8():
        raise ValueError(f"torch {torch.__version__}: CPU _int_mm does not take uint8 operands; use s8s8")
    if kernel == "onednn" and not onednn_available():
        raise ValueError(f"torch {torch.__version__}: no oneDNN qlinear_pointwise in this build; use s8s8")
    if kernel == "f32" and not fp32_gemm_is_ieee():
        raise ValueError("fp32 matmuls may run in bf16/tf32 here (float32 matmul precision): the f32 form would not be exact")
    _default_kernel["cpu"] = kernel


def cpu_kernel() -> Optional[str]:
    """The forced CPU W8A8 form, or None when the probe chooses."""
    return _default_kernel["cpu"]


# --------------------------------------------------------------------------- integer GEMM


def _ceil_to(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _cpu_int_mm(a: Tensor, w: Tensor, kernel: str) -> Tensor:
    if kernel == "u8s8" and supports_u8():  # same integers either way; older torch lacks u8
        # +128 is a flip of the sign bit of the byte; the 128 * colsum(W) term is subtracted here
        # (the compiled linear folds it into its dequant epilogue instead, see `w8a8_core`).
        acc = torch._int_mm(a.view(torch.uint8) ^ 128, w.t())
        cs = w.sum(1, dtype=torch.int32)
        return acc.sub_(cs * 128)
    return torch._int_mm(a, w.t())


def _cuda_int_mm(a: Tensor, w: Tensor) -> Tensor:
    M, K = a.shape
    N = w.shape[0]
    Mp, Kp, Np = max(M, 17), max(_ceil_to(K, 8), 16), max(_ceil_to(N, 8), 8)
    if (Mp, Kp, Np) != (M, K, N):  # zero rows/columns add nothing to the dot products
        a = F.pad(a, (0, Kp - K, 0, Mp - M))
        w = F.pad(w, (0, Kp - K, 0, Np - N))
    acc = torch._int_mm(a, w.t())
    return acc[:M, :N] if (Mp, Np) != (M, N) else acc


def _xla_int_mm(a: Tensor, w: Tensor) -> Tensor:
    try:
        import torch_xla  # noqa: F401  (only present in the xla lane's venv)

        dot_general = torch_xla._XLAC._xla_dot_general
    except (ImportError, AttributeError):
        dot_general = None
    if dot_general is not None:
        # contract dim 1 of a [M, K] with dim 1 of w [N, K]; no batch dims -> [M, N] int32
        return dot_general(a, w, (([1], [1]), ()), preferred_element_type=torch.int32)
    return torch.matmul(a.to(torch.int32), w.t().to(torch.int32))


def int8_mm(a: Tensor, w: Tensor, *, kernel: Optional[str] = None) -> Tensor:
    """Exact X_q @ W_q^T for int8 a [M, K] and int8 w [N, K] -> int32 [M, N] (int64 past the
    overflow bound). Dispatches on the device type of `a`."""
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"int8_mm expects int8 operands, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"int8_mm: shapes {tuple(a.shape)} and {tuple(w.shape)} do not contract over K")
    M, K = a.shape
    N = w.shape[0]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, N, dtype=torch.int32, device=a.device)
    device = a.device.type
    # int8_mm is the plain integer GEMM: the oneDNN form lives in the linear (`w8a8_onednn`)
    kernel = kernel or (_default_kernel["cpu"] if device == "cpu" else None)
    kernel = kernel if kernel in ("s8s8", "u8s8") else "s8s8"
    limit = _SPLIT_K_U8 if kernel == "u8s8" else _SPLIT_K_S8
    if K > limit:  # split K; partial sums are exact in int32, their sum in int64
        step = limit // 64 * 64
        return sum(int8_mm(a[:, i : i + step], w[:, i : i + step], kernel=kernel).to(torch.int64) for i in range(0, K, step))
    if device == "cpu":
        return _cpu_int_mm(a, w, kernel)
    if device == "cuda":
        return _cuda_int_mm(a, w)
    if device == "xla":
        return _xla_int_mm(a, w)
    acc = a.to(torch.float64) @ w.to(torch.float64).t()
    return acc.to(torch.int64)


def f32_exact_mm(a: Tensor, w_t: Tensor) -> Tensor:
    """Exact X_q @ W_q^T on the fp32 GEMM: a fp32 [M, K] and w_t fp32 [K, N] holding integer codes in
    [-128, 127] -> fp32 [M, N], the value the int32 accumulator takes when converted to fp32 (what
    every dequant epilogue multiplies). K-chunks of `F32_EXACT_K` keep each GEMM's partial sums exact;
    past one chunk they are added in fp64 (exact) and rounded to fp32 once. Needs IEEE fp32 GEMMs
    (`fp32_gemm_is_ieee`)."""
    # aten's mm with autocast off: autocast would run it in bf16, and a __torch_function__ mode
    # (rayq's emulated half precision) would round its output; either loses the exact integers
    mm = torch.ops.aten.mm.default
    with torch.autocast(a.device.type, enabled=False):
        K = a.shape[1]
        if K <= F32_EXACT_K:
            return mm(a, w_t)
        acc = None
        for k in range(0, K, F32_EXACT_K):
            part = mm(a[:, k : k + F32_EXACT_K], w_t[k : k + F32_EXACT_K]).double()
            acc = part if acc is None else acc.add_(part)
        return acc.float()


def int_mm_reference(a: Tensor, w: Tensor) -> Tensor:
    """int64 X @ W^T on CPU: the bit-exact yardstick for every integer GEMM path."""
    return a.cpu().to(torch.int64) @ w.cpu().to(torch.int64).t()


# --------------------------------------------------------------------------- quantizers


def absmax_rows(x: Tensor) -> Tensor:
    """max |x| per row as [M, 1] fp32, floored at EPS_ABSMAX; NaN/inf propagate (checked later)."""
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32).clamp_min(EPS_ABSMAX)


def quantize_symmetric(x: Tensor, absmax: Tensor, qmax: int = QMAX8, dtype: torch.dtype = torch.int8) -> Tensor:
    """round(x * qmax / absmax) clamped to [-qmax, qmax] (the clamp matters for static scales)."""
    return torch.round(x * (qmax / absmax)).clamp_(-qmax, qmax).to(dtype)


def quantize_weight(w: Tensor, qmax: int = QMAX8, per: str = "channel") -> tuple[Tensor, Tensor]:
    """Weight [N, K] -> (int8 codes [N, K], fp32 scale): per="channel" gives scale [N], per="tensor"
    a [1] scale. Computed in fp64 so that the codes do not depend on the caller's dtype."""
    w64 = w.detach().to(torch.float64)
    if per == "channel":
        absmax = w64.abs().amax(dim=1).clamp_min(EPS_ABSMAX)
    elif per == "tensor":
        absmax = w64.abs().amax().clamp_min(EPS_ABSMAX).reshape(1)
    else:
        raise ValueError(f"per must be 'channel' or 'tensor', got {per!r}")
    scale = (absmax / qmax).to(torch.float32)
    codes = torch.round(w64 / scale.to(torch.float64).unsqueeze(-1 if per == "channel" else 0)).clamp_(-qmax, qmax)
    return codes.to(torch.int8), scale


def quantize_weight_groups(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Weight [N, K] -> (int8 codes [N, K], fp32 scales [N, K // group_size])."""
    N, K = w.shape
    g = w.detach().to(torch.float64).reshape(N, K // group_size, group_size)
    scale = (g.abs().amax(dim=2).clamp_min(EPS_ABSMAX) / QMAX8).to(torch.float32)
    codes = torch.round(g / scale.to(torch.float64).unsqueeze(-1)).clamp_(-QMAX8, QMAX8)
    return codes.reshape(N, K).to(torch.int8), scale


def pack_int4(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7], shape [N, K] -> uint8 [N, ceil(K / 2)]: element 2j in the low
    nibble, 2j+1 in the high nibble (two's complement nibbles; odd K padded with a zero)."""
    N, K = codes.shape
    if K % 2:
        codes = F.pad(codes, (0, 1))
    u = codes.to(torch.uint8) & 0x0F
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: Tensor, K: int) -> Tensor:
    """Inverse of pack_int4 -> int8 codes [N, K]."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :K]
    return (both ^ 8) - 8  # sign-extend a 4-bit two's complement value


# --------------------------------------------------------------------------- W8A8 linear


def _activation_codes(x: Tensor, in_scale: Optional[Tensor], act_absmax: Optional[Tensor],
                      per_tensor_act: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The W8A8 activation quantizer both CPU paths share: (x after the smoothing `in_scale`,
    its codes in [-127, 127] as a rounded fp32 tensor the caller may modify in place, the absmax
    behind them: static per layer, per tensor, or per row). Plain tensor code, so torch.compile
    inlines it into `w8a8_core`'s fused quantize pass."""
    if in_scale is not None:
        x = x * in_scale
    if act_absmax is not None:
        absmax = act_absmax.reshape(1, 1)
    elif per_tensor_act:
        absmax = torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32).clamp_min(EPS_ABSMAX).reshape(1, 1)
    else:
        absmax = absmax_rows(x)
    t = x * (QMAX8 / absmax)
    t.round_()
    if act_absmax is not None:  # a static scale can be exceeded; a dynamic one cannot (|t| <= 127)
        t.clamp_(-QMAX8, QMAX8)
    return x, t, absmax


def w8a8_core(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor],
    in_scale: Optional[Tensor],
    act_absmax: Optional[Tensor],
    per_tensor_act: bool,
    comp: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """The fast W8A8 linear on fp32 x [M, K] -> (out fp32 [M, N], activation absmax).

    in_scale: SmoothQuant's 1/s per input channel (multiplied in before quantizing), or None.
    act_absmax: a static activation absmax (calibrated), or None for dynamic.
    comp: 128 * colsum(W) as int32 [N] to use the u8 x s8 GEMM, or None for s8 x s8 (subtracted
    in int32: the biased u8 accumulator can exceed 2^24, where fp32 would round it).
    The absmax is returned so the caller can check it is finite (NaN/inf anywhere in a row makes
    it so) without a separate pass over x (int8 conversion would silently turn NaN into a code).
    Pure tensor code: torch.compile fuses the quantize into one pass over x and the dequant
    (+ compensation + bias) into one epilogue pass; eagerly, the in-place ops below save the
    allocations (and page faults) of three [M, N] temporaries.
    """
    x, t, absmax = _activation_codes(x, in_scale, act_absmax, per_tensor_act)
    xq = t.to(torch.int8)
    if comp is not None:
        acc = torch._int_mm(xq.view(torch.uint8) ^ 128, qweight.t()).sub_(comp)
    else:
        acc = int8_mm(xq, qweight, kernel="s8s8")
    out = acc * (absmax / QMAX8)
    out.mul_(w_scale)
    if bias is not None:
        out.add_(bias)
    # a static scale hides NaN/inf from the absmax, so take the (fusable) max |x| for the check
    check = absmax if act_absmax is None else torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32)
    return out, check


def w8a8_f32(
    x: Tensor,
    wf: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor],
    in_scale: Optional[Tensor],
    act_absmax: Optional[Tensor],
    per_tensor_act: bool,
) -> tuple[Tensor, Tensor]:
    """`w8a8_core` with the integer GEMM run exactly on the fp32 GEMM (`f32_exact_mm`): wf is the
    int8 weight's codes as fp32 [N, K]. The activation codes are already integers in fp32, so no
    int8 conversion pass is needed; the dequant is `w8a8_core`'s, in the same order: the same
    output bits as the int32 paths."""
    x, t, absmax = _activation_codes(x, in_scale, act_absmax, per_tensor_act)
    out = f32_exact_mm(t, wf.t())
    out.mul_(absmax / QMAX8)
    out.mul_(w_scale)
    if bias is not None:
        out.add_(bias)
    check = absmax if act_absmax is None else torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32)
    return out, check


def onednn_prepack(w: Tensor, m_hint: int) -> Tensor:
    """oneDNN's blocked copy of an int8 weight [N, K] (opaque; kept beside the int8 buffer)."""
    return torch.ops.onednn.qlinear_prepack(w, [m_hint, w.shape[1]])


@torch.library.custom_op("rayq::onednn_qlinear", mutates_args=())
def onednn_qlinear(xu8: Tensor, packed: Tensor, w_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """(X_u8 - 128) @ W^T * w_scale[n] in one oneDNN call: the zero point and the per-channel
    dequant run in the GEMM's epilogue. The per-token scale cannot (oneDNN takes one x scale).

    A custom op so that torch.compile calls it as it is and fuses the passes around it: Inductor's
    own lowering of `qlinear_pointwise` only accepts a weight frozen into the graph."""
    zp = torch.zeros(w_scale.shape[0], dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(xu8, 1.0, 128, packed, w_scale, zp, None, 1.0, 0, out_dtype, "none", [], "")


@onednn_qlinear.register_fake
def _onednn_qlinear_shape(xu8: Tensor, packed: Tensor, w_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    return xu8.new_empty((xu8.shape[0], w_scale.shape[0]), dtype=out_dtype)


def w8a8_onednn(
    x: Tensor,
    packed: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor],
    in_scale: Optional[Tensor],
    act_absmax: Optional[Tensor],
    per_tensor_act: bool,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """`w8a8_core` through oneDNN's prepacked int8 linear: same codes, same integer dot products
    (u8 = s8 + 128, the zero point corrected inside oneDNN), the weight scale fused into the GEMM
    output, then the per-token scale and the bias in place. `w_scale` must have one entry per
    output channel. x may be fp32 or bf16 (its codes are computed in fp32 either way, so they are
    the same codes); `out_dtype` bf16 has oneDNN write bf16, which on AMX machines is the fast
    output (measured 1.6x the fp32 one at 2048x4096x4096). Returns (out [M, N], the absmax to
    check for NaN/inf). Pure tensor code around one custom op: torch.compile fuses the quantize
    into one pass and the dequant into one epilogue pass."""
    x, t, absmax = _activation_codes(x, in_scale, act_absmax, per_tensor_act)
    t.add_(128)  # codes in [1, 255]: exact in fp32 and in uint8
    out = onednn_qlinear(t.to(torch.uint8), packed, w_scale, out_dtype)
    out.mul_(absmax / QMAX8)
    if bias is not None:
        out.add_(bias)
    check = absmax if act_absmax is None else torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32)
    return out, check


_compiled: dict[str, object] = {}
_compile_lock = threading.Lock()
_compile_failed: list[str] = []


def _compiled_fn(name: str, fn):
    if _compile_failed:
        return None
    with _compile_lock:
        if name not in _compiled:
            _compiled[name] = torch.compile(fn, fullgraph=True, dynamic=None)
    return _compiled[name]


def compiled_w8a8_core():
    """`w8a8_core` under torch.compile (default mode; NEVER freezing=True: Inductor then rewrites
    the pattern to a oneDNN int8 linear that runs its scalar reference kernel on CPUs without AMX,
    ~1000x slower). One compiled function serves every layer (weights are arguments); Dynamo
    marks the dimensions dynamic after the first recompile. Returns None if compile is broken."""
    return _compiled_fn("w8a8", w8a8_core)


def compiled_w8a8_onednn():
    """`w8a8_onednn` under torch.compile: the quantize pass and the dequant epilogue fused around
    the oneDNN GEMM (the eager passes cost as much as the GEMM itself on AMX machines)."""
    return _compiled_fn("w8a8_onednn", w8a8_onednn)


def note_compile_failure(exc: BaseException) -> None:
    if not _compile_failed:
        warnings.warn(f"rayq.kernels: torch.compile failed ({type(exc).__name__}: {exc}); using eager kernels", RuntimeWarning, stacklevel=3)
    _compile_failed.append(repr(exc))


def w8a8_reference(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor],
    in_scale: Optional[Tensor] = None,
    act_absmax: Optional[Tensor] = None,
    per_tensor_act: bool = False,
) -> Tensor:
    """The same math as `w8a8_core` in float64 on CPU: scales, rounding, the integer dot
    products (exact in fp64 below 2^53) and the dequantization. Returns fp64 [M, N]."""
    x = x.detach().cpu().to(torch.float64)
    if in_scale is not None:
        x = x * in_scale.cpu().to(torch.float64)
    if act_absmax is not None:
        absmax = act_absmax.cpu().to(torch.float64).reshape(1, 1)
    elif per_tensor_act:
        absmax = x.abs().amax().clamp_min(EPS_ABSMAX).reshape(1, 1)
    else:
        absmax = x.abs().amax(dim=1, keepdim=True).clamp_min(EPS_ABSMAX)
    xq = torch.round(x * (QMAX8 / absmax)).clamp_(-QMAX8, QMAX8)
    acc = xq @ qweight.cpu().to(torch.float64).t()
    out = acc * (absmax / QMAX8) * w_scale.cpu().to(torch.float64)
    if bias is not None:
        out = out + bias.cpu().to(torch.float64)
    return out


def group_core(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor], group_size: int) -> tuple[Tensor, Tensor]:
    """Group-wise W8A8: per-token activation codes, one INT32 GEMM per K-group, each rescaled by
    its [N] weight scales and summed in fp32, then the per-token scale and bias."""
    absmax = absmax_rows(x)
    xq = quantize_symmetric(x, absmax)
    M, K = xq.shape
    out = None
    for gi, k0 in enumerate(range(0, K, group_size)):
        acc = int8_mm(xq[:, k0 : k0 + group_size].contiguous(), qweight[:, k0 : k0 + group_size].contiguous())
        part = acc * w_scale[:, gi]
        out = part if out is None else out.add_(part)
    out = out * (absmax / QMAX8)
    if bias is not None:
        out = out + bias
    return out, absmax


def group_reference(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor], group_size: int) -> Tensor:
    x = x.detach().cpu().to(torch.float64)
    absmax = x.abs().amax(dim=1, keepdim=True).clamp_min(EPS_ABSMAX)
    xq = torch.round(x * (QMAX8 / absmax)).clamp_(-QMAX8, QMAX8)
    M, K = xq.shape
    N = qweight.shape[0]
    G = K // group_size
    wq = qweight.cpu().to(torch.float64).reshape(N, G, group_size)
    acc = torch.einsum("mgk,ngk->mgn", xq.reshape(M, G, group_size), wq)  # [M, G, N] exact integers
    out = (acc * w_scale.cpu().to(torch.float64).t().unsqueeze(0)).sum(1) * (absmax / QMAX8)
    if bias is not None:
        out = out + bias.cpu().to(torch.float64)
    return out
