"""Resolve a model spec string to an ``nn.Module``.

Specs: ``zoo:NAME``, ``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:callable`` and
``package.module:callable`` (a callable returning an ``nn.Module``; a class works too).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from memplan.errors import MemplanError

DEFAULT_INPUT = (1, 3, 224, 224)


def _optional(package: str) -> object:
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise MemplanError(f"{package} is not installed ({e}); install it with: pip install 'memplan[vision]'") from e


def _zoo(name: str) -> nn.Module:
    from memplan import zoo

    try:
        return zoo.create_model(name)
    except zoo.UnknownModelError as e:
        raise MemplanError(str(e)) from e


def _torchvision(name: str) -> nn.Module:
    tv = _optional("torchvision.models")
    try:
        return tv.get_model(name, weights=None)
    except ValueError as e:
        raise MemplanError(f"unknown torchvision model '{name}'") from e


def _timm(name: str) -> nn.Module:
    timm = _optional("timm")
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise MemplanError(f"unknown timm model '{name}' ({e})") from e


_PREFIXES: dict[str, Callable[[str], nn.Module]] = {"zoo": _zoo, "torchvision": _torchvision, "timm": _timm}


def _callable_from(spec: str) -> Callable[[], object]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise MemplanError(f"bad model spec '{spec}': use zoo:NAME, torchvision:NAME, timm:NAME, FILE.py:CALLABLE "
                           "or package.module:CALLABLE")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise MemplanError(f"model file '{target}' does not exist")
        mod_name = f"_memplan_user_{path.stem}"
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - user code: report, do not crash
            raise MemplanError(f"cannot import '{target}': {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise MemplanError(f"cannot import module '{target}': {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise MemplanError(f"'{attr}' is not a callable in '{target}'")
    return fn


def load_model(spec: str) -> nn.Module:
    """Build the model a spec names.

    Example:
        >>> type(load_model("zoo:resnet18")).__name__
        'ResNet'
    """
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _PREFIXES:
        return _PREFIXES[prefix](rest)
    fn = _callable_from(spec)
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001
        raise MemplanError(f"calling '{spec}' failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise MemplanError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def default_input(spec: str) -> tuple[int, ...]:
    """The natural input shape of a model spec (zoo models know theirs; others get 1×3×224×224)."""
    prefix, _, rest = spec.partition(":")
    if prefix == "zoo":
        from memplan import zoo

        try:
            return tuple(zoo.default_input(rest))
        except zoo.UnknownModelError as e:
            raise MemplanError(str(e)) from e
    return DEFAULT_INPUT


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (or ``1x3x224x224``) into a shape; one-line error otherwise."""
    parts = text.replace("x", ",").replace("×", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise MemplanError(f"bad input shape '{text}': need comma-separated positive integers, e.g. 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise MemplanError(f"bad input shape '{text}': every dimension must be a positive integer")
    return shape
