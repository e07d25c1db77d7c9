import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rayq.eval import degradation, kl_agreement, paired_bootstrap, token_batches, token_kl

TABLE = Path(__file__).resolve().parents[1] / "fixtures" / "paper_table_a3.json"  # the paper's Table A.3


def test_table_a3_average_pct_diff_all_rows():
    table = json.loads(TABLE.read_text())
    assert len(table["rows"]) == 13
    for row in table["rows"]:
        fp = {t: row["fp16"][t] for t in table["tasks"]}
        q = {t: row["int8"][t] for t in table["tasks"]}
        assert round(degradation(fp, q), 2) == pytest.approx(row["average_pct_diff"], abs=1e-9), row["variant"]


def test_degradation_basic_and_errors():
    assert degradation({"a": 50.0, "b": 80.0}, {"a": 49.0, "b": 80.0}) == pytest.approx(-1.0)
    assert degradation({"a": 0.5}, {"a": 0.55}) == pytest.approx(10.0)  # scale-free: fractions or percent
    with pytest.raises(ValueError, match="FP score of a is 0"):
        degradation({"a": 0.0}, {"a": 0.1})
    with pytest.raises(ValueError, match="no score for b"):
        degradation({"a": 1.0, "b": 1.0}, {"a": 1.0})


def test_paired_bootstrap_identical_models_has_zero_width():
    rng = np.random.default_rng(0)
    items = {"t1": rng.integers(0, 2, 200).astype(float), "t2": rng.integers(0, 2, 100).astype(float)}
    iv = paired_bootstrap(items, items, samples=200, seed=1)
    assert iv.estimate == 0.0 and iv.low == 0.0 and iv.high == 0.0


def test_paired_bootstrap_covers_estimate_and_pairing_narrows_it():
    rng = np.random.default_rng(0)
    n = 400
    fp = (rng.random(n) < 0.6).astype(float)
    q = fp.copy()
    flip = rng.choice(n, 12, replace=False)  # Q differs from FP on 3% of the items
    q[flip] = 1 - q[flip]
    iv = paired_bootstrap({"t": fp}, {"t": q}, samples=2000, confidence=0.95, seed=0)
    est = (q.mean() - fp.mean()) / fp.mean() * 100
    assert iv.estimate == pytest.approx(est)
    assert iv.low <= est <= iv.high
    # unpaired resampling (independent indices for FP and Q) would be far wider: the pairing matters
    idx_fp, idx_q = rng.integers(0, n, (2000, n)), rng.integers(0, n, (2000, n))
    unpaired = (q[idx_q].mean(1) - fp[idx_fp].mean(1)) / fp[idx_fp].mean(1) * 100
    lo, hi = np.quantile(unpaired, [0.025, 0.975])
    assert (iv.high - iv.low) < 0.5 * (hi - lo)
    # determinism for a seed
    assert paired_bootstrap({"t": fp}, {"t": q}, samples=2000, seed=0) == iv


def test_paired_bootstrap_rejects_unpaired_lengths():
    with pytest.raises(ValueError, match="FP items"):
        paired_bootstrap({"t": np.ones(3)}, {"t": np.ones(4)})


def test_token_kl_matches_definition():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    expected = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(token_kl(a, b), expected)
    assert torch.all(token_kl(a, a) == 0)


class _Shift(torch.nn.Module):
    def __init__(self, noise: float):
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(11, 11)
        self.noise = noise

    def forward(self, idx):
        out = self.emb(idx)
        if self.noise:
            out = out + self.noise * torch.sin(out * 37.0)  # deterministic perturbation
        return out


def test_kl_agreement_stats_and_standard_error():
    fp, q = _Shift(0.0), _Shift(0.3)
    q.emb.load_state_dict(fp.emb.state_dict())
    tokens = np.arange(2000) % 11
    batches = token_batches(tokens, n_tokens=640, seq_len=16, batch_size=8)
    assert sum(b.shape[0] for b in batches) == 40 and all(b.shape[1] == 16 for b in batches)
    stats = kl_agreement(fp, {"q": q, "same": fp}, batches)
    s = stats["q"]
    x = torch.cat(batches)
    with torch.no_grad():
        per_seq = token_kl(fp(x), q(x)).mean(-1).numpy()
    assert s.kl == pytest.approx(per_seq.mean())
    assert s.kl_se == pytest.approx(per_seq.std(ddof=1) / math.sqrt(len(per_seq)))
    assert s.kl > 0 and s.kl_se > 0 and 0 <= s.top1_agree <= 1
    assert s.tokens == 640 and s.sequences == 40
    assert stats["same"].kl == 0 and stats["same"].top1_agree == 1.0


def test_token_batches_too_short():
    with pytest.raises(ValueError, match="held-out tokens"):
        token_batches(np.arange(5), 100, seq_len=16, batch_size=4)
