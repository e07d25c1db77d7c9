"""The evaluator's "graph" backend: each quantized copy compiled whole (`rayq.kernels.graph`).

Each quantized layer computes the same bits as eagerly for the same input (tests/kernels/
test_kernels_graph.py); the FP glue between layers (LayerNorm, GELU, attention) is Inductor's code,
whose reductions differ from eager's by ulps, so an activation code can move by one step at a
rounding tie. The tolerance here: the compile's own KL must stay under 1% of the quantization's KL
(measured: 0.03-0.2%), and the top-1 predictions must agree."""

import pytest
import torch

from rayq.errors import UserError
from rayq.eval import evaluate, load_tasks, token_batches
from rayq.eval.degradation import token_kl
from rayq.eval.evaluate import EVAL_BACKENDS, default_quantizer
from rayq.kernels import CompiledQuantized
from rayq.schema import EvalConfig

SCHEME = "w8a8-vectorwise"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Empty Dynamo caches per test: they are process-wide and count towards its recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _kl_batches(gpt, n_tokens=2048):
    return token_batches(gpt.sp.encode(gpt.heldout["toy/heldout"]), n_tokens, gpt.cfg.seq_len, 16)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "autocast-bf16"])
def test_graph_backend_computes_what_the_eager_quantized_model_does(trained_gpt, bf16):
    model = trained_gpt.model
    eager = default_quantizer(backend="eager")(model, SCHEME)
    graph = default_quantizer(backend="graph")(model, SCHEME)
    assert isinstance(graph, CompiledQuantized) and graph.cfg == model.cfg  # what the scorer reads
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x in _kl_batches(trained_gpt):
            fp, e, g = model(x).float(), eager(x).float(), graph(x).float()
            quant_kl, compile_kl = token_kl(fp, e).mean().item(), token_kl(e, g).mean().item()
            assert quant_kl > 0 and compile_kl < 0.01 * quant_kl, (quant_kl, compile_kl)
            assert torch.equal(g.argmax(-1), e.argmax(-1))
    assert graph.failure is None, graph.failure


def test_evaluate_with_the_graph_backend_reports_the_eager_figures(trained_gpt):
    """The whole evaluator through the graph backend (variable-width scoring batches, KL batches):
    the same metric keys, the same accuracies, KL within the compile's tolerance."""
    tasks = load_tasks(["heldout-lambada", "heldout-cloze"], {}, heldout_texts=trained_gpt.heldout, size=32)
    cfg = EvalConfig(schemes=[SCHEME], bootstrap_samples=50, batch_size=16)
    runs = {backend: evaluate(trained_gpt.model, tasks, cfg, tokenizer=trained_gpt.sp, kl_batches=_kl_batches(trained_gpt),
                              quantizer=default_quantizer(backend=backend)).metrics()
            for backend in ("eager", "graph")}
    eager, graph = runs["eager"], runs["graph"]
    assert set(graph) == set(eager)
    for key, value in eager.items():
        if key.endswith(("/acc", "/acc_norm", "/acc_bytes")):
            assert graph[key] == value, key
    kl = f"ptq/{SCHEME}/kl"
    assert graph[kl] == pytest.approx(eager[kl], rel=0.01)
    assert graph[f"ptq/{SCHEME}/top1_agree"] == pytest.approx(eager[f"ptq/{SCHEME}/top1_agree"], abs=1e-3)


def test_unknown_backend_is_a_user_error():
    assert "graph" in EVAL_BACKENDS
    with pytest.raises(UserError, match="unknown backend 'grpah'"):
        default_quantizer(backend="grpah")
