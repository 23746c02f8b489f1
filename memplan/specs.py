"""Model specs: the one resolver every command and the trainer use to turn a string into a model.

Specs: ``zoo:NAME`` (:mod:`memplan.zoo`), ``torchvision:NAME``, ``timm:NAME`` (always built without
pretrained weights: memplan never downloads), ``path/to/file.py:callable`` and
``package.module:callable`` (a callable returning an ``nn.Module``; a class works too).

**Trust.** A file or module spec imports and runs code. A spec the user typed is trusted; a spec
read from a file (a run directory's ``config.yaml``, a YAML config) is limited to ``zoo:``,
``torchvision:`` and ``timm:`` names unless the user passes ``--trust-code``
(``trust_code=True``), so a run directory cannot make memplan run foreign code.

Example:
    >>> type(load_model("zoo:resnet18")).__name__
    'ResNet'
    >>> resolve_factory("subprocess:run", trust_code=False, source="config.yaml")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    memplan.specs.UntrustedCodeError: config.yaml names the model factory 'subprocess:run', ... --trust-code ...
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import operator
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memplan.errors import MemplanError
from memplan.registry import Registry

DEFAULT_INPUT = (1, 3, 224, 224)

ModelFactory = Callable[..., nn.Module]


class UntrustedCodeError(MemplanError):
    """A spec read from a file names code to run, and the user did not pass ``--trust-code``."""


def _optional(package: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise MemplanError(f"{package} is not installed ({e}); install it with: pip install 'memplan[vision]'") \
            from None


PREFIXES: Registry[Callable[[str], ModelFactory]] = Registry("model-spec prefix")


@PREFIXES.register("zoo")
def _zoo(name: str) -> ModelFactory:
    from memplan import zoo

    zoo.MODELS[name]  # unknown names fail here, listing the known ones

    def build(*, num_classes: int | None = None, in_chans: int | None = None, **kwargs: Any) -> nn.Module:
        extra = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
        return zoo.create_model(name, **extra, **kwargs)

    build.__name__ = name
    return build


@PREFIXES.register("torchvision")
def _torchvision(name: str) -> ModelFactory:
    models = _optional("torchvision.models")
    try:
        builder = models.get_model_builder(name)
    except ValueError:
        raise MemplanError(f"unknown torchvision model '{name}'") from None
    no_download = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        no_download["weights_backbone"] = None  # segmentation/detection backbones would download otherwise

    def build(*, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
        extra = {} if num_classes is None else {"num_classes": num_classes}
        return builder(**no_download, **extra, **kwargs)

    build.__name__ = name
    return build


@PREFIXES.register("timm")
def _timm(name: str) -> ModelFactory:
    timm = _optional("timm")
    if not timm.is_model(name):
        raise MemplanError(f"unknown timm model '{name}'")

    def build(*, num_classes: int | None = None, in_chans: int | None = None, **kwargs: Any) -> nn.Module:
        extra = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
        return timm.create_model(name, pretrained=False, **extra, **kwargs)

    build.__name__ = name
    return build


def is_code_spec(spec: str) -> bool:
    """Whether resolving ``spec`` imports user code (a file or module spec, not a registered prefix)."""
    prefix, sep, _ = spec.partition(":")
    return not (sep and prefix in PREFIXES)


def _import_attr(spec: str) -> Any:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise MemplanError(f"bad model spec '{spec}': use zoo:NAME, torchvision:NAME, timm:NAME, FILE.py:CALLABLE "
                           "or package.module:CALLABLE")
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise MemplanError(f"model file '{target}' does not exist")
        mod_name = f"_memplan_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise MemplanError(f"cannot import '{target}': not a Python file")
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - user code: report, do not crash
                raise MemplanError(f"cannot import '{target}': {type(e).__name__}: {_first_line(e)}") from None
            sys.modules[mod_name] = module
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:  # noqa: BLE001 - ImportError, or the module's own code failing
            raise MemplanError(f"cannot import module '{target}': {type(e).__name__}: {_first_line(e)}") from None
    try:
        return operator.attrgetter(attr)(module)
    except AttributeError:
        raise MemplanError(f"'{attr}' is not defined in '{target}'") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:200] if lines else ""


def resolve_factory(spec: str | ModelFactory, *, trust_code: bool = True, source: str | None = None) -> ModelFactory:
    """The model factory a spec names (a callable is returned as it is).

    ``trust_code=False`` refuses file and module specs (module docstring); ``source`` names where the
    spec was read, for the error.

    Example:
        >>> resolve_factory("zoo:resnet_tiny")(num_classes=3, in_chans=1).fc.out_features
        3
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise MemplanError(f"bad model spec {spec!r}: expected a string such as zoo:resnet18")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in PREFIXES:
        return PREFIXES[prefix](rest)
    if not trust_code:
        raise UntrustedCodeError(
            f"{source or 'a file'} names the model factory '{spec}', code memplan would import and run; only "
            "zoo:, torchvision: and timm: names are accepted from files: pass --trust-code if you trust it")
    factory = _import_attr(spec)
    if not callable(factory):
        raise MemplanError(f"'{spec}' is not callable")
    return factory


