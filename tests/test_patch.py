"""Patch-based execution (passes.patch): halo arithmetic, exact outputs, hand-computed peaks, ONNX, CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memplan.analyze import analyze
from memplan.capture import capture
from memplan.cli import main
from passes.patch import (
    PatchError,
    PatchPlan,
    Window,
    _axis_regions,
    apply_plan,
    count_macs,
    local_ops,
    patch_model,
    receptive_field,
)


def _seeded(net: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


class Mixed(nn.Module):
    """Stride, dilation, padding, BN, a residual add, a depthwise conv, max/avg pools and a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 5, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.mp = nn.MaxPool2d(3, 2, 1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.ap = nn.AvgPool2d(2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        z = self.c2(y) + y
        c = torch.cat([self.dw(z), self.mp(z)], 1)
        d = F.avg_pool2d(self.ap(F.relu(self.c3(c))), 3, 1, 1)
        return self.fc(d.mean((2, 3)))


class Functional(nn.Module):
    """Functional convs with a strided, asymmetric kernel, method calls, ceil-mode max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 5) * 0.2)
        self.w2 = nn.Parameter(torch.randn(6, 6, 3, 3) * 0.2)

    def forward(self, x):
        y = F.conv2d(x, self.w1, None, stride=(2, 1), padding=(1, 2)).relu()
        y = F.max_pool2d(y, 3, 2, 1, ceil_mode=True)
        y = torch.sigmoid(F.conv2d(y, self.w2, padding=1)) * y
        return y.mean((2, 3))


class SE(nn.Module):
    """A squeeze-excitation gate right after the stem: nothing past its global pool can be patched."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Conv2d(8, 8, 1)
        self.body = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))
        return self.body(y).mean((2, 3))


# ------------------------------------------------------------------------------------------ halos
def test_window_input_range_by_hand():
    assert Window(3, 1, 1, 1).input_range((0, 4)) == (-1, 5)
    assert Window(3, 2, 1, 1).input_range((0, 4)) == (-1, 8)  # outputs 0..3 read 2*o-1 .. 2*o+1
    assert Window(3, 1, 2, 2).input_range((5, 6)) == (3, 8)  # dilation 2: 3, 5, 7
    assert Window(7, 2, 1, 3).input_range((10, 12)) == (17, 26)


def test_receptive_field_of_a_chain_by_hand():
    # 3x3/1 -> 3x3/2 -> 3x3 dilation 2: 1 + 4 = 5 -> (5-1)*2 + 3 = 11 -> 11 + 2 = 13, total stride 2
    assert receptive_field([Window(3, 1), Window(3, 2), Window(3, 1, dilation=2)]) == (13, 2)
    assert receptive_field([Window(7, 2, pad=3), Window(3, 2, pad=1)]) == (11, 4)


