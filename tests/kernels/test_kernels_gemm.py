"""Integer GEMM exactness: every INT32 accumulator path equals an int64 reference bit for bit."""

from __future__ import annotations

import pytest
import torch

from rayq.kernels import MAX_K_S8, MAX_K_U8, gemm, int8_mm, int_mm_reference

SHAPES = [(1, 64, 32), (1, 4096, 8), (3, 7, 5), (17, 33, 9), (16, 100, 24), (64, 257, 31), (128, 512, 256)]


KERNELS = ["s8s8", pytest.param("u8s8", marks=pytest.mark.skipif(not gemm.supports_u8(), reason="this torch's _int_mm has no u8 operand"))]


def _rand(shape, gen, lo=-127, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_int_mm_exact_random(kernel, M, K, N):
    gen = torch.Generator().manual_seed(M * 1000 + K + N)
    a, w = _rand((M, K), gen), _rand((N, K), gen)
    acc = int8_mm(a, w, kernel=kernel)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.to(torch.int64), int_mm_reference(a, w))


@pytest.mark.parametrize("kernel", KERNELS)
def test_int_mm_exact_adversarial(kernel):
    gen = torch.Generator().manual_seed(0)
    M, K, N = 33, 1031, 19  # K not a multiple of 8
    cases = {
        "all -127": (torch.full((M, K), -127, dtype=torch.int8), torch.full((N, K), -127, dtype=torch.int8)),
        "all +-127 mixed": (torch.full((M, K), -127, dtype=torch.int8), torch.full((N, K), 127, dtype=torch.int8)),
        "zero rows": (_rand((M, K), gen).index_fill_(0, torch.tensor([0, 5, 32]), 0), _rand((N, K), gen)),
        "outlier columns": (
            # codes of an activation whose columns 3 and 700 are 100x the rest, after per-row absmax
            gemm.quantize_symmetric(*(lambda x: (x, gemm.absmax_rows(x)))(torch.randn(M, K, generator=gen).index_fill_(1, torch.tensor([3, 700]), 100.0))),
            _rand((N, K), gen),
        ),
        "int8 min -128": (torch.full((M, K), -128, dtype=torch.int8), torch.full((N, K), -128, dtype=torch.int8)),
    }
    for name, (a, w) in cases.items():
        assert torch.equal(int8_mm(a, w, kernel=kernel).to(torch.int64), int_mm_reference(a, w)), name


def test_int_mm_transposed_and_sliced_views():
    gen = torch.Generator().manual_seed(1)
    a = _rand((40, 96), gen)[:, 8:80]  # a column slice (non-contiguous)
    w = _rand((96, 30), gen).t()  # [30, 96] as a transposed view
    w = w[:, 8:80]
    assert torch.equal(int8_mm(a.contiguous(), w.contiguous()).long(), int_mm_reference(a, w))
    assert torch.equal(int8_mm(a, w).long(), int_mm_reference(a, w))


def test_overflow_bound_documented_values():
    assert MAX_K_S8 == 133_144 and 127 * 127 * MAX_K_S8 < 2**31 <= 127 * 127 * (MAX_K_S8 + 1)
    assert MAX_K_U8 == 66_311 and 255 * 127 * MAX_K_U8 < 2**31 <= 255 * 127 * (MAX_K_U8 + 1)
    # int8_mm takes any int8 (-128 too), so it splits a bit earlier than the [-127, 127] bound
    assert 128 * 128 * gemm._SPLIT_K_S8 < 2**31 and 255 * 128 * gemm._SPLIT_K_U8 < 2**31


@pytest.mark.parametrize("kernel", KERNELS)
def test_int_mm_splits_k_beyond_int32_bound(kernel):
    # K past the bound with worst-case codes: the true sums exceed int32, the result must not wrap
    K = MAX_K_S8 + 1000
    a = torch.full((2, K), -127, dtype=torch.int8)
    w = torch.full((3, K), -127, dtype=torch.int8)
    acc = int8_mm(a, w, kernel=kernel)
    assert acc.dtype == torch.int64
    assert torch.equal(acc, int_mm_reference(a, w))
    assert int(acc[0, 0]) == 127 * 127 * K > 2**31


