"""Why a model is (or is not) easy to quantize: the weight and activation diagnostics of paper §5.

Per layer, on a few held-out batches of the FP model:
* RMSE(X, X_hat) of the input X of `attn.qkv`, X_hat = INT8 vector-wise (per-token absmax)
  quantize-dequantize: what W8A8 does to that input;
* mean per-token activation STD (std over features, averaged over tokens) at each linear's input;
* LayerNorm gain STD (a wide spread of gains is what amplifies some features);
* spectral norm of each linear weight (power iteration in float64);
* outlier dimensions by the Dettmers rule: a feature is an outlier where |x| >= threshold (6) at
  >= 6% of the tokens, in >= 25% of the sites (inputs of attn.qkv and mlp.fc_in, i.e. the
  LayerNorm outputs Dettmers tracked); the z-score variant replaces the absolute threshold by
  |x - mean| / std >= z (6) per site and batch, so it still works at scales where nothing reaches 6;
* weight and LayerNorm-gain histograms;
* the outlier diagnostics of `rayq.eval.outliers` (per-site kurtosis, max/median, crest factor,
  attention sinks, first-token residual norm, LayerNorm gain max/median), in the same forward pass;
* the quantizer probes' KL(FP || Q) and delta CE with bootstrap CIs (`rayq.eval.probe_damage`).

Statistics are accumulated batch by batch (no activation is kept), so this runs on big models.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from rayq import metrics
from rayq.eval.outliers import OutlierCollector, OutlierDiagnostics, metric_name
from rayq.eval.probe_damage import DEFAULT_PROBES, ProbeDamage, probe_damage
from rayq.eval.scoring import autocast_of, eval_mode, model_device, no_grad_for
from rayq.model import BLOCK_LINEARS

SITES = BLOCK_LINEARS  # the model's stable block-linear names
_LINEAR = re.compile(r"^blocks\.(\d+)\.(" + "|".join(map(re.escape, SITES)) + r")$")
_LAYERNORM = re.compile(r"^(blocks\.(\d+)\.(ln_attn|ln_mlp)|ln_f)$")
OUTLIER_SITES = ("attn.qkv", "mlp.fc_in")  # LayerNorm outputs, where Dettmers found the outlier features
HIST_BINS = 60


def spectral_norm(weight: torch.Tensor, *, iters: int = 500, tol: float = 1e-10, seed: int = 0) -> float:
    """Largest singular value by power iteration on W^T W (float64, deterministic start)."""
    w = weight.detach().double().cpu()
    if w.dim() != 2:
        w = w.reshape(w.shape[0], -1)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(w.shape[1], generator=gen, dtype=torch.float64)
    v /= v.norm()
    sigma = 0.0
    for _ in range(iters):
        u = w @ v
        un = u.norm()
        if un == 0:
            return 0.0
        v_new = w.T @ (u / un)
        new_sigma = float(v_new.norm())  # = ||W^T u|| -> sigma_max as v converges
        v = v_new / new_sigma
        if abs(new_sigma - sigma) <= tol * new_sigma:
            return new_sigma
        sigma = new_sigma
    return sigma


def quant_dequant_rows(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric absmax quantize-dequantize per row (token) — W8A8 vector-wise's activation side.
    All-zero rows get an epsilon scale instead of a NaN."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    return (x / scale).round().clamp(-qmax, qmax) * scale


def histogram(values: torch.Tensor, bins: int = HIST_BINS) -> dict:
    v = values.detach().float().cpu().flatten()
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    return {"edges": np.linspace(lo, hi, bins + 1).tolist(), "counts": counts.long().tolist()}


@dataclass
class OutlierReport:
    rule: str  # "abs" or "zscore"
    threshold: float
    min_layer_frac: float
    min_token_frac: float
    dims: list[int]  # outlier feature dimensions
    layer_frac: list[float]  # per dimension: fraction of sites where it is affected


@dataclass
class Diagnostics:
    n_layer: int
    tokens: int
    qkv_input_rmse: list[float]  # per layer
    act_std: dict[str, list[float]]  # site -> per layer mean per-token std of the linear's input
    max_abs_act: dict[str, list[float]]  # site -> per layer max |x|
    dim_max_abs: list[list[float]]  # per layer: max |x| per feature at the qkv input (outlier picture)
    ln_gain_std: dict[str, float]  # LayerNorm name -> std of its gain
    spectral_norm: dict[str, float]  # linear name -> largest singular value
    outliers: OutlierReport
    outliers_z: OutlierReport
    weight_hist: dict[str, dict] = field(repr=False)  # "layer i" -> histogram of its block linear weights
    ln_gain_hist: dict[str, dict] = field(repr=False)  # LayerNorm name -> histogram of its gain
    outlier_stats: OutlierDiagnostics | None = None  # per-site / per-block outlier statistics
    probes: dict[str, ProbeDamage] | None = None  # probe label -> KL and delta CE with CIs

    def summary(self) -> dict[str, float]:
        """Flat `diag/...` scalars for the metric stream."""
        sn = list(self.spectral_norm.values())
        ln = list(self.ln_gain_std.values())
        return {
            metrics.diag("qkv_rmse_mean"): float(np.mean(self.qkv_input_rmse)),
            metrics.diag("qkv_rmse_max"): float(np.max(self.qkv_input_rmse)),
            metrics.diag("act_std_mean"): float(np.mean(self.act_std["attn.qkv"])),
            metrics.diag("max_abs_act"): float(max(max(v) for v in self.max_abs_act.values())),
            metrics.diag("ln_gain_std_mean"): float(np.mean(ln)),
            metrics.diag("ln_gain_std_max"): float(np.max(ln)),
            metrics.diag("spectral_norm_mean"): float(np.mean(sn)),
            metrics.diag("spectral_norm_max"): float(np.max(sn)),
            metrics.diag("outlier_dims"): float(len(self.outliers.dims)),
            metrics.diag("outlier_dims_z"): float(len(self.outliers_z.dims)),
            **(self.outlier_stats.metrics() if self.outlier_stats is not None else {}),
            **probe_metrics(self.probes or {}),
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> dict:
        """The `diagnostics` document of `rayq eval --diagnostics --json`: flat `summary` metrics,
        then `sites.<linear name>.<stat>`, `blocks`, `layernorms`, `maxima` and `probes`."""
        o = self.outlier_stats
        return {
            "summary": self.summary(),
            "tokens": self.tokens,
            "sites": o.sites if o else {},
            "blocks": o.blocks if o else {},
            "layernorms": o.layernorms if o else {},
            "maxima": o.maxima if o else {},
            "sink_threshold": o.sink_threshold if o else None,
            "probes": {label: asdict(d) for label, d in (self.probes or {}).items()},
            "outlier_dims": self.outliers.dims,
            "outlier_dims_z": self.outliers_z.dims,
        }


def probe_metrics(probes: Mapping[str, ProbeDamage]) -> dict[str, float]:
    """`diag/probe/<label>/{kl,delta_ce}` with `_ci_low` / `_ci_high`."""
    out = {}
    for label, d in probes.items():
        for stat, iv in (("kl", d.kl), ("delta_ce", d.delta_ce)):
            out[metric_name(f"probe/{label}", stat)] = iv.estimate
            out[metric_name(f"probe/{label}", f"{stat}_ci_low")] = iv.low
            out[metric_name(f"probe/{label}", f"{stat}_ci_high")] = iv.high
    return out


class _SiteStats:
    """Streaming statistics of one linear's input."""

    def __init__(self, width: int, threshold: float, z: float):
        self.threshold, self.z = threshold, z
        self.tokens = 0
        self.sq_err = 0.0  # sum of (x - x_hat)^2
        self.elements = 0
        self.std_sum = 0.0
        self.max_abs = 0.0
        self.dim_max = torch.zeros(width, dtype=torch.float64)
        self.abs_hits = torch.zeros(width, dtype=torch.float64)  # tokens with |x_d| >= threshold
        self.z_hits = torch.zeros(width, dtype=torch.float64)

    def update(self, x: torch.Tensor, with_rmse: bool) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])  # (tokens, features)
        self.tokens += x.shape[0]
        if with_rmse:
            self.sq_err += float(((x - quant_dequant_rows(x)) ** 2).double().sum())
            self.elements += x.numel()
        self.std_sum += float(x.std(dim=-1).double().sum()) if x.shape[-1] > 1 else 0.0
        ax = x.abs()
        self.max_abs = max(self.max_abs, float(ax.max()))
        self.dim_max = torch.maximum(self.dim_max, ax.amax(0).double().cpu())
        self.abs_hits += (ax >= self.threshold).double().sum(0).cpu()
        zs = (x - x.mean()) / x.std().clamp_min(1e-12)
        self.z_hits += (zs.abs() >= self.z).double().sum(0).cpu()


