"""Quantizer probes: schemes that split W8A8 damage into its token-wise and channel parts.

Beside the paper's vector-wise W8A8 (per-token activation scales), these measure what other
activation granularities lose on the same model:

* `w8a8-tensor-static`: ONE static activation scale per layer, calibrated on a fixed token set
  (`percentile=100`: min-max, i.e. max |x|; `percentile=99.99`: the 99.99th percentile of |x|,
  clipping the rest), with per-output-channel INT8 weights. Real INT8 x INT8 -> INT32 GEMMs (the
  kernels' `W8A8Linear` with per-tensor static activations). A massive activation on a few tokens
  (the BOS / position-0 spike) sets the scale for every token: this probe sees token-wise outliers.
* `w8a6-token`: 6-bit per-token activations (codes in [-31, 31], held in int8) x per-channel INT8
  weights, through the same integer GEMM `rayq.kernels.int8_mm`. Coarser than A8 so that small
  models' damage rises above evaluation noise.
* `w8a8-channel-oracle`: 8-bit activations with one scale per INPUT CHANNEL taken from the very
  batch being quantized (an oracle: no deployable kernel knows them in advance, and a scale that
  varies along K cannot be pulled out of an integer dot product). SIMULATED: quantize-dequantize
  in fp32, then an fp32 GEMM with the dequantized per-channel INT8 weight. Outlier features
  (channels) cost it nothing, so per-token minus this oracle isolates the channel part.

The 99.99th-percentile variant needs a calibration statistic that `quantize_` does not collect
(it gathers per-channel maxima), so probes are built with `quantize_probe`, which computes the
clip values and hands them to the handler for the duration of one call. `quantize_` alone accepts
the min-max variant and refuses the percentile one with a message naming `quantize_probe`.
Probe modules are for measurement: `load_quantized` does not rebuild them.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from . import gemm
from .gemm import int8_mm
from .quantize import (
    QuantLinear,
    W8A8Linear,
    quantize_,
    register_handler,
    run_batch,
    select_layers,
)
from .schemes import Scheme, SchemeError, as_scheme, register_scheme

Tensor = torch.Tensor

QMAX6 = 31  # symmetric 6-bit codes in [-31, 31]
# clip values (max |x| to map to code 127) per layer name, set by `quantize_probe` for one call
_CLIPS: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("rayq_probe_clips", default=None)


@register_scheme
@dataclass(frozen=True)
class W8A8TensorStatic(Scheme):
    """Per-tensor static INT8 activations (calibrated clip) with per-output-channel INT8 weights."""

    name: ClassVar[str] = "w8a8-tensor-static"
    description: ClassVar[str] = ("probe: per-tensor static A8 (min-max or percentile calibration) x per-channel W8, "
                                  "INT32 GEMM")
    percentile: float = 100.0  # of |x| over the calibration tokens; 100 = min-max (max |x|)
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        if not (50.0 < self.percentile <= 100.0):
            raise SchemeError(f"w8a8-tensor-static: percentile must be in (50, 100], got {self.percentile}")
        if self.calibration_batches < 1:
            raise SchemeError(f"w8a8-tensor-static: calibration_batches must be >= 1, got {self.calibration_batches}")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        """quantize_'s own calibration pass, skipped when `quantize_probe` already computed the clips."""
        return _CLIPS.get() is None


@register_scheme
@dataclass(frozen=True)
class W8A6Token(Scheme):
    """Per-token 6-bit activations x per-output-channel INT8 weights, integer GEMM."""

    name: ClassVar[str] = "w8a6-token"
    description: ClassVar[str] = "probe: per-token A6 (codes in [-31, 31]) x per-channel W8, INT32 GEMM"
    act_bits: ClassVar[int | None] = 6


@register_scheme
@dataclass(frozen=True)
class W8A8ChannelOracle(Scheme):
    """Per-input-channel A8 with scales from the batch itself (oracle, simulated in fp32)."""

    name: ClassVar[str] = "w8a8-channel-oracle"
    description: ClassVar[str] = ("probe: per-input-channel A8 with the batch's own scales x per-channel W8 "
                                  "(an oracle, simulated in fp32)")


