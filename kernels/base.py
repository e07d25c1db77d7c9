"""What every quantized module shares: the backend switch, the NaN/inf guard, the linear's
reshape and output dtype. A module of its own so that the module files (`w8a8_linear`,
`quantize`) can all build on it without importing each other in a circle.

The NaN/inf guard has two forms. Eagerly it is a check per call (`bool(isfinite(t).all())`, a
device sync, and a clear error naming the layer). Inside a whole-model `torch.compile` graph
(`rayq.kernels.graph`) that data-dependent branch would split the graph at every layer, so a
module armed by `graph.arm` writes the verdict into its `finite_flag` buffer instead, and the
caller reads all flags once after the forward and raises the same error for the first bad layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .schemes import Scheme, SchemeError

Tensor = torch.Tensor

BACKENDS = ("auto", "eager", "compiled", "reference")
# "auto" compiles when a call has >= AUTO_COMPILE_MIN_ROWS tokens and >= AUTO_COMPILE_WORK
# multiply-adds: measured here, the fused form beat eager from 256x1024x1024 up and lost at M=1
# (Dynamo guards + launch cost more than the passes they save); tiny test models stay eager and
# never pay the compile time.
AUTO_COMPILE_WORK = 2**28
AUTO_COMPILE_MIN_ROWS = 32


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise SchemeError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    return backend


class QuantModule(nn.Module):
    """Common part of quantized modules: a name for error messages, the backend switch, and a
    `spec()` from which `load_quantized` rebuilds an empty module before loading its tensors."""

    kind = "QuantModule"

    def __init__(self, name: str, scheme: Scheme, backend: str):
        super().__init__()
        self.name = name
        self.scheme = scheme
        self.backend = _check_backend(backend)
        self.check_finite = True  # on XLA this forces a device sync per layer; callers may turn it off
        # bool [] once `rayq.kernels.graph.arm` ran: the guard's verdict inside a compiled graph.
        # Not persistent: it is run state, not part of a saved model.
        self.register_buffer("finite_flag", None, persistent=False)

    def _raise_nonfinite(self) -> None:
        raise SchemeError(f"layer {self.name!r}: input contains NaN or inf ({self.scheme.name})")

    def _check(self, t: Tensor) -> None:
        if not self.check_finite:
            return
        if self.finite_flag is not None and torch.compiler.is_compiling():
            # no data-dependent branch in a graph: the verdict goes to the flag, read after the
            # forward by whoever armed it (`graph.check_flags`)
            self.finite_flag.copy_(torch.isfinite(t).all())
            return
        if not bool(torch.isfinite(t).all()):
            self._raise_nonfinite()

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError


class QuantLinear(QuantModule):
    """Base of quantized linears: y = x W^T + b with x [..., K] -> y [..., N], output in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, name: str, scheme: Scheme, backend: str = "auto"):
        super().__init__(name, scheme, backend)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    # activation dtypes `_fast` reads as they are; any other is converted to fp32 first
    fast_inputs: tuple[torch.dtype, ...] = (torch.float32,)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"layer {self.name!r}: expected last dim {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out_dtype = output_dtype(x)
        with torch.no_grad():
            if self.backend == "reference":
                self._check(x2)
                out = self._reference(x2).to(device=x.device)
            else:
                out = self._fast(x2 if x2.dtype in self.fast_inputs else x2.float(), out_dtype)
        return out.to(out_dtype).reshape(*lead, self.out_features)

    def _use_compiled(self, x: Tensor) -> bool:
        if x.device.type not in ("cpu", "cuda"):  # XLA traces and fuses the graph itself
            return False
        if self.backend == "compiled":
            return True
        work = x.shape[0] * self.in_features * self.out_features
        return self.backend == "auto" and x.shape[0] >= AUTO_COMPILE_MIN_ROWS and work >= AUTO_COMPILE_WORK

    def _fast(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        """y for x [M, K]; in `out_dtype` where the kernel can write it directly, else fp32."""
        raise NotImplementedError

    def _reference(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None, "scheme": self.scheme.to_dict()}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, scheme={self.scheme.name}, backend={self.backend}"


def output_dtype(x: Tensor) -> torch.dtype:
    """`nn.Linear`'s output dtype for input x: autocast's dtype where autocast is on for x's
    device, else x's own. A quantized linear follows it, so that a quantized model under a bf16
    recipe's autocast carries bf16 activations exactly where the FP model does."""
    device = x.device.type
    try:
        if x.is_floating_point() and torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    except RuntimeError:  # a device type autocast does not know
        pass
    return x.dtype
