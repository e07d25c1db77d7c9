"""Outlier diagnostics of the FP model, cheap enough for every eval step of a search.

Per block linear input (`blocks.{i}.attn.qkv`, `attn.out`, `mlp.fc_in`, `mlp.fc_out`), each over
all tokens and again without position 0 (suffix `_nopos0`; the first position carries the
massive activation / attention sink when there is one):
* `kurtosis`: kurtosis (non-excess; 3 for a Gaussian) over channels of the per-channel RMS of the
  input (He et al. 2024): a few channels far louder than the rest -> large;
* `max_median` / `max_median_mean`: per token max|x| / median|x|, the largest over tokens and the
  mean over tokens. A token whose median |x| is 0 (dead GELU units feeding `mlp.fc_out`) has no
  ratio: it is left out and counted in `zero_median_frac` instead of producing inf;
* `crest`: max|x| / rms(x) over the whole tensor (per-tensor 8-bit SQNR ~ 52.9 dB - 20 log10 crest).
Per block (`blocks.{i}`): `sink_rate`, the fraction of heads whose mean attention to position 0
(over query positions 1..T-1, recomputed from the qkv output with the model's causal SDPA) exceeds SINK_THRESHOLD, and
`bos_norm_ratio`, the first token's residual norm (block output) over the sequence's median token
norm, averaged over sequences. Per LayerNorm: `gain_max_median`, max|g| / median|g|.
`max/<stat>` is the largest value over the model's sites (or blocks, or LayerNorms).

Metric names are built by `metric_name` only (`rayq.metrics.diag`): `diag/<site>/<stat>`.
Statistics are accumulated batch by batch (sums, maxima), no activation is kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayq import metrics
from rayq.model import BLOCK_LINEARS

SINK_THRESHOLD = 0.3  # mean attention to position 0 above which a head counts as a sink
_LINEAR = re.compile(r"^blocks\.(\d+)\.(" + "|".join(map(re.escape, BLOCK_LINEARS)) + r")$")
_BLOCK = re.compile(r"^blocks\.(\d+)$")
_LAYERNORM = re.compile(r"^(blocks\.\d+\.(ln_attn|ln_mlp)|ln_f)$")
INPUT_STATS = ("kurtosis", "max_median", "max_median_mean", "crest", "zero_median_frac")


def metric_name(site: str, stat: str) -> str:
    """A diagnostics metric of one site, `diag/<site>/<stat>` (spelled by `rayq.metrics`)."""
    return metrics.diag(stat, site=site)


def kurtosis(values: torch.Tensor) -> float:
    """Non-excess kurtosis E[(v - mean)^4] / var^2 (population moments); NaN if all values are equal."""
    v = values.double()
    d = v - v.mean()
    var = float(d.square().mean())
    if var <= 0 or not math.isfinite(var):
        return float("nan")
    return float(d.pow(4).mean()) / var**2


def row_median(a: torch.Tensor) -> torch.Tensor:
    """Lower median of each row of a 2-D tensor (torch.median's convention). On CPU through
    numpy's partial sort: measured here ~9x faster than torch.median for 4096 x 512."""
    k = (a.shape[-1] - 1) // 2
    if a.device.type == "cpu" and a.dtype == torch.float32:
        return torch.from_numpy(np.partition(a.contiguous().numpy(), k, axis=-1)[:, k])
    return a.median(-1).values


class _InputPart:
    """Sums and maxima of one linear's input over a subset of positions."""

    def __init__(self) -> None:
        self.ch_sq: torch.Tensor | None = None  # per-channel sum of x^2 (float64 across batches)
        self.tokens = 0
        self.max_abs = 0.0
        self.ratio_max = 0.0
        self.ratio_sum = 0.0
        self.ratio_count = 0
        self.zero_median = 0

    def update(self, ch_sq: torch.Tensor, tok_max: torch.Tensor, tok_med: torch.Tensor) -> None:
        """ch_sq: this batch's per-channel sum of x^2; tok_max / tok_med: per-token max and median |x|."""
        if tok_max.numel() == 0:
            return
        ch_sq = ch_sq.double().cpu()
        self.ch_sq = ch_sq if self.ch_sq is None else self.ch_sq + ch_sq
        self.tokens += tok_max.numel()
        alive = tok_med > 0
        ratio = tok_max[alive] / tok_med[alive]
        self.max_abs = max(self.max_abs, float(tok_max.max()))
        if ratio.numel():
            self.ratio_max = max(self.ratio_max, float(ratio.max()))
            self.ratio_sum += float(ratio.double().sum())
        self.ratio_count += int(ratio.numel())
        self.zero_median += int((~alive).sum())

    def result(self) -> dict[str, float]:
        nan = float("nan")
        if self.ch_sq is None or self.tokens == 0:
            return dict.fromkeys(INPUT_STATS, nan)
        rms = (self.ch_sq / self.tokens).sqrt()
        tensor_rms = math.sqrt(float(self.ch_sq.sum()) / (self.tokens * len(self.ch_sq)))
        return {
            "kurtosis": kurtosis(rms),
            "max_median": self.ratio_max if self.ratio_count else nan,
            "max_median_mean": self.ratio_sum / self.ratio_count if self.ratio_count else nan,
            "crest": self.max_abs / tensor_rms if tensor_rms > 0 else nan,
            "zero_median_frac": self.zero_median / self.tokens,
        }


class _InputStats:
    def __init__(self) -> None:
        self.all, self.rest = _InputPart(), _InputPart()

    def update(self, x: torch.Tensor) -> None:  # (B, T, C) or (T, C)
        x = x.detach().float()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
        B, T, C = x.shape
        ax = x.abs()
        tok_max = ax.amax(-1)  # (B, T)
        tok_med = row_median(ax.reshape(-1, C)).view(B, T).to(tok_max.device)
        sq = x.square()
        # float32 sums per batch (exact enough, ~70x faster than float64), accumulated in float64;
        # the rest is summed directly, not as all - position 0 (a massive position 0 would cancel)
        self.all.update(sq.sum((0, 1)), tok_max, tok_med)
        self.rest.update(sq[:, 1:].sum((0, 1)), tok_max[:, 1:], tok_med[:, 1:])

    def result(self) -> dict[str, float]:
        out = self.all.result()
        out.update({f"{k}_nopos0": v for k, v in self.rest.result().items()})
        return out


def input_stats(x: torch.Tensor) -> dict[str, float]:
    """The per-site statistics of one activation tensor (B, T, C) (or (T, C)): what the collector
    reports for a linear whose input over the whole evaluation was `x`."""
    stats = _InputStats()
    stats.update(x)
    return stats.result()


class _BlockStats:
    """Attention to position 0 per head, and the first token's residual norm ratio."""

    def __init__(self, n_head: int) -> None:
        self.n_head = n_head
        self.head_p0 = torch.zeros(n_head, dtype=torch.float64)
        self.queries = 0
        self.bos_ratio_sum = 0.0
        self.sequences = 0

    def update_attention(self, qkv: torch.Tensor) -> None:  # (B, T, 3C), the qkv linear's output
        B, T, C3 = qkv.shape
        if T < 2:
            return
        C = C3 // 3
        q, k, _ = qkv.detach().float().split(C, dim=2)
        q = q.reshape(B, T, self.n_head, -1).transpose(1, 2)  # (B, H, T, hd)
        k = k.reshape(B, T, self.n_head, -1).transpose(1, 2)
        # attention with a value that is 1 at position 0 and 0 elsewhere returns p(query -> 0):
        # the model's own fused causal kernel, without materialising the (T, T) probabilities
        v = torch.zeros_like(q)
        v[:, :, 0, 0] = 1.0
        p0 = F.scaled_dot_product_attention(q, k, v, is_causal=True)[..., 0]  # (B, H, T)
        self.head_p0 += p0[:, :, 1:].double().sum((0, 2)).cpu()  # query 0 sees only position 0: left out
        self.queries += B * (T - 1)

    def update_residual(self, x: torch.Tensor) -> None:  # (B, T, C), the block's output
        norms = x.detach().float().norm(dim=-1)  # (B, T)
        med = norms.median(-1).values.clamp_min(torch.finfo(torch.float32).tiny)
        self.bos_ratio_sum += float((norms[:, 0] / med).double().sum())
        self.sequences += x.shape[0]

    def result(self) -> dict:
        nan = float("nan")
        per_head = (self.head_p0 / self.queries).tolist() if self.queries else []
        return {
            "sink_rate": sum(p > SINK_THRESHOLD for p in per_head) / len(per_head) if per_head else nan,
            "bos_norm_ratio": self.bos_ratio_sum / self.sequences if self.sequences else nan,
            "head_attention_to_pos0": per_head,
        }


@dataclass
class OutlierDiagnostics:
    sites: dict[str, dict[str, float]]  # linear name -> INPUT_STATS (+ _nopos0)
    blocks: dict[str, dict]  # "blocks.i" -> sink_rate, bos_norm_ratio, head_attention_to_pos0 (per head)
    layernorms: dict[str, dict[str, float]]  # LayerNorm name -> gain_max_median
    tokens: int = 0
    sink_threshold: float = SINK_THRESHOLD
    maxima: dict[str, float] = field(default_factory=dict)  # stat -> largest over sites / blocks / LayerNorms

    def __post_init__(self) -> None:
        groups = [self.sites.values(), self.blocks.values(), self.layernorms.values()]
        for group in groups:
            for stats in group:
                for k, v in stats.items():
                    if isinstance(v, float) and not math.isnan(v):
                        self.maxima[k] = max(self.maxima.get(k, -math.inf), v)

    def metrics(self) -> dict[str, float]:
        """Flat `diag/<site>/<stat>` scalars (NaN where undefined) for the metric stream."""
        out = {}
        for group in (self.sites, self.blocks, self.layernorms):
            for site, stats in group.items():
                out.update({metric_name(site, k): float(v) for k, v in stats.items() if not isinstance(v, list)})
        out.update({metric_name("max", k): float(v) for k, v in self.maxima.items()})
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def layernorm_gains(model: nn.Module) -> dict[str, dict[str, float]]:
    out = {}
    for name, mod in model.named_modules():
        g = getattr(mod, "weight", None)
        if _LAYERNORM.match(name) and g is not None:
            a = g.detach().float().abs().cpu()
            med = float(a.median())
            out[name] = {"gain_max_median": float(a.max()) / med if med > 0 else float("nan")}
    return out


class OutlierCollector:
    """Forward hooks that feed the statistics; `with collector.attached(): model(x)` then `result()`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.inputs: dict[str, _InputStats] = {}
        self.blocks: dict[str, _BlockStats] = {}
        self._linears = {n: m for n, m in model.named_modules() if _LINEAR.match(n)}
        self._blocks = {n: m for n, m in model.named_modules() if _BLOCK.match(n)}
        if not self._linears:
            raise ValueError("outlier diagnostics: the model has no blocks.{i}.attn.qkv|attn.out|mlp.fc_in|mlp.fc_out")

    def _block(self, name: str) -> _BlockStats:
        if name not in self.blocks:
            attn = getattr(self._blocks[name], "attn", None)
            self.blocks[name] = _BlockStats(int(getattr(attn, "n_head", 1)))
        return self.blocks[name]

    @contextmanager
    def attached(self) -> Iterator[OutlierCollector]:
        handles = []

        def input_hook(name: str):
            def hook(mod, args):
                self.inputs.setdefault(name, _InputStats()).update(args[0])
            return hook

        def qkv_hook(block: str):
            def hook(mod, args, out):
                self._block(block).update_attention(out)
            return hook

        def block_hook(block: str):
            def hook(mod, args, out):
                self._block(block).update_residual(out)
            return hook

        try:
            for name, mod in self._linears.items():
                handles.append(mod.register_forward_pre_hook(input_hook(name)))
                if name.endswith("attn.qkv"):
                    handles.append(mod.register_forward_hook(qkv_hook(name.rsplit(".", 2)[0])))
            for name, mod in self._blocks.items():
                handles.append(mod.register_forward_hook(block_hook(name)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def result(self) -> OutlierDiagnostics:
        order = list(self._linears)  # module order: blocks.0.attn.qkv, blocks.0.attn.out, ...
        return OutlierDiagnostics(
            sites={n: self.inputs[n].result() for n in order if n in self.inputs},
            blocks={n: s.result() for n, s in self.blocks.items()},
            layernorms=layernorm_gains(self.model),
            tokens=next((s.all.tokens for s in self.inputs.values()), 0),
        )
