"""Model level: quantize a briefly trained tiny GPT; loss/KL changes, reference agreement,
save/load round trip, layer selection and bad-input errors."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from rayq.kernels import (
    QuantEmbedding,
    SchemeError,
    W4Colwise,
    W8A8Groupwise,
    W8A8Linear,
    W8A8Vectorwise,
    load_quantized,
    quantize_,
    quantized_modules,
    save_quantized,
    select_layers,
    set_backend,
)
from rayq.model import BLOCK_LINEARS, GPT
from rayq.schema import ModelConfig

CFG = ModelConfig(vocab_size=64, seq_len=32, n_layer=2, d_model=64, n_head=4)


def markov_batches(n_batches: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Structured synthetic text: a sparse random Markov chain (each token has 3 likely successors)."""
    g = torch.Generator().manual_seed(1234)  # the same chain for train and held-out data
    succ = torch.randint(0, CFG.vocab_size, (CFG.vocab_size, 3), generator=g)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        seq = torch.empty(batch, CFG.seq_len + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, CFG.vocab_size, (batch,), generator=g)
        for t in range(1, CFG.seq_len + 1):
            pick = torch.randint(0, 3, (batch,), generator=g)
            seq[:, t] = succ[seq[:, t - 1], pick]
        out.append(seq)
    return out


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.detach().double(), y.detach().double()
    return 20 * math.log10(ref.norm() / (ref - y).norm())


def lm_loss(model, batches) -> float:
    with torch.no_grad():
        losses = [F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()) for b in batches]
    return float(torch.stack(losses).mean())