# --------------------------------------------------------------------------- modules


class W8A6TokenLinear(QuantLinear):
    """6-bit per-token activation codes and INT8 per-channel weights: int8_mm -> INT32, dequant
    s_x * acc * s_w + b (s_x = absmax / 31)."""

    kind = "W8A6TokenLinear"

    def __init__(self, in_features: int, out_features: int, bias: bool, *, name: str, scheme: Scheme, backend: str = "auto"):
        super().__init__(in_features, out_features, bias, name=name, scheme=scheme, backend=backend)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))

    def _fast(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        absmax = gemm.absmax_rows(x)
        self._check(absmax)  # NaN/inf anywhere in a row poisons its absmax
        acc = int8_mm(gemm.quantize_symmetric(x, absmax, QMAX6), self.qweight)
        out = acc * (absmax / QMAX6) * self.w_scale
        return out + self.bias if self.bias is not None else out

    def _reference(self, x: Tensor) -> Tensor:
        x = x.detach().cpu().double()
        absmax = x.abs().amax(dim=1, keepdim=True).clamp_min(gemm.EPS_ABSMAX)
        xq = torch.round(x * (QMAX6 / absmax)).clamp_(-QMAX6, QMAX6)
        out = (xq @ self.qweight.cpu().double().t()) * (absmax / QMAX6) * self.w_scale.cpu().double()
        return out + self.bias.cpu().double() if self.bias is not None else out


class ChannelOracleLinear(QuantLinear):
    """Simulated per-input-channel A8: x_hat[:, k] = round(x[:, k] * 127 / max_m |x[m, k]|) * scale_k
    from the rows of this very call, then x_hat @ (W_q * s_w)^T + b in fp32 (fp64 on "reference")."""

    kind = "ChannelOracleLinear"

    def __init__(self, in_features: int, out_features: int, bias: bool, *, name: str, scheme: Scheme, backend: str = "auto"):
        super().__init__(in_features, out_features, bias, name=name, scheme=scheme, backend=backend)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))

    def _simulate(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        x = x.to(dtype)
        absmax = x.abs().amax(dim=0, keepdim=True).clamp_min(gemm.EPS_ABSMAX)  # [1, K]: per input channel
        x_hat = torch.round(x * (gemm.QMAX8 / absmax)).clamp_(-gemm.QMAX8, gemm.QMAX8) * (absmax / gemm.QMAX8)
        w_hat = self.qweight.to(device=x.device, dtype=dtype) * self.w_scale.to(device=x.device, dtype=dtype).unsqueeze(1)
        out = x_hat @ w_hat.t()
        return out + self.bias.to(device=x.device, dtype=dtype) if self.bias is not None else out

    def _fast(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        self._check(x)
        return self._simulate(x, torch.float32)

    def _reference(self, x: Tensor) -> Tensor:
        return self._simulate(x.detach().cpu(), torch.float64)


# --------------------------------------------------------------------------- handlers

def _weight(linear: nn.Linear, name: str) -> Tensor:
    w = linear.weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise SchemeError(f"layer {name!r}: weight contains NaN or inf")
    return w


def _fill(q: QuantLinear, linear: nn.Linear, name: str) -> QuantLinear:
    codes, scale = gemm.quantize_weight(_weight(linear, name), per="channel")
    q.qweight.copy_(codes)
    q.w_scale.copy_(scale)
    if linear.bias is not None:
        q.bias.copy_(linear.bias.detach().float())
    return q.to(linear.weight.device)


@register_handler(W8A8TensorStatic)
def _tensor_static(linear, scheme, *, name, backend, act_absmax=None):
    clips = _CLIPS.get()
    if clips is not None and name in clips:
        clip = clips[name]
    elif scheme.percentile == 100.0 and act_absmax is not None:
        clip = float(act_absmax.max())  # quantize_'s calibration: per-channel max |x| -> the tensor's max
    else:
        raise SchemeError(f"{scheme.name}: percentile={scheme.percentile} needs the percentile calibration of "
                          "rayq.kernels.probes.quantize_probe (quantize_ collects only per-channel maxima)")
    q = W8A8Linear(linear.in_features, linear.out_features, linear.bias is not None, name=name, scheme=scheme,
                   backend=backend, per_tensor_act=True, static_act=True)
    q = _fill(q, linear, name)
    q.act_absmax.fill_(max(clip, gemm.EPS_ABSMAX))
    return q


@register_handler(W8A6Token)
def _a6_token(linear, scheme, *, name, backend, act_absmax=None):
    return _fill(W8A6TokenLinear(linear.in_features, linear.out_features, linear.bias is not None, name=name,
                                 scheme=scheme, backend=backend), linear, name)


@register_handler(W8A8ChannelOracle)
def _channel_oracle(linear, scheme, *, name, backend, act_absmax=None):
    return _fill(ChannelOracleLinear(linear.in_features, linear.out_features, linear.bias is not None, name=name,
                                     scheme=scheme, backend=backend), linear, name)


# --------------------------------------------------------------------------- calibration


def abs_percentile(values: Iterable[Tensor], percentile: float) -> float:
    """The `percentile` of |x| over all elements of `values` (the k-th smallest, k = ceil(p/100 * n))."""
    flat = torch.cat([v.detach().abs().float().flatten().cpu() for v in values])
    if flat.numel() == 0:
        raise SchemeError("calibration saw no activations")
    k = min(flat.numel(), max(1, math.ceil(percentile / 100.0 * flat.numel())))
    return float(flat.kthvalue(k).values)


def calibrate_clips(model: nn.Module, names: list[str], calibration: Iterable[Any], percentiles: Sequence[float],
                    max_batches: int) -> dict[float, dict[str, float]]:
    """Per percentile, per named linear: the percentile of |x| of its input over up to
    `max_batches` batches (token id tensors, or tuples / dicts of model inputs), from one pass.
    Keeps the layer inputs of the calibration set in memory (the probes' fixed token set is
    small: e.g. 32 x 256 tokens)."""
    seen_inputs: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = []

    def hook_for(name: str):
        def hook(module, inputs):
            x = inputs[0].detach()
            if not bool(torch.isfinite(x).all()):
                raise SchemeError(f"layer {name!r}: calibration input contains NaN or inf")
            seen_inputs[name].append(x.float().cpu())
        return hook

    for n in names:
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook_for(n)))
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for batch in calibration:
                if batches >= max_batches:
                    break
                run_batch(model, batch)
                batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if batches == 0:
        raise SchemeError("calibration is empty: pass at least one batch of model inputs")
    missing = [n for n, xs in seen_inputs.items() if not xs]
    if missing:
        raise SchemeError(f"layer {missing[0]!r} never ran during calibration")
    return {p: {n: abs_percentile(xs, p) for n, xs in seen_inputs.items()} for p in percentiles}


