"""MobileNetV2 and MobileNetV3 (torchvision architectures)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memplan.zoo._registry import register_model
from memplan.zoo.common import (
    ConvNormAct,
    PooledClassifier,
    init_weights,
    make_divisible,
    resolve_strides,
)

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
        self.strides = resolve_strides(
            "mobilenet_v2", strides, [2] + [s for *_, s in _MOBILENET_V2_STAGES], labels
        )
        input_channel = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [
            ConvNormAct(in_chans, input_channel, stride=self.strides[0], activation_layer=nn.ReLU6)
        ]
        for (t, c, n, _), s in zip(_MOBILENET_V2_STAGES, self.strides[1:]):
            output_channel = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(
            ConvNormAct(input_channel, self.last_channel, kernel_size=1, activation_layer=nn.ReLU6)
        )
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self)

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
            layers.append(SqueezeExcitation(exp_c, make_divisible(exp_c // 4, 8)))
        layers.append(ConvNormAct(exp_c, out_c, 1, norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_c

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result




class MobileNetV3(PooledClassifier):
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
        self.strides = resolve_strides("mobilenet_v3", strides, [2] + [cfg[-1] for cfg in setting], labels)
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
        init_weights(self)


@register_model
def mobilenet_v3_small(**kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Small (torchvision); strides default ``[2, 2, 2, 1, 2, 1, 1, 1, 1, 2, 1, 1]``.

    Example:
        >>> mobilenet_v3_small().features[12][0]
        Conv2d(96, 576, kernel_size=(1, 1), stride=(1, 1), bias=False)
    """
    return MobileNetV3(_MOBILENET_V3_SMALL, 1024, **kwargs)
