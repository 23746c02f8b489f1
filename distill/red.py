"""ReDistill's RED block and RED loss (docs/definitions.md §5, arXiv 2406.03744).

The RED block stays in the deployed student, so it is built from plain modules only: it traces with
``torch.fx`` and exports to ONNX without data-dependent control flow.

>>> import torch
>>> block = REDBlock(8)
>>> x = torch.randn(2, 8, 7, 7)
>>> block(x).shape
torch.Size([2, 8, 7, 7])
>>> float(red_loss(x, x)) < 1e-6
True
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from memplan.errors import MemplanError
from passes import StageMap, attach_blocks

__all__ = ["ChunkedREDBlock", "REDBlock", "REDError", "attach_red", "ort_friendly", "red_loss"]


class REDError(MemplanError, ValueError):
    """A RED block or loss given inputs it cannot use (channels, mismatched maps)."""

class REDBlock(nn.Module):
    """``out = x * sigmoid(BN(conv1x1(x))) + ReLU6(BN(conv3x3(x)))`` with C -> C channels.

    >>> import torch
    >>> REDBlock(4)(torch.zeros(1, 4, 5, 5)).shape
    torch.Size([1, 4, 5, 5])
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise REDError(f"REDBlock needs channels >= 1, got {channels}")
        self.channels = channels
        self.gate_conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.gate_bn = nn.BatchNorm2d(channels)
        self.gate_act = nn.Sigmoid()
        self.body_conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.body_bn = nn.BatchNorm2d(channels)
        self.body_act = nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        # gate first: its map dies at the multiply, before the body branch allocates (3 maps live, not 4)
        gated = x * self.gate_act(self.gate_bn(self.gate_conv(x)))
        return gated + self.body_act(self.body_bn(self.body_conv(x)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def red_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """RED loss of one attachment: ``1 - cos(mean_c(s), mean_c(t))``, per sample, then batch mean.

    Both inputs are ``(N, C, H, W)`` maps (channel counts may differ; spatial sizes must match).
    The result lies in ``[0, 2]``: 0 for proportional channel-mean maps, 2 for opposite ones.

    >>> import torch
    >>> s = torch.ones(2, 3, 4, 4)
    >>> float(red_loss(s, -s))
    2.0
    """
    if student_feat.dim() != 4 or teacher_feat.dim() != 4:
        raise REDError(
            f"red_loss expects (N, C, H, W) maps, got student {tuple(student_feat.shape)} "
            f"and teacher {tuple(teacher_feat.shape)}"
        )
    if student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise REDError(
            f"red_loss needs equal spatial sizes: student {tuple(student_feat.shape[2:])} vs "
            f"teacher {tuple(teacher_feat.shape[2:])}; match the student stage to a teacher map of the "
            "same resolution"
        )
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise REDError(
            f"red_loss needs equal batch sizes: {student_feat.shape[0]} vs {teacher_feat.shape[0]}"
        )
    s = student_feat.mean(dim=1).flatten(1)
    t = teacher_feat.mean(dim=1).flatten(1)
    return (1.0 - F.cosine_similarity(s, t.to(s.dtype), dim=1)).mean()


def attach_red(student: nn.Module, stage_map: StageMap, placement: str = "input+output") -> fx.GraphModule:
    """A copy of ``student`` with a :class:`REDBlock` at every stage-map pair ``placement`` uses.

    ``placement``: ``"input+output"`` (ReDistill's better setting) or ``"output"``; the copy lists the
    blocks in ``red_points`` and their teacher nodes in ``red_teachers`` (:func:`passes.attach_blocks`).

    >>> import torch
    >>> from memplan.zoo import create_model
    >>> from passes import aggressive_pool
    >>> s = aggressive_pool(create_model("resnet_tiny"), torch.empty(1, 1, 28, 28), factor=4)
    >>> attach_red(s.module, s.stage_map, "output").red_points
    ['red_out0', 'red_out1', 'red_out2']
    """
    return attach_blocks(student, stage_map, placement, REDBlock, prefix="red")


class ChunkedREDBlock(nn.Module):
    """The same function as a (trained, eval-mode) :class:`REDBlock`, computed in ``chunks`` slices of
    output channels and concatenated: the form onnxruntime keeps small.

    onnxruntime's binary element-wise kernels never write in place and its execution order puts the
    body conv before the gate, so a whole-map RED block holds four maps at once (x, body, gate,
    product). Slice by slice, only x, the finished slices and one slice's temporaries are live:
    about two maps. BatchNorm is folded into the sliced convs (eval statistics), as the exporter
    would do.

    >>> import torch
    >>> block = REDBlock(8).eval()
    >>> x = torch.randn(1, 8, 6, 6)
    >>> torch.allclose(ChunkedREDBlock(block, 4)(x), block(x), atol=1e-6)
    True
    """

    def __init__(self, block: REDBlock, chunks: int) -> None:
        super().__init__()
        c = block.channels
        if chunks < 1 or c % chunks:
            raise ValueError(f"ChunkedREDBlock needs chunks dividing {c} channels, got {chunks}")
        self.channels, self.chunks = c, chunks
        gw, gb = _fold(block.gate_conv, block.gate_bn)
        bw, bb = _fold(block.body_conv, block.body_bn)
        step = c // chunks
        self.gate = nn.ModuleList(_conv_from(gw[i:i + step], gb[i:i + step], 0) for i in range(0, c, step))
        self.body = nn.ModuleList(_conv_from(bw[i:i + step], bb[i:i + step], 1) for i in range(0, c, step))
        # x's slice k as a 1x1 conv with 0/1 weights (exact for finite x): a Slice would make
        # onnxruntime copy all of x back out of its blocked NCHWc layout first
        eye = torch.eye(c)[:, :, None, None]
        self.pick = nn.ModuleList(_conv_from(eye[i:i + step], None, 0) for i in range(0, c, step))

    def forward(self, x: Tensor) -> Tensor:
        outs = [pick(x) * gate(x).sigmoid() + F.relu6(body(x))
                for pick, gate, body in zip(self.pick, self.gate, self.body)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale[:, None, None, None], bias


def _conv_from(weight: Tensor, bias: Tensor | None, padding: int) -> nn.Conv2d:
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], padding=padding, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def ort_friendly(model: nn.Module, chunks: int = 16) -> nn.Module:
    """An eval copy of ``model`` whose RED blocks are :class:`ChunkedREDBlock` s (``chunks`` slices, or
    the largest divisor of the channel count below it): the same function, the export form
    onnxruntime runs in about two maps per block instead of four.

    >>> import torch
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), REDBlock(8)).eval()
    >>> x = torch.randn(1, 3, 9, 9)
    >>> torch.allclose(ort_friendly(net)(x), net(x), atol=1e-6)
    True
    """
    import copy

    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, REDBlock):
                    k = max(d for d in range(1, chunks + 1) if child.channels % d == 0)
                    setattr(parent, name, ChunkedREDBlock(child, k))
    return model
