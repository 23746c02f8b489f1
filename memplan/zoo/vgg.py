"""VGG with BatchNorm (torchvision architecture)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from memplan.zoo._registry import register_model
from memplan.zoo.common import (
    PooledClassifier,
    init_weights,
    pool_layer,
    resolve_strides,
)

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(PooledClassifier):
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
        self.strides = resolve_strides("vgg", strides, [2] * len(labels), labels)
        pool_strides = iter(self.strides)
        layers: list[nn.Module] = []
        in_channels = in_chans
        for v in cfg:
            if v == "M":
                layers.append(pool_layer(nn.MaxPool2d, next(pool_strides)))
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
        init_weights(self)


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
