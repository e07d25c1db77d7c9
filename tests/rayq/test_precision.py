import pytest
import torch
import torch.nn.functional as F

from rayq.precision import EmulatedHalf, PrecisionPolicy
from rayq.schema import RecipeConfig


def _linear_native(x, w, dtype):
    return F.linear(x.to(dtype), w.to(dtype)).float()


def _linear_emulated(x, w, dtype):
    with EmulatedHalf(dtype, layernorm_fp32=True):
        return F.linear(x, w)


def test_emulated_fp16_overflows_where_native_does():
    x = torch.full((2, 8), 300.0)
    w = torch.full((4, 8), 100.0)  # 8 * 300 * 100 = 240000 > 65504
    assert torch.isinf(_linear_native(x, w, torch.float16)).all()
    assert torch.isinf(_linear_emulated(x, w, torch.float16)).all()
    # bf16 has fp32's range: no overflow in either
    assert torch.isfinite(_linear_emulated(x, w, torch.bfloat16)).all()


def test_emulated_fp16_underflows_where_native_does():
    x = torch.full((2, 8), 1e-5)
    w = torch.full((4, 8), 1e-4)  # products 1e-9, far below fp16's smallest subnormal 6e-8
    assert (_linear_native(x, w, torch.float16) == 0).all()
    assert (_linear_emulated(x, w, torch.float16) == 0).all()


def test_emulated_matches_native_rounding_on_random_data():
    torch.manual_seed(0)
    x, w = torch.randn(16, 64), torch.randn(32, 64)
    for dtype in (torch.float16, torch.bfloat16):
        native = _linear_native(x, w, dtype)
        emulated = _linear_emulated(x, w, dtype)
        # both round inputs and output to `dtype`; accumulation order may differ by one ulp
        assert torch.allclose(native, emulated, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def _grad_of_tiny_loss(emulated: bool, scale: float) -> torch.Tensor:
    w = torch.full((4, 8), 1e-2, requires_grad=True)
    x = torch.full((2, 8), 1e-2)
    if emulated:
        with EmulatedHalf(torch.float16, layernorm_fp32=True):
            y = F.linear(x, w)
    else:
        y = F.linear(x.half(), w.half()).float()
    loss = (y * 1e-8).sum() * scale  # d loss / d y = 1e-8 * scale: below fp16's 6e-8 unless scaled
    loss.backward()
    return w.grad / scale


@pytest.mark.parametrize("emulated", [False, True])
def test_loss_scaling_rescues_underflowing_gradients(emulated):
    unscaled = _grad_of_tiny_loss(emulated, scale=1.0)
    scaled = _grad_of_tiny_loss(emulated, scale=65536.0)
    assert (unscaled == 0).all()  # the output gradient rounds to 0 at the fp16 boundary
    assert torch.allclose(scaled, torch.full_like(scaled, 2e-10), rtol=1e-2)


def test_policy_resolution():
    cpu = PrecisionPolicy.from_recipe(RecipeConfig(precision="fp16"), "cpu")
    assert cpu.mode == "emulated" and cpu.make_scaler() is not None
    assert PrecisionPolicy.from_recipe(RecipeConfig(precision="bf16"), "cpu").mode == "native"
    assert PrecisionPolicy.from_recipe(RecipeConfig(precision="fp16"), "cuda").mode == "native"
    assert PrecisionPolicy.from_recipe(RecipeConfig(precision="fp32"), "cpu").make_scaler() is None
    forced = PrecisionPolicy.from_recipe(RecipeConfig(precision="bf16", precision_mode="emulated"), "cpu")
    assert forced.mode == "emulated" and forced.make_scaler() is None


@pytest.mark.parametrize("ln_fp32", [True, False])
def test_layernorm_precision_knob(ln_fp32):
    x = torch.randn(4, 64) * 3 + 1000.0  # large mean: LN in half loses the small variations
    ln = torch.nn.LayerNorm(64)
    ref = ln(x)
    for mode in ("native", "emulated"):
        policy = PrecisionPolicy("bf16", mode, "cpu", ln_fp32)
        with policy.autocast():
            out = ln(x).float()
        err = (out - ref).abs().max().item()
        if ln_fp32:
            assert err < 1e-4, (mode, err)
        else:
            assert err > 1e-2, (mode, err)
