"""rayq.kernels: INT8 quantization that really computes in integers (imports torch only).

    from rayq.kernels import quantize_, W8A8Vectorwise
    quantize_(model, W8A8Vectorwise())          # every nn.Linear -> INT8 x INT8 -> INT32 GEMMs
    quantize_(model, "w4-colwise", layers=("attn.qkv", "mlp.fc_in"), inplace=False)

Schemes are frozen config objects with stable CLI names (`list_schemes()`, `rayq ls quant`);
each module computes on the device's integer kernel and can switch to the fp64 reference path
(`set_backend(model, "reference")`) that every fast path is tested against. Which exact integer
kernel runs on a CPU (`_int_mm` s8s8 / u8s8, oneDNN's prepacked qlinear) is measured once per
machine and cached (`rayq.kernels.backends`, `rayq.kernels.machine`). `rayq bench int8`
(rayq.kernels.bench) measures the speed. This package imports torch only.
"""

from . import (
    backends,
    machine,
    probes,  # noqa: F401  (registers the probe schemes: w8a8-tensor-static, w8a6-token, w8a8-channel-oracle)
)
from .gemm import MAX_K_S8, MAX_K_U8, int8_mm, int_mm_reference, set_cpu_kernel
from .quantize import (
    QuantEmbedding,
    QuantLinear,
    QuantModule,
    W4Linear,
    W8A8GroupLinear,
    W8A8Linear,
    load_quantized,
    quantize_,
    quantized_modules,
    quantized_state_dict,
    register_handler,
    save_quantized,
    select_layers,
    set_backend,
)
from .schemes import (
    Scheme,
    SchemeError,
    W4Colwise,
    W8A8Groupwise,
    W8A8PerTensor,
    W8A8SmoothQuant,
    W8A8Vectorwise,
    list_schemes,
    register_scheme,
    scheme_from_name,
)

__all__ = [
    "MAX_K_S8",
    "MAX_K_U8",
    "QuantEmbedding",
    "QuantLinear",
    "QuantModule",
    "Scheme",
    "SchemeError",
    "W4Colwise",
    "W4Linear",
    "W8A8GroupLinear",
    "W8A8Groupwise",
    "W8A8Linear",
    "W8A8PerTensor",
    "W8A8SmoothQuant",
    "W8A8Vectorwise",
    "backends",
    "int8_mm",
    "int_mm_reference",
    "list_schemes",
    "load_quantized",
    "machine",
    "quantize_",
    "quantized_modules",
    "quantized_state_dict",
    "register_handler",
    "register_scheme",
    "save_quantized",
    "scheme_from_name",
    "select_layers",
    "set_backend",
    "set_cpu_kernel",
]
