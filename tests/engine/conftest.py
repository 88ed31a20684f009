"""Engine tests work on tiny tensors: one intra-op thread is faster than several and
does not fight other test processes for the cores."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
