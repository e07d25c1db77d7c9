"""CUDA INT8 GEMM: `torch._int_mm` behind rayq's zero-padding (M > 16, K and N multiples of 8)
is bit-exact against the int64 CPU reference for shapes that need every kind of padding."""

import json

import pytest
import torch

from rayq.kernels.gemm import int8_mm, int_mm_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (M, K, N): M <= 16 pads rows; K, N off multiples of 8 pad columns; the last one splits K
PADDING_SHAPES = [(1, 3, 5), (16, 8, 8), (17, 16, 8), (5, 13, 11), (40, 1000, 3), (33, 72, 24), (300, 257, 129),
                  (20, 140_000, 16)]


@pytest.mark.parametrize("M,K,N", PADDING_SHAPES)
def test_cuda_int_mm_with_padding_is_exact(M, K, N):
    gen = torch.Generator().manual_seed(M * 7 + K + N)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    a[0, :] = 127  # saturated rows: the largest dot products the int32 accumulator must hold
    w[0, :] = 127
    acc = int8_mm(a.cuda(), w.cuda())
    assert acc.device.type == "cuda" and acc.shape == (M, N)
    assert torch.equal(acc.cpu().long(), int_mm_reference(a, w))


def test_cuda_w8a8_linear_equals_the_reference_backend_at_odd_shapes():
    from rayq.kernels import quantize_, set_backend

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 36), torch.nn.GELU(), torch.nn.Linear(36, 13)).cuda()
    x = torch.randn(3, 7, 100, device="cuda")  # 21 tokens: M > 16, K and N not multiples of 8
    q = quantize_(model, "w8a8-vectorwise", layers="all", inplace=False)
    fast = q(x)
    set_backend(q, "reference")
    torch.testing.assert_close(fast.cpu(), q(x).cpu(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast.cpu(), model(x).detach().cpu())  # it did quantize


def test_bench_int8_on_cuda_prints_one_json(capsys):
    from rayq.kernels import bench

    assert bench.main(["--device", "cuda", "--quick", "--rounds", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cuda" and len(out["linear"]) == len(bench.QUICK_SHAPES)
    assert all(r["w8a8_ms"] > 0 and r["speedup_vs_fp16"] is not None for r in out["linear"])
