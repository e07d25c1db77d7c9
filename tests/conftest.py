"""Shared fixtures: a prepared tiny corpus, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests share corpus_fixture.py

from corpus_fixture import tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """(cfg, prepared data) of the tiny preset on the test corpus."""
    from rayq import data as data_io

    root = tmp_path_factory.mktemp("tiny-corpus")
    cfg = tiny_config(root / "text", root / "cache")
    return cfg, data_io.prepare(cfg.data, cfg.model.vocab_size)


@pytest.fixture
def one_thread():
    """One torch thread for tests that check numbers, not speed: small ops on 2 OpenMP threads
    crawl when the machine is shared (measured: a 100-step tiny GPT loop 83 s on 2 threads vs 5 s
    on 1 under load). The kernel and eval rooms use it for every test (their conftest.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
