"""Outlier diagnostics (rayq.eval.outliers): each statistic against an independent computation,
the position-0 split, the dead-unit guard, attention sinks, and the metric names."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayq.eval import token_batches
from rayq.eval.diagnostics import analyze
from rayq.eval.outliers import (
    SINK_THRESHOLD,
    OutlierCollector,
    input_stats,
    kurtosis,
    metric_name,
)


def _batches(gpt, n=256):
    return token_batches(gpt.sp.encode(gpt.heldout["toy/heldout"]), n, gpt.cfg.seq_len, 4)


def _collect(model, batches):
    collector = OutlierCollector(model)
    with torch.no_grad(), collector.attached():
        for x in batches:
            model(x)
    return collector.result()


def test_kurtosis_matches_numpy_moments():
    v = np.array([1.0, 1.0, 1.0, 1.0, 10.0, 2.0, 0.5])
    d = v - v.mean()
    assert kurtosis(torch.tensor(v)) == pytest.approx((d**4).mean() / (d**2).mean() ** 2)
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert kurtosis(g) == pytest.approx(3.0, abs=0.05)  # non-excess: a Gaussian is 3
    assert math.isnan(kurtosis(torch.ones(5)))


def test_input_stats_against_direct_computation():
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(1))
    x[:, 0, 2] = 40.0  # a massive activation at position 0 only
    s = input_stats(x)
    flat, rest = x.reshape(-1, 16), x[:, 1:].reshape(-1, 16)
    for sub, sfx in ((flat, ""), (rest, "_nopos0")):
        rms = sub.double().square().mean(0).sqrt()
        ratio = sub.abs().amax(1) / sub.abs().median(1).values
        assert s["kurtosis" + sfx] == pytest.approx(kurtosis(rms))
        assert s["max_median" + sfx] == pytest.approx(float(ratio.max()), rel=1e-6)
        assert s["max_median_mean" + sfx] == pytest.approx(float(ratio.double().mean()), rel=1e-6)
        assert s["crest" + sfx] == pytest.approx(float(sub.abs().max() / sub.double().square().mean().sqrt()), rel=1e-6)
    assert s["max_median"] > 5 * s["max_median_nopos0"] and s["crest"] > 3 * s["crest_nopos0"]
    assert s["kurtosis"] > s["kurtosis_nopos0"]


def test_dead_units_do_not_make_infinite_ratios():
    x = torch.randn(2, 8, 10, generator=torch.Generator().manual_seed(2)).relu()
    x[:, :, :6] = 0.0  # six of ten units dead: every token's median |x| is 0
    x[0, 3, 6:] = 1.0 + torch.arange(4.0)  # ...except none: still 6 zeros of 10
    s = input_stats(x)
    assert s["zero_median_frac"] == 1.0 and math.isnan(s["max_median"]) and math.isfinite(s["crest"])
    x[1, 5, :] = 1.0 + torch.arange(10.0)  # one token with all units alive
    s = input_stats(x)
    assert s["zero_median_frac"] == pytest.approx(15 / 16)
    assert s["max_median"] == pytest.approx(10.0 / 5.0)  # lower median of 1..10 is 5


def test_attention_to_position_0_matches_an_explicit_softmax(trained_gpt):
    model = trained_gpt.model
    x = _batches(trained_gpt)[0]
    out = _collect(model, [x])
    blk = model.blocks[0]
    with torch.no_grad():
        h = model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1]))
        qkv = blk.attn.qkv(blk.ln_attn(h))
    B, T, C3 = qkv.shape
    H = blk.attn.n_head
    q, k, _ = (t.view(B, T, H, -1).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = F.softmax(scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), dim=-1)
    expected = p[:, :, 1:, 0].mean((0, 2))
    got = out.blocks["blocks.0"]["head_attention_to_pos0"]
    assert got == pytest.approx(expected.tolist(), rel=1e-4)
    assert out.blocks["blocks.0"]["sink_rate"] == pytest.approx(float((expected > SINK_THRESHOLD).double().mean()))
    # first-token residual norm over the median token norm, averaged over sequences
    with torch.no_grad():
        r = blk(h).norm(dim=-1)
    assert out.blocks["blocks.0"]["bos_norm_ratio"] == pytest.approx(float((r[:, 0] / r.median(1).values).mean()), rel=1e-5)


def test_planted_massive_first_token_and_gain_outlier(trained_gpt):
    base = _collect(trained_gpt.model, _batches(trained_gpt))
    model = copy.deepcopy(trained_gpt.model)
    with torch.no_grad():
        model.pos_emb.weight[0, 7] += 200.0  # a massive activation on position 0, one channel
        model.blocks[1].ln_mlp.weight.fill_(1.0)
        model.blocks[1].ln_mlp.weight[3] = 12.0
    d = _collect(model, _batches(trained_gpt))
    qkv = d.sites["blocks.0.attn.qkv"]
    assert d.blocks["blocks.0"]["bos_norm_ratio"] > 10 * base.blocks["blocks.0"]["bos_norm_ratio"]
    assert qkv["max_median"] > 5 * qkv["max_median_nopos0"]  # position 0 carries it ...
    assert qkv["max_median_nopos0"] == pytest.approx(base.sites["blocks.0.attn.qkv"]["max_median_nopos0"], rel=0.05)
    assert d.layernorms["blocks.1.ln_mlp"]["gain_max_median"] == pytest.approx(12.0)
    assert d.maxima["gain_max_median"] >= 12.0


def test_metric_names_and_analyze_integration(trained_gpt):
    d = analyze(trained_gpt.model, _batches(trained_gpt), probes=None)
    s = d.summary()
    L = trained_gpt.cfg.n_layer
    for i in range(L):
        for site in ("attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out"):
            for stat in ("kurtosis", "kurtosis_nopos0", "max_median", "crest_nopos0", "zero_median_frac"):
                assert metric_name(f"blocks.{i}.{site}", stat) in s
        assert {f"diag/blocks.{i}/sink_rate", f"diag/blocks.{i}/bos_norm_ratio", f"diag/blocks.{i}.ln_attn/gain_max_median"} <= set(s)
    assert {"diag/max/kurtosis", "diag/max/sink_rate", "diag/ln_f/gain_max_median"} <= set(s)
    assert all(isinstance(v, float) for v in s.values())
    assert not any(k.startswith("diag/probe/") for k in s)
    rep = d.report()
    assert set(rep["sites"]["blocks.0.attn.qkv"]) >= {"kurtosis", "kurtosis_nopos0", "crest", "max_median_mean"}
    assert len(rep["blocks"]["blocks.0"]["head_attention_to_pos0"]) == trained_gpt.cfg.n_head