def test_regions_from_the_captured_graph_equal_the_gradient_support():
    """The halo the pass computes from the traced graph is exactly the input each tile depends on."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, stride=2, padding=1),
                        nn.Conv2d(1, 1, 3, padding=2, dilation=2), nn.AvgPool2d(3, 2, 1), nn.Conv2d(1, 1, (1, 3)))
    for m in net:
        if isinstance(m, nn.Conv2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    shape = (1, 1, 33, 35)
    cg = capture(net, torch.empty(shape))
    ops, cands, _ = local_ops(cg)
    cand = cands[-1]
    assert cand.node == "_4" and cand.shape == (1, 1, 9, 7)
    for rows, cols in [((0, 2), (0, 3)), ((4, 6), (2, 5)), ((8, 9), (6, 7))]:
        need_h, _ = _axis_regions(cg.gm, cand, ops, 0, rows)
        need_w, _ = _axis_regions(cg.gm, cand, ops, 1, cols)
        x = torch.ones(shape, requires_grad=True)
        net(x)[..., rows[0]:rows[1], cols[0]:cols[1]].sum().backward()
        hit_r = torch.nonzero(x.grad[0, 0].sum(1)).flatten()
        hit_c = torch.nonzero(x.grad[0, 0].sum(0)).flatten()
        x_name = next(n.name for n in cg.gm.graph.nodes if n.op == "placeholder")
        assert need_h[x_name] == (int(hit_r[0]), int(hit_r[-1]) + 1)
        assert need_w[x_name] == (int(hit_c[0]), int(hit_c[-1]) + 1)


# ------------------------------------------------------------------------------------------ equality
def _assert_equal(r, tol=1e-5):
    assert r.max_abs_diff is not None and r.max_abs_diff <= tol * max(r.output_scale, 1e-12)


@pytest.mark.parametrize("grid", [2, (3, 2), (1, 4), pytest.param(5, marks=pytest.mark.slow)])
@pytest.mark.parametrize("stream", [False, True])
def test_mixed_net_outputs_equal(grid, stream):
    r = patch_model(_seeded(Mixed()), (1, 3, 37, 41), grid=grid, stream_input=stream)
    _assert_equal(r)
    assert r.plan.grid == ((grid, grid) if isinstance(grid, int) else grid)
    assert r.mac_overhead >= 1.0


@pytest.mark.parametrize("bands", [2, 3, 6, 11])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("pace", ["split", "input"])
def test_cached_row_bands_exact_and_no_extra_macs(bands, stream, pace):
    """Halo caching: every row computed once (the MACs do not grow), outputs equal, at every split,
    bands paced by the split map or by the input."""
    net = _seeded(Mixed())
    cg = capture(net, torch.empty(1, 3, 37, 41))
    _, cands, _ = local_ops(cg)
    for cand in cands[::2]:
        if bands > cand.shape[2] and pace == "split":
            continue
        r = patch_model(net, (1, 3, 37, 41), grid=(bands, 1), split_node=cand.node, halo="cache",
                        stream_input=stream, verify=1, pace=pace)
        _assert_equal(r)
        assert (r.plan.halo, r.plan.pace) == ("cache", pace)
        # every row once, but for the top band's few surplus rows (fewer where a floor pool drops rows)
        assert r.mac_overhead <= 1.05


class Inverted(nn.Module):
    """Two MobileNetV2 inverted residuals (1x1 expansion 4 -> 24, depthwise 3x3, 1x1 projection),
    the second one strided, after a strided stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU6())

        def block(stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(4, 24, 1), nn.BatchNorm2d(24), nn.ReLU6(),
                                 nn.Conv2d(24, 24, 3, stride, 1, groups=24), nn.BatchNorm2d(24), nn.ReLU6(),
                                 nn.Conv2d(24, 4, 1), nn.BatchNorm2d(4))

        self.b1, self.b2 = block(1), block(2)
        self.head = nn.Conv2d(4, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.b1(y)
        return self.head(self.b2(y)).mean((2, 3))


@pytest.mark.parametrize("pace", ["split", "input"])
@pytest.mark.parametrize("stream", [False, True])
def test_mixed_halo_recomputes_expansions_instead_of_keeping_them(pace, stream):
    """halo="mixed": the 24-channel expansions (1x1 conv, BN, ReLU6) keep no rows between bands; each
    band recomputes the ones its depthwise conv reads from the 4-channel rows kept instead. Exact,
    lower peak than caching everything, more MACs."""
    import operator

    net, shape = _seeded(Inverted()), (1, 3, 48, 40)
    split = "b2_7"
    kw = dict(grid=(8, 1), split_node=split, stream_input=stream, verify=1, pace=pace)
    cached, mixed = patch_model(net, shape, halo="cache", **kw), patch_model(net, shape, halo="mixed", **kw)
    _assert_equal(mixed)
    assert mixed.plan.halo == "mixed"

    def kept_channels(r):  # channels of every tensor a band keeps for a later one
        return {n.meta["tensor_meta"].shape[1] for n in r.module.graph.nodes
                if n.op == "call_method" and n.target == "clone" and n.args[0].target is operator.getitem
                and n.args[0].args[0].op != "placeholder" and "tensor_meta" in n.meta}

    from torch.fx.passes.shape_prop import ShapeProp
    for r in (cached, mixed):
        ShapeProp(r.module).propagate(torch.randn(shape))
    assert 24 in kept_channels(cached) and 24 not in kept_channels(mixed)
    assert mixed.patched_peak_bytes < cached.patched_peak_bytes
    assert mixed.patched_macs > cached.patched_macs


class Ghost(nn.Module):
    """A GhostNet-style module: primary conv, cheap depthwise conv, concat, channel slice; with the
    ``x.ndim == 4`` check timm's norm layers trace."""

    def __init__(self) -> None:
        super().__init__()
        self.primary, self.cheap = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.out = nn.Conv2d(6, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        torch._assert(y.ndim == 4, "expected a 4-d map")
        z = torch.cat([y, self.cheap(y)], 1)[:, :6]
        return self.out(F.relu(z)).mean((2, 3))


@pytest.mark.parametrize("halo", ["recompute", "cache"])
def test_channel_slices_and_shape_checks_do_not_stop_patching(halo):
    net = _seeded(Ghost())
    cg = capture(net, torch.empty(1, 3, 24, 24))
    _, cands, stop = local_ops(cg)
    assert "out" in {c.node for c in cands} and "mean" in stop
    r = patch_model(net, (1, 3, 24, 24), grid=(3, 1), split_node="out", halo=halo, verify=1)
    _assert_equal(r)


def test_cached_functional_net_exact():
    _assert_equal(patch_model(_seeded(Functional()), (1, 3, 30, 27), grid=(4, 1), halo="cache"))
    with pytest.raises(PatchError, match="needs 1 column"):
        patch_model(Functional(), (1, 3, 30, 27), grid=(2, 2), halo="cache")


def test_every_split_point_is_exact():
    net = _seeded(Mixed())
    cg = capture(net, torch.empty(1, 3, 21, 19))
    _, cands, stop = local_ops(cg)
    assert "mean" in stop  # the global mean bounds the split
    for cand in cands:
        r = patch_model(net, (1, 3, 21, 19), grid=(2, 3), split_node=cand.node, verify=1)
        _assert_equal(r)


def test_functional_ops_and_ceil_mode_exact():
    net = _seeded(Functional())
    for grid in (2, (3, 2)):
        _assert_equal(patch_model(net, (1, 3, 30, 27), grid=grid))


def test_global_ops_bound_the_split():
    cg = capture(_seeded(SE()), torch.empty(1, 3, 16, 16))
    _, cands, stop = local_ops(cg)
    assert [c.node for c in cands] == ["relu"]
    assert "adaptive_avg_pool2d" in stop and "not spatially local" in stop
    with pytest.raises(PatchError, match="not a valid split node"):
        patch_model(SE(), (1, 3, 16, 16), split_node="body")


def test_unpatchable_model_one_line():
    net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(PatchError, match="cannot be patched: no split point before node") as e:
        patch_model(net, (1, 3, 16, 16))
    assert "\n" not in str(e.value)


def test_gradients_and_state_dict():
    net = _seeded(Mixed())
    r = patch_model(net, (1, 3, 37, 41), grid=3)
    pm = r.module
    assert sorted(pm.state_dict()) == sorted(net.state_dict())
    pm.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 37, 41)  # batch 2: the assembled map follows the batch
    net.zero_grad()
    net(x).square().sum().backward()
    pm.eval().zero_grad()
    pm(x).square().sum().backward()
    ref = dict(net.named_parameters())
    for name, p in pm.named_parameters():
        assert torch.allclose(p.grad, ref[name].grad, atol=1e-5, rtol=1e-4), name


def test_macs_count_the_halo_recomputation():
    # 3x3 conv on 8x8, two row bands: band 0 computes rows 0..4 (5 rows incl. a surplus row of its own
    # padding), band 1 rows 3..7 (+1 surplus): 2 * 5 rows instead of 8 -> overhead 10/8
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1), nn.Flatten())
    r = patch_model(net, (1, 1, 8, 8), grid=(2, 1), split_node="_1", check=False)
    assert count_macs(capture(net, torch.empty(1, 1, 8, 8))) == r.macs == 2 * 64 * 9
    # conv _1 needs rows [0,4) / [4,8) -> conv _0 computes rows [0,5)+1 surplus and [3,8)+1 surplus
    assert r.patched_macs == (6 * 8 + 6 * 8) * 9 + (5 * 8 + 5 * 8) * 9


