"""The precision policy: how a recipe's `precision` (bf16 | fp16 | fp32) is computed.

Master weights are always fp32. Two ways to compute in a half dtype:

* `native`: `torch.autocast` (what GPUs and TPUs run), with dynamic loss scaling for fp16
  (`torch.amp.GradScaler`: unscale before clipping, skip steps whose grads hold inf/NaN).
* `emulated`: a `TorchFunctionMode` rounds to the half dtype at every matmul and LayerNorm
  boundary in forward AND backward while computing in fp32: inputs and weights are rounded on the
  way in, outputs on the way out, and the same rounding is applied to the gradients flowing back
  through each boundary. That is tensor-core numerics (half in, fp32 accumulate, half out) at fp32
  speed, so fp16 overflows to inf and underflows to 0 exactly where native fp16 does. On this
  CPU native fp16 is ~50x slower than fp32, so `auto` picks emulated for fp16 on CPU and native
  wherever the device runs the dtype fast (bf16 on CPU, everything on CUDA/XLA).

`layernorm_fp32` keeps LayerNorm in fp32 in both modes (nanoGPT and Megatron do this); when off,
LayerNorm runs in (or is rounded to) the half dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rayq.schema import RecipeConfig

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _RoundTrip(torch.autograd.Function):
    """Round to `dtype` and back to fp32 in forward; round the incoming gradient the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.dtype = dtype
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype).to(grad.dtype), None


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


@dataclass(frozen=True)
class PrecisionPolicy:
    precision: str  # bf16 | fp16 | fp32
    mode: str  # native | emulated | none (fp32)
    device_type: str  # cpu | cuda | xla
    layernorm_fp32: bool
    init_loss_scale: float = 65536.0
    growth_interval: int = 2000

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig, device_type: str) -> "PrecisionPolicy":
        if recipe.precision == "fp32":
            mode = "none"
        elif recipe.precision_mode != "auto":
            mode = recipe.precision_mode
        else:  # native where the device computes the dtype fast; fp16 on CPU is ~50x slower than fp32
            mode = "emulated" if (device_type == "cpu" and recipe.precision == "fp16") else "native"
        return cls(recipe.precision, mode, device_type, recipe.layernorm_fp32,
                   recipe.init_loss_scale, recipe.loss_scale_growth_interval)

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
