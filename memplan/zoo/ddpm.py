"""DDPM denoising UNets (Ho et al. 2020), written from the paper's description.

The network takes ``(x, t)``: images ``(N, C, H, W)`` and time steps ``(N,)`` (integer or float), and
returns the predicted noise, shaped like ``x``. Layout (the CIFAR-10 configuration of the paper):

- sinusoidal embedding of ``t`` → Linear → SiLU → Linear (``4 * base`` wide), added to every
  residual block through a SiLU → Linear projection;
- ``conv_in`` (3×3), then per level ``num_res_blocks`` residual blocks (GroupNorm, SiLU, conv 3×3,
  + time, GroupNorm, SiLU, dropout, conv 3×3; 1×1 conv shortcut when the width changes), self-attention
  after each block at the attention levels, and a DownSample (3×3 conv, stride 2) between levels;
- middle: residual block, attention, residual block;
- decoder: per level ``num_res_blocks + 1`` residual blocks, each on the concat of the running map and
  one saved encoder map (every block, conv_in and DownSample output is saved), UpSample (nearest ×2,
  then 3×3 conv) between levels;
- GroupNorm, SiLU, ``conv_out`` (3×3) back to the image channels.

``strides`` lists the downsampling points in forward order (docs/definitions.md §4):
``[conv_in, down0, down1, ...]``, default ``[1, 2, 2, ...]``. Each UpSample uses its mirrored
DownSample's factor (factor 1: no interpolation, only the conv) and a ``conv_in`` stride ``k > 1``
makes the tail a ``ConvTranspose2d`` of stride ``k``: ReDistill's k=2 DDPM student is
``strides=[2, 2, 2, 1]`` (head stride 2, deepest DownSample stride 1, tail transposed conv stride 2).

Example:
    >>> import torch
    >>> net = DDPMUNet(in_chans=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
    ...                attn_levels=(1,), norm_groups=4).eval()
    >>> net(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999])).shape
    torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memplan.zoo._registry import ZooError, register_model
from memplan.zoo.common import resolve_strides

__all__ = ["AttnBlock", "DDPMUNet", "DownSample", "ResBlock", "TimeEmbedding", "UpSample", "ddpm_unet",
           "ddpm_unet_small"]


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of ``t`` (``dim`` features, sin half then cos half) → Linear → SiLU → Linear.

    Example:
        >>> TimeEmbedding(8, 32)(torch.tensor([0, 10])).shape
        torch.Size([2, 32])
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ZooError(f"TimeEmbedding needs an even dim >= 2, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.dense0 = nn.Linear(dim, out_dim)
        self.act = nn.SiLU()
        self.dense1 = nn.Linear(out_dim, out_dim)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.float()[:, None] * self.freqs[None, :]
        return self.dense1(self.act(self.dense0(torch.cat([arg.sin(), arg.cos()], dim=1))))


class ResBlock(nn.Module):
    """DDPM residual block with the time embedding added after the first conv.

    Example:
        >>> ResBlock(8, 16, 32, norm_groups=4)(torch.zeros(1, 8, 4, 4), torch.zeros(1, 32)).shape
        torch.Size([1, 16, 4, 4])
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, *, dropout: float = 0.0, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(norm_groups, in_ch), in_ch)
        self.act1 = nn.SiLU()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_act = nn.SiLU()
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(min(norm_groups, out_ch), out_ch)
        self.act2 = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        h = h + self.temb_proj(self.temb_act(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``H*W`` positions, with a residual connection.

    Example:
        >>> AttnBlock(8, norm_groups=4)(torch.zeros(1, 8, 3, 5)).shape
        torch.Size([1, 8, 3, 5])
    """

    def __init__(self, ch: int, *, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(norm_groups, ch), ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)
        self.scale = ch ** -0.5

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = self.q(h).flatten(2), self.k(h).flatten(2), self.v(h).flatten(2)  # (N, C, HW)
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.scale, dim=-1)  # (N, HW, HW)
        out = torch.bmm(v, w.transpose(1, 2)).reshape_as(x)
        return x + self.proj_out(out)


class DownSample(nn.Module):
    """3×3 conv of stride ``stride`` (padding 1; stride 1 keeps the size)."""

    def __init__(self, ch: int, stride: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=stride, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UpSample(nn.Module):
    """Nearest-neighbour upsampling by ``factor`` (none when 1), then a 3×3 conv."""

    def __init__(self, ch: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.factor > 1:
            x = F.interpolate(x, scale_factor=float(self.factor), mode="nearest")
        return self.conv(x)


class DDPMUNet(nn.Module):
    """The DDPM ε-prediction UNet (module docstring). ``attn_levels``: level indices with attention.

    The output has ``num_classes`` channels (the zoo's name for a dense head's width), default
    ``in_chans``: the predicted noise.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_levels: Sequence[int] = (1,),
        dropout: float = 0.1,
        norm_groups: int = 32,
        strides: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not channel_mults or num_res_blocks < 1:
            raise ZooError("ddpm_unet needs at least one level and num_res_blocks >= 1")
        levels = len(channel_mults)
        labels = ["conv_in"] + [f"down{i}" for i in range(levels - 1)]
        self.strides = resolve_strides("ddpm_unet", strides, [1] + [2] * (levels - 1), labels)
        self.in_chans = in_chans
        self.config: dict[str, Any] = dict(  # what rebuilds this network with other strides
            in_chans=in_chans, base_channels=base_channels, channel_mults=tuple(channel_mults),
            num_res_blocks=num_res_blocks, attn_levels=tuple(attn_levels), dropout=dropout, norm_groups=norm_groups,
            num_classes=num_classes)
        temb_ch = 4 * base_channels
        self.temb = TimeEmbedding(base_channels, temb_ch)
        self.conv_in = nn.Conv2d(in_chans, base_channels, 3, stride=self.strides[0], padding=1)

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, temb_ch, dropout=dropout, norm_groups=norm_groups)

        def attn(level: int, ch: int) -> nn.Module:
            return AttnBlock(ch, norm_groups=norm_groups) if level in attn_levels else nn.Identity()

        widths = [base_channels * m for m in channel_mults]
        skips, ch = [base_channels], base_channels
        self.down_blocks, self.down_attns, self.downsamples = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level, width in enumerate(widths):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(res(ch, width))
                attns.append(attn(level, width))
                ch = width
                skips.append(ch)
            self.down_blocks.append(blocks)
            self.down_attns.append(attns)
            if level < levels - 1:
                self.downsamples.append(DownSample(ch, self.strides[level + 1]))
                skips.append(ch)
        self.mid_block1, self.mid_attn, self.mid_block2 = res(ch, ch), AttnBlock(ch, norm_groups=norm_groups), res(ch, ch)
        self.up_blocks, self.up_attns, self.upsamples = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(levels)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(res(ch + skips.pop(), widths[level]))
                attns.append(attn(level, widths[level]))
                ch = widths[level]
            self.up_blocks.append(blocks)
            self.up_attns.append(attns)
            if level > 0:
                self.upsamples.append(UpSample(ch, self.strides[level]))
        self.norm_out = nn.GroupNorm(min(norm_groups, ch), ch)
        self.act_out = nn.SiLU()
        k, out_chans = self.strides[0], num_classes or in_chans
        self.conv_out = (nn.Conv2d(ch, out_chans, 3, padding=1) if k == 1
                         else nn.ConvTranspose2d(ch, out_chans, kernel_size=k, stride=k))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.temb(t)
        h = self.conv_in(x)
        hs = [h]
        for level, (blocks, attns) in enumerate(zip(self.down_blocks, self.down_attns)):
            for block, att in zip(blocks, attns):
                h = att(block(h, temb))
                hs.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                hs.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb)), temb)
        for level, (blocks, attns) in enumerate(zip(self.up_blocks, self.up_attns)):
            for block, att in zip(blocks, attns):
                h = att(block(torch.cat([h, hs.pop()], dim=1), temb))
            if level < len(self.upsamples):
                h = self.upsamples[level](h)
        return self.conv_out(self.act_out(self.norm_out(h)))


@register_model(default_input=(1, 3, 32, 32), extra_inputs=(((0,), "int64"),))  # (image, time step)
def ddpm_unet(**kwargs: Any) -> DDPMUNet:
    """The DDPM CIFAR-10 UNet: base 128, multipliers [1,2,2,2], 2 blocks per level, attention at 16×16.

    Example:
        >>> sum(p.numel() for p in ddpm_unet().parameters())
        35746307
    """
    return DDPMUNet(**kwargs)


@register_model(default_input=(1, 1, 32, 32), extra_inputs=(((0,), "int64"),))
def ddpm_unet_small(**kwargs: Any) -> DDPMUNet:
    """A CPU-sized DDPM UNet for 1×32×32 images: base 32, multipliers [1,2,2], 1 block, attention at 8×8.

    Dropout 0 (short training runs); ``kwargs`` as :class:`DDPMUNet`.

    Example:
        >>> ddpm_unet_small().eval()(torch.zeros(1, 1, 32, 32), torch.tensor([5])).shape
        torch.Size([1, 1, 32, 32])
    """
    config: dict[str, Any] = dict(in_chans=1, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                                  attn_levels=(2,), dropout=0.0, norm_groups=8)
    return DDPMUNet(**{**config, **kwargs})
