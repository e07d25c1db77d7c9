"""The precision policy: how a recipe's `precision` (bf16 | fp16 | fp32) is computed.

Master weights are always fp32. Two ways to compute in a half dtype:

* `native`: `torch.autocast` (what GPUs and TPUs run), with dynamic loss scaling for fp16
  (`torch.amp.GradScaler`: unscale before clipping, skip steps whose grads hold inf/NaN).
* `emulated`: a `TorchFunctionMode` rounds to the half dtype at every matmul and LayerNorm
  boundary in forward AND backward while computing in fp32: inputs and weights are rounded on the
  way in, outputs on the way out, and the same rounding is applied to the gradients flowing back
  through each boundary. That is tensor-core numerics (half in, fp32 accumulate, half out) at fp32
  speed, so fp16 overflows to inf and underflows to 0 exactly where native fp16 does.

`auto` picks per device: on CUDA/XLA native; on CPU, fp16 is emulated (native fp16 is ~50x slower
than fp32 on every CPU seen), and bf16 is native only where this CPU runs bf16 faster than fp32 —
measured once per machine (`native_bf16_probe`, cached by `rayq.kernels.machine`): on a Xeon
without AMX bf16 was 0.5x fp32, and there the recipe's numerics are what matter, not the dtype of
the kernel. The choice and its reason are in `PrecisionPolicy.reason` and on stderr.

The round trip x -> half -> fp32 is two passes with a half-size temporary (~2.6 ns/element
eagerly). With RAYQ_FUSED_ROUNDING=1, large tensors go through one torch.compile'd elementwise
kernel instead, compiled with Inductor's `emulate_precision_casts` (without it Inductor drops the
round trip as a no-op and the tensor is NOT rounded) and used only after a self-check that it
rounds bit-identically to the eager casts on overflow, subnormal, tie and NaN values. It is
opt-in because the compile costs 40 s or more per process on a loaded 2-core machine (every Ray
worker and every test process would pay it); `rayq bench train` measures both.

`layernorm_fp32` keeps LayerNorm in fp32 in both modes (nanoGPT and Megatron do this); when off,
LayerNorm runs in (or is rounded to) the half dtype.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rayq.kernels import machine
from rayq.kernels.timing import race
from rayq.schema import RecipeConfig

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# below this many elements a compiled call's guards cost more than the pass it saves
FUSED_ROUNDING_MIN_NUMEL = 1 << 18
BF16_PROBE_KEY = "precision/bf16-cpu"


def _eager_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(x.dtype)


_fused: dict[str, Any] = {}
_fused_lock = threading.Lock()


def _self_check(fn: Callable[[torch.Tensor, torch.dtype], torch.Tensor]) -> bool:
    """Whether `fn` rounds exactly like the eager casts (values chosen at fp16/bf16 edges)."""
    edges = torch.tensor([7e4, 65504.0, 65519.0, 65520.0, -65520.0, 1e-8, 2.9e-8, 3e-8, 6e-8, 6.1e-5, 1.0 + 2**-11,
                          1.0 + 3 * 2**-11, 3.3895e38, float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    x = torch.cat([edges, torch.randn(FUSED_ROUNDING_MIN_NUMEL, generator=torch.Generator().manual_seed(0)) * 1e3])
    for dtype in (torch.float16, torch.bfloat16):
        got, want = fn(x, dtype), _eager_round(x, dtype)
        if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
            return False
    return True


def fused_round() -> Optional[Callable[[torch.Tensor, torch.dtype], torch.Tensor]]:
    """The compiled round trip once it passed `_self_check` in this process, else None (also
    when RAYQ_FUSED_ROUNDING=1 is not set: the eager casts run)."""
    if os.environ.get("RAYQ_FUSED_ROUNDING", "0") != "1":
        return None
    with _fused_lock:
        if "fn" not in _fused:
            fn = None
            try:
                cand = torch.compile(_eager_round, dynamic=True, options={"emulate_precision_casts": True})
                fn = cand if _self_check(cand) else None
            except Exception:  # noqa: BLE001 - a broken compiler only costs the fusion
                fn = None
            _fused["fn"] = fn
        return _fused["fn"]


def round_trip(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to `dtype`, returned in x's dtype: fused for large tensors, eager otherwise."""
    if (x.numel() >= FUSED_ROUNDING_MIN_NUMEL and x.device.type == "cpu" and x.is_contiguous()
            and not torch.compiler.is_compiling()):
        fn = fused_round()
        if fn is not None:
            # one flat view: every rank and shape shares one dynamic graph per dtype pair
            # (a graph per rank hit dynamo's recompile limit and fell back to eager mid-run)
            return fn(x.view(-1), dtype).view(x.shape)
    return _eager_round(x, dtype)