# ------------------------------------------------------------------------------------------ peaks
class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x))).flatten(1)


def test_patched_peak_of_a_chain_by_hand():
    """1x1x6x6 input (144 B), 3x3 conv to 2 channels (288 B map), two row bands of 3 rows.

    Band 0 reads input rows 0..3 (a view) and computes conv rows 0..3 (4x6x2 = 192 B, its bottom row
    is surplus of the conv's own padding), ReLU in place; then the 288 B map is allocated and the
    tile copied in: 144 + 192 + 288 = 624. Band 1: band 0's conv is dead; input + map + its conv
    (rows 2..5, 192 B) = 624 again. Streamed: the input is not resident, each band clones its 4-row
    crop (96 B): band 1's conv step holds 96 + 288 + 192 = 576.
    """
    net = Chain().eval()
    assert analyze(net, (1, 1, 6, 6)).peak_bytes == 144 + 288
    r = patch_model(net, (1, 1, 6, 6), grid=(2, 1), split_node="relu", halo="recompute")
    assert (r.peak_bytes, r.patched_peak_bytes) == (432, 624)
    s = patch_model(net, (1, 1, 6, 6), grid=(2, 1), split_node="relu", stream_input=True, halo="recompute")
    assert s.patched_peak_bytes == 576
    _assert_equal(r)
    _assert_equal(s)


