"""`W8A8Linear`: INT8 weights, INT8 activations, an exact integer GEMM and an fp32 dequant.

Which integer GEMM runs on a CPU (the "form": `_int_mm` s8s8 / u8s8, oneDNN's prepacked qlinear,
or the exact fp32-GEMM form, see `rayq.kernels.gemm`) is the machine's probe's choice
(`rayq.kernels.backends`) per call shape, and each form needs tensors derived from the int8
weight (the u8 compensation, the oneDNN prepack, the codes as fp32), cached per weight version.

Two ways to run it:
- called eagerly (alone, or with the per-layer compiled quantize/dequant of backend
  "auto"/"compiled"): the form is resolved and the derived tensors looked up at every call;
- traced into a whole-model graph (`torch.compile` of the model, `rayq.kernels.graph`): the
  probe's lock and the cache's `data_ptr` key cannot be traced, so `prepare(rows, out_dtype)`
  resolves the form and builds the tensors eagerly beforehand, and the traced forward only reads
  them and calls the same kernel functions (no nested compile: the model's graph fuses the
  quantize pass with the op before it and the dequant with the ops after it).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch

from . import backends, gemm
from .base import QuantLinear
from .schemes import Scheme

Tensor = torch.Tensor


def dtype_key(dtype: torch.dtype) -> str:
    """The key of a prepared form: the linear's output dtype (the probe ranks forms per dtype)."""
    return str(dtype).removeprefix("torch.")


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
        # `prepare`'s choices for a traced forward: dtype_key(out dtype) -> (form, derived tensors),
        # and the weight key each was built for (apart: the trace reads `_graph` only, and every
        # value it reads becomes a guard; data pointers differ between copies of a model)
        self._graph: dict[str, tuple[str, Any]] = {}
        self._graph_keys: dict[str, tuple] = {}

    def __deepcopy__(self, memo):
        # the derived tensors (opaque oneDNN layouts among them) are rebuilt on use, not copied
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for k, v in self.__dict__.items():
            clone.__dict__[k] = {} if k in ("_derived", "_graph", "_graph_keys") else copy.deepcopy(v, memo)
        return clone

    def _weight_key(self) -> tuple:
        return (self.qweight.data_ptr(), self.qweight._version)

    def _cached(self, form: str, build: Callable[[], Any]) -> Any:
        key = self._weight_key()
        hit = self._derived.get(form)
        if hit is None or hit[0] != key:
            hit = (key, build())
            self._derived[form] = hit
        return hit[1]

    def _form(self, rows: int, out_dtype: torch.dtype, compiled: bool) -> str:
        """"s8s8", "u8s8", "onednn" or "f32" for a CPU call of `rows` tokens: forced
        (`gemm.set_cpu_kernel`), else the machine's probe (its compiled ranking for fused calls)."""
        form = gemm.cpu_kernel() or backends.choose(rows, out_dtype, compiled)
        if form == "u8s8" and self.in_features > gemm.MAX_K_U8:
            return "s8s8"  # the u8 accumulator would overflow int32
        if form == "f32" and not gemm.fp32_gemm_is_ieee():
            return "s8s8"  # fp32 matmul precision lowered since the probe: no longer exact
        return form

    def _cpu_form(self, x: Tensor, out_dtype: torch.dtype = torch.float32) -> str:
        """The form an eager call on x [M, K] runs (the bench records it)."""
        return self._form(x.shape[0], out_dtype, self._use_compiled(x))

    def _derived_for(self, form: str, rows: int) -> Any:
        """The tensors `form` reads besides the layer's buffers, cached per weight version:
        the codes as fp32 ("f32"), (prepacked weight, per-channel scale) ("onednn"),
        128 * colsum(W_q) ("u8s8"), or None ("s8s8")."""
        if form == "f32":
            return self._cached("f32", self.qweight.float)
        if form == "onednn":
            return self._cached("onednn", lambda: (
                gemm.onednn_prepack(self.qweight, rows), self.w_scale.expand(self.out_features).contiguous()))
        if form == "u8s8":
            return self._cached("u8s8", lambda: self.qweight.sum(1, dtype=torch.int32) * 128)
        return None

    def _kernel(self, form: str, x: Tensor, out_dtype: torch.dtype, derived: Any) -> tuple[Callable, Optional[Callable], tuple]:
        """(eager kernel, its compiled-function getter or None, arguments) of `form`."""
        if form == "f32":  # one GEMM call and in-place passes: nothing for a per-layer compile to fuse
            return gemm.w8a8_f32, None, (x, derived, self.w_scale, self.bias, self.in_scale, self.act_absmax, self.per_tensor_act)
        if form == "onednn":
            packed, w_scale = derived
            # oneDNN writes fp32 or bf16; anything else is converted by `forward`
            out = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
            return gemm.w8a8_onednn, gemm.compiled_w8a8_onednn, (
                x, packed, w_scale, self.bias, self.in_scale, self.act_absmax, self.per_tensor_act, out)
        return gemm.w8a8_core, gemm.compiled_w8a8_core, (x, *self._args(), derived)

    def _args(self) -> tuple:
        return (self.qweight, self.w_scale, self.bias, self.in_scale, self.act_absmax, self.per_tensor_act)

    # ------------------------------------------------------------------ the whole-model graph

    def prepare(self, rows: int, out_dtype: torch.dtype = torch.float32) -> str:
        """Resolve the form for calls of about `rows` tokens writing `out_dtype` and build its
        derived tensors, eagerly, so that a `torch.compile` of the model containing this layer
        traces its forward without a graph break. The form is the probe's ranking for compiled
        calls (in a whole-model graph the quantize pass is fused whatever the form); every form
        gives the same integers, so one prepared for other shapes only costs speed. Returns it."""
        if self.qweight.device.type == "cpu":
            form = self._form(rows, out_dtype, compiled=True)
        else:  # CUDA's `_int_mm` (zero-padded) and XLA's int8 dot: the s8 x s8 core
            form = "s8s8"
        key = dtype_key(out_dtype)
        self._graph[key] = (form, self._derived_for(form, rows))
        self._graph_keys[key] = self._weight_key()
        return form

    def prepared_forms(self) -> dict[str, str]:
        """{output dtype: form} of what `prepare` built (recorded by `rayq bench eval`)."""
        return {key: form for key, (form, _) in self._graph.items()}

    def is_prepared(self, out_dtype: torch.dtype) -> bool:
        """Whether `prepare` ran for `out_dtype` since the weight last changed."""
        return self._graph_keys.get(dtype_key(out_dtype)) == self._weight_key()

    def _prepared(self, out_dtype: torch.dtype) -> Optional[tuple[str, Any]]:
        entry = self._graph.get(dtype_key(out_dtype))
        if entry is None and self._graph:  # an output dtype nobody prepared (a model cast to bf16
            entry = next(iter(self._graph.values()))  # without autocast): any form computes the same
        return entry

    def _fast(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        traced = self._prepared(out_dtype) if torch.compiler.is_compiling() else None
        if traced is not None:
            # in a whole-model graph: the eager kernel is traced into it, the finite check is a flag
            form, derived = traced
            eager, _, args = self._kernel(form, x, out_dtype, derived)
            out, absmax = eager(*args)
            self._check(absmax)
            return out
        form = self._cpu_form(x, out_dtype) if x.device.type == "cpu" else "s8s8"
        eager, compiled, args = self._kernel(form, x, out_dtype, self._derived_for(form, x.shape[0]))
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
