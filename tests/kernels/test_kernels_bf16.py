"""bf16 activations through the W8A8 linear: a quantized linear follows `nn.Linear`'s output dtype
(autocast's where autocast is on), reads bf16 input as it is (same codes as its fp32 copy), and
every CPU form, eager and compiled, agrees with the fp64 reference to bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from rayq.kernels import backends, gemm, quantize_, set_backend
from rayq.kernels.quantize import output_dtype

FORMS = ["s8s8", "u8s8", "onednn", "f32"]


def _available(form: str) -> bool:
    return backends.inexact_reason(form) is None


def _forced(module, form, x, autocast: bool):
    before = gemm.cpu_kernel()
    gemm.set_cpu_kernel(form)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return module(x)
    finally:
        gemm.set_cpu_kernel(before)


def test_output_dtype_follows_autocast_like_nn_linear():
    x = torch.randn(4, 8)
    lin = torch.nn.Linear(8, 3)
    assert output_dtype(x) == lin(x).dtype == torch.float32
    assert output_dtype(x.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert output_dtype(x) == lin(x).dtype == torch.bfloat16
    assert output_dtype(torch.arange(3)) == torch.int64  # no autocast dtype for integer inputs


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-input", "autocast"])
def test_bf16_activations_give_the_fp32_path_rounded_to_bf16(form, autocast):
    """Same codes from bf16 input as from its exact fp32 copy; the output differs by the bf16
    rounding of the dequantized values only (oneDNN rounds in its epilogue, then the token scale
    rounds again: two roundings at most)."""
    if not _available(form):
        pytest.skip(f"{form}: {backends.inexact_reason(form)}")
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(131, 45))
    x = torch.randn(37, 131).bfloat16()
    q = quantize_(lin, "w8a8-vectorwise", inplace=False, backend="eager")
    y = _forced(q, form, x.float() if autocast else x, autocast)
    assert y.dtype == torch.bfloat16
    fp32 = _forced(q, form, x.float(), False)
    if form == "onednn":
        torch.testing.assert_close(y.float(), fp32, rtol=2 ** -7, atol=2 ** -7 * fp32.abs().max().item())
    else:
        assert torch.equal(y, fp32.bfloat16())
    set_backend(q, "reference")  # and the fp32 path against the fp64 yardstick; with bf16-valued
    # inputs, x * 127 / absmax meets rounding ties where fp32 and fp64 may round a code apart
    torch.testing.assert_close(fp32, q(x.float()), rtol=0, atol=0.02 * fp32.abs().max().item())


def test_compiled_onednn_form_matches_eager_in_both_output_dtypes():
    if not gemm.onednn_available():
        pytest.skip("no oneDNN qlinear in this torch build")
    torch.manual_seed(1)
    lin = torch.nn.Sequential(torch.nn.Linear(96, 40))
    x = torch.randn(24, 96)
    x[3] = 0.0
    eager = quantize_(lin, "w8a8-vectorwise", inplace=False, backend="eager")
    compiled = quantize_(lin, "w8a8-vectorwise", inplace=False, backend="compiled")
    for autocast in (False, True):
        want = _forced(eager, "onednn", x, autocast)
        got = _forced(compiled, "onednn", x, autocast)
        assert got.dtype == want.dtype
        if autocast:  # the fused epilogue rounds to bf16 once, the eager one after each in-place op
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not gemm._compile_failed, gemm._compile_failed
    x[2, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        _forced(compiled, "onednn", x, False)
