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
    return cfg, data_io.prepare(cfg)