class _RoundTrip(torch.autograd.Function):
    """Round to `dtype` and back to fp32 in forward; round the incoming gradient the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.dtype = dtype
        return round_trip(x, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return round_trip(grad, ctx.dtype), None


def round_to(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if x is None or not x.is_floating_point():
        return x
    return _RoundTrip.apply(x, dtype)


class EmulatedHalf(TorchFunctionMode):
    """Round at matmul / attention / LayerNorm boundaries; compute in fp32 (see module doc)."""

    _MATMULS = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__}

    def __init__(self, dtype: torch.dtype, layernorm_fp32: bool):
        super().__init__()
        self.dtype = dtype
        self.layernorm_fp32 = layernorm_fp32

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        r = lambda t: round_to(t, self.dtype)  # noqa: E731
        if func in self._MATMULS:
            return r(func(*[r(a) if isinstance(a, torch.Tensor) else a for a in args], **kwargs))
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            return r(func(r(q), r(k), r(v), *rest, **kwargs))
        if func is F.layer_norm and not self.layernorm_fp32:
            x, shape, *rest = args
            rest = [r(a) if isinstance(a, torch.Tensor) else a for a in rest]
            kw = {k: r(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            return r(func(r(x), shape, *rest, **kw))
        return func(*args, **kwargs)


class _LayerNormPrecision(TorchFunctionMode):
    """Under native autocast: LayerNorm explicitly in fp32, or explicitly in the half dtype.

    Autocast's per-device op lists disagree on LayerNorm; the recipe knob must not depend on them.
    """

    def __init__(self, device_type: str, dtype: torch.dtype, layernorm_fp32: bool):
        super().__init__()
        self.device_type, self.dtype, self.layernorm_fp32 = device_type, dtype, layernorm_fp32

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.layer_norm:
            return func(*args, **kwargs)
        target = torch.float32 if self.layernorm_fp32 else self.dtype
        cast = lambda t: t.to(target) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        with torch.autocast(self.device_type, enabled=False):
            return func(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})


def _time_linear_step(dtype: Optional[torch.dtype], x: torch.Tensor, w: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            y = F.linear(x, w)
        y.float().sum().backward()
        w.grad = None

    return step


def probe_native_bf16(rounds: int = 5) -> dict[str, Any]:
    """fp32 vs bf16-autocast time of a linear forward + backward (512 x 1024 x 1024), rounds
    interleaved, medians; `native_faster` says whether native bf16 beats fp32 on this CPU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=gen)
    w = torch.randn(1024, 1024, generator=gen).requires_grad_()
    fns = {"fp32": _time_linear_step(None, x, w), "bf16": _time_linear_step(torch.bfloat16, x, w)}
    ms = race(fns, rounds, digits=None)
    fp32, bf16 = ms["fp32"], ms["bf16"]
    return {"fp32_ms": round(fp32, 4), "bf16_ms": round(bf16, 4), "bf16_speedup": round(fp32 / bf16, 3),
            "native_faster": bf16 < fp32, "threads": torch.get_num_threads()}


_bf16_memo: dict[str, dict[str, Any]] = {}


def native_bf16_probe() -> dict[str, Any]:
    """The bf16-vs-fp32 verdict for this CPU: in memory, else the machine cache, else a probe."""
    with _fused_lock:
        entry = _bf16_memo.get("cpu")
        if entry is None:
            entry = machine.lookup(BF16_PROBE_KEY)
            if not (entry and isinstance(entry.get("native_faster"), bool) and isinstance(entry.get("bf16_speedup"), (int, float))):
                entry = probe_native_bf16()
                machine.store(BF16_PROBE_KEY, entry)
            _bf16_memo["cpu"] = entry
        return entry


_said: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        print(f"[rayq] {msg}", file=sys.stderr, flush=True)


def _auto_mode(precision: str, device_type: str) -> tuple[str, str]:
    """(mode, reason) for precision_mode auto."""
    if device_type != "cpu":
        return "native", f"auto: native {precision} on {device_type}"
    if precision == "fp16":
        return "emulated", "auto: emulated fp16 on CPU (native fp16 is ~50x slower than fp32 on CPUs)"
    probe = native_bf16_probe()
    if probe["native_faster"]:
        return "native", f"auto: native bf16 on this CPU ({probe['bf16_speedup']:.2f}x fp32, probed once per machine)"
    return "emulated", (f"auto: emulated bf16 at fp32 speed: native bf16 is slower than fp32 on this CPU "
                        f"({probe['bf16_speedup']:.2f}x fp32, probed once per machine)")


@dataclass(frozen=True)
class PrecisionPolicy:
    precision: str  # bf16 | fp16 | fp32
    mode: str  # native | emulated | none (fp32)
    device_type: str  # cpu | cuda | xla
    layernorm_fp32: bool
    init_loss_scale: float = 65536.0
    growth_interval: int = 2000
    reason: str = ""  # why this mode (auto's probe verdict, or "set in the recipe")

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig, device_type: str) -> "PrecisionPolicy":
        if recipe.precision == "fp32":
            mode, reason = "none", "fp32"
        elif recipe.precision_mode != "auto":
            mode, reason = recipe.precision_mode, f"{recipe.precision_mode} {recipe.precision}: set in the recipe"
        else:
            mode, reason = _auto_mode(recipe.precision, device_type)
            _say_once(f"precision {recipe.precision} on {device_type}: {reason}")
        return cls(recipe.precision, mode, device_type, recipe.layernorm_fp32,
                   recipe.init_loss_scale, recipe.loss_scale_growth_interval, reason)

    @property
    def dtype(self) -> torch.dtype:
        return HALF_DTYPES.get(self.precision, torch.float32)

    @property
    def uses_loss_scaling(self) -> bool:
        return self.precision == "fp16"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Context for the forward pass (and the loss): the half-precision numerics of the recipe."""
        if self.mode == "none":
            yield
        elif self.mode == "emulated":
            with EmulatedHalf(self.dtype, self.layernorm_fp32):
                yield
        else:
            with torch.autocast(self.device_type, dtype=self.dtype), \
                    _LayerNormPrecision(self.device_type, self.dtype, self.layernorm_fp32):
                yield

    def make_scaler(self, scaler_cls: Any = None) -> Optional[torch.amp.GradScaler]:
        """Dynamic loss scaler for fp16 (native or emulated: emulated gradients underflow too);
        `scaler_cls` defaults to `torch.amp.GradScaler` (FSDP passes its `ShardedGradScaler`)."""
        if not self.uses_loss_scaling:
            return None
        device = "cpu" if self.device_type == "xla" else self.device_type
        return (scaler_cls or torch.amp.GradScaler)(device, init_scale=self.init_loss_scale,
                                                    growth_interval=self.growth_interval)
