import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this room runs on one torch thread (tests/conftest.py: one_thread)."""
