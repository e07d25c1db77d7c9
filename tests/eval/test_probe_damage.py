"""Quantizer probes on a model (rayq.eval.probe_damage) and the probe-calibration test: a planted,
function-preserving outlier must leave the FP model unchanged and raise kurtosis and KL(FP||Q)."""

import copy
import itertools

import numpy as np
import pytest
import torch

from rayq.eval import token_batches
from rayq.eval.degradation import token_kl
from rayq.eval.diagnostics import analyze
from rayq.eval.outliers import OutlierCollector
from rayq.eval.probe_damage import (
    DEFAULT_PROBES,
    bootstrap_mean,
    build_probes,
    probe_damage,
)

SCALES = (1.0, 4.0, 16.0, 64.0)
CHANNEL = 5


def _split(gpt):
    """A fixed calibration set and separate held-out sequences (same for every model)."""
    b = token_batches(gpt.sp.encode(gpt.heldout["toy/heldout"]), 24 * gpt.cfg.seq_len, gpt.cfg.seq_len, 8)
    return b[:1], b[1:]


def plant(model, s: float, layer: int = 0, channel: int = CHANNEL):
    """LayerNorm gain and bias of one channel x s, the next linear's input column / s."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        ln, qkv = m.blocks[layer].ln_attn, m.blocks[layer].attn.qkv
        ln.weight[channel] *= s
        ln.bias[channel] *= s
        qkv.weight[:, channel] /= s
    return m


def test_bootstrap_mean_interval():
    v = np.random.default_rng(0).normal(2.0, 1.0, size=400)
    iv = bootstrap_mean(v, samples=500, seed=1)
    assert iv.estimate == pytest.approx(v.mean())
    assert iv.low < iv.estimate < iv.high
    assert iv.se == pytest.approx(v.std(ddof=1) / np.sqrt(len(v)), rel=0.15)  # bootstrap SE ~ analytic SE
    assert bootstrap_mean(v, samples=500, seed=1) == iv  # seeded


def test_probe_damage_on_a_trained_model(trained_gpt):
    calib, held = _split(trained_gpt)
    model = trained_gpt.model
    qmodels = build_probes(model, calib)
    damage = probe_damage(model, held, calib, samples=200, models=qmodels)
    assert set(damage) == set(DEFAULT_PROBES)
    seqs = sum(len(b) for b in held)
    for d in damage.values():
        assert d.sequences == seqs and d.tokens == seqs * trained_gpt.cfg.seq_len
        assert 0 < d.kl.estimate and d.kl.low <= d.kl.estimate <= d.kl.high
        assert d.delta_ce.low <= d.delta_ce.estimate <= d.delta_ce.high
    # KL agrees with a direct computation on the same sequences
    x = torch.cat(held)
    with torch.no_grad():
        direct = float(token_kl(model(x), qmodels["a6-token"](x)).mean())
    assert damage["a6-token"].kl.estimate == pytest.approx(direct, rel=1e-6)
    # coarser activations cost more: A6 per token > A8 per token
    assert damage["a6-token"].kl.estimate > 3 * damage["w8a8-vectorwise"].kl.estimate
    assert damage["a8-tensor-minmax"].scheme == {"name": "w8a8-tensor-static", "percentile": 100.0, "calibration_batches": 8}


def test_probe_calibration_planted_outlier(trained_gpt):
    """Issue 12's probe calibration: s in {1, 4, 16, 64}."""
    calib, held = _split(trained_gpt)
    x = torch.cat(held)
    with torch.no_grad():
        fp_ref = trained_gpt.model(x)
    kurt, kl, kl_low = [], {label: [] for label in DEFAULT_PROBES}, {label: [] for label in DEFAULT_PROBES}
    for s in SCALES:
        model = plant(trained_gpt.model, s)
        collector = OutlierCollector(model)
        with torch.no_grad(), collector.attached():
            fp = model(x)
        # function-preserving: the FP output does not move (float rounding only)
        assert torch.allclose(fp, fp_ref, rtol=0, atol=2e-4 * float(fp_ref.abs().max())), f"s={s}"
        kurt.append(collector.result().sites["blocks.0.attn.qkv"]["kurtosis"])
        for label, d in probe_damage(model, held, calib, samples=50).items():
            kl[label].append(d.kl.estimate)
            kl_low[label].append(d.kl.low)
    assert all(a < b for a, b in itertools.pairwise(kurt)), kurt
    for label in ("a8-tensor-minmax", "a8-tensor-p99.99", "a6-token"):
        assert all(a < b for a, b in zip(kl[label], kl[label][1:])), (label, kl[label])
    # per-token A8: a 4x channel barely exceeds the tokens' own absmax (measured: +7%, inside the
    # CI), so from s = 1 to 4 it must only not fall below the CI; from there on it must rise
    vw = kl["w8a8-vectorwise"]
    assert vw[1] > kl_low["w8a8-vectorwise"][0] and vw[1] < vw[2] < vw[3], vw
    # at s = 64 the per-tensor and per-token probes are hurt far more than at s = 1 ...
    assert kl["a8-tensor-minmax"][-1] > 100 * kl["a8-tensor-minmax"][0]
    assert vw[-1] > 30 * vw[0]
    # ... while the per-channel oracle, which a channel outlier cannot hurt, barely moves (its rest
    # at s = 64 is the W8 error of the shrunken weight column)
    oracle = kl["a8-channel-oracle"]
    assert oracle[-1] < 10 * oracle[0] and oracle[-1] < vw[-1] / 5, oracle


def test_analyze_reports_probes_with_cis(trained_gpt):
    calib, held = _split(trained_gpt)
    d = analyze(trained_gpt.model, held[:2], calibration=calib, bootstrap_samples=50)
    s = d.summary()
    for label in DEFAULT_PROBES:
        for stat in ("kl", "kl_ci_low", "kl_ci_high", "delta_ce", "delta_ce_ci_low", "delta_ce_ci_high"):
            assert f"diag/probe/{label}/{stat}" in s
        assert s[f"diag/probe/{label}/kl_ci_low"] <= s[f"diag/probe/{label}/kl"] <= s[f"diag/probe/{label}/kl_ci_high"]
    rep = d.report()
    assert rep["probes"]["a6-token"]["kl"]["estimate"] == s["diag/probe/a6-token/kl"]
