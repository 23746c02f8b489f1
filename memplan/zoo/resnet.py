"""ResNet / ResNeXt (torchvision v1.5) and small-image ResNets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from memplan.zoo._registry import ZooError, register_model
from memplan.zoo.common import (
    init_weights,
    pool_layer,
    resolve_strides,
)


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
        self.widths = widths = resolve_strides(
            "resnet", widths, [64 * 2**i for i in range(len(layers))], labels[2:], what="widths"
        )
        stem_default = {"imagenet": [2, 2], "small": [1, 1]}
        if stem not in stem_default:
            raise ZooError(f"resnet: stem must be 'imagenet' or 'small', got {stem!r}")
        self.strides = resolve_strides(
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
            self.maxpool = nn.Identity() if pool_stride == 1 else pool_layer(nn.MaxPool2d, pool_stride)
        self.layer_names = labels[2:]
        for name, planes, blocks, stride in zip(self.layer_names, widths, layers, self.strides[2:]):
            self.add_module(name, self._make_layer(block, planes, blocks, stride))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        init_weights(self, linear_std=None)

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
