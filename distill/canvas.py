"""Items on a larger, cluttered canvas: a localisation-heavy variant of small-image datasets.

``make_canvas_dataset`` pastes each (e.g. 28×28 Fashion-MNIST) item at a random position of a
``canvas``×``canvas`` black image (96 = STL10's size), optionally rescaled, over ``clutter``
fragments cut from *other* items of the same set at lower intensity. The classifier must find the
full-intensity, whole object among partial, dimmer distractors — exactly the spatial detail an
aggressive-pooling student (docs/definitions.md §4) throws away, so the teacher-student gap is large, unlike
on plain 28×28 Fashion-MNIST (docs/definitions.md §6).

Calibrated regime (Fashion-MNIST, ``canvas=96, clutter=2, scale=(2, 2)``, 20k balanced training
images, 8 epochs, zoo ``resnet10_narrow``): teacher ≈ 85.7% test accuracy, its k=4 student
(``strides=[8, 1, 1, 2, 2, 1]``) ≈ 78.9%, k=8 (``[16, 1, 1, 2, 1, 1]``) ≈ 66%.

Everything is drawn up front from one ``torch.Generator`` seeded with ``seed`` and rendered in
chunks with batched matrix products (separable resampling, no Python loop over images): the
result depends only on the inputs and the parameters, not on the chunk size or thread count.
70k 96×96 canvases take a few seconds on two CPU cores.

>>> import torch
>>> items = torch.zeros(3, 28, 28, dtype=torch.uint8)
>>> items[:, 8:20, 8:20] = 200
>>> x, y = make_canvas_dataset(items, torch.tensor([0, 1, 2]), canvas=64, seed=0, clutter=2)
>>> x.shape, x.dtype, y.tolist()
(torch.Size([3, 1, 64, 64]), torch.uint8, [0, 1, 2])
>>> int((x == 200).sum(dim=(1, 2, 3)).min())  # each whole 12×12 item is there, unchanged
144
>>> bool((make_canvas_dataset(items, torch.tensor([0, 1, 2]), canvas=64, seed=0, clutter=2)[0] == x).all())
True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from memplan.errors import MemplanError

__all__ = ["make_canvas_dataset"]


class CanvasError(MemplanError, ValueError):
    """Canvas options that cannot produce a dataset."""


def _weights(out_size: int, src_size: int, scale: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Per-sample 1-D resampling matrices ``(B, out_size, src_size)`` into a box at the origin.

    Output pixel ``i < round((hi - lo) * scale)`` of sample ``b`` reads source coordinate
    ``u = (i + 0.5) / scale[b] - 0.5 + lo[b]``, clamped into the crop window ``[lo, hi - 1]`` (as
    ``F.interpolate(align_corners=False)``), with a tent (bilinear) kernel widened by ``1 / scale``
    when shrinking (antialiasing); source pixels outside the window weigh 0, later output pixels
    are 0. Scale 1 gives exact 0/1 weights: a pixel-exact copy.
    """
    i = torch.arange(out_size, dtype=torch.float32)[None, :, None]
    y = torch.arange(src_size, dtype=torch.float32)[None, None, :]
    s = scale.to(torch.float32)[:, None, None]
    lo, hi = lo.to(torch.float32)[:, None, None], hi.to(torch.float32)[:, None, None]
    u = torch.minimum(torch.maximum((i + 0.5) / s - 0.5 + lo, lo), hi - 1)
    shrink = torch.clamp(s, max=1.0)
    w = (y - u).abs_().mul_(shrink).neg_().add_(1.0).clamp_(min=0.0).mul_(shrink)
    return w.mul_((y >= lo) & (y < hi) & (i < torch.round((hi - lo) * s)))


def _paste(canvas: Tensor, patch: Tensor, top: Tensor, left: Tensor, mode: str) -> None:
    """Combine ``patch`` ``(B, L, L)`` into ``canvas`` ``(B, H, W)`` at per-sample ``(top, left)``.

    ``mode="max"``: element-wise maximum; ``"over"``: the patch wherever it rounds to non-zero.
    ``canvas`` must be padded by ``L`` on the bottom and right so every box fits.
    """
    side = patch.shape[-1]
    offsets = torch.arange(side)
    rows = (top[:, None] + offsets)[:, :, None]
    cols = (left[:, None] + offsets)[:, None, :]
    batch = torch.arange(canvas.shape[0])[:, None, None]
    region = canvas[batch, rows, cols]
    if mode == "max":
        canvas[batch, rows, cols] = torch.maximum(region, patch)
    else:
        canvas[batch, rows, cols] = torch.where(patch >= 0.5, patch, region)


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def _randint_upto(high: Tensor, generator: torch.Generator) -> Tensor:
    """One integer in ``[0, high[b]]`` per entry (inclusive), drawn with ``generator``."""
    r = torch.rand(high.shape, generator=generator, dtype=torch.float64)
    return torch.minimum((r * (high + 1).to(torch.float64)).floor().to(torch.int64), high)


