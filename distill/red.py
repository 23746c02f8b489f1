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

import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from memplan.errors import MemplanError
from passes import StageMap, attach_blocks

__all__ = ["REDBlock", "attach_red", "red_loss"]


class REDBlock(nn.Module):
    """``out = x * sigmoid(BN(conv1x1(x))) + ReLU6(BN(conv3x3(x)))`` with C -> C channels.

    >>> import torch
    >>> REDBlock(4)(torch.zeros(1, 4, 5, 5)).shape
    torch.Size([1, 4, 5, 5])
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise MemplanError(f"REDBlock needs channels >= 1, got {channels}")
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
        raise MemplanError(
            f"red_loss expects (N, C, H, W) maps, got student {tuple(student_feat.shape)} "
            f"and teacher {tuple(teacher_feat.shape)}"
        )
    if student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise MemplanError(
            f"red_loss needs equal spatial sizes: student {tuple(student_feat.shape[2:])} vs "
            f"teacher {tuple(teacher_feat.shape[2:])}; match the student stage to a teacher map of the "
            "same resolution"
        )
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise MemplanError(
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
