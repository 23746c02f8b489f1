"""Shared fixtures."""

import inspect

import pytest
import torch

from memplan import zoo


def single_input_models() -> list[str]:
    """Zoo models whose forward takes one tensor (image models); denoisers take (x, t) and have own tests."""
    names = []
    for name in zoo.list_models():
        with torch.device("meta"):
            model = zoo.create_model(name)
        if len(inspect.signature(model.forward).parameters) == 1:
            names.append(name)
    return names


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for training tests: tiny models on small, shared CI machines run fastest so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
