"""How much a quantization scheme loses: the paper's metric, its bootstrap CI, KL(FP || Q).

* `degradation(fp, q)`: mean over tasks of (Q - FP) / FP * 100 (Ahmadian et al. 2023, Table A.3
  "Average % Diff"); reproduces that column of the paper from its per-task numbers.
* `paired_bootstrap(...)`: FP and Q are scored on the same items, so items are resampled *together*
  (same indices for both models, independently per task); the spread of the resampled degradation
  is the sampling noise of the task sets, with the shared per-item difficulty cancelled out.
* `kl_agreement(...)`: mean per-token KL(FP || Q) of next-token distributions and top-1
  agreement on held-out tokens. Tokens of one sequence are correlated, so the standard error is
  computed over sequences (a cluster standard error), not over tokens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rayq.eval.scoring import autocast_of, eval_mode, model_device, no_grad_for


def degradation(fp: Mapping[str, float], q: Mapping[str, float], tasks: Optional[Sequence[str]] = None) -> float:
    """Mean over tasks of the relative change (Q - FP) / FP, in percent (negative = Q is worse)."""
    names = list(tasks) if tasks is not None else list(fp)
    if not names:
        raise ValueError("degradation: no tasks")
    missing = [t for t in names if t not in q or t not in fp]
    if missing:
        raise ValueError(f"degradation: no score for {', '.join(missing)}")
    for t in names:
        if fp[t] == 0:
            raise ValueError(f"degradation: FP score of {t} is 0, the relative change is undefined")
    return float(sum((q[t] - fp[t]) / fp[t] * 100.0 for t in names) / len(names))


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    se: float  # bootstrap standard deviation of the estimate
    samples: int  # resamples that were defined (an FP mean of 0 makes one undefined)


def paired_bootstrap(fp_items: Mapping[str, np.ndarray], q_items: Mapping[str, np.ndarray], *,
                     samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile CI of `degradation` under paired resampling of each task's items.

    fp_items[t] and q_items[t] are per-item scores (0/1 for accuracy) of the same items, in order.
    """
    names = list(fp_items)
    for t in names:
        if len(fp_items[t]) != len(q_items[t]):
            raise ValueError(f"paired_bootstrap: task {t} has {len(fp_items[t])} FP items but {len(q_items[t])} Q items")
        if len(fp_items[t]) == 0:
            raise ValueError(f"paired_bootstrap: task {t} has no items")
    estimate = degradation({t: float(np.mean(fp_items[t])) for t in names},
                           {t: float(np.mean(q_items[t])) for t in names})
    rng = np.random.default_rng(seed)
    rel = np.zeros(samples)
    for t in names:
        fp = np.asarray(fp_items[t], dtype=np.float64)
        q = np.asarray(q_items[t], dtype=np.float64)
        n = len(fp)
        # multinomial counts are the same resample as drawing n indices, at O(samples * n) memory anyway
        idx = rng.integers(0, n, size=(samples, n))
        fp_mean, q_mean = fp[idx].mean(1), q[idx].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel += (q_mean - fp_mean) / fp_mean * 100.0
    rel /= len(names)
    rel = rel[np.isfinite(rel)]
    if len(rel) == 0:
        return Interval(estimate, float("nan"), float("nan"), float("nan"), 0)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(rel, [alpha, 1 - alpha])
    return Interval(estimate, float(low), float(high), float(rel.std(ddof=1)) if len(rel) > 1 else 0.0, len(rel))


@dataclass(frozen=True)
class KLStats:
    kl: float  # mean per-token KL(FP || Q), nats
    kl_se: float  # standard error over sequences
    top1_agree: float  # fraction of positions where FP and Q have the same argmax
    top1_agree_se: float
    tokens: int
    sequences: int


def _mean_se(per_seq: np.ndarray) -> tuple[float, float]:
    n = len(per_seq)
    mean = float(per_seq.mean())
    se = float(per_seq.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


def token_kl(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_fp || P_q) per position, in float64 (per-token values near 1e-5 nats would drown in
    float32 rounding of log-probabilities near 0)."""
    lp = F.log_softmax(fp_logits.double(), dim=-1)
    lq = F.log_softmax(q_logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def kl_agreement(fp_model: nn.Module, q_models: Mapping[str, nn.Module], batches: Sequence[torch.Tensor], *,
                 policy: Any = None) -> dict[str, KLStats]:
    """KL(FP || Q) and top-1 agreement for every Q model, one FP forward per batch.

    `batches` are token id tensors (B, T); every position of every sequence is scored.
    """
    if not batches:
        raise ValueError("kl_agreement: no held-out batches")
    autocast = autocast_of(policy)
    kl_seq: dict[str, list] = {k: [] for k in q_models}
    agree_seq: dict[str, list] = {k: [] for k in q_models}
    tokens = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(no_grad_for(model_device(fp_model)))
        stack.enter_context(eval_mode(fp_model))
        for m in q_models.values():
            stack.enter_context(eval_mode(m))
        for x in batches:
            with autocast():
                fp_logits = fp_model(x.to(model_device(fp_model))).float()
            if fp_logits.device.type == "xla":  # float64 KL on the host: TPUs have no fast float64
                fp_logits = fp_logits.cpu()
            tokens += x.numel()
            for name, qm in q_models.items():
                with autocast():
                    q_logits = qm(x.to(model_device(qm))).float().to(fp_logits.device)
                kl_seq[name].append(token_kl(fp_logits, q_logits).mean(-1).cpu().numpy())
                agree = (fp_logits.argmax(-1) == q_logits.argmax(-1)).double().mean(-1)
                agree_seq[name].append(agree.cpu().numpy())
    out = {}
    for name in q_models:
        kl, kl_se = _mean_se(np.concatenate(kl_seq[name]))
        ag, ag_se = _mean_se(np.concatenate(agree_seq[name]))
        out[name] = KLStats(kl, kl_se, ag, ag_se, tokens, int(sum(len(a) for a in kl_seq[name])))
    return out


def token_batches(tokens: Any, n_tokens: int, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Held-out windows of `seq_len` tokens, spread evenly over the stream, ~`n_tokens` in total
    (the same windows at every eval step, so KL is comparable across steps and recipes)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    windows = len(tokens) // seq_len
    if windows < 1:
        raise ValueError(f"need at least seq_len={seq_len} held-out tokens, have {len(tokens)}")
    want = min(windows, max(1, math.ceil(n_tokens / seq_len)))
    starts = (np.arange(want) * windows // want) * seq_len
    w = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len)[None, :]])
    return [w[i:i + batch_size] for i in range(0, want, batch_size)]
