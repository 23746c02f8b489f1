"""How the trainer obtains intermediate features: the ``FeatureFn`` protocol and ``FeatureTap``.

A feature function is a graph rewrite plus a call convention: ``prepare(model)`` returns the module
to train/run (it must be called before any DDP wrapping), and ``fn(prepared, x)`` returns
``(logits, [features])``. ``LogitsOnly`` returns no features; ``FeatureTap`` rewrites the model's
``torch.fx`` graph so that it also returns the outputs of the named nodes or modules (no forward
hooks), which works the same for teacher and student.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3))
>>> tap = FeatureTap(["1"])
>>> tapped = tap.prepare(net)
>>> logits, feats = tap(tapped, torch.randn(2, 1, 5, 5))
>>> logits.shape, feats[0].shape
(torch.Size([2, 3]), torch.Size([2, 4, 5, 5]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch.fx as fx
from torch import Tensor, nn

from memplan.errors import MemplanError

__all__ = ["FeatureFn", "FeatureTap", "LogitsOnly"]


class TapError(MemplanError, ValueError):
    """A feature tap naming no node or module, or a model torch.fx cannot trace."""


class FeatureFn(Protocol):
    """Prepares a model (graph rewrite) and runs it to ``(logits, features)``."""

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def __call__(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]: ...


@dataclass(frozen=True)
class LogitsOnly:
    """Feature function of a model used for its logits only.

    >>> import torch
    >>> LogitsOnly()(nn.Identity(), torch.ones(1, 2))
    (tensor([[1., 1.]]), [])
    """

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def __call__(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return model(x), []


class _TapTracer(fx.Tracer):
    """Symbolic tracer that keeps the tapped modules whole, so their outputs are single nodes."""

    def __init__(self, leaves: frozenset[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class FeatureTap:
    """Taps named node or module outputs by rewriting the model's fx graph.

    ``names`` are module qualified names (``"layer1.0"``; containers are kept whole so their output
    is tappable) or fx node names (``"add_1"``). The prepared ``GraphModule`` shares parameters and
    buffers with the original model and returns ``(original_output, [tapped outputs])`` in the
    order of ``names``.

    >>> import torch
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> tap = FeatureTap(["0"])
    >>> out, (hidden,) = tap(tap.prepare(net), torch.ones(1, 2))
    >>> torch.equal(out, hidden.relu())
    True
    """

    names: tuple[str, ...]

    def __init__(self, names: Sequence[str]) -> None:
        if isinstance(names, str):
            raise TypeError("FeatureTap expects a sequence of names, not a single string")
        if not names:
            raise TapError("FeatureTap needs at least one node or module name")
        if len(set(names)) != len(names):
            raise TapError(f"FeatureTap names must be unique, got {list(names)}")
        object.__setattr__(self, "names", tuple(names))

    def prepare(self, model: nn.Module) -> fx.GraphModule:
        """Return a GraphModule computing ``(model(x), [tapped features])``."""
        module_names = {name for name, _ in model.named_modules() if name}
        tracer = _TapTracer(frozenset(n for n in self.names if n in module_names))
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises many error types for untraceable code
            raise TapError(f"FeatureTap cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
        taps = [_find_node(graph, name) for name in self.names]
        output = next(node for node in graph.nodes if node.op == "output")
        output.args = ((output.args[0], taps),)
        graph.lint()
        return fx.GraphModule(tracer.root, graph, class_name=f"Tapped{type(model).__name__}")

    def __call__(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = model(x)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list)):
            raise TypeError("FeatureTap: run the module returned by FeatureTap.prepare(model)")
        logits, feats = out
        return logits, list(feats)


def _find_node(graph: fx.Graph, name: str) -> fx.Node:
    """The unique call of module ``name``, else the node called ``name``."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) > 1:
        raise TapError(f"FeatureTap: module {name!r} is called {len(calls)} times; tap a node name instead")
    if calls:
        return calls[0]
    for node in graph.nodes:
        if node.name == name and node.op not in ("placeholder", "output"):
            return node
    available = [n.name for n in graph.nodes if n.op not in ("placeholder", "output")]
    raise TapError(f"FeatureTap: no module call or node named {name!r}; nodes: {', '.join(available)}")
