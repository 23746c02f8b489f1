"""DenseNet (torchvision architecture) and a small DenseNet."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memplan.zoo._registry import register_model
from memplan.zoo.common import (
    init_weights,
    pool_layer,
    resolve_strides,
)


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
        self.pool = pool_layer(nn.AvgPool2d, stride)


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
        self.strides = resolve_strides("densenet", strides, [2] * len(labels), labels)
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
        init_weights(self, conv_mode="fan_in", linear_std=None)

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