def mean_kl(fp, qm, batches) -> float:
    with torch.no_grad():
        kls = []
        for b in batches:
            lp, lq = F.log_softmax(fp(b[:, :-1]), -1), F.log_softmax(qm(b[:, :-1]), -1)
            kls.append((lp.exp() * (lp - lq)).sum(-1).mean())
    return float(torch.stack(kls).mean())


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT trained ~100 AdamW steps (a few seconds) and its held-out batches."""
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for b in markov_batches(100, 16, seed=1):
        loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    heldout = markov_batches(4, 32, seed=2)
    assert lm_loss(model, heldout) < 0.75 * torch.log(torch.tensor(float(CFG.vocab_size))).item()  # it learned something
    return model, heldout


def test_default_selection_is_every_linear_and_block_linears_by_name(trained):
    model, _ = trained
    assert [n for n, _ in select_layers(model)] == [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    names = [n for n, _ in select_layers(model, BLOCK_LINEARS)]
    assert len(names) == 4 * CFG.n_layer and all(n.endswith(BLOCK_LINEARS) for n in names)
    assert "lm_head" not in names
    assert "lm_head" in [n for n, _ in select_layers(model, BLOCK_LINEARS, include_lm_head=True)]
    assert {"tok_emb", "pos_emb"} <= {n for n, _ in select_layers(model, include_embeddings=True)}
    assert [n for n, _ in select_layers(model, lambda n, m: n.endswith("fc_in"))] == [f"blocks.{i}.mlp.fc_in" for i in range(CFG.n_layer)]
    assert len(select_layers(model, "all")) == 4 * CFG.n_layer + 1


def test_quantized_loss_changes_small_for_w8a8_larger_for_w4(trained):
    model, heldout = trained
    fp = lm_loss(model, heldout)
    w8 = quantize_(model, W8A8Vectorwise(), layers=BLOCK_LINEARS, inplace=False)
    w4 = quantize_(model, W4Colwise(), layers=BLOCK_LINEARS, inplace=False)
    d8, d4 = lm_loss(w8, heldout) - fp, lm_loss(w4, heldout) - fp
    assert d8 != 0.0 and abs(d8) / fp < 0.01, (fp, d8)  # small but real: the INT8 GEMMs did run
    assert abs(d4) > 3 * abs(d8), (d8, d4)
    kl8, kl4 = mean_kl(model, w8, heldout), mean_kl(model, w4, heldout)
    assert 0 < kl8 < kl4 / 5, (kl8, kl4)
    # inplace=False left the float model alone
    assert not quantized_modules(model)


def test_quantized_forward_matches_reference_forward(trained):
    model, heldout = trained
    for scheme, kw in [(W8A8Vectorwise(), {}), ("w8a8-tensor", {}), (W8A8Groupwise(32), {}), (W4Colwise(), {}),
                       ("w8a8-smoothquant", {"calibration": [b[:, :-1] for b in heldout[:2]]})]:
        qm = quantize_(model, scheme, layers=BLOCK_LINEARS, inplace=False, include_lm_head=True, include_embeddings=True, **kw)
        x = heldout[0][:, :-1]
        with torch.no_grad():
            y = qm(x)
            set_backend(qm, "reference")
            yr = qm(x)
        # fp32 vs fp64 rounding can flip a code at a rounding boundary and the flip propagates
        # through later layers, so compare in SQNR: the two must agree far better than either
        # agrees with the float model (measured 72-140 dB vs 25-46 dB)
        fp = model(x)
        assert sqnr(yr, y) > max(60.0, sqnr(fp, y) + 20), (scheme, sqnr(yr, y), sqnr(fp, y))


def test_inplace_returns_same_model_and_replaces_modules(trained):
    model, heldout = trained
    import copy

    m = copy.deepcopy(model)
    out = quantize_(m, "w8a8-vectorwise", layers=BLOCK_LINEARS, include_lm_head=True, include_embeddings=True)
    assert out is m
    qs = quantized_modules(m)
    assert isinstance(qs["lm_head"], W8A8Linear) and isinstance(qs["tok_emb"], QuantEmbedding)
    assert qs["blocks.0.attn.qkv"].qweight.dtype == torch.int8
    with pytest.raises(SchemeError, match="no layers matched"):  # nothing left to quantize
        quantize_(m, "w8a8-vectorwise")


def test_save_load_round_trip(trained, tmp_path):
    model, heldout = trained
    for scheme in (W8A8Vectorwise(), W4Colwise(), W8A8Groupwise(16)):
        qm = quantize_(model, scheme, layers=BLOCK_LINEARS, inplace=False, include_lm_head=True, include_embeddings=True)
        path = tmp_path / f"{scheme.name}.pt"
        save_quantized(qm, path)
        assert sorted(os.listdir(tmp_path)) == sorted(p for p in os.listdir(tmp_path) if not p.startswith(".tmp"))  # no temp left
        sd = torch.load(path, weights_only=True)
        dtypes = {k: v.dtype for k, v in sd.items()}
        if scheme.weight_bits == 4:
            assert dtypes["blocks.0.mlp.fc_in.qweight_packed"] == torch.uint8
            assert sd["blocks.0.mlp.fc_in.qweight_packed"].shape == (4 * CFG.d_model, CFG.d_model // 2)
        else:
            assert dtypes["blocks.0.mlp.fc_in.qweight"] == torch.int8
        assert dtypes["blocks.0.mlp.fc_in.w_scale"] == torch.float32
        fresh = load_quantized(GPT(CFG), path)
        x = heldout[0][:, :-1]
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), qm(x), rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors(trained):
    model, heldout = trained
    with pytest.raises(SchemeError, match="did you mean 'w4-colwise'"):
        quantize_(model, "w4-colwse", inplace=False)
    with pytest.raises(SchemeError, match=r"group_size 48 does not divide the input width 64 of layer 'blocks.0.attn.qkv'"):
        quantize_(model, W8A8Groupwise(48), inplace=False)
    with pytest.raises(SchemeError, match="no layers matched"):
        quantize_(torch.nn.Sequential(torch.nn.ReLU()), "w8a8-vectorwise")
    with pytest.raises(SchemeError, match="no layers matched"):
        quantize_(model, "w8a8-vectorwise", layers=lambda n, m: False, inplace=False)
    with pytest.raises(SchemeError, match="calibration"):
        quantize_(model, "w8a8-smoothquant", inplace=False)
    with pytest.raises(SchemeError, match="backend"):
        quantize_(model, "w8a8-vectorwise", inplace=False, backend="fast")
    # NaN reaching a quantized layer is named
    qm = quantize_(model, "w8a8-vectorwise", layers=BLOCK_LINEARS, inplace=False)
    with torch.no_grad():
        qm.blocks[0].ln_attn.weight[3] = float("nan")
    with pytest.raises(SchemeError, match=r"layer 'blocks.0.attn.qkv': input contains NaN or inf"):
        qm(heldout[0][:, :-1])
    # a NaN weight is refused at quantization time, before any module is replaced
    import copy

    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.blocks[1].mlp.fc_out.weight[0, 0] = float("inf")
    with pytest.raises(SchemeError, match=r"layer 'blocks.1.mlp.fc_out': weight contains NaN or inf"):
        quantize_(bad, "w8a8-vectorwise")
    assert not quantized_modules(bad)
