"""Which dims of every tensor are spatial (docs/definitions.md §4): a propagation over a captured graph.

Layout ops (``permute``/``transpose``, ``view``/``reshape``/``flatten``, reductions) move, merge and
split a feature map's height and width; they do not resample it. This pass follows the two spatial
axes of the model input through every op of a captured graph (torch.fx or torch.export, shapes from
:class:`memplan.capture.StorageProp`) and writes a typed :class:`Layout` into
``node.meta["memplan_layout"]``: per output tensor, per dim, the spatial axes the dim carries
(``("h",)``, ``("w",)``, ``("h", "w")`` for a flattened map, ``("",)`` for none). A tensor has a
spatial *size* when one dim carries exactly ``h`` and another exactly ``w`` — a channels-last
``(N, H, W, C)`` map has size ``(H, W)``, a ``(N, radix, C, H, W)`` group view too, a ``(N, C, H*W)``
token view has none.

How each op kind moves the axes is a handler table (:data:`HANDLERS`, op name -> handler): permute-like
ops reorder dims by their arguments, reshape-like ops regroup dims by equal size products, reductions
drop the reduced dims, and every other op keeps the axes of its equal-rank inputs position by position
(conv, pool, norm, elementwise, cat, interpolate...), or right-aligned by broadcasting when the rank
changes.

Example:
    >>> import torch
    >>> from memplan.capture import capture
    >>> class ChannelsLast(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (3,)).flatten(1, 2)
    >>> cg = capture(ChannelsLast(), torch.empty(1, 3, 8, 6))
    >>> propagate_layout(cg.gm)
    >>> [(n.name, spatial_size(n)) for n in cg.gm.graph.nodes if n.op != "output"]
    [('x', (8, 6)), ('permute', (8, 6)), ('layer_norm', (8, 6)), ('flatten', None)]
    >>> layout_of(cg.gm.graph.find_nodes(op="call_method", target="flatten")[0]).dims
    (('',), ('h', 'w'), ('',))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from memplan.capture import META_KEY, target_name

__all__ = ["HANDLERS", "LAYOUT_KEY", "Layout", "layout_of", "propagate_layout", "spatial_size"]

LAYOUT_KEY = "memplan_layout"
Axes = tuple[str, ...]
NONE: Axes = ("",)
Size = tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """Spatial axes per dim of one tensor (module docstring)."""

    dims: tuple[Axes, ...]

    def axis(self, name: str) -> int | None:
        """The one dim carrying exactly the spatial axis ``name`` (``"h"``/``"w"``), else None."""
        found = [d for d, axes in enumerate(self.dims) if axes == (name,)]
        return found[0] if len(found) == 1 else None

    def size(self, shape: Sequence[int]) -> Size | None:
        """``(H, W)`` of a tensor of ``shape`` with this layout, or None when it is not a 2-d map."""
        h, w = self.axis("h"), self.axis("w")
        return None if h is None or w is None else (int(shape[h]), int(shape[w]))

    @property
    def nchw(self) -> bool:
        """Whether the tensor is an ``(N, C, H, W)`` map (what a conv or a RED block reads)."""
        return len(self.dims) == 4 and (self.axis("h"), self.axis("w")) == (2, 3)

    @classmethod
    def plain(cls, rank: int) -> Layout:
        return cls((NONE,) * rank)


def layout_of(node: fx.Node, index: int = 0) -> Layout | None:
    """The :class:`Layout` of output ``index`` of ``node`` (None before :func:`propagate_layout`)."""
    layouts = node.meta.get(LAYOUT_KEY)
    return layouts[index] if layouts and index < len(layouts) and layouts[index] is not None else None


def spatial_size(node: fx.Node) -> Size | None:
    """``(H, W)`` of the first tensor output of ``node``, or None when it is not a spatial map."""
    meta, layout = node.meta.get(META_KEY), layout_of(node)
    if meta is None or not meta.outputs or layout is None:
        return None
    return layout.size(meta.outputs[0].shape)


# ------------------------------------------------------------------------------------------ handlers
Inputs = list[tuple[tuple[int, ...], Layout]]  # (shape, layout) of every tensor the node reads, in order
Handler = Callable[[fx.Node, Inputs, tuple[int, ...]], Layout]


def _ints(values: object) -> list[int] | None:
    flat = pytree.tree_leaves(values)
    return [int(v) for v in flat] if flat and all(isinstance(v, int) and not isinstance(v, bool) for v in flat) else None


def _dims_arg(node: fx.Node, names: Sequence[str]) -> list[int] | None:
    """The integer dims given positionally after the tensor, or by keyword."""
    given = [node.kwargs[k] for k in names if k in node.kwargs]
    return _ints(given if given else list(node.args[1:]))


def _positional(node: fx.Node, ins: Inputs, out: tuple[int, ...]) -> Layout:
    """Equal-rank inputs keep their axes dim by dim (an equal-size input first, so a broadcast gate
    does not hide the map); otherwise inputs align from the right (broadcasting) on equal sizes."""
    dims: list[Axes] = []
    same = [(s, lay) for s, lay in ins if len(s) == len(out)]
    for d, size in enumerate(out):
        if same:
            exact = [lay.dims[d] for s, lay in same if s[d] == size and lay.dims[d] != NONE]
            dims.append(exact[0] if exact else same[0][1].dims[d])
            continue
        back = len(out) - d
        found = [lay.dims[len(s) - back] for s, lay in ins if len(s) >= back and s[len(s) - back] == size]
        dims.append(next((a for a in found if a != NONE), NONE))
    return Layout(tuple(dims))


def _permute(node: fx.Node, ins: Inputs, out: tuple[int, ...]) -> Layout:
    """``permute``/``transpose``/``movedim``/``t``: output dim ``d`` is input dim ``order[d]``."""
    shape, lay = ins[0]
    rank = len(shape)
    name = target_name(node, node.graph.owning_module).lower().rstrip("_")
    order = list(range(rank))
    if name == "permute":
        dims = _dims_arg(node, ("dims",))
        order = [d % rank for d in dims] if dims and len(dims) == rank else order
    elif name in ("movedim", "moveaxis"):
        dims = _dims_arg(node, ("source", "destination"))
        if not dims or len(dims) % 2:
            return _positional(node, ins, out)
        src, dst = [d % rank for d in dims[: len(dims) // 2]], [d % rank for d in dims[len(dims) // 2:]]
        rest = iter(d for d in range(rank) if d not in src)
        placed = dict(zip(dst, src))
        order = [placed[d] if d in placed else next(rest) for d in range(rank)]
    else:  # transpose / swapaxes / swapdims / t
        dims = _dims_arg(node, ("dim0", "dim1", "axis0", "axis1")) or ([0, 1] if rank == 2 else None)
        if not dims or len(dims) != 2:
            return _positional(node, ins, out)
        a, b = dims[0] % rank, dims[1] % rank
        order[a], order[b] = order[b], order[a]
    if [shape[i] for i in order] != list(out):
        return _positional(node, ins, out)
    return Layout(tuple(lay.dims[i] for i in order))


def _reshape(node: fx.Node, ins: Inputs, out: tuple[int, ...]) -> Layout:
    """View-like ops regroup dims: runs of input and output dims with equal size products form a group;
    a group's axes are those of its input dims in order, dealt one per non-1 output dim when the counts
    agree (``(N, C, H*W) -> (N, C, H, W)``), given whole to a single output dim otherwise."""
    shape, lay = ins[0]
    if 0 in shape or 0 in out:
        return Layout.plain(len(out))
    literal = _literal_dims(node, len(out))
    dims: list[Axes] = [NONE] * len(out)
    i = j = 0
    while i < len(shape) and j < len(out):
        gi, gj, pa, pb = [i], [j], shape[i], out[j]
        i, j = i + 1, j + 1
        while pa != pb and i <= len(shape) and j <= len(out):
            if pa < pb and i < len(shape):
                gi.append(i)
                pa, i = pa * shape[i], i + 1
            elif pb < pa and j < len(out):
                gj.append(j)
                pb, j = pb * out[j], j + 1
            else:
                return Layout.plain(len(out))
        axes = tuple(a for k in gi if shape[k] != 1 or lay.dims[k] != NONE for a in lay.dims[k])
        spatial = tuple(a for a in axes if a)
        targets = [k for k in gj if out[k] != 1] or gj[:1]
        computed = [k for k in targets if k not in literal]
        if len(gi) == 1 and len(gj) == 1:
            dims[gj[0]] = lay.dims[gi[0]]
        elif len(spatial) == 1 and len(targets) > 1 and len(computed) == 1:
            dims[computed[0]] = spatial  # (H,) -> (H // s, s): the piece sized from the map keeps the axis
        elif len(targets) == len(axes):
            for k, a in zip(targets, axes):
                dims[k] = (a,)
        elif spatial:
            for k in targets:
                dims[k] = spatial if len(targets) == 1 else ("?",)
    return Layout(tuple(dims))


def _literal_dims(node: fx.Node, rank: int) -> set[int]:
    """Output dims of a ``view``/``reshape``/``unflatten`` whose size the call gives as a number (not
    computed from a tensor's size, not -1): the fixed pieces of a split."""
    name = target_name(node, node.graph.owning_module).lower()
    if name == "unflatten":
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        sizes = node.kwargs.get("sizes", node.args[2] if len(node.args) > 2 else None)
        if not isinstance(dim, int) or not isinstance(sizes, (list, tuple)):
            return set()
        start = dim % (rank - len(sizes) + 1)
        return {start + i for i, v in enumerate(sizes) if isinstance(v, int) and v >= 0}
    if name not in ("view", "reshape", "_unsafe_view"):
        return set()
    sizes = node.kwargs.get("shape", node.kwargs.get("size", node.args[1:]))
    sizes = list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else list(sizes)
    if len(sizes) != rank:
        return set()
    return {d for d, v in enumerate(sizes) if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def _reduce(node: fx.Node, ins: Inputs, out: tuple[int, ...]) -> Layout:
    """Reductions over ``dim``: reduced dims lose their axes (kept as size 1 with ``keepdim``)."""
    shape, lay = ins[0]
    rank = len(shape)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = _ints(dim)
    if dims is None or rank == 0:
        return _positional(node, ins, out)
    reduced = {d % rank for d in dims}
    if len(out) == rank:
        return Layout(tuple(NONE if d in reduced else lay.dims[d] for d in range(rank)))
    kept = [lay.dims[d] for d in range(rank) if d not in reduced]
    return Layout(tuple(kept)) if len(kept) == len(out) else _positional(node, ins, out)


def _matmul(node: fx.Node, ins: Inputs, out: tuple[int, ...]) -> Layout:
    """``matmul``/``bmm``/``mm`` (``addmm``/``baddbmm`` after their bias): rows come from the first
    operand, columns from the second, leading (batch) dims broadcast."""
    name = target_name(node, node.graph.owning_module).lower()
    operands = ins[1:3] if name in ("addmm", "baddbmm") else ins[:2]
    if len(operands) < 2 or min(len(operands[0][0]), len(operands[1][0]), len(out)) < 2:
        return _positional(node, ins, out)
    (sa, la), (sb, lb) = operands
    if out[-2] != sa[-2] or out[-1] != sb[-1]:
        return _positional(node, ins, out)
    batch = _positional(node, [(s[:-2], Layout(lay.dims[:-2])) for s, lay in operands], out[:-2])
    return Layout((*batch.dims, la.dims[-2], lb.dims[-1]))


def _linear(node: fx.Node, ins: Inputs, out: tuple[int, ...]) -> Layout:
    """``linear``: every dim of the input but the last, whose features come from the weight."""
    shape, lay = ins[0]
    return Layout((*lay.dims[:-1], NONE)) if len(shape) == len(out) else _positional(node, ins, out)


HANDLERS: dict[str, Handler] = {
    **dict.fromkeys(("matmul", "bmm", "mm", "baddbmm", "addmm"), _matmul),
    "linear": _linear,
    **dict.fromkeys(("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"), _permute),
    **dict.fromkeys(("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                     "reshape_as", "contiguous", "clone", "alias"), _reshape),
    **dict.fromkeys(("sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "logsumexp", "norm",
                     "nansum", "argmax", "argmin", "any", "all"), _reduce),
}
_MODULE_HANDLERS: dict[type[torch.nn.Module], Handler] = {
    torch.nn.Flatten: _reshape, torch.nn.Unflatten: _reshape, torch.nn.Linear: _linear,
}


def _handler(gm: fx.GraphModule, node: fx.Node) -> Handler:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return next((h for t, h in _MODULE_HANDLERS.items() if isinstance(module, t)), _positional)
    return HANDLERS.get(target_name(node, gm).lower(), _positional)


def _input_layout(shape: tuple[int, ...]) -> Layout:
    """A model input of rank 4 is an ``(N, C, H, W)`` image; other inputs carry no spatial axes."""
    return Layout((NONE, NONE, ("h",), ("w",))) if len(shape) == 4 else Layout.plain(len(shape))


def propagate_layout(gm: fx.GraphModule) -> None:
    """Write a list of :class:`Layout` (one per tensor output) into ``node.meta["memplan_layout"]`` of every
    node of a graph whose nodes carry :class:`memplan.capture.NodeMeta` (module docstring)."""
    for node in gm.graph.nodes:
        meta = node.meta.get(META_KEY)
        if node.op == "output" or meta is None:
            continue
        shapes = [t.shape for t in meta.outputs]
        if node.op == "placeholder":
            node.meta[LAYOUT_KEY] = [_input_layout(s) for s in shapes]
            continue
        if node.op == "get_attr":
            node.meta[LAYOUT_KEY] = [Layout.plain(len(s)) for s in shapes]
            continue
        sources = [a for a in node.all_input_nodes if a.meta.get(LAYOUT_KEY) is not None]
        if target_name(node, gm) == "getitem" and len(sources) == 1 and isinstance(node.args[1], int):
            src = sources[0]
            pieces = list(zip((t.shape for t in src.meta[META_KEY].outputs), src.meta[LAYOUT_KEY]))
            if len(pieces) > 1 and node.args[1] < len(pieces) and [pieces[node.args[1]][0]] == shapes:
                node.meta[LAYOUT_KEY] = [pieces[node.args[1]][1]]
                continue
        ins: Inputs = [(t.shape, lay) for a in sources for t, lay in zip(a.meta[META_KEY].outputs, a.meta[LAYOUT_KEY])
                       if lay is not None]
        handler = _handler(gm, node)
        node.meta[LAYOUT_KEY] = [handler(node, ins, s) if ins else Layout.plain(len(s)) for s in shapes]