def test_cached_patched_peak_of_a_chain_by_hand():
    """The chain above in two cached bands. Band 0 runs the conv with its own padding on input rows
    0..3 (a view): 4 rows x 6 x 2 ch = 192 B, its bottom row surplus (48 B, less than a padded copy
    of the input, 160 B), ReLU in place; with the 288 B map: 144 + 192 + 288 = 624. Band 1 computes
    only rows 3..5 from input rows 2..5, bottom border by an explicit zero pad that only the conv
    reads, which the deploy form counts as free (docs/definitions.md §2): input + map + conv output
    = 144 + 288 + 144 = 576. Streamed, band 0 clones its 4 input rows (96 B) and keeps rows 2..3
    (48 B) for band 1: 48 + 192 + 288 = 528; band 1 joins them to its new rows 4..5: cat 96 + map
    288 + conv 144 = 528. MACs: 4 + 3 rows instead of 6."""
    net = Chain().eval()
    for stream, peak in ((False, 624), (True, 528)):
        r = patch_model(net, (1, 1, 6, 6), grid=(2, 1), split_node="relu", halo="cache", stream_input=stream,
                        pace="split")
        assert r.patched_peak_bytes == peak
        assert (r.macs, r.patched_macs) == (6 * 6 * 2 * 9, 7 * 6 * 2 * 9)
        _assert_equal(r)


def test_input_paced_bands_of_a_chain_by_hand():
    """The chain in three bands paced by the input (2 rows each). Band 0 (input rows 0..1) can make
    conv row 0 only (row 1 reads input row 2): the conv runs with its own padding on rows 0..1, its
    second output row surplus (96 B), ReLU in place: input 144 + 96 + map 288 = 528. Band 1 (rows
    ..3) makes conv rows 1..2 from input rows 0..3, no padding: 144 + 96 + 288 = 528. Band 2 makes
    the rest, rows 3..5, from rows 2..5 and the free bottom pad: 144 + 144 + 288 = 576 (the split
    pace's first band, 624, is gone). Streamed, band 1 joins the 2 input rows band 0 kept to its 2
    new ones (cat 96 B) and keeps rows 2..3 (48 B) for band 2: map 288 + 96 + 48 + conv 96 = 528."""
    net = Chain().eval()
    for stream, peak in ((False, 576), (True, 528)):
        r = patch_model(net, (1, 1, 6, 6), grid=(3, 1), split_node="relu", halo="cache", stream_input=stream,
                        pace="input")
        assert r.patched_peak_bytes == peak
        assert (r.macs, r.patched_macs) == (6 * 6 * 2 * 9, 7 * 6 * 2 * 9)  # band 0's surplus row
        _assert_equal(r)


