"""What each quantizer probe costs on the same held-out tokens: KL(FP || Q) and delta CE, with CIs.

Probes (`rayq.kernels.probes`) beside the paper's vector-wise W8A8, under stable labels:

    w8a8-vectorwise      per-token A8 x per-channel W8 (the paper's)
    a8-tensor-minmax     per-tensor static A8, max |x| on the calibration tokens, x per-channel W8
    a8-tensor-p99.99     the same with the 99.99th percentile of |x| (the rest is clipped)
    a6-token             per-token A6 x per-channel W8
    a8-channel-oracle    per-input-channel A8 with the batch's own scales (simulated oracle)

Damage split (proxy-regime note): per-tensor minus per-token ~ the token-wise (massive
activation) part; per-token minus the channel oracle ~ the channel (outlier feature) part.

Every model is scored on the same held-out sequences. Tokens of one sequence are correlated, so
the unit of resampling is the sequence: per-sequence mean KL and per-sequence CE difference
(Q minus FP, paired by construction) are bootstrapped with the same resample indices for every
probe (seeded), giving percentile CIs as `rayq.eval.degradation.Interval`s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayq.eval.degradation import Interval
from rayq.eval.scoring import autocast_of, eval_mode, model_device, no_grad_for
from rayq.model import BLOCK_LINEARS

# label -> (scheme name, fields); the labels name the metrics
DEFAULT_PROBES: dict[str, tuple[str, dict]] = {
    "w8a8-vectorwise": ("w8a8-vectorwise", {}),
    "a8-tensor-minmax": ("w8a8-tensor-static", {"percentile": 100.0}),
    "a8-tensor-p99.99": ("w8a8-tensor-static", {"percentile": 99.99}),
    "a6-token": ("w8a6-token", {}),
    "a8-channel-oracle": ("w8a8-channel-oracle", {}),
}


def bootstrap_mean(per_seq: np.ndarray, *, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile CI of the mean of `per_seq` under resampling of sequences (seeded: every probe
    gets the same resample indices for the same number of sequences)."""
    v = np.asarray(per_seq, dtype=np.float64)
    if len(v) == 0:
        raise ValueError("bootstrap_mean: no sequences")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(samples, len(v)))].mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(float(v.mean()), float(low), float(high), float(means.std(ddof=1)) if samples > 1 else 0.0, samples)


@dataclass(frozen=True)
class ProbeDamage:
    scheme: dict  # the probe's scheme as recorded (`Scheme.to_dict()`)
    kl: Interval  # mean per-token KL(FP || Q), nats
    delta_ce: Interval  # CE(Q) - CE(FP) on the next held-out token, nats/token
    sequences: int
    tokens: int  # scored positions


def _sequence_nll(log_probs: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """Mean next-token negative log-likelihood per sequence (positions 0..T-2 predict 1..T-1)."""
    nll = -log_probs[:, :-1].gather(-1, x[:, 1:, None].to(log_probs.device)).squeeze(-1)
    return nll.mean(-1).cpu().numpy()


def build_probes(model: nn.Module, calibration: Sequence[torch.Tensor], probes: Mapping[str, tuple[str, dict]] = DEFAULT_PROBES,
                 *, backend: str = "auto") -> dict[str, nn.Module]:
    """A quantized copy of `model` per probe label; the static probes share one calibration pass
    over `calibration` (the fixed token set)."""
    from rayq.kernels import scheme_from_name
    from rayq.kernels.probes import (
        W8A8TensorStatic,
        calibrate_clips,
        probe_layers,
        quantize_probe,
    )

    dev = model_device(model)
    calib = [b.to(dev) for b in calibration]
    schemes = {label: scheme_from_name(name, **fields) for label, (name, fields) in probes.items()}
    static = [s for s in schemes.values() if isinstance(s, W8A8TensorStatic)]
    clips = {}
    if static:
        clips = calibrate_clips(model, probe_layers(model, BLOCK_LINEARS), calib, sorted({s.percentile for s in static}),
                                max(s.calibration_batches for s in static))
    # the block linears, as the evaluator quantizes them: embeddings and the LM head stay FP
    return {label: quantize_probe(model, s, calibration=calib, backend=backend, layers=BLOCK_LINEARS,
                                  clips=clips.get(getattr(s, "percentile", None))).eval()
            for label, s in schemes.items()}


def probe_damage(model: nn.Module, batches: Sequence[torch.Tensor], calibration: Sequence[torch.Tensor], *,
                 probes: Mapping[str, tuple[str, dict]] = DEFAULT_PROBES, policy: Any = None, samples: int = 1000,
                 confidence: float = 0.95, seed: int = 0, backend: str = "auto",
                 models: Mapping[str, nn.Module] | None = None) -> dict[str, ProbeDamage]:
    """KL(FP || Q) and delta CE per probe on `batches` (token ids (B, T)), bootstrap CIs over sequences.

    `calibration`: the fixed token set of the static probes (keep it apart from `batches`).
    `models`: already quantized copies by label (else built here with `build_probes`)."""
    if not batches:
        raise ValueError("probe_damage: no held-out batches")
    qmodels = dict(models) if models is not None else build_probes(model, calibration, probes, backend=backend)
    autocast = autocast_of(policy)
    dev = model_device(model)
    kl: dict[str, list] = {k: [] for k in qmodels}
    dce: dict[str, list] = {k: [] for k in qmodels}
    tokens = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(no_grad_for(dev))
        for m in (model, *qmodels.values()):
            stack.enter_context(eval_mode(m))
        for x in batches:
            x = x.to(dev)
            with autocast():
                fp_logits = model(x).float()
            if fp_logits.device.type == "xla":  # float64 on the host: TPUs have no fast float64
                fp_logits = fp_logits.cpu()
            # float64 log-probabilities (per-token KL near 1e-5 nats drowns in float32 rounding),
            # the FP side computed once per batch for every probe
            lp = F.log_softmax(fp_logits.double(), dim=-1)
            p = lp.exp()
            fp_nll = _sequence_nll(lp, x)
            tokens += x.numel()
            for label, qm in qmodels.items():
                with autocast():
                    lq = F.log_softmax(qm(x).float().to(lp.device).double(), dim=-1)
                kl[label].append((p * (lp - lq)).sum(-1).clamp_min(0.0).mean(-1).cpu().numpy())  # = degradation.token_kl
                dce[label].append(_sequence_nll(lq, x) - fp_nll)
    out = {}
    for label, qm in qmodels.items():
        k, d = np.concatenate(kl[label]), np.concatenate(dce[label])
        scheme = next((m.scheme.to_dict() for m in qm.modules() if hasattr(m, "scheme")), {"name": label})
        out[label] = ProbeDamage(scheme, bootstrap_mean(k, samples=samples, confidence=confidence, seed=seed),
                                 bootstrap_mean(d, samples=samples, confidence=confidence, seed=seed), len(k), tokens)
    return out