def make_canvas_dataset(
    images: Tensor,
    labels: Tensor,
    *,
    canvas: int = 96,
    seed: int = 0,
    clutter: int = 4,
    scale: tuple[float, float] = (1.0, 1.0),
    clutter_size: tuple[int, int] = (8, 16),
    clutter_intensity: tuple[float, float] = (0.3, 0.6),
    chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Place each item at a random position of a ``canvas``×``canvas`` image among clutter.

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, 1, H, W)`` items (background 0, e.g. Fashion-MNIST).
        labels: ``(N,)`` labels; returned unchanged (as int64) — the canvas keeps each item's class.
        canvas: side of the square output; must hold the largest rescaled item.
        seed: seeds the ``torch.Generator`` all random draws come from.
        clutter: fragments per canvas, each a square crop of another random item (never the
            canvas's own), resampled by its own random factor from ``scale``, multiplied by an
            intensity factor drawn from ``clutter_intensity`` and placed anywhere on the canvas
            (overlaps combine by maximum). 0 gives clean canvases.
        scale: item rescale factor drawn uniformly from ``[lo, hi]``; the item becomes a square
            of side ``round(H * factor)`` (bilinear, antialiased when shrinking), placed at a
            uniformly random integer position, entirely inside the canvas. ``(1, 1)``: a
            pixel-exact paste.
        clutter_size: side of the source crop of a fragment, uniform integer in ``[lo, hi]``
            (clipped to the item size), at a uniform position inside the source item.
        clutter_intensity: fragment brightness factor range; below 1 keeps the real item the
            brightest object (the item is drawn on top wherever its pixels are non-zero).
        chunk: canvases rendered per batched step (memory ≈ ``chunk * (clutter + 1) * canvas²``
            floats); does not change the result.

    Returns:
        ``(canvases, labels)``: uint8 ``(N, 1, canvas, canvas)`` and int64 ``(N,)``.
    """
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise CanvasError(
            f"images must be uint8 (N, H, W) or (N, 1, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    n, h, w = images.shape
    if labels.shape != (n,):
        raise CanvasError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if not 0 < scale[0] <= scale[1]:
        raise CanvasError(f"scale must be 0 < lo <= hi, got {scale}")
    if round(max(h, w) * scale[1]) > canvas:
        raise CanvasError(f"canvas {canvas} cannot hold a {h}x{w} item scaled by {scale[1]}")
    if clutter < 0 or (clutter > 0 and n < 2):
        raise CanvasError(f"clutter needs a non-negative count and at least 2 items, got {clutter} with {n}")
    if not 1 <= clutter_size[0] <= clutter_size[1]:
        raise CanvasError(f"clutter_size must be 1 <= lo <= hi, got {clutter_size}")

    g = torch.Generator().manual_seed(seed)
    # The item: size, position.
    factor = _uniform(n, scale, g)
    out_h = torch.round(h * factor).clamp(min=1).to(torch.int64)
    out_w = torch.round(w * factor).clamp(min=1).to(torch.int64)
    item_y = _randint_upto(canvas - out_h, g)
    item_x = _randint_upto(canvas - out_w, g)
    # The fragments: source item, crop window, scale, position, intensity. Shapes (N, clutter).
    k = clutter
    source = (torch.arange(n)[:, None] + 1 + torch.randint(0, max(n - 1, 1), (n, k), generator=g)) % n
    side = torch.randint(clutter_size[0], clutter_size[1] + 1, (n, k), generator=g)
    side_h, side_w = side.clamp(max=h), side.clamp(max=w)
    crop_y = _randint_upto(h - side_h, g)
    crop_x = _randint_upto(w - side_w, g)
    frag_factor = _uniform(n * k, scale, g).view(n, k)
    frag_h = torch.round(side_h * frag_factor).clamp(min=1).to(torch.int64)
    frag_w = torch.round(side_w * frag_factor).clamp(min=1).to(torch.int64)
    frag_y = _randint_upto(canvas - frag_h, g)
    frag_x = _randint_upto(canvas - frag_w, g)
    intensity = _uniform(n * k, clutter_intensity, g).view(n, k).to(torch.float32)

    out = torch.empty(n, 1, canvas, canvas, dtype=torch.uint8)
    src = images.to(torch.float32)
    item_box = max(1, math.ceil(max(h, w) * scale[1]))
    frag_box = max(1, math.ceil(clutter_size[1] * scale[1]))
    zeros = torch.zeros(n, dtype=torch.float64)
    for start in range(0, n, chunk):
        b = slice(start, min(start + chunk, n))
        nb = b.stop - b.start
        board = torch.zeros(nb, canvas + item_box, canvas + item_box)
        for j in range(k):
            cy, cx = crop_y[b, j], crop_x[b, j]
            wy = _weights(frag_box, h, frag_h[b, j] / side_h[b, j], cy, cy + side_h[b, j])
            wx = _weights(frag_box, w, frag_w[b, j] / side_w[b, j], cx, cx + side_w[b, j])
            frag = wy @ src[source[b, j]] @ wx.transpose(1, 2)
            _paste(board, frag * intensity[b, j, None, None], frag_y[b, j], frag_x[b, j], "max")
        # Item: the exact per-axis scales out_h/h and out_w/w keep its rendered size an integer.
        wy = _weights(item_box, h, out_h[b] / h, zeros[b], zeros[b] + h)
        wx = _weights(item_box, w, out_w[b] / w, zeros[b], zeros[b] + w)
        _paste(board, wy @ src[b] @ wx.transpose(1, 2), item_y[b], item_x[b], "over")
        out[b, 0] = board[:, :canvas, :canvas].round_().clamp_(0, 255).to(torch.uint8)
    return out, labels.to(torch.int64).clone()
