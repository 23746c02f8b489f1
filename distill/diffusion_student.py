"""The k-factor student of a denoising encoder–decoder and its RED sites (ReDistill's DDPM configuration).

:func:`diffusion_student` takes the student from the student pass
(:func:`passes.aggressive_pool.aggressive_pool`: head stride ``k``, ``k`` removed from the deepest
downsampling, the matching decoder upsampling removed, weights copied from the teacher) and then folds
the pass's inserted tail into the last conv: the pass restores the output resolution with a
``ConvTranspose2d(C_out, C_out, k, stride=k)`` *after* the output conv, which for a 1-channel noise
prediction ties the ``k×k`` pixels of each block to one value (a fixed pattern per block, so at least
``1 − 1/k²`` of white noise's variance can never be predicted and DDIM samples keep that noise). The
fold replaces ``conv_out`` (``C_in → C_out``, 3×3) and the tail by one
``ConvTranspose2d(C_in, C_out, k, stride=k)`` — ReDistill's "tail ConvTranspose2d stride 2" on the
decoder's last feature map. The peak does not change (docs/definitions.md §1: the tail's input map is
the smaller one).

RED sites come from the pass's stage map: ``6`` is its ``"6-site"`` selection (head out, first encoder
block in, second encoder block out, decoder blocks in/out, tail in), ``2`` its ``"2-site"`` (head out,
tail in).

Example:
    >>> import torch
    >>> from memplan.zoo import create_model
    >>> teacher = create_model("ddpm_unet_small", base_channels=8, norm_groups=4)
    >>> s = diffusion_student(teacher, (1, 1, 32, 32), factor=2)
    >>> type(s.module.conv_out).__name__, s.module.conv_out.in_channels, s.module.conv_out.stride
    ('ConvTranspose2d', 8, (2, 2))
    >>> red, s_taps, t_taps = red_student(s, 2)
    >>> len(s_taps), red(torch.zeros(2, 1, 32, 32), torch.tensor([1, 2])).shape
    (2, torch.Size([2, 1, 32, 32]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from distill.red import attach_red
from passes.aggressive_pool import StageMap, Student, TailUpsample, aggressive_pool
from passes.downsampling import PassError

__all__ = ["DiffusionStudent", "diffusion_student", "fold_tail", "red_student"]

SITE_PLACEMENTS = {6: "6-site", 2: "2-site"}


@dataclass
class DiffusionStudent:
    """A student denoiser (``module``, an fx GraphModule), its stage map and the pass's result."""

    module: fx.GraphModule
    stage_map: StageMap
    student: Student
    source: str = "passes.aggressive_pool + tail folded into the last conv"


def fold_tail(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every inserted :class:`TailUpsample` (transposed-conv kind) into the conv that feeds it, in place.

    The conv must be a stride-1 ``nn.Conv2d`` read only by the tail, and the tail must not crop; the
    fold gives the conv module a fresh ``ConvTranspose2d(in, out, k, stride=k)`` under the same name.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), TailUpsample):
            continue
        tail = gm.get_submodule(node.target)
        up = tail.up
        src = node.args[0]
        conv = gm.get_submodule(src.target) if getattr(src, "op", None) == "call_module" else None
        if not isinstance(up, nn.ConvTranspose2d) or len(node.args) > 1:
            raise PassError(f"cannot fold tail '{node.name}': only an uncropped transposed-conv tail folds")
        if not isinstance(conv, nn.Conv2d) or conv.stride != (1, 1) or conv.groups != 1 or len(src.users) != 1:
            raise PassError(f"cannot fold tail '{node.name}': its input '{src.name}' is not a stride-1 conv "
                            "read only by the tail")
        k = up.stride
        device = conv.weight.device
        gm.add_submodule(src.target, nn.ConvTranspose2d(conv.in_channels, conv.out_channels, up.kernel_size,
                                                        stride=k, bias=conv.bias is not None).to(device))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def diffusion_student(teacher: nn.Module, shape: Sequence[int], factor: int = 2) -> DiffusionStudent:
    """The factor-``factor`` student of denoiser ``teacher`` (called ``teacher(x, t)``) at input ``shape``."""
    example = [torch.empty(tuple(shape)), torch.zeros(shape[0], dtype=torch.long)]
    s = aggressive_pool(teacher, example, factor=factor)
    return DiffusionStudent(fold_tail(s.module), s.stage_map, s)


def red_student(student: DiffusionStudent, sites: int) -> tuple[fx.GraphModule, list[str], list[str]]:
    """``student`` with RED blocks at ``sites`` (6 or 2) stage-map sites: (module, RED nodes, teacher taps)."""
    if sites not in SITE_PLACEMENTS:
        raise PassError(f"RED site configurations: {sorted(SITE_PLACEMENTS)}, got {sites}")
    red = attach_red(student.module, student.stage_map, placement=SITE_PLACEMENTS[sites])
    return red, list(red.red_points), list(red.red_teachers)