def probe_layers(model: nn.Module, layers: Any = None) -> list[str]:
    """Names of the linears a probe quantizes (quantize_'s selection)."""
    return [n for n, m in select_layers(model, layers) if isinstance(m, nn.Linear)]


def quantize_probe(model: nn.Module, scheme: Scheme | str, *, calibration: Iterable[Any] | None = None,
                   inplace: bool = False, backend: str = "auto", layers: Any = None,
                   clips: dict[str, float] | None = None) -> nn.Module:
    """`quantize_` for any scheme, computing the percentile clips of `w8a8-tensor-static` first
    (or taking `clips`, layer name -> clip from `calibrate_clips`, to share one calibration pass
    between probes). Defaults to a quantized copy (inplace=False): probes are compared against
    the FP model."""
    scheme = as_scheme(scheme)
    if not isinstance(scheme, W8A8TensorStatic):
        return quantize_(model, scheme, layers=layers, inplace=inplace, calibration=calibration, backend=backend)
    if clips is None:
        if calibration is None:
            raise SchemeError(f"{scheme.name}: needs calibration batches (a fixed token set)")
        names = probe_layers(model, layers)
        clips = calibrate_clips(model, names, calibration, [scheme.percentile], scheme.calibration_batches)[scheme.percentile]
    token = _CLIPS.set(clips)
    try:
        return quantize_(model, scheme, layers=layers, inplace=inplace, backend=backend)
    finally:
        _CLIPS.reset(token)
