"""`quantize_(model, scheme)`: swap selected nn.Linear (and optionally nn.Embedding) modules for
quantized ones that really compute in INT8; save and reload the result.

One verb, many configs (torchao): each scheme type has a handler registered with
`@register_handler(SchemeType)` that turns one float module into its quantized replacement.

Quantized modules are for inference: their weights are int8 buffers (no gradients), the forward
runs under no_grad, and `backend` picks the arithmetic:
- "auto": the device's integer kernel; on CPU the path `rayq.kernels.backends` measured fastest
  on this machine for the call's shape class (`_int_mm` s8s8 / u8s8, oneDNN's prepacked qlinear,
  or the exact fp32-GEMM form); the integer paths run compiled (fused quantize/dequant) when a
  call is big enough to repay it (AUTO_COMPILE_WORK), eager otherwise;
- "eager": the same path choice, never compiled; "compiled": always the compiled `_int_mm` form;
- "reference": the fp64 path of the same math (`rayq.kernels.gemm.*_reference`), the yardstick.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, gemm
from .files import atomic_write
from .schemes import (
    Scheme,
    SchemeError,
    W4Colwise,
    W8A8Groupwise,
    W8A8PerTensor,
    W8A8SmoothQuant,
    W8A8Vectorwise,
    as_scheme,
    scheme_from_dict,
)

Tensor = torch.Tensor

BACKENDS = ("auto", "eager", "compiled", "reference")
# "auto" compiles when a call has >= AUTO_COMPILE_MIN_ROWS tokens and >= AUTO_COMPILE_WORK
# multiply-adds: measured here, the fused form beat eager from 256x1024x1024 up and lost at M=1
# (Dynamo guards + launch cost more than the passes they save); tiny test models stay eager and
# never pay the compile time.
AUTO_COMPILE_WORK = 2**28
AUTO_COMPILE_MIN_ROWS = 32
FORMAT = "rayq.kernels.quantized/1"
META_KEY = "__rayq_quant_meta__"
SMOOTH_EPS = 1e-5  # SmoothQuant's floor for channel maxima and factors (dead channels stay finite)

LayerFilter = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise SchemeError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    return backend


# --------------------------------------------------------------------------- modules


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

    def _raise_nonfinite(self) -> None:
        raise SchemeError(f"layer {self.name!r}: input contains NaN or inf ({self.scheme.name})")

    def _check(self, t: Tensor) -> None:
        if self.check_finite and not bool(torch.isfinite(t).all()):
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


class W8A8Linear(QuantLinear):
    """INT8 weights [N, K] with per-channel (or one per-tensor) scale; activations quantized per
    token (or per tensor, dynamic or static) at run time; INT8 GEMM with INT32 accumulation;
    fp32 dequant s_x * acc * s_w + b. Also serves SmoothQuant via `in_scale` (1/s per input
    channel, applied to x before quantizing; W already carries s). bf16 activations are read as
    they are (the codes are computed in fp32 either way) and, where the output is bf16 (see
    `output_dtype`), the oneDNN form writes bf16 itself."""

    kind = "W8A8Linear"
    fast_inputs = (torch.float32, torch.bfloat16)

    def __init__(self, in_features: int, out_features: int, bias: bool, *, name: str, scheme: Scheme, backend: str = "auto",
                 per_tensor_weight: bool = False, per_tensor_act: bool = False, static_act: bool = False, smooth: bool = False):
        super().__init__(in_features, out_features, bias, name=name, scheme=scheme, backend=backend)
        self.per_tensor_weight, self.per_tensor_act, self.static_act, self.smooth = per_tensor_weight, per_tensor_act, static_act, smooth
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(1 if per_tensor_weight else out_features))
        self.register_buffer("act_absmax", torch.ones(1) if static_act else None)
        self.register_buffer("in_scale", torch.ones(in_features) if smooth else None)
        # derived from qweight per (form, weight version): u8 compensation or the oneDNN prepack
        self._derived: dict[str, tuple[tuple, Any]] = {}

    def __deepcopy__(self, memo):
        # the derived tensors (opaque oneDNN layouts among them) are rebuilt on use, not copied
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for k, v in self.__dict__.items():
            clone.__dict__[k] = {} if k == "_derived" else copy.deepcopy(v, memo)
        return clone

    def _cached(self, form: str, build: Callable[[], Any]) -> Any:
        key = (self.qweight.data_ptr(), self.qweight._version)
        hit = self._derived.get(form)
        if hit is None or hit[0] != key:
            hit = (key, build())
            self._derived[form] = hit
        return hit[1]

    def _cpu_form(self, x: Tensor, out_dtype: torch.dtype = torch.float32) -> str:
        """"s8s8", "u8s8", "onednn" or "f32": forced (`gemm.set_cpu_kernel`), else the machine's probe."""
        form = gemm.cpu_kernel() or backends.choose(x.shape[0], out_dtype, self._use_compiled(x))
        if form == "u8s8" and self.in_features > gemm.MAX_K_U8:
            return "s8s8"  # the u8 accumulator would overflow int32
        if form == "f32" and not gemm.fp32_gemm_is_ieee():
            return "s8s8"  # fp32 matmul precision lowered since the probe: no longer exact
        return form

    def _compensation(self, form: str) -> Optional[Tensor]:
        """128 * colsum(W_q) for the u8 x s8 CPU GEMM, cached per weight version."""
        if form != "u8s8":
            return None
        return self._cached("u8s8", lambda: self.qweight.sum(1, dtype=torch.int32) * 128)

    def _onednn_args(self, x: Tensor, out_dtype: torch.dtype) -> tuple:
        packed, w_scale = self._cached("onednn", lambda: (
            gemm.onednn_prepack(self.qweight, x.shape[0]), self.w_scale.expand(self.out_features).contiguous()))
        # oneDNN writes fp32 or bf16; anything else is converted by `forward`
        out = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
        return (x, packed, w_scale, self.bias, self.in_scale, self.act_absmax, self.per_tensor_act, out)

    def _args(self) -> tuple:
        return (self.qweight, self.w_scale, self.bias, self.in_scale, self.act_absmax, self.per_tensor_act)

    def _fast(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        form = self._cpu_form(x, out_dtype) if x.device.type == "cpu" else "s8s8"
        if form == "f32":  # one GEMM call and in-place passes: nothing for a compile to fuse
            eager, compiled, args = gemm.w8a8_f32, None, (x, self._cached("f32", self.qweight.float), *self._args()[1:])
        elif form == "onednn":
            eager, compiled, args = gemm.w8a8_onednn, gemm.compiled_w8a8_onednn, self._onednn_args(x, out_dtype)
        else:
            eager, compiled, args = gemm.w8a8_core, gemm.compiled_w8a8_core, (x, *self._args(), self._compensation(form))
        fn = compiled() if compiled and self._use_compiled(x) else None
        result = None
        if fn is not None:
            try:
                result = fn(*args)
            except Exception as exc:  # noqa: BLE001 - a broken compiler must not break evaluation
                gemm.note_compile_failure(exc)
        out, absmax = result if result is not None else eager(*args)
        self._check(absmax)  # NaN/inf in a row poison its absmax
        return out

    def _reference(self, x: Tensor) -> Tensor:
        return gemm.w8a8_reference(x, *self._args())

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "per_tensor_weight": self.per_tensor_weight, "per_tensor_act": self.per_tensor_act,
                "static_act": self.static_act, "smooth": self.smooth}


