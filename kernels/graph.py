"""`compile_quantized(model)`: a quantized model compiled whole by torch.compile.

Why: the per-layer compile of backend "compiled" fuses each W8A8 linear's quantize and dequant
around its GEMM, but the LayerNorm before the quantize pass and the bias / GELU / residual add
after the dequant remain separate passes over the activations; at small widths (K = 256) those
passes cost as much as the INT8 GEMM. One graph for the whole model lets Inductor fuse them.

What it takes to trace a quantized model without a graph break:
1. prepare: every `W8A8Linear` resolves its form (the probe's choice of integer GEMM) and builds
   the tensors that form reads (prepacked weight, compensation, fp32 codes) eagerly, before the
   trace (`W8A8Linear.prepare`), for the call's token count and output dtype (autocast's where it
   is on); again whenever a weight changed since;
2. arm: every quantized module gets a `finite_flag`; inside the graph the NaN/inf guard writes
   its verdict there instead of branching on it (`QuantModule._check`);
3. after each compiled forward `check_flags` reads all flags at once (one sync) and raises the
   eager path's error (`SchemeError`, "layer '...': input contains NaN or inf") for the first
   quantized module, in module order, that saw NaN or inf.

Numerics: a quantized layer computes the same activation codes, the same exact integer GEMM and
its dequant in the same order as eagerly (Inductor's CPU code keeps true divisions and is
compiled without floating-point contraction), so given the same input it returns the same bits
(tests/kernels/test_kernels_graph.py). For bf16 outputs that needs Inductor's
`emulate_precision_casts` (on by default here, `GRAPH_OPTIONS`): eager rounds to bf16 after each
in-place dequant step of the oneDNN form, a fused epilogue without it only once. The rest of the model (LayerNorm, GELU, attention, residual
adds) is Inductor's fused code, whose fp32 reductions are ordered differently from ATen's: the
activations entering a quantized layer differ from eager's by a few ulps, which moves an
activation code by one step where a value sits at a rounding boundary. The model's outputs are
therefore close to, not identical with, the eager W8A8 model's (`rayq.eval` tests bound it).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from .quantize import QuantModule, quantized_modules
from .w8a8_linear import W8A8Linear

Tensor = torch.Tensor

# Inductor keeps eager's low-precision roundings between fused ops: bf16 results equal eager's
# layer by layer (a handful of extra conversions in registers, no extra memory pass)
GRAPH_OPTIONS = {"emulate_precision_casts": True}


def arm(model: nn.Module) -> list[QuantModule]:
    """Give every quantized module of `model` a finite flag (True); returns them in module order."""
    armed = []
    for m in quantized_modules(model).values():
        if m.finite_flag is None:
            device = next((b.device for b in m.buffers() if b is not None), torch.device("cpu"))
            # never an inference tensor (the graph writes it in place, in or out of inference mode)
            with torch.inference_mode(False):
                m.finite_flag = torch.ones((), dtype=torch.bool, device=device)
        armed.append(m)
    return armed


def check_flags(armed: list[QuantModule]) -> None:
    """Raise the eager guard's error for the first module whose flag says it saw NaN/inf; one
    device sync for all of them. The flags are reset first, so the next call starts clean."""
    flags = [m.finite_flag for m in armed if m.finite_flag is not None and m.check_finite]
    if not flags or bool(torch.stack(flags).all()):
        return
    bad = next(m for m in armed if m.finite_flag is not None and m.check_finite and not bool(m.finite_flag))
    for m in armed:
        if m.finite_flag is not None:
            m.finite_flag.fill_(True)
    bad._raise_nonfinite()


def call_shape(model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, torch.dtype]:
    """(tokens per call, output dtype of the quantized linears) of a call with these inputs: the
    form choice's hint. Token ids [B, T] give B * T rows; a float input [..., K] its rows. The
    dtype is autocast's where it is on for the input's device, else a float input's own, else the
    model's first floating parameter's."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
    if first is None:
        return 1, torch.float32
    rows = first.numel() // max(first.shape[-1], 1) if first.is_floating_point() and first.dim() else first.numel()
    device = first.device.type
    try:
        if torch.is_autocast_enabled(device):
            return rows, torch.get_autocast_dtype(device)
    except RuntimeError:  # a device type autocast does not know
        pass
    if first.is_floating_point():
        return rows, first.dtype
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return rows, param.dtype if param is not None else torch.float32


def prepare(model: nn.Module, rows: int, out_dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Prepare every `W8A8Linear` of `model` for a traced forward (see the module doc) unless it
    already is for `out_dtype` and its current weight; returns {layer name: form} of the new ones."""
    return {name: m.prepare(rows, out_dtype) for name, m in model.named_modules()
            if isinstance(m, W8A8Linear) and not m.is_prepared(out_dtype)}


class CompiledQuantized(nn.Module):
    """`model` (holding `rayq.kernels` quantized modules) under one `torch.compile`; calls
    prepare the quantized linears, run the compiled model and check the NaN/inf flags after it.
    Attributes the wrapper does not have (`cfg`, ...) are the model's. If the compile fails, a
    warning says why and the model runs eagerly (the per-layer paths) from then on."""

    def __init__(self, model: nn.Module, *, fullgraph: bool = True, options: Optional[dict[str, Any]] = None):
        super().__init__()
        self.model = model
        self.armed = arm(model)
        self.fullgraph = fullgraph
        # not a registered submodule: the compiled module holds `model` again (state_dict, .to(),
        # parameters() see it once, as `model`)
        options = GRAPH_OPTIONS if options is None else options
        self.__dict__["compiled"] = torch.compile(model, fullgraph=fullgraph, options=options)
        self.__dict__["failure"] = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.failure is None:
            rows, out_dtype = call_shape(self.model, args, kwargs)
            prepare(self.model, rows, out_dtype)  # eager and cheap once prepared: weights unchanged
            try:
                out = self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a broken compiler must not break evaluation
                # eagerly: an error of the input itself is raised again here, and only a call that
                # succeeds eagerly marks the compiler as the culprit
                out = self.model(*args, **kwargs)
                self._fall_back(exc)
                return out
            check_flags(self.armed)
            return out
        return self.model(*args, **kwargs)  # eager: the modules check their inputs themselves

    def forms(self) -> dict[str, dict[str, int]]:
        """{output dtype: {form: number of layers}} the quantized linears were prepared with."""
        out: dict[str, dict[str, int]] = {}
        for m in self.model.modules():
            if isinstance(m, W8A8Linear):
                for dtype, form in m.prepared_forms().items():
                    out.setdefault(dtype, {}).setdefault(form, 0)
                    out[dtype][form] += 1
        return out

    def _fall_back(self, exc: BaseException) -> None:
        self.__dict__["failure"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"rayq.kernels.graph: torch.compile of the quantized model failed ({self.failure}); "
                      "running it eagerly", RuntimeWarning, stacklevel=3)
        for m in self.armed:  # a half-run graph may have left a flag down
            if m.finite_flag is not None:
                m.finite_flag.fill_(True)


def compile_quantized(model: nn.Module, *, fullgraph: bool = True, options: Optional[dict[str, Any]] = None) -> CompiledQuantized:
    """`model` compiled whole (see the module doc); `fullgraph` and `options` (default
    `GRAPH_OPTIONS`) go to torch.compile.
    The model's quantized modules keep their eager behaviour when it is called directly."""
    return CompiledQuantized(model, fullgraph=fullgraph, options=options)
