"""A quantized model compiled whole (`rayq.kernels.graph`): no graph break for any CPU form, each
quantized layer bit-identical to its eager self, NaN/inf still a clear error naming the layer."""

from __future__ import annotations

import pytest
import torch

from rayq.kernels import SchemeError, W8A8Linear, backends, compile_quantized, gemm, quantize_
from rayq.kernels.graph import arm, prepare
from rayq.model import BLOCK_LINEARS, GPT
from rayq.schema import ModelConfig

CFG = ModelConfig(vocab_size=64, seq_len=16, n_layer=1, d_model=64, n_head=4)
FORMS = ["s8s8", "u8s8", "onednn", "f32"]
PRECISIONS = [False, True]  # fp32, or under bf16 autocast (a bf16 recipe's evaluation)


def _usable(form: str) -> None:
    why = backends.inexact_reason(form)
    if why:
        pytest.skip(f"{form}: {why}")


@pytest.fixture
def forced():
    """Force the CPU form for the test (the probe's choice differs per machine)."""
    before = gemm.cpu_kernel()
    yield gemm.set_cpu_kernel
    gemm.set_cpu_kernel(before)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts from empty Dynamo caches: they are per code object (`GPT.forward`,
    `Sequential.forward`) and process-wide, so the forms and schemes of earlier tests would add
    up to Dynamo's recompile limit (8), past which a fullgraph compile fails."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bf16", PRECISIONS, ids=["fp32", "autocast-bf16"])
def test_quantized_gpt_traces_as_one_graph(form, bf16, forced):
    """The satisfied brief of issue 13: no graph break anywhere in a quantized GPT's forward once
    its layers are prepared (the probe's lock, the weight-version cache and the finite check
    were the breaks). `torch._dynamo.explain` traces without compiling: fast."""
    _usable(form)
    forced(form)
    q = quantize_(_gpt(), "w8a8-vectorwise", layers=BLOCK_LINEARS, inplace=False)
    x = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    arm(q)
    dtype = torch.bfloat16 if bf16 else torch.float32
    assert set(prepare(q, x.numel(), dtype).values()) == {form}
    with torch.inference_mode(), _autocast(bf16):
        report = torch._dynamo.explain(q)(x)
    assert report.graph_break_count == 0, [b.reason for b in report.break_reasons]
    assert report.graph_count == 1


def _assert_layer_bit_identical(scheme: str, calibrate: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(24, 96)
    x[3] = 0.0  # an all-zero row: epsilon scale, zero codes
    calibration = [x] if calibrate else None
    lin = torch.nn.Sequential(torch.nn.Linear(96, 40))
    eager = quantize_(lin, scheme, layers="all", inplace=False, backend="eager", calibration=calibration)
    graph = compile_quantized(quantize_(lin, scheme, layers="all", inplace=False, calibration=calibration))
    for bf16 in PRECISIONS:
        with torch.inference_mode(), _autocast(bf16):
            want, got = eager(x), graph(x)
        assert got.dtype == want.dtype and torch.equal(got, want), (scheme, bf16, (got.float() - want.float()).abs().max())
    assert graph.failure is None, graph.failure


@pytest.mark.parametrize("form", FORMS)
def test_each_compiled_layer_equals_its_eager_self_bit_for_bit(form, forced):
    """Same input, same bits, in fp32 and with bf16 output: the codes, the exact integer GEMM
    and the dequant in eager's order (bf16 output thanks to `emulate_precision_casts`)."""
    _usable(form)
    forced(form)
    _assert_layer_bit_identical("w8a8-vectorwise", calibrate=False)


@pytest.mark.parametrize("scheme", ["w8a8-tensor-static", "w8a8-smoothquant"])
def test_static_and_smoothed_layers_equal_eager_too(scheme, forced):
    """Clamped codes of a static scale, the smoothing multiply before quantizing: same bits."""
    forced("s8s8")
    _assert_layer_bit_identical(scheme, calibrate=True)


def test_nan_input_raises_after_the_compiled_forward_naming_the_layer(forced):
    """The finite check moved out of the graph: one flag per layer, read after the forward. The
    error is the eager one, for the same layer; a clean call afterwards works (flags reset)."""
    forced("s8s8")
    q = quantize_(_gpt(), "w8a8-vectorwise", layers=BLOCK_LINEARS, inplace=False)
    graph = compile_quantized(q)
    x = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    with torch.inference_mode():
        clean = graph(x)
        with torch.no_grad():
            saved = q.blocks[0].ln_mlp.weight[5].item()
            q.blocks[0].ln_mlp.weight[5] = float("nan")  # NaN reaches mlp.fc_in only
        with pytest.raises(SchemeError, match=r"layer 'blocks\.0\.mlp\.fc_in': input contains NaN or inf") as in_graph:
            graph(x)
        with pytest.raises(SchemeError) as eagerly:
            q(x)
        assert str(in_graph.value) == str(eagerly.value)
        with torch.no_grad():
            q.blocks[0].ln_mlp.weight[5] = saved
        assert torch.equal(graph(x), clean)
    assert graph.failure is None, graph.failure


def test_weights_changed_after_compiling_are_prepared_again(forced):
    """The derived tensors (here the u8 compensation) follow the weight: a layer whose weight
    changed is prepared again before the next compiled call, as the eager cache does."""
    forced("u8s8")
    torch.manual_seed(2)
    lin = torch.nn.Sequential(torch.nn.Linear(32, 8))
    q = quantize_(lin, "w8a8-vectorwise", layers="all", inplace=False)
    graph = compile_quantized(q)
    eager = quantize_(lin, "w8a8-vectorwise", layers="all", inplace=False, backend="eager")
    eager[0].qweight.neg_()
    x = torch.randn(5, 32)
    with torch.inference_mode():
        graph(x)
        layer = q[0]
        assert isinstance(layer, W8A8Linear) and layer.is_prepared(torch.float32)
        layer.qweight.neg_()
        assert not layer.is_prepared(torch.float32)
        got = graph(x)
        assert layer.is_prepared(torch.float32)
        assert torch.equal(got, eager(x))
