"""The k-factor student of a DDPM UNet and its RED sites (ReDistill's diffusion configuration).

:func:`diffusion_student` asks the student pass (:func:`passes.aggressive_pool.aggressive_pool`) for
the encoder–decoder student first. While that pass refuses networks that upsample, it falls back to
the student the zoo constructor builds directly (``strides=[k, 2, ..., 2, 2/k...]``: head stride
``k``, ``k`` taken from the deepest DownSamples, the matching UpSamples and a ``ConvTranspose2d`` tail
of stride ``k``) and weights copied from the teacher where shapes match; ``Student.source`` says which.

RED sites (the paper's configurations; each student map paired with the teacher map of equal
size at the same depth of the encoder or decoder):

- 6 sites: head out, the last block out of encoder levels 0 and 1, the last block out of decoder
  level 1, the first block out of decoder level 0, tail in;
- 2 sites: head out, tail in.

Example:
    >>> import torch
    >>> from memplan.zoo import create_model
    >>> teacher = create_model("ddpm_unet_small", base_channels=8, norm_groups=4)
    >>> s = diffusion_student(teacher, (1, 1, 32, 32), factor=2)
    >>> s.module.strides, s.source
    ((2, 2, 1), 'zoo constructor (hand-built)')
    >>> red, s_taps, t_taps = red_student(s, 2)
    >>> s_taps, t_taps
    (['red_out0', 'red_out5'], ['downsamples.0', 'up_attns.1.1'])
    >>> red(torch.zeros(2, 1, 32, 32), torch.tensor([1, 2])).shape
    torch.Size([2, 1, 32, 32])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from memplan.zoo import DDPMUNet
from passes.aggressive_pool import StageMap, StagePair, aggressive_pool, transfer_weights
from passes.attach_red import attach_red
from passes.downsampling import PassError

__all__ = ["DiffusionStudent", "diffusion_student", "red_student"]

SITE_COUNTS = (2, 6)


@dataclass
class DiffusionStudent:
    """A student denoiser, the teacher it came from, its 6 RED sites and how it was derived."""

    module: nn.Module
    teacher: nn.Module
    stage_map: StageMap
    source: str


class _LeafTracer(fx.Tracer):
    """fx tracer keeping the named submodules whole, so their outputs are single nodes."""

    def __init__(self, leaves: frozenset[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def _site_modules(net: DDPMUNet) -> tuple[list[str], list[str]]:
    """(student module, teacher module) of the 6 sites, for a UNet of >= 3 levels (module docstring)."""
    levels, last = len(net.down_blocks), len(net.down_blocks[0]) - 1
    if levels < 3:
        raise PassError(f"the 6-site RED configuration needs a DDPM UNet of >= 3 levels, got {levels}")
    # up_attns[i] is decoder level levels-1-i; its blocks run 0..num_res_blocks
    student = ["conv_in", f"down_attns.0.{last}", f"down_attns.1.{last}", f"up_attns.{levels - 2}.{last + 1}",
               f"up_attns.{levels - 1}.0", "act_out"]
    teacher = ["downsamples.0", f"down_attns.1.{last}", f"down_attns.2.{last}", f"up_attns.{levels - 3}.{last + 1}",
               f"up_attns.{levels - 2}.0", f"up_attns.{levels - 2}.{last + 1}"]
    return student, teacher


def _shapes(model: nn.Module, names: Sequence[str], shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Output shapes of submodules ``names`` in one forward on zeros."""
    found: dict[str, tuple[int, ...]] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: found.__setitem__(n, tuple(out.shape))) for n in names]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(tuple(shape)), torch.zeros(shape[0], dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return found


def diffusion_student(teacher: nn.Module, shape: Sequence[int], factor: int = 2) -> DiffusionStudent:
    """The factor-``factor`` student of ``teacher`` at input ``shape`` (module docstring)."""
    example = [torch.empty(tuple(shape)), torch.zeros(shape[0], dtype=torch.long)]
    try:
        s = aggressive_pool(teacher, example, factor=factor)
        return DiffusionStudent(s.module, teacher, s.stage_map, "passes.aggressive_pool")
    except PassError:
        if not isinstance(teacher, DDPMUNet):
            raise
    strides = list(teacher.strides)
    strides[0] *= factor
    remaining = factor
    for i in reversed(range(1, len(strides))):  # the deepest DownSamples give up the factor
        take = min(remaining, strides[i])
        if remaining % take:
            raise PassError(f"cannot remove a factor {factor} from the DownSample strides {teacher.strides}")
        strides[i] //= take
        remaining //= take
        if remaining == 1:
            break
    if remaining != 1:
        raise PassError(f"cannot remove a factor {factor} from the DownSample strides {teacher.strides}")
    student = DDPMUNet(**teacher.config, strides=strides)
    transfer_weights(teacher, student)
    s_names, t_names = _site_modules(student)
    s_shapes, t_shapes = _shapes(student, s_names, shape), _shapes(teacher, t_names, shape)
    pairs = []
    for i, (s_name, t_name) in enumerate(zip(s_names, t_names)):
        if s_shapes[s_name][2:] != t_shapes[t_name][2:]:
            raise PassError(f"RED site {s_name}: student map {s_shapes[s_name]} and teacher map {t_shapes[t_name]} "
                            "differ in size")
        pairs.append(StagePair(i, "output", s_name.replace(".", "_"), t_name, s_shapes[s_name][2:],
                               s_shapes[s_name][1], t_shapes[t_name][1]))
    gm = fx.GraphModule(student, _LeafTracer(frozenset(s_names)).trace(student), "DDPMStudent")
    gm.strides = student.strides
    return DiffusionStudent(gm, teacher, StageMap(tuple(pairs)), "zoo constructor (hand-built)")


def red_student(student: DiffusionStudent, sites: int) -> tuple[fx.GraphModule, list[str], list[str]]:
    """``student`` with RED blocks at ``sites`` (2 or 6) sites: (module, its RED nodes, teacher taps)."""
    if sites not in SITE_COUNTS:
        raise PassError(f"RED site configurations: {SITE_COUNTS}, got {sites}")
    pairs = student.stage_map.outputs
    chosen = pairs if sites == 6 else (pairs[0], pairs[-1])
    if len(pairs) < sites:
        raise PassError(f"the stage map has {len(pairs)} sites, {sites} requested")
    red = attach_red(student.module, StageMap(tuple(chosen)), placement="output")
    return red, list(red.red_points), list(red.red_teachers)