class Patchify(nn.Module):
    """A patchify stem (2x2 windows, stride 2: they do not overlap) before a 3x3 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(1, 2, 2, stride=2), nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.stem(x))).relu().mean((2, 3))


def test_streamed_patchify_stem_reads_its_input_a_row_at_a_time(monkeypatch):
    """Streamed, a stem whose windows do not overlap runs one output row at a time on the 2 input rows
    it reads, so no band of the input is ever resident. At 16x16 in two bands: the 8x8x2 map (512 B)
    plus a band's 4 stem rows twice (the rows and their concatenation, 2 x 256 B) = 1,024 B. Copying
    each band's 8 input rows whole instead (512 B) gives 512 + 512 + 256 = 1,280 B."""
    import operator

    from passes.patch import _Builder

    net = _seeded(Patchify())
    r = patch_model(net, (1, 1, 16, 16), grid=(2, 1), split_node="relu", halo="cache", stream_input=True)
    crops = [n.args[1][2] for n in r.module.graph.nodes
             if n.target is operator.getitem and n.args[0].op == "placeholder"]
    assert [(c.start, c.stop) for c in crops] == [(i, i + 2) for i in range(0, 16, 2)]
    assert r.patched_peak_bytes == 512 + 2 * 256
    _assert_equal(r)
    monkeypatch.setattr(_Builder, "_streamed_readers", lambda self, x: set())
    whole = patch_model(net, (1, 1, 16, 16), grid=(2, 1), split_node="relu", halo="cache", stream_input=True)
    assert whole.patched_peak_bytes == 512 + 512 + 256


def test_each_patch_dies_before_the_next_runs():
    """In memplan's liveness of the patched graph every tensor a patch allocates is dead by the copy
    that ends it; only the assembled map (and the input) outlive patches."""
    net = _seeded(Mixed())
    r = patch_model(net, (1, 3, 37, 41), grid=3, halo="recompute")
    rep = r.report
    ends = [t.step for t in rep.timeline if t.op == "copy_"]
    assert len(ends) == 9
    full = max(rep.lifetimes, key=lambda lt: lt.size if rep.graph.storages[lt.storage].shape[1:] ==
               tuple(r.split_shape[1:]) else -1)
    for lt in rep.lifetimes:
        st = rep.graph.storages[lt.storage]
        if st.is_input or lt is full or lt.start > ends[-1]:
            continue
        patch = next(i for i, e in enumerate(ends) if lt.start <= e)
        assert lt.end <= ends[patch], (st.producer, lt, patch)


@pytest.mark.slow
def test_patching_lowers_a_stride_one_stem_peak():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    r = patch_model(net, (1, 3, 64, 64))
    assert r.peak_bytes == (16 * 64 * 64 + 16 * 32 * 32) * 4  # at the second conv; the input is dead
    assert r.patched_peak_bytes < r.peak_bytes / 2 and r.mac_overhead <= 1.2
    _assert_equal(r)
    assert analyze(r.module, (1, 3, 64, 64)).peak_bytes == r.patched_peak_bytes  # an ordinary module


def test_budget():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    r = patch_model(net, (1, 3, 48, 48), budget=100_000)
    assert r.patched_peak_bytes <= 100_000
    with pytest.raises(PatchError, match="fits 1,000 bytes: the best reachable peak is about"):
        patch_model(net, (1, 3, 48, 48), budget=1000)


def test_plan_round_trip(tmp_path):
    net = _seeded(Mixed())
    r = patch_model(net, (1, 3, 37, 41), grid=(2, 3))
    (tmp_path / "plan.json").write_text(json.dumps(r.plan.to_json()))
    plan = PatchPlan.load(tmp_path / "plan.json")
    assert plan == r.plan
    again = apply_plan(net, plan)
    assert again.patched_peak_bytes == r.patched_peak_bytes
    _assert_equal(again)
    with pytest.raises(PatchError, match="bad patch plan"):
        PatchPlan.from_json({"grid": [2]})
    paced = patch_model(net, (1, 3, 37, 41), grid=(7, 1), halo="mixed", pace="input")
    assert PatchPlan.from_json(json.loads(json.dumps(paced.plan.to_json()))) == paced.plan
    assert apply_plan(net, paced.plan).patched_peak_bytes == paced.patched_peak_bytes
    with pytest.raises(PatchError, match="pace must be split or input"):
        PatchPlan.from_json({**paced.plan.to_json(), "pace": "diagonal"})


