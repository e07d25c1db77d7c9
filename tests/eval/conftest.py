"""Fixtures of the eval tests (helpers live in eval_helpers.py, importable by the test modules)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from eval_helpers import toy_text, train_spm


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this room runs on one torch thread (tests/conftest.py: one_thread)."""


@pytest.fixture(scope="session")
def spm_tokenizer():
    sp, proto = train_spm(toy_text(300, seed=1))
    return SimpleNamespace(sp=sp, proto=proto)


@pytest.fixture(scope="session")
def trained_gpt(spm_tokenizer):
    """A tiny GPT trained ~300 AdamW steps on toy stories; held-out stories come from another seed."""
    from rayq.model import GPT
    from rayq.schema import ModelConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixture: runs before the per-test _one_thread
    torch.manual_seed(0)
    sp = spm_tokenizer.sp
    train_ids = np.array(sp.encode(toy_text(400, seed=2)), dtype=np.int64)
    cfg = ModelConfig(vocab_size=sp.get_piece_size(), seq_len=64, n_layer=2, d_model=64, n_head=4)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    gen = np.random.default_rng(0)
    steps, batch = 300, 16
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        starts = gen.integers(0, len(train_ids) - cfg.seq_len - 1, size=batch)
        w = torch.from_numpy(np.stack([train_ids[s:s + cfg.seq_len + 1] for s in starts]))
        loss = nn.functional.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    heldout = {"toy/heldout": toy_text(120, seed=3)}
    return SimpleNamespace(model=model, cfg=cfg, sp=sp, proto=spm_tokenizer.proto, heldout=heldout,
                           final_loss=float(loss.detach()))
