import copy
import json

import pytest
import torch

from rayq.eval import analyze, quant_dequant_rows, spectral_norm, token_batches


@pytest.mark.parametrize("shape", [(64, 64), (192, 64), (64, 256), (7, 3)])
def test_spectral_norm_matches_linalg(shape):
    torch.manual_seed(sum(shape))
    w = torch.randn(*shape)
    assert spectral_norm(w) == pytest.approx(float(torch.linalg.matrix_norm(w.double(), ord=2)), rel=1e-6)


def test_spectral_norm_of_trained_weights_and_zero(trained_gpt):
    for name, mod in trained_gpt.model.named_modules():
        if name.endswith("mlp.fc_out"):
            expected = float(torch.linalg.matrix_norm(mod.weight.detach().double(), ord=2))
            assert spectral_norm(mod.weight) == pytest.approx(expected, rel=1e-6)
    assert spectral_norm(torch.zeros(4, 3)) == 0.0


def test_quant_dequant_rows_is_vectorwise_absmax_int8():
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [127.0, 1.0, -0.3]])
    y = quant_dequant_rows(x)
    assert torch.equal(y[0], torch.round(x[0] / (1 / 127)) * (1 / 127))  # scale = absmax / 127
    assert torch.equal(y[1], torch.zeros(3))  # all-zero row: epsilon scale, no NaN
    assert torch.equal(y[2], torch.tensor([127.0, 1.0, -0.0]))  # scale 1: -0.3 rounds to 0
    assert (x - y).abs().max() <= x.abs().amax(-1).max() / 127 / 2 + 1e-6


def _batches(gpt, n=256):
    return token_batches(gpt.sp.encode(gpt.heldout["toy/heldout"]), n, gpt.cfg.seq_len, 4)


def test_analyze_fields_and_no_outliers_at_small_scale(trained_gpt):
    d = analyze(trained_gpt.model, _batches(trained_gpt))
    L = trained_gpt.cfg.n_layer
    assert d.n_layer == L and d.tokens == 256
    assert len(d.qkv_input_rmse) == L and all(0 < r < 0.1 for r in d.qkv_input_rmse)
    assert set(d.act_std) == {"attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out"}
    assert set(d.ln_gain_std) == {f"blocks.{i}.{k}" for i in range(L) for k in ("ln_attn", "ln_mlp")} | {"ln_f"}
    assert len(d.spectral_norm) == 4 * L
    assert d.outliers.dims == [] and len(d.outliers.layer_frac) == trained_gpt.cfg.d_model
    assert set(d.weight_hist) == {f"layer {i}" for i in range(L)}
    assert sum(d.ln_gain_hist["ln_f"]["counts"]) == trained_gpt.cfg.d_model
    json.dumps(d.to_dict())  # JSON-ready
    s = d.summary()
    assert s["diag/outlier_dims"] == 0.0 and all(isinstance(v, float) for v in s.values())


def test_planted_outlier_dimension_is_found_by_both_rules(trained_gpt):
    model = copy.deepcopy(trained_gpt.model)
    with torch.no_grad():  # a huge LayerNorm gain on feature 5 of every block: Dettmers' outlier feature
        for name, mod in model.named_modules():
            if name.endswith(("ln_attn", "ln_mlp")):
                mod.weight[5] = 40.0
                mod.bias[5] = 8.0
    d = analyze(model, _batches(trained_gpt))
    assert d.outliers.dims == [5] and d.outliers.layer_frac[5] == 1.0
    assert 5 in d.outliers_z.dims
    assert d.max_abs_act["attn.qkv"][0] > 6
    # the INT8 error at the qkv input grows with the outlier (the paper's mechanism)
    base = analyze(trained_gpt.model, _batches(trained_gpt))
    assert min(d.qkv_input_rmse) > 5 * max(base.qkv_input_rmse)
    # a higher threshold or a stricter layer fraction rule it out
    assert analyze(model, _batches(trained_gpt), threshold=1000.0).outliers.dims == []


def test_z_rule_finds_outliers_below_the_absolute_threshold(trained_gpt):
    model = copy.deepcopy(trained_gpt.model)
    with torch.no_grad():  # feature 9 large relative to the rest, but nowhere near |x| = 6
        for name, mod in model.named_modules():
            if name.endswith(("ln_attn", "ln_mlp")):
                mod.weight.mul_(0.05)
                mod.bias.mul_(0.05)
                mod.weight[9] = 2.0
                mod.bias[9] = 1.5
    d = analyze(model, _batches(trained_gpt), z=4.0)
    assert d.outliers.dims == [] and 9 in d.outliers_z.dims
