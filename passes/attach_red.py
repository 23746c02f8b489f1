"""Attach ReDistill's RED blocks (docs/definitions.md §5) to a student at its stage-map points, by graph rewriting.

The blocks stay in the deployed student, so their memory counts: the deploy-form peak of the module
:func:`attach_red` returns is what ``fit_budget`` and ``memplan student`` report as the peak with RED.

Each block is a top-level submodule named ``red_out<stage>`` / ``red_in<stage>`` called by an fx node
of the same name, inserted after the stage-map point (output blocks before input blocks at the same
point) so that every later reader sees its output. The returned ``GraphModule`` still returns the
logits; ``red_points`` lists the block node names in execution order and ``red_teachers`` the teacher
node each one is distilled towards, so a trainer taps both with ``distill.features.FeatureTap``.

Example:
    >>> import torch
    >>> from memplan.zoo import create_model
    >>> from passes.aggressive_pool import aggressive_pool
    >>> s = aggressive_pool(create_model("resnet_tiny"), torch.empty(1, 1, 28, 28), factor=4)
    >>> red = attach_red(s.module, s.stage_map, placement="output")
    >>> red.red_points, red.red_teachers
    (['red_out0', 'red_out1', 'red_out2'], ['layer3_1_relu_1', 'layer3_1_relu_1', 'layer3_1_relu_1'])
    >>> red(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from distill.red import REDBlock
from passes.aggressive_pool import StageMap
from passes.downsampling import PassError

__all__ = ["PLACEMENTS", "attach_red"]

PLACEMENTS = ("input+output", "output")


def attach_red(student: nn.Module, stage_map: StageMap, placement: str = "input+output") -> fx.GraphModule:
    """A copy of ``student`` with a :class:`~distill.red.REDBlock` at every pair ``placement`` uses.

    ``placement`` is ``"input+output"`` (blocks at the input and the output of each matched stage,
    ReDistill's better setting) or ``"output"``. ``student`` is a ``GraphModule`` (``Student.module``)
    or any fx-traceable module whose node names the stage map uses. The copy keeps ``red_points`` and
    ``red_teachers`` through ``copy.deepcopy``.
    """
    pairs = stage_map.for_placement(placement)
    gm = copy.deepcopy(student) if isinstance(student, fx.GraphModule) else fx.symbolic_trace(copy.deepcopy(student))
    nodes = {n.name: n for n in gm.graph.nodes}
    device = next(gm.parameters(), torch.empty(0)).device
    tail: dict[str, fx.Node] = {}
    points, teachers = [], []
    for pair in pairs:
        if pair.student not in nodes:
            raise PassError(f"the student has no node '{pair.student}' from the stage map")
        name = f"red_{'out' if pair.position == 'output' else 'in'}{pair.stage}"
        if hasattr(gm, name):
            raise PassError(f"cannot attach RED block '{name}': the student already has an attribute of that name")
        gm.add_submodule(name, REDBlock(pair.channels).to(device).train(gm.training))
        src = tail.get(pair.student, nodes[pair.student])
        with gm.graph.inserting_after(src):
            red = gm.graph.call_module(name, (src,))
        src.replace_all_uses_with(red, delete_user_cb=lambda user, red=red: user is not red)
        tail[pair.student] = red
        points.append(red.name)
        teachers.append(pair.teacher)
    gm.graph.lint()
    gm.recompile()
    gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = {"red_points": points, "red_teachers": teachers}
    gm.red_points, gm.red_teachers = points, teachers
    return gm
