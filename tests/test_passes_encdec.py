"""Encoder-decoder students (docs/definitions.md §4): structural UNets, the zoo UNet, stage map, refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.red import attach_red
from memplan.analyze import analyze
from memplan.capture import capture
from memplan.zoo import create_model
from passes import PassError, Recipe, UpsamplingError, aggressive_pool, apply_recipe
from passes.aggressive_pool import InsertTail, Rescale, TailUpsample
from passes.layout import propagate_layout, spatial_size


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SkipUNet(nn.Module):
    """Two-level UNet with a configurable skip join and decoder upsampling.

    ``join``: "cat" or "add"; ``up``: "convT" (2x2/2 transposed conv), "upsample" (nn.Upsample x2),
    "interp_scale" (F.interpolate scale 2), "interp_size" (F.interpolate to the skip's size),
    "convT_pad" (transposed conv padded to the skip's size, for odd sizes).
    """

    def __init__(self, join: str = "cat", up: str = "convT", width: int = 8) -> None:
        super().__init__()
        self.join, self.up_kind = join, up
        c1, c2, c3 = width, 2 * width, 4 * width
        self.enc1, self.enc2 = _block(3, c1), _block(c1, c2)
        self.pool1, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.mid = _block(c2, c3)
        self.up2 = self._up(c3, c2)
        self.up1 = self._up(c2, c1)
        mult = 2 if join == "cat" else 1
        self.dec2, self.dec1 = _block(mult * c2, c2), _block(mult * c1, c1)
        self.out = nn.Conv2d(c1, 3, 1)

    def _up(self, cin: int, cout: int) -> nn.Module:
        if self.up_kind.startswith("convT"):
            return nn.ConvTranspose2d(cin, cout, 2, 2)
        resample = nn.Upsample(scale_factor=2) if self.up_kind == "upsample" else nn.Identity()
        return nn.Sequential(resample, nn.Conv2d(cin, cout, 1))

    def _upsample(self, up: nn.Module, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.up_kind == "interp_scale":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        elif self.up_kind == "interp_size":
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        x = up(x)
        if self.up_kind == "convT_pad":
            dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return torch.cat([x, skip], 1) if self.join == "cat" else x + skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool1(s1))
        y = self.mid(self.pool2(s2))
        y = self.dec2(self._upsample(self.up2, y, s2))
        y = self.dec1(self._upsample(self.up1, y, s1))
        return self.out(y)


CASES = [("cat", "convT", 32), ("add", "convT", 32), ("cat", "upsample", 32), ("add", "interp_scale", 32),
         ("cat", "interp_size", 30), ("cat", "convT_pad", 30), ("add", "interp_size", 33)]


def _joins(module: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, list[tuple[int, int]]]]:
    """(node, spatial sizes of its map inputs) of every skip join (cat/add of two maps) of ``module``."""
    check = capture(module, torch.empty(shape))
    propagate_layout(check.gm)
    found = []
    for n in check.gm.graph.nodes:
        sizes = [spatial_size(a) for a in n.all_input_nodes if spatial_size(a) is not None]
        if len(sizes) == 2 and spatial_size(n) is not None:
            found.append((n.name, sizes))
    return found


@pytest.mark.parametrize("join,up,px", CASES, ids=[f"{j}-{u}-{p}" for j, u, p in CASES])
def test_unet_student_keeps_the_output_and_matched_skips(join: str, up: str, px: int) -> None:
    torch.manual_seed(0)
    teacher = SkipUNet(join, up).eval()
    shape = (1, 3, px, px)
    student = aggressive_pool(teacher, torch.empty(shape), factor=2)
    x = torch.randn(2, 3, px, px)
    assert student.module.eval()(x).shape == teacher(x).shape == (2, 3, px, px)
    joins = _joins(student.module, shape)
    assert len(joins) == 2 and all(a == b for _, (a, b) in joins)
    # k=2: the head has stride 2, so both skips join at half the teacher's resolution
    half = (px + 1) // 2
    assert sorted(s[0] for _, (s, _) in joins) == sorted([half // 2, half])
    teacher_peak = analyze(teacher, shape).peak_bytes
    assert 3.5 <= teacher_peak / student.peak_bytes <= 4.5
    assert isinstance(student.module.get_submodule("tail"), TailUpsample)


def test_unet_student_changes() -> None:
    """The paper's DDPM recipe: head stride 2, the deepest pool stride 1, its transposed conv x1, a tail x2."""
    student = aggressive_pool(SkipUNet("cat", "convT"), torch.empty(1, 3, 32, 32), factor=2)
    assert [c.describe() for c in student.recipe.changes] == [
        "enc1.0 (conv): stride 1 -> 2",
        "pool2 (max_pool): stride 2 -> 1, kernel 2 -> 1",
        "up2 (conv_transpose): upsampling x2 -> x1",
        "tail (conv_transpose): inserted on the output out, x2, 3 channels",
    ]
    assert student.module.up2.weight.shape == (32, 16, 1, 1)
    assert [(s.label, s.teacher, s.student) for s in student.strides][:1] == [("enc1.0", 1, 2)]


def test_interpolation_removed_when_it_matches_a_removed_pool() -> None:
    student = aggressive_pool(SkipUNet("add", "upsample"), torch.empty(1, 3, 32, 32), factor=2)
    rescales = [c for c in student.recipe.changes if isinstance(c, Rescale)]
    assert [(c.target, c.old, c.new) for c in rescales] == [("up2.0", 2, 1)]
    assert not any(n.target == "up2.0" for n in student.module.graph.nodes)  # an x1 interpolation is gone


def test_recipe_round_trips_and_reapplies() -> None:
    torch.manual_seed(0)
    teacher = SkipUNet("cat", "upsample").eval()
    student = aggressive_pool(teacher, torch.empty(1, 3, 32, 32), factor=2)
    recipe = Recipe.from_json(json.loads(json.dumps(student.recipe.to_json())))
    assert recipe == student.recipe and any(isinstance(c, InsertTail) for c in recipe.changes)
    again = apply_recipe(SkipUNet("cat", "upsample").eval(), recipe)
    again.module.load_state_dict(student.module.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again.module.eval()(x), student.module.eval()(x))


def test_zoo_unet_small_peaks() -> None:
    """unet_small peaks at its last concat (transposed-conv output 16 ch + skip 16 ch + concat 32 ch,
    fp32): 64 * H * W * 4 B, i.e. 262,144 B at 32 px and 1,048,576 B at 64 px. The k=2 student runs
    that concat at H/2 x W/2: 65,536 and 262,144 B, 4.0x lower."""
    model = create_model("unet_small").eval()
    for px, teacher_peak in ((32, 262_144), (64, 1_048_576)):
        student = aggressive_pool(model, torch.empty(1, 3, px, px), factor=2)
        assert analyze(model, (1, 3, px, px)).peak_bytes == teacher_peak
        assert student.peak_bytes == teacher_peak // 4
        assert student.module(torch.zeros(1, 3, px, px)).shape == (1, 2, px, px)


def test_stage_map_of_a_unet() -> None:
    student = aggressive_pool(create_model("unet_small").eval(), torch.empty(1, 3, 64, 64), factor=2)
    sm = student.stage_map
    roles = [(s.role, s.block, s.position, s.size) for s in sm.sites]
    assert roles[0] == ("head", "", "output", (32, 32)) and roles[-1] == ("tail", "", "input", (32, 32))
    assert [r[1] for r in roles if r[0] == "encoder"] == ["encoders.0.1"] * 2 + ["encoders.1"] * 2 + ["encoders.2"] * 2
    assert [r[1] for r in roles if r[0] == "decoder"] == [f"decoders.{i}" for i in range(3) for _ in range(2)]
    teacher = analyze(create_model("unet_small"), (1, 3, 64, 64))
    assert teacher.peak_bytes > 0
    sizes = {n: s for n, s in _teacher_sizes().items()}
    for site in sm.sites:
        assert sizes[site.teacher] == site.size  # equal resolution on both sides
    by_role = {s.role for s in sm.sites}
    assert by_role == {"head", "encoder", "decoder", "tail"}
    six = sm.for_placement("6-site")
    assert [(p.student, p.position) for p in six] == [
        ("encoders_0_0_2", "output"), ("encoders_0_0_2", "input"), ("encoders_1_1_2", "output"),
        ("cat_1", "input"), ("decoders_2_1_2", "output"), ("decoders_2_1_2", "input")]
    assert [s.role for s in (sm.sites[i] for i in dict(sm.placements)["6-site"])] == [
        "head", "encoder", "encoder", "decoder", "decoder", "tail"]
    assert [p.student for p in sm.for_placement("2-site")] == ["encoders_0_0_2", "decoders_2_1_2"]
    assert sm.pairs == six
    red = attach_red(student.module, sm, "6-site")
    assert len(red.red_points) == 6 and red(torch.zeros(2, 3, 64, 64)).shape == (2, 2, 64, 64)
    with_red = analyze(red, (1, 3, 64, 64)).peak_bytes
    assert student.peak_bytes <= with_red < 1_048_576 / 2


def _teacher_sizes() -> dict[str, tuple[int, int]]:
    from passes import analyze_downsampling

    return analyze_downsampling(create_model("unet_small"), torch.empty(1, 3, 64, 64)).sizes


class InputSkipUNet(SkipUNet):
    """Concatenates the raw input image with the last decoder map: a skip from before the stem."""

    def __init__(self) -> None:
        super().__init__("cat", "convT")
        self.out = nn.Conv2d(8 + 3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool1(s1))
        y = self.dec2(torch.cat([self.up2(self.mid(self.pool2(s2))), s2], 1))
        y = self.dec1(torch.cat([self.up1(y), s1], 1))
        return self.out(torch.cat([y, x], 1))


def test_skip_that_cannot_stay_matched_is_refused_naming_the_node() -> None:
    with pytest.raises(PassError, match=r"node 'cat_2' joins maps that the factor-2 student cannot keep") as info:
        aggressive_pool(InputSkipUNet(), torch.empty(1, 3, 32, 32), factor=2)
    assert "\n" not in str(info.value)


class TwoBranchFusion(nn.Module):
    """HRNet-style: a high- and a low-resolution branch exchange maps twice (upsample-add and
    strided-conv-add), so the fusion's up- and downsampling are coupled with the branch split."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(3, 8)
        self.split_down = nn.Conv2d(8, 16, 3, 2, 1)
        self.high, self.low = _block(8, 8), _block(16, 16)
        self.low_to_high = nn.Sequential(nn.Conv2d(16, 8, 1), nn.Upsample(scale_factor=2))
        self.high_to_low = nn.Conv2d(8, 16, 3, 2, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        low = self.split_down(h)
        h, low = self.high(h), self.low(low)
        h, low = h + self.low_to_high(low), low + self.high_to_low(h)
        return self.head(h + self.low_to_high(low))


def test_coupled_fusion_branches_change_together() -> None:
    student = aggressive_pool(TwoBranchFusion().eval(), torch.empty(1, 3, 32, 32), factor=2)
    x = torch.randn(1, 3, 32, 32)
    assert student.module.eval()(x).shape == (1, 2, 32, 32)
    changed = {c.describe() for c in student.recipe.changes}
    # the branch split absorbs the factor, so its partner fusion convs and upsamplings keep x2 together
    assert "split_down (conv): stride 2 -> 1" in changed and "high_to_low (conv): stride 2 -> 1" in changed
    assert {c.target for c in student.recipe.changes if isinstance(c, Rescale)} == {"low_to_high.1"}


def test_ddpm_unet_student_matches_the_papers_recipe() -> None:
    """ReDistill's DDPM student (head stride 2, deepest DownSample stride 1, its UpSample without
    interpolation, a stride-2 transposed conv at the tail): the pass finds it from the graph, and its
    peak equals the zoo's DDPM UNet built with those strides (conv_out as the transposed conv)."""
    ddpm = pytest.importorskip("memplan.zoo.ddpm")
    inputs = [torch.empty(1, 1, 32, 32), torch.zeros(1, dtype=torch.long)]
    with torch.device("meta"):
        teacher, reference = ddpm.ddpm_unet_small().eval(), ddpm.ddpm_unet_small(strides=[2, 2, 1]).eval()
    student = aggressive_pool(teacher, [t.to("meta") for t in inputs], factor=2)
    assert [c.describe() for c in student.recipe.changes] == [
        "conv_in (conv): stride 1 -> 2", "downsamples.1.conv (conv): stride 2 -> 1",
        "upsamples.0 (interpolate): upsampling removed", "tail (conv_transpose): inserted on the output conv_out, x2, 1 channels"]
    assert student.peak_bytes == analyze(reference, [t.to("meta") for t in inputs]).peak_bytes
    assert 3.9 < analyze(teacher, [t.to("meta") for t in inputs]).peak_bytes / student.peak_bytes <= 4.0
    roles = [student.stage_map.sites[i].role for i in dict(student.stage_map.placements)["6-site"]]
    assert roles == ["head", "encoder", "encoder", "decoder", "decoder", "tail"]


@pytest.mark.parametrize("up", ["convT", "interp_scale", "convT_pad"])
def test_untraceable_unet_student_from_the_exported_graph(up: str) -> None:
    """A UNet whose stem pads TF-"same" (torch.fx cannot trace it) is rewritten on its exported ATen
    graph: functional transposed conv (fresh 1x1 weight) and upsample_nearest2d ops are re-scaled."""
    from test_passes_layout import Conv2dSame

    torch.manual_seed(0)
    teacher = SkipUNet("cat", up)
    teacher.enc1[0] = Conv2dSame(3, 8, 3, 1, bias=False)
    teacher.eval()
    px = 30 if up == "convT_pad" else 32
    student = aggressive_pool(teacher, torch.empty(1, 3, px, px), factor=2)
    assert student.recipe.changes[0].describe() == "enc1.0 (conv): stride 1 -> 2"
    assert analyze(teacher, (1, 3, px, px)).peak_bytes == 4 * student.peak_bytes
    gm = student.module.train()
    out = gm(torch.randn(3, 3, px, px))
    assert out.shape == (3, 3, px, px)
    out.square().mean().backward()
    assert all(p.grad is not None for p in gm.parameters())


class FPN(nn.Module):
    """FPN top-down path: each lateral 1x1 conv is added to the interpolated coarser level."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.c2, self.c3, self.c4 = nn.Conv2d(16, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, 64, 3, 2, 1)
        self.l2, self.l3, self.l4 = nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 1), nn.Conv2d(64, 32, 1)
        self.head = nn.Conv2d(32, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c2 = F.relu(self.c2(self.stem(x)))
        c3 = F.relu(self.c3(c2))
        c4 = F.relu(self.c4(c3))
        p3 = self.l3(c3) + F.interpolate(self.l4(c4), scale_factor=2.0)
        p2 = self.l2(c2) + F.interpolate(p3, scale_factor=2.0)
        return F.interpolate(self.head(p2), scale_factor=4.0, mode="bilinear")


def test_fpn_laterals_change_with_their_levels() -> None:
    """k=4: c3 and c4 give up their stride, so both top-down interpolations meet their laterals at x1."""
    student = aggressive_pool(FPN().eval(), torch.empty(1, 3, 64, 64), factor=4)
    assert [c.describe() for c in student.recipe.changes] == [
        "stem.0 (conv): stride 2 -> 8", "c3 (conv): stride 2 -> 1", "c4 (conv): stride 2 -> 1",
        "interpolate (interpolate): upsampling removed", "interpolate_1 (interpolate): upsampling removed",
        "tail (conv_transpose): inserted on the output interpolate_2, x4, 4 channels"]
    assert student.module(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 64, 64)


class FusionNet(nn.Module):
    """HRNet-style fusion: a 1/4 branch upsampled x2 into the 1/2 branch, then two strided convs.
    The factor-4 student absorbs the factor in those convs, so the 1/4 branch runs 4x smaller too."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.low = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)
        self.up = nn.Upsample(scale_factor=2)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.up(F.relu(self.low(x)))
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


def test_fusion_of_a_rounded_map_is_refused_naming_the_upsampling() -> None:
    """At 56x56 the 1/4 branch is 14x14, 3.5x3.5 in the factor-4 student: it rounds to 4x4, upsampled to
    8x8 against the 7x7 main branch. The refusal names the upsampling; at 64x64 (16 / 4 = 4) it runs."""
    with pytest.raises(UpsamplingError, match=r"node 'up' \(up\) upsamples a 3\.5x3\.5 map in the student \(14x14 / 4\)"):
        aggressive_pool(FusionNet().eval(), torch.empty(1, 3, 56, 56), factor=4)
    student = aggressive_pool(FusionNet().eval(), torch.empty(1, 3, 64, 64), factor=4)
    assert student.module(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    assert [c.describe() for c in student.recipe.changes] == [
        "stem (conv): stride 2 -> 8", "conv1 (conv): stride 2 -> 1", "conv2 (conv): stride 2 -> 1"]