def build_model(spec: str | ModelFactory, kwargs: dict[str, Any] | None = None, *, trust_code: bool = True,
                source: str | None = None) -> nn.Module:
    """Resolve ``spec`` and call its factory with ``kwargs``; anything the factory raises is one line."""
    factory = resolve_factory(spec, trust_code=trust_code, source=source)
    name = spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
    try:
        model = factory(**(kwargs or {}))
    except MemplanError:
        raise
    except Exception as e:  # noqa: BLE001 - user and third-party code: report, do not crash
        raise MemplanError(f"building model '{name}' failed: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise MemplanError(f"'{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model(spec: str, *, trust_code: bool = True) -> nn.Module:
    """Build the model a spec names, with its default arguments.

    Example:
        >>> load_model("zoo:resnet_tiny").conv1.in_channels
        1
    """
    return build_model(spec, trust_code=trust_code)


def default_input(spec: str) -> tuple[int, ...]:
    """The natural input shape of a model spec (zoo models know theirs; others get 1×3×224×224).

    Example:
        >>> default_input("zoo:resnet_tiny"), default_input("timm:anything")
        ((1, 1, 28, 28), (1, 3, 224, 224))
    """
    prefix, _, rest = spec.partition(":")
    if prefix == "zoo":
        from memplan import zoo

        return tuple(zoo.default_input(rest))
    return DEFAULT_INPUT


INPUT_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")


def example_inputs(spec: str, texts: Sequence[str] = ()) -> list[torch.Tensor]:
    """Meta tensors for a model's forward arguments, one per ``SHAPE[:DTYPE]`` text (``--input``).

    Without texts, the spec's natural input (:func:`default_input`); a zoo model that takes more than
    the image (a denoiser's time step) gets its further arguments added, at the image's batch.

    Example:
        >>> [(tuple(t.shape), t.dtype) for t in example_inputs("zoo:ddpm_unet_small", ["4,1,32,32"])]
        [((4, 1, 32, 32), torch.float32), ((4,), torch.int64)]
        >>> example_inputs("zoo:resnet18", ["1,3,64,64:complex"])
        Traceback (most recent call last):
        ...
        memplan.errors.MemplanError: bad input '1,3,64,64:complex': unknown dtype 'complex' (use float32, float16, bfloat16, int64, int32, int8, uint8, bool)
    """
    given = []
    for text in texts:
        shape_text, _, dtype = text.partition(":")
        if dtype and dtype not in INPUT_DTYPES:
            raise MemplanError(f"bad input '{text}': unknown dtype '{dtype}' (use {', '.join(INPUT_DTYPES)})")
        given.append((parse_shape(shape_text), dtype or "float32"))
    given = given or [(default_input(spec), "float32")]
    prefix, _, rest = spec.partition(":")
    if len(given) == 1 and prefix == "zoo":
        from memplan import zoo

        batch = given[0][0][0]
        given += [(tuple(batch if d == 0 else d for d in shape), dtype) for shape, dtype in zoo.extra_inputs(rest)]
    return [torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for shape, dtype in given]


MAX_ELEMENTS = 2**48  # beyond any memory; larger shapes are typos (and overflow int64 byte counts)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (or ``1x3x224x224``) into a shape; one-line error otherwise.

    Example:
        >>> parse_shape("1x3x32x32")
        (1, 3, 32, 32)
    """
    parts = text.replace("x", ",").replace("×", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise MemplanError(f"bad input shape '{text}': need comma-separated positive integers, e.g. 1,3,224,224") \
            from None
    if not shape or any(d <= 0 for d in shape):
        raise MemplanError(f"bad input shape '{text}': every dimension must be a positive integer")
    elements = 1
    for d in shape:
        elements *= d
    if elements > MAX_ELEMENTS:
        raise MemplanError(f"bad input shape '{text}': {elements:.3g} elements is beyond any memory (max 2^48)")
    return shape
