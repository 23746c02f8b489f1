"""Reference CNNs in a timm-style registry, with torchvision-identical architectures.

The torchvision families (``resnet18``, ``resnet34``, ``resnet50``, ``resnext50_32x4d``,
``mobilenet_v2``, ``mobilenet_v3_small``, ``vgg11_bn``, ``densenet121``) have the same module names,
``state_dict`` keys and shapes and forward semantics as torchvision >= 0.13 (in-place ReLUs,
``out += identity``, ``torch.flatten(x, 1)``...), so torchvision checkpoints load unchanged. Small-image
variants (``resnet18_small``, ``resnet_tiny``, ``resnet10_narrow``, ``mobilenet_v2_small``,
``densenet_small``, ``unet_small``) serve 28–128 px data and fast tests. ResNets also take ``widths``
(channels per layer; the stem's is ``widths[0]``), kept as their ``widths`` attribute.

Every constructor takes ``num_classes``, ``in_chans`` and ``strides``: the list of the network's
downsampling points in forward order (docs/definitions.md §4). An aggressive-pool student is the same constructor
with a different list, e.g. the ReDistill ResNet18 student ``resnet18(strides=[8, 1, 1, 2, 2, 1])``;
every model keeps the resolved list as its ``strides`` attribute (a tuple). A wrong length or a
non-positive entry raises :class:`ZooError` (a ``ValueError``) naming the expected slots.
A pool whose slot in ``strides`` is a plain pooling layer (VGG pools, DenseNet transitions, UNet
encoder pools) uses ``kernel_size = stride = s``, so ``s = 1`` keeps the spatial size.

Example:
    >>> from memplan.zoo import create_model, default_input, list_models
    >>> "resnet18" in list_models()
    True
    >>> model = create_model("resnet_tiny").eval()
    >>> model(torch.zeros(default_input("resnet_tiny"))).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memplan.errors import MemplanError

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ConvNormAct",
    "DenseNet",
    "MobileNetV2",
    "MobileNetV3",
    "ResNet",
    "UNet",
    "UnknownModelError",
    "VGG",
    "ZooError",
    "create_model",
    "default_input",
    "list_models",
    "register_model",
]

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

IMAGENET_INPUT = (1, 3, 224, 224)


class ZooError(MemplanError, ValueError):
    """A bad model-zoo request: wrong ``strides`` length, non-positive stride, unknown stem...

    Example:
        >>> create_model("resnet18", strides=[2, 2])
        Traceback (most recent call last):
        ...
        memplan.zoo.ZooError: resnet: strides needs 6 entries [conv1, maxpool, layer1, layer2, layer3, layer4], got 2: [2, 2]
    """


class UnknownModelError(ZooError):
    """``create_model`` / ``default_input`` got a name that is not registered.

    Example:
        >>> create_model("resnet19")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        memplan.zoo.UnknownModelError: unknown model 'resnet19'; known: densenet121, ...
    """


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {}


def register_model(fn: ModelFn | None = None, *, default_input: tuple[int, ...] = IMAGENET_INPUT) -> Any:
    """Register a model constructor under its function name (usable bare or with arguments).

    ``default_input`` is the input shape (batch first) the model is meant for; it is what
    :func:`default_input` returns.

    Example:
        >>> @register_model(default_input=(1, 1, 8, 8))
        ... def doc_example_net(num_classes: int = 2, in_chans: int = 1) -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 64, num_classes))
        >>> create_model("doc_example_net")(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 2])
        >>> _ = _REGISTRY.pop("doc_example_net")
    """

    def decorate(model_fn: ModelFn) -> ModelFn:
        name = model_fn.__name__
        if name in _REGISTRY:
            raise ZooError(f"model {name!r} is already registered")
        _REGISTRY[name] = (model_fn, tuple(default_input))
        return model_fn

    return decorate if fn is None else decorate(fn)


def list_models() -> list[str]:
    """Names of all registered models, sorted.

    Example:
        >>> [n for n in list_models() if n.startswith("resnet")]
        ['resnet10_narrow', 'resnet18', 'resnet18_small', 'resnet34', 'resnet50', 'resnet_tiny']
    """
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[Callable[..., nn.Module], tuple[int, ...]]:
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` go to its constructor.

    Example:
        >>> student = create_model("resnet18", strides=[8, 1, 1, 2, 2, 1], num_classes=10)
        >>> student.conv1.stride, student.fc.out_features
        ((8, 8), 10)
    """
    return _entry(name)[0](**kwargs)


