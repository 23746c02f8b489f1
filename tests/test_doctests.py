"""Every docstring example of every module in memplan, passes and distill runs, and passes."""

import doctest
import importlib
import pkgutil

import pytest
import torch
from torch import nn

PACKAGES = ("memplan", "passes", "distill")
SLOW = {"distill.trainer", "distill.run", "memplan.pipeline", "memplan.measure", "memplan.export", "memplan.onnx_ort"}


def _modules() -> list[str]:
    names = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        names += [info.name for info in pkgutil.walk_packages(pkg.__path__, f"{pkg_name}.")]
    return sorted(names)


def _examples() -> list:
    cases = []
    for name in _modules():
        module = importlib.import_module(name)
        for test in doctest.DocTestFinder(exclude_empty=True).find(module, name, globs={}):
            if test.examples and test.name.startswith(name):
                marks = [pytest.mark.slow] if name.split(".")[0:2] and ".".join(name.split(".")[:2]) in SLOW else []
                cases.append(pytest.param(name, test.name, id=test.name, marks=marks))
    return cases


@pytest.mark.parametrize(("module_name", "test_name"), _examples())
def test_docstring_example(module_name, test_name):
    module = importlib.import_module(module_name)
    (test,) = [t for t in doctest.DocTestFinder().find(module, module_name) if t.name == test_name]
    test.globs.update({"torch": torch, "nn": nn, **test.globs})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0, f"{test_name}: {runner.failures} of {runner.tries} examples failed (run with -s)"


def test_every_module_has_an_example():
    """A module docstring names its one public entry with an example (application-layer commands aside)."""
    missing = [
        name for name in _modules()
        if not name.startswith("memplan.commands") and name != "memplan.__main__"
        and ">>>" not in (importlib.import_module(name).__doc__ or "")
        and not any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(name), name))
    ]
    assert not missing, f"modules without a runnable example: {missing}"
