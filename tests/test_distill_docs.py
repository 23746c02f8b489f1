import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["red", "features", "losses", "data", "trainer"])
def test_docstring_examples_run(name):
    module = importlib.import_module(f"distill.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
