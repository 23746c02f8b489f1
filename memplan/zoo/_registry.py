"""The zoo's model registry: ``register_model``, ``create_model``, ``list_models``, ``default_input``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch  # noqa: F401  (doctests)
from torch import nn

from memplan.errors import MemplanError
from memplan.registry import Registry, UnknownNameError

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

IMAGENET_INPUT = (1, 3, 224, 224)


class ZooError(MemplanError, ValueError):
    """A bad model-zoo request: wrong ``strides`` length, non-positive stride, unknown stem...

    Example:
        >>> from memplan.zoo import create_model
        >>> create_model("resnet18", strides=[2, 2])
        Traceback (most recent call last):
        ...
        memplan.zoo._registry.ZooError: resnet: strides needs 6 entries [conv1, maxpool, layer1, layer2, layer3, layer4], got 2: [2, 2]
    """


class UnknownModelError(ZooError, UnknownNameError):
    """``create_model`` / ``default_input`` got a name that is not registered.

    Example:
        >>> from memplan.zoo import create_model
        >>> create_model("resnet19")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        memplan.zoo._registry.UnknownModelError: unknown zoo model 'resnet19'; known: ..., resnet18, ...
    """


MODELS: Registry[Callable[..., nn.Module]] = Registry("zoo model", unknown_error=UnknownModelError)


def register_model(fn: ModelFn | None = None, *, default_input: tuple[int, ...] = IMAGENET_INPUT,
                   extra_inputs: tuple[tuple[tuple[int, ...], str], ...] = ()) -> Any:
    """Register a model constructor under its function name (usable bare or with arguments).

    ``default_input`` is the input shape (batch first) the model is meant for; it is what
    :func:`default_input` returns. ``extra_inputs`` are the ``(shape, dtype)`` of further forward
    arguments (a denoiser's time step), a ``0`` in a shape standing for the first input's batch.

    Example:
        >>> @register_model(default_input=(1, 1, 8, 8))
        ... def doc_example_net(num_classes: int = 2, in_chans: int = 1) -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 64, num_classes))
        >>> create_model("doc_example_net")(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 2])
        >>> _ = MODELS.unregister("doc_example_net")
    """

    def decorate(model_fn: ModelFn) -> ModelFn:
        MODELS.add(model_fn.__name__, model_fn, default_input=tuple(default_input), extra_inputs=tuple(extra_inputs))
        return model_fn

    return decorate if fn is None else decorate(fn)


def list_models() -> list[str]:
    """Names of all registered models, sorted.

    Example:
        >>> [n for n in list_models() if n.startswith("resnet")]
        ['resnet10_narrow', 'resnet18', 'resnet18_small', 'resnet34', 'resnet50', 'resnet_tiny']
    """
    return MODELS.names()


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` go to its constructor.

    Example:
        >>> student = create_model("resnet18", strides=[8, 1, 1, 2, 2, 1], num_classes=10)
        >>> student.conv1.stride, student.fc.out_features
        ((8, 8), 10)
    """
    return MODELS[name](**kwargs)


def default_input(name: str) -> tuple[int, ...]:
    """The input shape (N, C, H, W) the registered model ``name`` is meant for.

    Example:
        >>> default_input("resnet18"), default_input("resnet_tiny")
        ((1, 3, 224, 224), (1, 1, 28, 28))
    """
    return MODELS.meta(name)["default_input"]


def extra_inputs(name: str) -> tuple[tuple[tuple[int, ...], str], ...]:
    """The ``(shape, dtype)`` of the forward arguments after the image (:func:`register_model`).

    Example:
        >>> extra_inputs("resnet18"), extra_inputs("ddpm_unet_small")
        ((), (((0,), 'int64'),))
    """
    return MODELS.meta(name)["extra_inputs"]
