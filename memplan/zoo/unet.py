"""A small UNet (encoder-decoder with skip connections)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from memplan.zoo._registry import register_model
from memplan.zoo.common import (
    ConvNormAct,
    init_weights,
    pool_layer,
    resolve_strides,
)


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
        self.strides = resolve_strides("unet", strides, [2] * depth, labels)
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(
            _double_conv(c_in, c_out) for c_in, c_out in zip([in_chans] + widths[: depth - 1], widths[:depth])
        )
        self.pools = nn.ModuleList(pool_layer(nn.MaxPool2d, s) for s in self.strides)
        self.bottleneck = _double_conv(widths[depth - 1], widths[depth])
        levels = list(reversed(range(depth)))
        self.upsamples = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=self.strides[i], stride=self.strides[i])
            for i in levels
        )
        self.decoders = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in levels)
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)
        init_weights(self)

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