def default_input(name: str) -> tuple[int, ...]:
    """The input shape (N, C, H, W) the registered model ``name`` is meant for.

    Example:
        >>> default_input("resnet18"), default_input("resnet_tiny")
        ((1, 3, 224, 224), (1, 1, 28, 28))
    """
    return _entry(name)[1]


# --------------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------------


def _resolve_strides(
    arch: str,
    strides: Sequence[int] | None,
    default: Sequence[int],
    labels: Sequence[str],
    what: str = "strides",
) -> tuple[int, ...]:
    """``strides`` (or ``default`` when None) checked against one entry per label in ``labels``.

    ``what`` names the argument in the error messages (also used for ResNet ``widths``).
    """
    resolved = tuple(default if strides is None else strides)
    if len(resolved) != len(labels):
        raise ZooError(
            f"{arch}: {what} needs {len(labels)} entries [{', '.join(labels)}], "
            f"got {len(resolved)}: {list(resolved)}"
        )
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in resolved):
        raise ZooError(f"{arch}: {what} must be positive integers, got {list(resolved)}")
    return resolved


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going below 90% of it (torchvision's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _pool(pool_cls: type[nn.MaxPool2d] | type[nn.AvgPool2d], stride: int) -> nn.Module:
    """A non-overlapping pool ``kernel_size = stride = stride``; stride 1 keeps the spatial size."""
    return pool_cls(kernel_size=stride, stride=stride)


def _init_weights(model: nn.Module, conv_mode: str = "fan_out", linear_std: float | None = 0.01) -> None:
    """torchvision-style init: Kaiming-normal convs, unit BatchNorm, optional N(0, std) linears."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias, "same" padding) → norm → optional in-place activation.

    Laid out like torchvision's ``Conv2dNormActivation`` (children ``0``, ``1``, ``2``), so
    ``state_dict`` keys match it.

    Example:
        >>> ConvNormAct(3, 8, stride=2, activation_layer=nn.ReLU6)(torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
    ) -> None:
        layers = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                (kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            norm_layer(out_channels),
        ]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


# --------------------------------------------------------------------------------------------------
# ResNet / ResNeXt (torchvision v1.5)
# --------------------------------------------------------------------------------------------------


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN pairs with a residual; the stride sits on ``conv1`` (torchvision layout)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ZooError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided, grouped) → 1×1 with a residual: ResNet v1.5 / ResNeXt."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet with a configurable stem, stage widths and stride list.

    ``widths`` = the channel count ("planes") of each layer, the stem's width being ``widths[0]``;
    default ``64 * 2**i`` per layer (torchvision's 64/128/256/512), kept as the ``widths`` attribute
    (a tuple). A wrong length or a non-positive entry raises :class:`ZooError` like ``strides``.
    Bottleneck layers output ``4 * widths[i]`` channels, as in torchvision.

    ``strides`` = [conv1, maxpool, layer1, ..., layerN]; default ``[2, 2, 1, 2, 2, 2]`` for the
    ImageNet stem and ``[1, 1, 1, 2, 2, 2]`` for the small stem. A layer's stride goes on its first
    block (``conv1`` of a BasicBlock, ``conv2`` of a Bottleneck) and on that block's 1×1
    ``downsample``, which exists when the stride is not 1 or the channels change.

    ``stem="imagenet"``: ``conv1`` 7×7 pad 3, ``maxpool`` = MaxPool2d(3, stride, padding 1) (stride 1
    keeps the size). ``stem="small"`` (CIFAR style): ``conv1`` 3×3 pad 1; ``maxpool`` is
    ``nn.Identity`` when its stride is 1, else a non-overlapping MaxPool2d(stride, stride).

    Example:
        >>> m = ResNet(BasicBlock, (1, 1), widths=(8, 16), stem="small", num_classes=3).eval()
        >>> m(torch.zeros(1, 3, 16, 16)).shape, m.strides
        (torch.Size([1, 3]), (1, 1, 1, 2))
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        widths: Sequence[int] | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        strides: Sequence[int] | None = None,
        stem: str = "imagenet",
        groups: int = 1,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        labels = ["conv1", "maxpool"] + [f"layer{i + 1}" for i in range(len(layers))]
        self.widths = widths = _resolve_strides(
            "resnet", widths, [64 * 2**i for i in range(len(layers))], labels[2:], what="widths"
        )
        stem_default = {"imagenet": [2, 2], "small": [1, 1]}
        if stem not in stem_default:
            raise ZooError(f"resnet: stem must be 'imagenet' or 'small', got {stem!r}")
        self.strides = _resolve_strides(
            "resnet", strides, stem_default[stem] + [1] + [2] * (len(layers) - 1), labels
        )
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = widths[0]
        conv_stride, pool_stride = self.strides[:2]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, 7, stride=conv_stride, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, 3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        if stem == "imagenet":
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=pool_stride, padding=1)
        else:
            self.maxpool = nn.Identity() if pool_stride == 1 else _pool(nn.MaxPool2d, pool_stride)
        self.layer_names = labels[2:]
        for name, planes, blocks, stride in zip(self.layer_names, widths, layers, self.strides[2:]):
            self.add_module(name, self._make_layer(block, planes, blocks, stride))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        _init_weights(self, linear_std=None)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [
            block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.layer_names:
            x = getattr(self, name)(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@register_model
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision); ``kwargs`` as :class:`ResNet` (``strides``, ``stem``, ``num_classes``...).

    Example:
        >>> resnet18(strides=[8, 1, 1, 2, 2, 1]).eval()(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 (torchvision); ``kwargs`` as :class:`ResNet`.

    Example:
        >>> [len(resnet34().get_submodule(f"layer{i}")) for i in (1, 2, 3, 4)]
        [3, 4, 6, 3]
    """
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (torchvision: stride on the 3×3 conv); ``kwargs`` as :class:`ResNet`.

    Example:
        >>> resnet50().layer2[0].conv2.stride
        (2, 2)
    """
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def resnext50_32x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-50 32×4d (torchvision); ``kwargs`` as :class:`ResNet`.

    Example:
        >>> resnext50_32x4d().layer1[0].conv2
        Conv2d(128, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=32, bias=False)
    """
    return ResNet(Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4, **kwargs)


@register_model(default_input=(1, 3, 32, 32))
def resnet18_small(**kwargs: Any) -> ResNet:
    """ResNet-18 with the CIFAR stem (3×3 stride-1 conv1, no maxpool), 10 classes by default.

    Default strides [conv1, maxpool, layer1..4] = [1, 1, 1, 2, 2, 2]: 32 px → 4×4 final map.

    Example:
        >>> resnet18_small().eval()(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), **{"stem": "small", "num_classes": 10, **kwargs})


@register_model(default_input=(1, 1, 28, 28))
def resnet_tiny(**kwargs: Any) -> ResNet:
    """The docs/definitions.md §6 calibration teacher: small stem to 16 ch, BasicBlock stages 16/32/64 (2 blocks each).

    Defaults: ``in_chans=1``, ``num_classes=10``, strides [conv1, maxpool, layer1, layer2, layer3] =
    [1, 1, 1, 2, 2] (28 → 28/14/7 px). The k=4 student is ``strides=[1, 4, 1, 1, 1]`` (4×4 max-pool
    after the stem, 7×7 everywhere).

    Example:
        >>> resnet_tiny(strides=[1, 4, 1, 1, 1]).eval()(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    defaults = {"widths": (16, 32, 64), "stem": "small", "in_chans": 1, "num_classes": 10}
    return ResNet(BasicBlock, (2, 2, 2), **{**defaults, **kwargs})


@register_model(default_input=(1, 3, 96, 96))
def resnet10_narrow(**kwargs: Any) -> ResNet:
    """A CPU-trainable ImageNet-style ResNet for 96 px (STL10-sized) data: BasicBlock (1, 1, 1, 1),
    widths 16/32/64/128, 10 classes by default.

    The ImageNet stem (7×7 stride-2 ``conv1``, 3×3 stride-2 ``maxpool``) and default strides
    [conv1, maxpool, layer1..4] = [2, 2, 1, 2, 2, 2] (96 → 48/24/24/12/6/3 px). The k=4 student is
    ``strides=[8, 1, 1, 2, 2, 1]`` (as ReDistill's ResNet18), k=8 ``[16, 1, 1, 2, 1, 1]``. With
    ``in_chans=1`` it is the teacher of the Fashion-MNIST canvas benchmark (``distill.canvas``).

    Example:
        >>> resnet10_narrow(in_chans=1, strides=[8, 1, 1, 2, 2, 1]).eval()(torch.zeros(1, 1, 96, 96)).shape
        torch.Size([1, 10])
    """
    return ResNet(BasicBlock, (1, 1, 1, 1), **{"widths": (16, 32, 64, 128), "num_classes": 10, **kwargs})


# --------------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------------

# (expand ratio t, channels c, repeats n, stride s) per stage, as in torchvision.
_MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (ReLU6) → 3×3 depthwise (ReLU6) → 1×1 linear project, in ``.conv``."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers += [
            ConvNormAct(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 with a stride list [stem, stage1, ..., stage7].

    Default strides ``[2, 1, 2, 2, 2, 1, 2, 1]``; a stage's stride goes on its first block.

    Example:
        >>> m = MobileNetV2(width_mult=0.25, num_classes=5).eval()
        >>> m(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 5])
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        strides: Sequence[int] | None = None,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        labels = ["stem"] + [f"stage{i + 1}" for i in range(len(_MOBILENET_V2_STAGES))]
        self.strides = _resolve_strides(
            "mobilenet_v2", strides, [2] + [s for *_, s in _MOBILENET_V2_STAGES], labels
        )
        input_channel = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [
            ConvNormAct(in_chans, input_channel, stride=self.strides[0], activation_layer=nn.ReLU6)
        ]
        for (t, c, n, _), s in zip(_MOBILENET_V2_STAGES, self.strides[1:]):
            output_channel = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(
            ConvNormAct(input_channel, self.last_channel, kernel_size=1, activation_layer=nn.ReLU6)
        )
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model
def mobilenet_v2(**kwargs: Any) -> MobileNetV2:
    """MobileNetV2 (torchvision); ``kwargs`` as :class:`MobileNetV2`.

    Example:
        >>> mobilenet_v2(strides=[8, 1, 2, 2, 1, 1, 1, 1]).features[0][0].stride
        (8, 8)
    """
    return MobileNetV2(**kwargs)


@register_model(default_input=(1, 3, 32, 32))
def mobilenet_v2_small(**kwargs: Any) -> MobileNetV2:
    """MobileNetV2 for 32 px (CIFAR): strides ``[1, 1, 1, 2, 2, 1, 2, 1]`` (32 → 4×4), 10 classes.

    Example:
        >>> mobilenet_v2_small().eval()(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return MobileNetV2(**{"strides": [1, 1, 1, 2, 2, 1, 2, 1], "num_classes": 10, **kwargs})


# --------------------------------------------------------------------------------------------------
# MobileNetV3
# --------------------------------------------------------------------------------------------------

# bneck entries (input_c, kernel, expanded_c, out_c, use_se, use_hardswish, stride), torchvision's table.
_MOBILENET_V3_SMALL = (
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with a hard-sigmoid scale (MobileNetV3)."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidualV3(nn.Module):
    """MobileNetV3 bneck: [1×1 expand] → k×k depthwise → [SE] → 1×1 project, in ``.block``."""

    def __init__(
        self,
        in_c: int,
        kernel: int,
        exp_c: int,
        out_c: int,
        use_se: bool,
        use_hs: bool,
        stride: int,
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_c == out_c
        act = nn.Hardswish if use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp_c != in_c:
            layers.append(ConvNormAct(in_c, exp_c, 1, norm_layer=norm_layer, activation_layer=act))
        layers.append(
            ConvNormAct(exp_c, exp_c, kernel, stride, exp_c, norm_layer=norm_layer, activation_layer=act)
        )
        if use_se:
            layers.append(SqueezeExcitation(exp_c, _make_divisible(exp_c // 4, 8)))
        layers.append(ConvNormAct(exp_c, out_c, 1, norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_c

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class _PooledClassifier(nn.Module):
    """torchvision's ``features -> avgpool -> flatten -> classifier`` forward (MobileNetV3, VGG)."""

    features: nn.Module
    avgpool: nn.Module
    classifier: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class MobileNetV3(_PooledClassifier):
    """torchvision's MobileNetV3 for a bneck table; strides = [stem] + one per bneck entry.

    Example:
        >>> m = MobileNetV3(_MOBILENET_V3_SMALL, 1024, num_classes=4).eval()
        >>> m(torch.zeros(1, 3, 32, 32)).shape, m.strides
        (torch.Size([1, 4]), (2, 2, 2, 1, 2, 1, 1, 1, 1, 2, 1, 1))
    """

    def __init__(
        self,
        setting: Sequence[tuple[int, int, int, int, bool, bool, int]],
        last_channel: int,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        strides: Sequence[int] | None = None,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        labels = ["stem"] + [f"bneck{i + 1}" for i in range(len(setting))]
        self.strides = _resolve_strides("mobilenet_v3", strides, [2] + [cfg[-1] for cfg in setting], labels)
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = [
            ConvNormAct(
                in_chans,
                setting[0][0],
                3,
                self.strides[0],
                norm_layer=norm_layer,
                activation_layer=nn.Hardswish,
            )
        ]
        layers += [
            InvertedResidualV3(*cfg[:-1], stride, norm_layer)
            for cfg, stride in zip(setting, self.strides[1:])
        ]
        lastconv_input_channels = setting[-1][3]
        lastconv_output_channels = 6 * lastconv_input_channels
        layers.append(
            ConvNormAct(
                lastconv_input_channels,
                lastconv_output_channels,
                1,
                norm_layer=norm_layer,
                activation_layer=nn.Hardswish,
            )
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_output_channels, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        _init_weights(self)


@register_model
def mobilenet_v3_small(**kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Small (torchvision); strides default ``[2, 2, 2, 1, 2, 1, 1, 1, 1, 2, 1, 1]``.

    Example:
        >>> mobilenet_v3_small().features[12][0]
        Conv2d(96, 576, kernel_size=(1, 1), stride=(1, 1), bias=False)
    """
    return MobileNetV3(_MOBILENET_V3_SMALL, 1024, **kwargs)


# --------------------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------------------

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(_PooledClassifier):
    """torchvision's VGG; ``strides`` has one entry per max-pool ("M" in ``cfg``), default all 2.

    A pool with stride s is ``MaxPool2d(kernel_size=s, stride=s)`` (s = 1 keeps the size).

    Example:
        >>> m = VGG((8, "M", 16, "M"), num_classes=3, strides=[4, 1]).eval()
        >>> m(torch.zeros(1, 3, 32, 32)).shape, m.features[3]
        (torch.Size([1, 3]), MaxPool2d(kernel_size=4, stride=4, padding=0, dilation=1, ceil_mode=False))
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        *,
        batch_norm: bool = True,
        num_classes: int = 1000,
        in_chans: int = 3,
        strides: Sequence[int] | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        labels = [f"pool{i + 1}" for i in range(cfg.count("M"))]
        self.strides = _resolve_strides("vgg", strides, [2] * len(labels), labels)
        pool_strides = iter(self.strides)
        layers: list[nn.Module] = []
        in_channels = in_chans
        for v in cfg:
            if v == "M":
                layers.append(_pool(nn.MaxPool2d, next(pool_strides)))
            else:
                layers.append(nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(int(v)))
                layers.append(nn.ReLU(inplace=True))
                in_channels = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        _init_weights(self)


@register_model
def vgg11_bn(**kwargs: Any) -> VGG:
    """VGG-11 with BatchNorm (torchvision); strides = the 5 max-pools, default ``[2] * 5``.

    Example (on the meta device: no memory for its 133M parameters):
        >>> with torch.device("meta"):
        ...     model = vgg11_bn(strides=[8, 2, 2, 1, 1])
        >>> model.features[3]
        MaxPool2d(kernel_size=8, stride=8, padding=0, dilation=1, ceil_mode=False)
    """
    return VGG(_VGG11, **kwargs)


# --------------------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-1×1 conv bottleneck then BN-ReLU-3×3 conv on the concatenation of all earlier maps."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False
        )

    def forward(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        return self.conv2(self.relu2(self.norm2(bottleneck_output)))


class DenseBlock(nn.ModuleDict):
    """``denselayer1..N``; each layer sees the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1×1 conv then ``AvgPool2d(kernel_size=stride, stride=stride)`` (torchvision: stride 2)."""

    def __init__(self, num_input_features: int, num_output_features: int, stride: int = 2) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = _pool(nn.AvgPool2d, stride)


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC; strides = [conv0, pool0, transition1, ..., transitionN-1].

    Default strides all 2. ``pool0`` is MaxPool2d(3, stride, padding 1) as in torchvision.

    Example:
        >>> m = DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=2).eval()
        >>> m(torch.zeros(1, 3, 32, 32)).shape, m.strides
        (torch.Size([1, 2]), (2, 2, 2))
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        labels = ["conv0", "pool0"] + [f"transition{i + 1}" for i in range(len(block_config) - 1)]
        self.strides = _resolve_strides("densenet", strides, [2] * len(labels), labels)
        self.features = nn.Sequential(
            OrderedDict(
                [
                    (
                        "conv0",
                        nn.Conv2d(
                            in_chans,
                            num_init_features,
                            kernel_size=7,
                            stride=self.strides[0],
                            padding=3,
                            bias=False,
                        ),
                    ),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=self.strides[1], padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(
                f"denseblock{i + 1}", DenseBlock(num_layers, num_features, bn_size, growth_rate)
            )
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = Transition(num_features, num_features // 2, self.strides[2 + i])
                self.features.add_module(f"transition{i + 1}", trans)
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        _init_weights(self, conv_mode="fan_in", linear_std=None)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


@register_model
def densenet121(**kwargs: Any) -> DenseNet:
    """DenseNet-121 (torchvision); ``kwargs`` as :class:`DenseNet`.

    Example:
        >>> densenet121().features.transition3.pool
        AvgPool2d(kernel_size=2, stride=2, padding=0)
    """
    return DenseNet(32, (6, 12, 24, 16), 64, **kwargs)


@register_model(default_input=(1, 3, 64, 64))
def densenet_small(**kwargs: Any) -> DenseNet:
    """A small DenseNet-BC (blocks (2, 2, 2, 2), growth 12, 24 initial features) for fast tests.

    Example:
        >>> densenet_small(num_classes=10).eval()(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 10])
    """
    return DenseNet(**{"growth_rate": 12, "block_config": (2, 2, 2, 2), "num_init_features": 24, **kwargs})


# --------------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------------


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(ConvNormAct(in_channels, out_channels), ConvNormAct(out_channels, out_channels))


class UNet(nn.Module):
    """A small UNet: ``depth`` encoder levels (two conv-BN-ReLU, then a max-pool), a bottleneck, and
    decoder levels (ConvTranspose2d up, concat with the skip, two conv-BN-ReLU), then a 1×1 ``head``.

    ``strides`` = one per encoder pool (default 2 each); the matching decoder upsampling uses the
    same factor, so the output has the input's spatial size whenever H and W are divisible by the
    product of the strides. Widths are ``base_width * 2**level``.

    Example:
        >>> UNet(in_chans=1, num_classes=3, base_width=4, depth=2).eval()(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 3, 8, 8])
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        num_classes: int = 2,
        base_width: int = 16,
        depth: int = 3,
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        labels = [f"pool{i + 1}" for i in range(depth)]
        self.strides = _resolve_strides("unet", strides, [2] * depth, labels)
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(
            _double_conv(c_in, c_out) for c_in, c_out in zip([in_chans] + widths[: depth - 1], widths[:depth])
        )
        self.pools = nn.ModuleList(_pool(nn.MaxPool2d, s) for s in self.strides)
        self.bottleneck = _double_conv(widths[depth - 1], widths[depth])
        levels = list(reversed(range(depth)))
        self.upsamples = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=self.strides[i], stride=self.strides[i])
            for i in levels
        )
        self.decoders = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in levels)
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for encoder, pool in zip(self.encoders, self.pools):
            x = encoder(x)
            skips.append(x)
            x = pool(x)
        x = self.bottleneck(x)
        for upsample, decoder, skip in zip(self.upsamples, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upsample(x), skip], 1))
        return self.head(x)


@register_model(default_input=(1, 3, 64, 64))
def unet_small(**kwargs: Any) -> UNet:
    """UNet with base width 16 and depth 3 (16/32/64 ch, 128 in the bottleneck); ``kwargs`` as :class:`UNet`.

    Example:
        >>> unet_small(num_classes=4).eval()(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 4, 32, 32])
    """
    return UNet(**kwargs)
