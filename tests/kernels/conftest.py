import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small ops on 2 OpenMP threads crawl when the machine is shared (measured: a 100-step tiny
    GPT loop 83 s on 2 threads vs 5 s on 1 under load); these tests check numbers, not speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
