"""Building blocks shared by the zoo families: stride-list checking, torchvision init, ConvNormAct."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from memplan.zoo._registry import ZooError


def resolve_strides(
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


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going below 90% of it (torchvision's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def pool_layer(pool_cls: type[nn.MaxPool2d] | type[nn.AvgPool2d], stride: int) -> nn.Module:
    """A non-overlapping pool ``kernel_size = stride = stride``; stride 1 keeps the spatial size."""
    return pool_cls(kernel_size=stride, stride=stride)


def init_weights(model: nn.Module, conv_mode: str = "fan_out", linear_std: float | None = 0.01) -> None:
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


class PooledClassifier(nn.Module):
    """torchvision's ``features -> avgpool -> flatten -> classifier`` forward (MobileNetV3, VGG)."""

    features: nn.Module
    avgpool: nn.Module
    classifier: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)
