"""Attach C->C blocks to a student at its stage-map points, by graph rewriting (RED: docs/definitions.md §5).

The pass knows nothing of the block: ``block(channels)`` builds one (``distill.red.attach_red`` passes
ReDistill's RED block). The blocks stay in the deployed student, so their memory counts: the
deploy-form peak of the module :func:`attach_blocks` returns is what ``fit_budget`` and
``memplan student`` report as the peak with RED.

Each block is a top-level submodule named ``<prefix>_out<stage>`` / ``<prefix>_in<stage>`` called by an
fx node of the same name, inserted after the stage-map point (output blocks before input blocks at the
same point) so that every later reader sees its output. The returned ``GraphModule`` still returns the
logits; ``<prefix>_points`` lists the block node names in execution order and ``<prefix>_teachers`` the
teacher node each one is distilled towards, so a trainer taps both with ``distill.features.FeatureTap``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from memplan.zoo import create_model
    >>> from passes.aggressive_pool import aggressive_pool
    >>> s = aggressive_pool(create_model("resnet_tiny"), torch.empty(1, 1, 28, 28), factor=4)
    >>> red = attach_blocks(s.module, s.stage_map, "output", lambda c: nn.Conv2d(c, c, 1))
    >>> red.red_points, red.red_teachers
    (['red_out0', 'red_out1', 'red_out2'], ['layer3_1_relu_1', 'layer3_1_relu_1', 'layer3_1_relu_1'])
    >>> red(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from passes.aggressive_pool import StageMap
from passes.downsampling import PassError

__all__ = ["PLACEMENTS", "BlockFactory", "attach_blocks"]

PLACEMENTS = ("input+output", "output")

BlockFactory = Callable[[int], nn.Module]


def attach_blocks(student: nn.Module, stage_map: StageMap, placement: str, block: BlockFactory,
                  prefix: str = "red") -> fx.GraphModule:
    """A copy of ``student`` with ``block(channels)`` at every stage-map pair ``placement`` uses.

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
        name = f"{prefix}_{'out' if pair.position == 'output' else 'in'}{pair.stage}"
        if hasattr(gm, name):
            raise PassError(f"cannot attach block '{name}': the student already has an attribute of that name")
        gm.add_submodule(name, block(pair.channels).to(device).train(gm.training))
        src = tail.get(pair.student, nodes[pair.student])
        with gm.graph.inserting_after(src):
            red = gm.graph.call_module(name, (src,))
        src.replace_all_uses_with(red, delete_user_cb=lambda user, red=red: user is not red)
        tail[pair.student] = red
        points.append(red.name)
        teachers.append(pair.teacher)
    gm.graph.lint()
    gm.recompile()
    attrs = {f"{prefix}_points": points, f"{prefix}_teachers": teachers}
    gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = attrs
    for key, value in attrs.items():
        setattr(gm, key, value)
    return gm
