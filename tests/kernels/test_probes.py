"""Quantizer probes (rayq.kernels.probes): registry, calibration, fast path vs fp64 reference, the
integer GEMM of the integer probes, and what each probe is (and is not) sensitive to."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rayq.kernels import (
    SchemeError,
    W8A8Vectorwise,
    int_mm_reference,
    list_schemes,
    quantize_,
    scheme_from_name,
    set_backend,
)
from rayq.kernels.probes import (
    ChannelOracleLinear,
    W8A6Token,
    W8A6TokenLinear,
    W8A8ChannelOracle,
    W8A8TensorStatic,
    abs_percentile,
    quantize_probe,
)

K, N, M = 128, 96, 64


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.detach().double(), y.detach().double()
    return 20 * math.log10(ref.norm() / (ref - y).norm())


def layer(seed=0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    return nn.Sequential(lin)


def x_random(seed=1, rows=M):
    return torch.randn(rows, K, generator=torch.Generator().manual_seed(seed))


def x_outlier_tokens(seed=2):
    x = x_random(seed)
    x[::16] *= 100  # a few massive tokens
    return x


def x_outlier_features(seed=3):
    x = x_random(seed)
    x[:, [3, 50, 90]] *= 60  # outlier channels in every token
    return x


def probe(model, scheme, calib=None, **kw):
    return quantize_probe(model, scheme, calibration=calib, layers="all", **kw)


def test_probe_schemes_are_registered_by_name():
    names = dict(list_schemes())
    assert {"w8a8-tensor-static", "w8a6-token", "w8a8-channel-oracle"} <= set(names)
    assert scheme_from_name("w8a8-tensor-static", percentile=99.99) == W8A8TensorStatic(percentile=99.99)
    with pytest.raises(SchemeError, match="percentile must be in"):
        W8A8TensorStatic(percentile=101)
    with pytest.raises(SchemeError, match="did you mean 'w8a6-token'"):
        scheme_from_name("w8a6-tokn")


def test_abs_percentile_is_the_kth_smallest_magnitude():
    v = torch.arange(1, 10001, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(5000)
    assert abs_percentile([v], 100.0) == 10000.0
    assert abs_percentile([v[:5000], v[5000:]], 99.99) == 9999.0
    assert abs_percentile([v], 50.0) == 5000.0


def test_static_clip_min_max_and_percentile():
    model = layer()
    calib = [x_outlier_tokens(5)]
    minmax = probe(model, W8A8TensorStatic(), calib)[0]
    pct = probe(model, W8A8TensorStatic(percentile=90.0), calib)[0]  # 6.25% of elements are massive
    assert float(minmax.act_absmax) == pytest.approx(float(calib[0].abs().max()))
    assert float(pct.act_absmax) == pytest.approx(abs_percentile(calib, 90.0))
    assert float(pct.act_absmax) < float(minmax.act_absmax) / 50  # the massive tokens are clipped away
    # per-channel weights (not one weight scale), per-tensor static activations
    assert minmax.w_scale.shape == (N,) and minmax.per_tensor_act and minmax.static_act
    # quantize_ alone builds the min-max probe identically, and refuses the percentile variant
    plain = quantize_(model, W8A8TensorStatic(), layers="all", inplace=False, calibration=calib)[0]
    assert torch.equal(plain.act_absmax, minmax.act_absmax) and torch.equal(plain.qweight, minmax.qweight)
    with pytest.raises(SchemeError, match="quantize_probe"):
        quantize_(model, W8A8TensorStatic(percentile=99.99), layers="all", inplace=False, calibration=calib)
    with pytest.raises(SchemeError, match="calibration"):
        probe(model, W8A8TensorStatic())


@pytest.mark.parametrize("scheme", [W8A8TensorStatic(), W8A8TensorStatic(percentile=99.9), W8A6Token(), W8A8ChannelOracle()],
                         ids=lambda s: f"{s.name}-{getattr(s, 'percentile', '')}")
@pytest.mark.parametrize("data", [x_random, x_outlier_tokens, x_outlier_features])
def test_fast_path_matches_fp64_reference(scheme, data):
    model = layer()
    x = data()
    qm = probe(model, scheme, [x_random(9)])
    fast = qm(x)
    ref = set_backend(probe(model, scheme, [x_random(9)]), "reference")(x)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast.double(), ref.double(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_a6_token_is_an_integer_gemm_of_6_bit_codes():
    model = layer()
    qm = probe(model, W8A6Token())
    lin = qm[0]
    assert isinstance(lin, W8A6TokenLinear) and lin.qweight.dtype == torch.int8
    x = x_random()
    absmax = x.abs().amax(1, keepdim=True)
    codes = torch.round(x * 31 / absmax).clamp(-31, 31).to(torch.int8)
    assert int(codes.abs().max()) == 31
    expected = int_mm_reference(codes, lin.qweight).double() * (absmax.double() / 31) * lin.w_scale.double() + lin.bias.double()
    assert torch.allclose(qm(x).double(), expected, rtol=1e-5, atol=1e-5)
    # six bits lose ~12 dB against eight (2 bits x 6.02 dB), on the same weights
    y = model(x)
    a8 = sqnr(y, quantize_(model, W8A8Vectorwise(), layers="all", inplace=False)(x))
    a6 = sqnr(y, qm(x))
    assert 8 < a8 - a6 < 16


def test_probes_split_token_and_channel_outliers():
    model = layer()
    y_tok, y_feat = model(x_outlier_tokens()), model(x_outlier_features())
    calib = [x_outlier_tokens(7)]
    tensor = probe(model, W8A8TensorStatic(), calib)
    vector = quantize_(model, W8A8Vectorwise(), layers="all", inplace=False)
    oracle = probe(model, W8A8ChannelOracle())
    assert isinstance(oracle[0], ChannelOracleLinear)
    # massive tokens: one static scale for every token ruins the normal ones; per-token scales do not care
    normal = torch.arange(M) % 16 != 0  # the ordinary tokens (the massive ones dominate any overall SQNR)
    y_tv, y_tt = vector(x_outlier_tokens())[normal], tensor(x_outlier_tokens())[normal]
    assert sqnr(y_tok[normal], y_tv) > sqnr(y_tok[normal], y_tt) + 15
    # outlier channels: per-channel scales (the oracle, then bounded by the W8 error) beat per-token scales
    assert sqnr(y_feat, oracle(x_outlier_features())) > sqnr(y_feat, vector(x_outlier_features())) + 6


def test_static_scale_clamps_and_nonfinite_input_is_an_error():
    model = layer()
    qm = probe(model, W8A8TensorStatic(), [x_random() * 0.01])
    y = qm(x_random())  # inputs far beyond the calibrated clip saturate at +-127 codes instead of wrapping
    assert torch.isfinite(y).all()
    bad = x_random()
    bad[3, 7] = float("nan")
    for scheme in (W8A8TensorStatic(), W8A6Token(), W8A8ChannelOracle()):
        with pytest.raises(SchemeError, match="NaN or inf"):
            probe(model, scheme, [x_random()])(bad)