# ------------------------------------------------------------------------------------------ ONNX
@pytest.mark.slow
def test_onnx_export_parity_and_peak(tmp_path):
    import onnxruntime as ort

    from memplan.commands.patch import export_patched
    from memplan.export import export_onnx
    from memplan.onnx_frontend import analyze_onnx

    net = _seeded(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                                nn.Conv2d(16, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    shape = (1, 3, 48, 48)
    r = patch_model(net, shape, grid=3)
    patched, exported = export_patched(net, r.plan, tmp_path / "p.onnx")
    assert exported.max_abs_diff <= 1e-5
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
    export_onnx(net, x, tmp_path / "plain.onnx", random_samples=1)
    plain, patched_file = analyze_onnx(tmp_path / "plain.onnx"), analyze_onnx(tmp_path / "p.onnx")
    assert plain.peak_bytes == r.peak_bytes  # same deploy form in both frontends
    assert patched_file.peak_bytes < plain.peak_bytes / 2
    assert patched_file.peak_bytes <= patched.patched_peak_bytes  # the exporter drops the folded BNs' identities
    cached = patch_model(net, shape, grid=(4, 1), halo="cache")
    _, exported = export_patched(net, cached.plan, tmp_path / "c.onnx")
    assert exported.max_abs_diff <= 1e-5
    assert analyze_onnx(tmp_path / "c.onnx").peak_bytes < plain.peak_bytes


# ------------------------------------------------------------------------------------------ CLI
def _cli(capsys, *argv):
    code = main(["patch", *argv])
    out, err = capsys.readouterr()
    return code, out, err


_TINY = ("import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), "
         "nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")


def test_cli_json_keys(capsys, tmp_path):
    (tmp_path / "tiny.py").write_text(_TINY)
    spec = f"{tmp_path / 'tiny.py'}:build"
    code, out, err = _cli(capsys, spec, "--input", "1,3,16,16", "--patches", "2", "--json", "-", "--out",
                          str(tmp_path / "run"))
    assert code == 0, err
    doc = json.loads(out)
    for key in ("peak_bytes", "patched_peak_bytes", "split_node", "patches", "mac_overhead", "max_abs_diff"):
        assert key in doc
    assert doc["patches"] == [2, 2] and doc["max_abs_diff"] <= 1e-5 * doc["output_scale"]
    assert doc["peak_bytes"] == (3 + 8) * 16 * 16 * 4
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["grid"] == [2, 2]
    state = torch.load(tmp_path / "run" / "patched.pt", weights_only=True)
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # the original model's keys
    code, out, err = _cli(capsys, spec, "--plan", str(tmp_path / "run" / "plan.json"), "--json", "-")
    assert code == 0 and json.loads(out)["patched_peak_bytes"] == doc["patched_peak_bytes"]
    code, out, err = _cli(capsys, spec, "--input", "1,3,16,16", "--halo", "cache", "--stream-input")
    assert code == 0 and "halo cached between row bands" in out


def test_cli_onnx_measure_reports_onnxruntime_with_and_without_reuse(capsys, tmp_path):
    (tmp_path / "tiny.py").write_text(_TINY)
    code, out, err = _cli(capsys, f"{tmp_path / 'tiny.py'}:build", "--input", "1,3,64,64", "--patches", "4",
                          "--onnx", str(tmp_path / "p.onnx"), "--measure", "--json", "-")
    assert code == 0, err
    doc = json.loads(out)
    input_bytes = 3 * 64 * 64 * 4
    for key in ("ort", "ort_noreuse"):
        assert doc[f"{key}_predicted_peak_bytes"] > input_bytes and doc[f"{key}_measured_peak_bytes"] > input_bytes
    # without reuse no buffer is held between its users: never more than with it
    assert doc["ort_noreuse_predicted_peak_bytes"] <= doc["ort_predicted_peak_bytes"]


def test_cli_runtime_picks_the_plan_onnxruntime_runs_smallest(capsys, tmp_path):
    """--runtime ort-noreuse exports the best plan of each halo mode, predicts each file in onnxruntime
    and keeps the smallest; --onnx then writes that plan's file."""
    (tmp_path / "tiny.py").write_text(_TINY)
    code, out, err = _cli(capsys, f"{tmp_path / 'tiny.py'}:build", "--input", "1,3,64,64", "--runtime",
                          "ort-noreuse", "--onnx", str(tmp_path / "p.onnx"), "--json", "-")
    assert code == 0, err
    doc = json.loads(out)
    picks = doc["runtime_candidates"]
    assert {c["halo"] for c in picks} == {"recompute", "cache", "mixed"} and doc["runtime"] == "ort-noreuse"
    best = min(picks, key=lambda c: c["predicted_bytes"])
    assert (doc["halo"], doc["pace"], doc["split_node"]) == (best["halo"], best["pace"], best["split_node"])
    assert doc["runtime_peak_bytes"] == best["predicted_bytes"]
    assert doc["onnx_peak_bytes"] > 0 and (tmp_path / "p.onnx").is_file()  # the chosen plan's file


@pytest.mark.parametrize(("argv", "message"), [
    (["--runtime", "ort", "--patches", "2"], "--runtime ranks the best plan of each halo mode"),
    (["--patches", "2x"], "bad --patches '2x'"),
    (["--split", "nope"], "'nope' is not a valid split node"),
    (["--budget", "1"], "best reachable peak is about"),
    (["--measure"], "--measure needs --onnx"),
    (["--plan", "/nonexistent/plan.json"], "cannot read patch plan"),
])
def test_cli_errors_one_line(capsys, tmp_path, argv, message):
    (tmp_path / "tiny.py").write_text(_TINY)
    code, out, err = _cli(capsys, f"{tmp_path / 'tiny.py'}:build", "--input", "1,3,16,16", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("memplan patch: error:")


def test_cli_unpatchable_model(capsys, tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.AdaptiveAvgPool2d(2), "
                    "nn.Conv2d(3, 4, 1), nn.Flatten())\n")
    code, out, err = _cli(capsys, f"{path}:build", "--input", "1,3,16,16")
    assert code == 2 and "cannot be patched" in err and len(err.strip().splitlines()) == 1


def test_tiles_of_the_onnx_form_have_different_sizes():
    from passes.patch import _tiles

    assert _tiles(28, 4) == [(0, 7), (7, 14), (14, 21), (21, 28)]
    distinct = _tiles(28, 4, distinct=True)
    lengths = [b - a for a, b in distinct]
    assert distinct[0][0] == 0 and distinct[-1][1] == 28 and len(set(lengths)) == 4 and lengths == sorted(lengths)
    assert _tiles(5, 4, distinct=True) == _tiles(5, 4)  # 1+2+3+4 > 5: as equal as can be


def test_onnx_form_patches_are_not_chained_by_onnxruntimes_planner(tmp_path, monkeypatch):
    # equal patches: onnxruntime hands each patch's freed buffers to the next patch's tensors of the same
    # shape and keeps them allocated to the last user; patches of different sizes leave nothing to hand on
    import passes.patch as patch_module
    from memplan.commands.patch import export_patched
    from memplan.ort_runtime import predict_ort

    net = _seeded(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                nn.Flatten()))
    plan = patch_model(net, (1, 3, 96, 96), grid=(4, 1), split_node="_5", halo="recompute", verify=1).plan
    handed_on = {}
    for label in ("distinct", "uniform"):
        if label == "uniform":
            monkeypatch.setattr(patch_module, "_tiles", lambda size, parts, distinct=False: [
                (round(i * size / parts), round((i + 1) * size / parts)) for i in range(parts)])
        _, exported = export_patched(net, plan, tmp_path / f"{label}.onnx")
        assert exported.max_abs_diff <= 1e-5
        placed = predict_ort(tmp_path / f"{label}.onnx").reuse.values()
        handed_on[label] = sum(how == "freelist" for how in placed)  # tensors put in an earlier tensor's buffer
    # the two interior patches of the uniform grid share every shape; the distinct grid only the odd few
    # tensors whose one-sided border halo makes up for their tile's extra row
    assert handed_on["distinct"] <= 2 and handed_on["uniform"] >= 8
