"""Fixtures of the codec tests."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread():
    """bitsandbytes' CPU calls on small arrays wait on torch's thread pool when the CPU is shared."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