def _outliers(stats: Sequence[_SiteStats], attr: str, rule: str, threshold: float, layer_frac: float,
              token_frac: float) -> OutlierReport:
    hits = torch.stack([getattr(s, attr) / max(1, s.tokens) for s in stats])  # (sites, features)
    affected = (hits >= token_frac).double().mean(0)  # fraction of sites where >= token_frac of tokens hit
    dims = torch.nonzero(affected >= layer_frac).flatten().tolist()
    return OutlierReport(rule, threshold, layer_frac, token_frac, dims, affected.tolist())


def analyze(model: nn.Module, batches: Sequence[torch.Tensor], *, threshold: float = 6.0, z: float = 6.0,
            layer_frac: float = 0.25, token_frac: float = 0.06, policy: Any = None,
            spectral_iters: int = 500, probes: Mapping[str, tuple[str, dict]] | None = DEFAULT_PROBES,
            calibration: Sequence[torch.Tensor] | None = None, bootstrap_samples: int = 1000) -> Diagnostics:
    """Run the diagnostics of the module docstring on `batches` (token id tensors (B, T)).

    `probes`: label -> (scheme name, fields) of `rayq.eval.probe_damage` (None or {} to skip).
    Their static scales are calibrated on `calibration`; without it, on the first batch, and the
    probes are then scored on the other batches (all of them if there is only one).
    """
    linears = {}
    for name, mod in model.named_modules():
        if (m := _LINEAR.match(name)) and hasattr(mod, "weight"):
            linears[name] = (int(m.group(1)), m.group(2), mod)
    if not linears:
        raise ValueError("diagnostics: the model has no blocks.{i}.attn.qkv|attn.out|mlp.fc_in|mlp.fc_out linears")
    n_layer = 1 + max(i for i, _, _ in linears.values())
    stats: dict[tuple[int, str], _SiteStats] = {}
    handles = []

    def hook_for(layer: int, site: str):
        def hook(mod, args):
            x = args[0]
            key = (layer, site)
            if key not in stats:
                stats[key] = _SiteStats(x.shape[-1], threshold, z)
            stats[key].update(x, with_rmse=site == "attn.qkv")
        return hook

    for name, (layer, site, mod) in linears.items():
        handles.append(mod.register_forward_pre_hook(hook_for(layer, site)))
    autocast = autocast_of(policy)
    tokens = 0
    collector = OutlierCollector(model)
    try:
        with no_grad_for(model_device(model)), eval_mode(model), collector.attached():
            for x in batches:
                with autocast():
                    model(x.to(model_device(model)))
                tokens += x.numel()
    finally:
        for h in handles:
            h.remove()
    if not stats:
        raise ValueError("diagnostics: no batches were run")

    layers = range(n_layer)
    site_list = [s for s in SITES if (0, s) in stats]
    qkv = [stats[(i, "attn.qkv")] for i in layers]
    outlier_stats = [stats[(i, s)] for i in layers for s in OUTLIER_SITES if (i, s) in stats]
    weights = {}
    for name, (layer, _, mod) in linears.items():
        weights.setdefault(layer, []).append(mod.weight.detach().flatten())
    ln_gains = {n: m.weight.detach() for n, m in model.named_modules()
                if _LAYERNORM.match(n) and getattr(m, "weight", None) is not None}
    return Diagnostics(
        n_layer=n_layer,
        tokens=tokens,
        qkv_input_rmse=[math.sqrt(s.sq_err / max(1, s.elements)) for s in qkv],
        act_std={site: [stats[(i, site)].std_sum / max(1, stats[(i, site)].tokens) for i in layers] for site in site_list},
        max_abs_act={site: [stats[(i, site)].max_abs for i in layers] for site in site_list},
        dim_max_abs=[s.dim_max.tolist() for s in qkv],
        ln_gain_std={n: float(g.float().std()) for n, g in ln_gains.items()},
        spectral_norm={n: spectral_norm(mod.weight, iters=spectral_iters) for n, (_, _, mod) in linears.items()},
        outliers=_outliers(outlier_stats, "abs_hits", "abs", threshold, layer_frac, token_frac),
        outliers_z=_outliers(outlier_stats, "z_hits", "zscore", z, layer_frac, token_frac),
        weight_hist={f"layer {i}": histogram(torch.cat(weights[i])) for i in sorted(weights)},
        ln_gain_hist={n: histogram(g) for n, g in ln_gains.items()},
        outlier_stats=collector.result(),
        probes=_probes(model, batches, probes, calibration, policy, bootstrap_samples) if probes else None,
    )


def _probes(model: nn.Module, batches: Sequence[torch.Tensor], probes: Mapping[str, tuple[str, dict]],
            calibration: Sequence[torch.Tensor] | None, policy: Any, samples: int) -> dict[str, ProbeDamage]:
    if calibration is None:
        calibration, batches = batches[:1], (batches[1:] if len(batches) > 1 else batches)
    return probe_damage(model, batches, calibration, probes=probes, policy=policy, samples=samples)