def test_cuda_padding_rules_on_cpu_tensors():
    # the CUDA wrapper's padding (M > 16, K and N multiples of 8) is device-independent: exercise it
    # on CPU, where torch._int_mm accepts the padded operands too
    gen = torch.Generator().manual_seed(2)
    for M, K, N in [(1, 3, 5), (16, 8, 8), (17, 16, 8), (5, 13, 11), (40, 1000, 3)]:
        a, w = _rand((M, K), gen), _rand((N, K), gen)
        acc = gemm._cuda_int_mm(a, w)
        assert acc.shape == (M, N)
        assert torch.equal(acc.long(), int_mm_reference(a, w))


def test_generic_device_fallback_is_exact():
    gen = torch.Generator().manual_seed(3)
    a, w = _rand((9, 77), gen), _rand((6, 77), gen)
    acc = (a.double() @ w.double().t()).long()  # what int8_mm does on a device without an int kernel
    assert torch.equal(acc, int_mm_reference(a, w))


def test_quantize_rows_zero_row_gets_epsilon_not_nan():
    x = torch.randn(4, 16)
    x[1] = 0.0
    absmax = gemm.absmax_rows(x)
    q = gemm.quantize_symmetric(x, absmax)
    assert torch.isfinite(absmax).all() and absmax[1, 0] == gemm.EPS_ABSMAX
    assert (q[1] == 0).all()
    assert q.abs().max() == 127


@pytest.mark.parametrize("K", [1, 2, 7, 64])
def test_int4_pack_roundtrip(K):
    codes = torch.randint(-8, 8, (5, K), dtype=torch.int8)
    packed = gemm.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (K + 1) // 2)
    assert torch.equal(gemm.unpack_int4(packed, K), codes)


@pytest.mark.gpu
def test_cuda_int_mm_exact():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gen = torch.Generator().manual_seed(4)
    for M, K, N in [(1, 64, 32), (17, 100, 24), (256, 4096, 512)]:
        a, w = _rand((M, K), gen), _rand((N, K), gen)
        acc = int8_mm(a.cuda(), w.cuda())
        assert torch.equal(acc.cpu().long(), int_mm_reference(a, w))


@pytest.mark.gpu
def test_cuda_quantized_linear_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from rayq.kernels import quantize_, set_backend

    lin = torch.nn.Sequential(torch.nn.Linear(100, 36)).cuda()
    x = torch.randn(5, 100, device="cuda")
    q = quantize_(lin, "w8a8-vectorwise", layers="all", inplace=False)
    y = q(x).cpu()
    set_backend(q, "reference")
    torch.testing.assert_close(y, q(x).cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.xla
def test_xla_int8_dot_exact():
    pytest.importorskip("torch_xla")
    import torch_xla

    dev = torch_xla.device()
    gen = torch.Generator().manual_seed(5)
    for M, K, N in [(1, 64, 32), (17, 100, 24), (64, 1031, 40)]:
        a, w = _rand((M, K), gen), _rand((N, K), gen)
        acc = int8_mm(a.to(dev), w.to(dev))
        assert acc.dtype in (torch.int32, torch.int64)
        assert torch.equal(acc.cpu().long(), int_mm_reference(a, w))


@pytest.mark.xla
def test_xla_quantized_linear_matches_reference():
    pytest.importorskip("torch_xla")
    import torch_xla

    from rayq.kernels import quantize_, set_backend

    dev = torch_xla.device()
    lin = torch.nn.Sequential(torch.nn.Linear(96, 40))
    x = torch.randn(7, 96)
    q = quantize_(lin, "w8a8-vectorwise", layers="all", inplace=False).to(dev)
    y = q(x.to(dev)).cpu()
    set_backend(q, "reference")
    torch.testing.assert_close(y, q(x.to(dev)).cpu(), rtol=1e-5, atol=1e-5)