class W8A8GroupLinear(QuantLinear):
    """INT8 weights with one scale per (output channel, K-group); per-token INT8 activations."""

    kind = "W8A8GroupLinear"

    def __init__(self, in_features: int, out_features: int, bias: bool, *, name: str, scheme: Scheme, backend: str = "auto", group_size: int = 128):
        super().__init__(in_features, out_features, bias, name=name, scheme=scheme, backend=backend)
        self.group_size = group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features, in_features // group_size))

    def _fast(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        out, absmax = gemm.group_core(x, self.qweight, self.w_scale, self.bias, self.group_size)
        self._check(absmax)
        return out

    def _reference(self, x: Tensor) -> Tensor:
        return gemm.group_reference(x, self.qweight, self.w_scale, self.bias, self.group_size)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "group_size": self.group_size}


class W4Linear(QuantLinear):
    """Weight-only INT4: codes in [-7, 7] packed two per byte, one fp32 scale per output channel.
    The forward unpacks and dequantizes the weight, then runs an FP linear: activations are never
    quantized in this scheme, so there is no integer GEMM to run (as in the paper's §4)."""

    kind = "W4Linear"

    def __init__(self, in_features: int, out_features: int, bias: bool, *, name: str, scheme: Scheme, backend: str = "auto"):
        super().__init__(in_features, out_features, bias, name=name, scheme=scheme, backend=backend)
        self.register_buffer("qweight_packed", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
        self.register_buffer("w_scale", torch.ones(out_features))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        codes = gemm.unpack_int4(self.qweight_packed, self.in_features)
        return codes.to(dtype) * self.w_scale.to(dtype).unsqueeze(1)

    def _fast(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        self._check(x)
        return F.linear(x, self.dequantized_weight(), self.bias)

    def _reference(self, x: Tensor) -> Tensor:
        w = self.dequantized_weight(torch.float64).cpu()
        b = None if self.bias is None else self.bias.cpu().double()
        return F.linear(x.detach().cpu().double(), w, b)


class QuantEmbedding(QuantModule):
    """Weight-only embedding table: one absmax scale per row (token), 8-bit codes or 4-bit packed."""

    kind = "QuantEmbedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, *, name: str, scheme: Scheme, backend: str = "auto", bits: int = 8):
        super().__init__(name, scheme, backend)
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        width = embedding_dim if bits == 8 else (embedding_dim + 1) // 2
        self.register_buffer("qweight", torch.zeros(num_embeddings, width, dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("w_scale", torch.ones(num_embeddings))

    def forward(self, idx: Tensor) -> Tensor:
        rows = F.embedding(idx, self.qweight)
        if self.bits == 4:
            rows = gemm.unpack_int4(rows.reshape(-1, rows.shape[-1]), self.embedding_dim).reshape(*idx.shape, self.embedding_dim)
        dtype = torch.float64 if self.backend == "reference" else torch.float32
        out = rows.to(dtype) * self.w_scale[idx].to(dtype).unsqueeze(-1)
        return out.to(torch.float32)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits, "scheme": self.scheme.to_dict()}


_KINDS: dict[str, type[QuantModule]] = {c.kind: c for c in (W8A8Linear, W8A8GroupLinear, W4Linear, QuantEmbedding)}


# --------------------------------------------------------------------------- handlers

_HANDLERS: dict[type[Scheme], Callable[..., QuantModule]] = {}


def register_handler(scheme_type: type[Scheme]):
    """Decorator: `handler(linear, scheme, *, name, backend, act_absmax) -> QuantLinear`."""

    def deco(fn):
        _HANDLERS[scheme_type] = fn
        return fn

    return deco


def _float_weight(linear: nn.Linear | nn.Embedding, name: str) -> Tensor:
    w = linear.weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise SchemeError(f"layer {name!r}: weight contains NaN or inf")
    return w


def _copy_bias(q: QuantLinear, linear: nn.Linear) -> None:
    if linear.bias is not None:
        q.bias.copy_(linear.bias.detach().float())


def _w8a8(linear: nn.Linear, scheme: Scheme, name: str, backend: str, weight: Tensor, **flags) -> W8A8Linear:
    q = W8A8Linear(linear.in_features, linear.out_features, linear.bias is not None, name=name, scheme=scheme, backend=backend, **flags)
    codes, scale = gemm.quantize_weight(weight, per="tensor" if flags.get("per_tensor_weight") else "channel")
    q.qweight.copy_(codes)
    q.w_scale.copy_(scale)
    _copy_bias(q, linear)
    return q.to(linear.weight.device)


@register_handler(W8A8Vectorwise)
def _vectorwise(linear, scheme, *, name, backend, act_absmax=None):
    return _w8a8(linear, scheme, name, backend, _float_weight(linear, name))


@register_handler(W8A8PerTensor)
def _per_tensor(linear, scheme, *, name, backend, act_absmax=None):
    q = _w8a8(linear, scheme, name, backend, _float_weight(linear, name), per_tensor_weight=True, per_tensor_act=True, static_act=scheme.static)
    if scheme.static:
        q.act_absmax.fill_(max(float(act_absmax.max()), gemm.EPS_ABSMAX))
    return q


@register_handler(W8A8SmoothQuant)
def _smoothquant(linear, scheme, *, name, backend, act_absmax=None):
    w = _float_weight(linear, name)
    a = act_absmax.to(w.device).float().clamp_min(SMOOTH_EPS)  # per input channel max |x| from calibration
    b = w.abs().amax(dim=0).clamp_min(SMOOTH_EPS)  # per input channel max |W|
    s = (a.pow(scheme.alpha) / b.pow(1.0 - scheme.alpha)).clamp_min(SMOOTH_EPS)
    q = _w8a8(linear, scheme, name, backend, w * s, smooth=True)
    q.in_scale.copy_(1.0 / s)
    return q


@register_handler(W8A8Groupwise)
def _groupwise(linear, scheme, *, name, backend, act_absmax=None):
    if linear.in_features % scheme.group_size:  # every replacement is built before any is swapped in
        raise SchemeError(f"w8a8-group: group_size {scheme.group_size} does not divide the input width "
                          f"{linear.in_features} of layer {name!r}")
    w = _float_weight(linear, name)
    q = W8A8GroupLinear(linear.in_features, linear.out_features, linear.bias is not None, name=name, scheme=scheme, backend=backend, group_size=scheme.group_size)
    codes, scale = gemm.quantize_weight_groups(w, scheme.group_size)
    q.qweight.copy_(codes)
    q.w_scale.copy_(scale)
    _copy_bias(q, linear)
    return q.to(linear.weight.device)


@register_handler(W4Colwise)
def _w4(linear, scheme, *, name, backend, act_absmax=None):
    w = _float_weight(linear, name)
    q = W4Linear(linear.in_features, linear.out_features, linear.bias is not None, name=name, scheme=scheme, backend=backend)
    codes, scale = gemm.quantize_weight(w, qmax=gemm.QMAX4)
    q.qweight_packed.copy_(gemm.pack_int4(codes))
    q.w_scale.copy_(scale)
    _copy_bias(q, linear)
    return q.to(linear.weight.device)


def _quantize_embedding(emb: nn.Embedding, scheme: Scheme, name: str, backend: str) -> QuantEmbedding:
    w = _float_weight(emb, name)
    bits = scheme.weight_bits
    q = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, name=name, scheme=scheme, backend=backend, bits=bits)
    codes, scale = gemm.quantize_weight(w, qmax=gemm.QMAX8 if bits == 8 else gemm.QMAX4)
    q.qweight.copy_(codes if bits == 8 else gemm.pack_int4(codes))
    q.w_scale.copy_(scale)
    return q.to(emb.weight.device)


# --------------------------------------------------------------------------- selection


def select_layers(model: nn.Module, layers: LayerFilter = None, *, include_lm_head: bool = False, include_embeddings: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs that `quantize_` would replace, in module order.

    layers: None or "all" -> every nn.Linear (torchao's default; rayq's evaluator passes the
    model's block linears, `rayq.model.BLOCK_LINEARS`); an iterable of names or name suffixes
    (matched at a "." boundary); or a callable(name, module) -> bool over nn.Linear.
    """
    if layers is None or layers == "all":
        pick = lambda n, m: True  # noqa: E731
    elif isinstance(layers, str):
        raise SchemeError(f"layers: expected None, 'all', a list of names or a callable, got {layers!r}")
    elif callable(layers):
        pick = layers
    else:
        wanted = tuple(layers)
        pick = lambda n, m: n in wanted or n.endswith(tuple("." + w for w in wanted))  # noqa: E731
    out = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and (pick(n, m) or (include_lm_head and n.split(".")[-1] == "lm_head")):
            out.append((n, m))
        elif isinstance(m, nn.Embedding) and include_embeddings:
            out.append((n, m))
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def run_batch(model: nn.Module, batch: Any) -> None:
    """One calibration batch through the model: a dict of keyword inputs, a tuple/list of
    positional ones, or a single tensor."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate(model: nn.Module, names: list[str], calibration: Optional[Iterable[Any]], max_batches: int) -> dict[str, Tensor]:
    """Per-input-channel max |x| [K] of each named linear's input over up to `max_batches` batches,
    collected with forward pre-hooks (the model runs in eval mode under no_grad)."""
    if calibration is None:
        raise SchemeError("this scheme needs calibration batches: pass quantize_(..., calibration=[batch, ...])")
    stats: dict[str, Tensor] = {}
    handles = []

    def hook_for(name: str):
        def hook(module, inputs):
            x = inputs[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            if not bool(torch.isfinite(amax).all()):
                raise SchemeError(f"layer {name!r}: calibration input contains NaN or inf")
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)

        return hook

    for n in names:
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook_for(n)))
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in calibration:
                if seen >= max_batches:
                    break
                run_batch(model, batch)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise SchemeError("calibration is empty: pass at least one batch of model inputs")
    missing = [n for n in names if n not in stats]
    if missing:
        raise SchemeError(f"layer {missing[0]!r} never ran during calibration")
    return stats


def quantize_(
    model: nn.Module,
    scheme: Union[Scheme, str],
    *,
    layers: LayerFilter = None,
    include_lm_head: bool = False,
    include_embeddings: bool = False,
    inplace: bool = True,
    calibration: Optional[Iterable[Any]] = None,
    backend: str = "auto",
) -> nn.Module:
    """Replace the selected modules of `model` by quantized ones; returns the model.

    inplace=False quantizes a deepcopy and leaves `model` untouched. `calibration` is an
    iterable of model inputs (a tensor, a tuple of positional args, or a dict of kwargs per
    batch), required by w8a8-smoothquant and static w8a8-tensor. Everything is validated before
    the first module is replaced, so a SchemeError leaves the model as it was.
    """
    scheme = as_scheme(scheme)
    _check_backend(backend)
    handler = _HANDLERS.get(type(scheme))
    if handler is None:
        raise SchemeError(f"no handler registered for scheme type {type(scheme).__name__}")
    targets = select_layers(model, layers, include_lm_head=include_lm_head, include_embeddings=include_embeddings)
    targets = [(n, m) for n, m in targets if not isinstance(m, QuantModule)]
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        seen = ", ".join(linears[:4]) + (", ..." if len(linears) > 4 else "") if linears else "none"
        raise SchemeError(f"{scheme.name}: no layers matched the selection (layers={layers!r}); nn.Linear modules in the model: {seen}")
    if not inplace:
        model = copy.deepcopy(model)
        targets = [(n, model.get_submodule(n)) for n, _ in targets]
    linear_names = [n for n, m in targets if isinstance(m, nn.Linear)]
    stats = calibrate(model, linear_names, calibration, scheme.calibration_batches) if scheme.needs_calibration else {}
    new = []
    for n, m in targets:  # build all replacements first: a bad layer raises before any swap
        if isinstance(m, nn.Embedding):
            new.append((n, _quantize_embedding(m, scheme, n, backend)))
        else:
            new.append((n, handler(m, scheme, name=n, backend=backend, act_absmax=stats.get(n))))
    for n, q in new:
        _set_module(model, n, q)
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every quantized module of `model` to `backend` (e.g. "reference" to cross-check)."""
    _check_backend(backend)
    for m in quantized_modules(model).values():
        m.backend = backend
    return model


# --------------------------------------------------------------------------- save / load


def quantized_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model state as a flat dict of CPU tensors (int8 / packed uint8 weights, fp32
    scales, the FP parameters of unquantized modules) plus META_KEY: a uint8 tensor of JSON that
    says which modules are quantized and how. Safetensors-style: tensors only."""
    layers = {n: m.spec() for n, m in quantized_modules(model).items()}
    if not layers:
        raise SchemeError("model has no quantized layers to save (run quantize_ first)")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = json.dumps({"format": FORMAT, "layers": layers}, sort_keys=True).encode()
    sd[META_KEY] = torch.frombuffer(bytearray(meta), dtype=torch.uint8).clone()
    return sd


def save_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """torch.save of `quantized_state_dict`, written to a temp file in the same directory and
    moved into place (`files.atomic_write`), so a reader never sees a half-written file."""
    sd = quantized_state_dict(model)
    atomic_write(os.path.abspath(os.fspath(path)), lambda f: torch.save(sd, f))


def load_quantized(model: nn.Module, path: Union[str, os.PathLike], *, backend: str = "auto", map_location: str = "cpu") -> nn.Module:
    """Rebuild the quantized modules recorded in `path` inside `model` (the FP architecture, e.g.
    a fresh GPT(cfg)) and load every tensor with torch.load(weights_only=True). Returns `model`."""
    _check_backend(backend)
    sd = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if META_KEY not in sd:
        raise SchemeError(f"{path}: not a rayq quantized file (no {META_KEY})")
    meta = json.loads(bytes(sd.pop(META_KEY).tolist()).decode())
    if meta.get("format") != FORMAT:
        raise SchemeError(f"{path}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    for name, spec in meta["layers"].items():
        spec = dict(spec)
        cls = _KINDS.get(spec.pop("kind"))
        if cls is None:
            raise SchemeError(f"{path}: unknown quantized module kind for layer {name!r}")
        scheme = scheme_from_dict(spec.pop("scheme"))
        if cls is QuantEmbedding:
            module = cls(spec["num_embeddings"], spec["embedding_dim"], name=name, scheme=scheme, backend=backend, bits=spec["bits"])
        else:
            args = (spec.pop("in_features"), spec.pop("out_features"), spec.pop("bias"))
            module = cls(*args, name=name, scheme=scheme, backend=backend, **spec)
        _set_module(model, name, module)
    model.load_state_dict(sd, strict=True)
    return model
