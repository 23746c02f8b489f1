"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for training tests: tiny models on small, shared CI machines run fastest so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
