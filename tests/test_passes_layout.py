"""Students of nets whose feature maps go through layout ops, and of nets torch.fx cannot trace.

Each net takes its strides as an argument, so the student's reference is the same net built with the
student's strides: equal deploy peak (memplan's own analysis of an independently built model) and,
with the teacher's weights, equal outputs.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Sequence

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from memplan.analyze import analyze
from memplan.capture import capture
from passes import PassError, aggressive_pool, analyze_downsampling
from passes.layout import layout_of, propagate_layout, spatial_size


def _teacher(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _check_student(cls: type[nn.Module], teacher_strides: Sequence[int], student_strides: Sequence[int],
                   shape: tuple[int, ...], factor: int = 2, ratio: float | None = None) -> object:
    torch.manual_seed(0)
    teacher = _teacher(cls(teacher_strides))
    student = aggressive_pool(teacher, torch.empty(shape), factor=factor)
    reference = cls(student_strides).eval()
    reference.load_state_dict(teacher.state_dict())
    assert student.transfer.complete
    assert student.peak_bytes == analyze(reference, shape).peak_bytes
    teacher_peak = analyze(teacher, shape).peak_bytes
    if ratio is not None:
        assert teacher_peak / student.peak_bytes == ratio
    x = torch.randn(2, *shape[1:])
    out = student.module.eval()(x)
    assert out.shape == teacher(x).shape
    torch.testing.assert_close(out, reference(x))
    return student


# ------------------------------------------------------------------------------------------ ConvNeXt
class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, then LayerNorm and the MLP channels-last, permuted back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1, self.pwconv2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtNet(nn.Module):
    """Patchify stem (4x4/4), a wide and a narrow stage joined by LayerNorm2d + 2x2/2 conv, mean-pooled head."""

    def __init__(self, strides: Sequence[int] = (4, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 4, strides[0]), LayerNorm2d(64))
        self.stage1 = ConvNeXtBlock(64)
        self.down = nn.Sequential(LayerNorm2d(64), nn.Conv2d(64, 16, 2, strides[1]))
        self.stage2 = ConvNeXtBlock(16)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean((-2, -1))))


def test_layout_tracks_channels_last_maps() -> None:
    cg = capture(ConvNeXtNet().eval(), torch.empty(1, 3, 32, 32))
    propagate_layout(cg.gm)
    sizes = {n.name: spatial_size(n) for n in cg.gm.graph.nodes if n.op != "output"}
    assert sizes["stage1_norm"] == (8, 8) and sizes["stage1_pwconv1"] == (8, 8)  # (N, H, W, 4C)
    assert sizes["permute_3"] == (8, 8) and sizes["stage2_pwconv2"] == (4, 4)
    assert sizes["mean"] is None and sizes["head"] is None


def test_convnext_student() -> None:
    """k=2 at 64x64: stem stride 8 (kernel kept), the stage downsampling goes to stride 1. The teacher
    peaks in stage 1's channels-last MLP at 16x16 (64 and 256 channels); the student runs stage 1 at
    8x8, and its narrow stage 2 stays below that: 4x lower."""
    student = _check_student(ConvNeXtNet, (4, 2), (8, 1), (1, 3, 64, 64), ratio=4.0)
    assert [(s.label, s.teacher, s.student) for s in student.strides] == [("stem.0", 4, 8), ("down.1", 2, 1)]


# ------------------------------------------------------------------------------------------ ResNeSt
class SplitAttention(nn.Module):
    """ResNeSt's split attention (radix 2): radix groups viewed out of the channels, summed,
    a softmax over the radix of a gate computed at 1x1, multiplied back and summed."""

    def __init__(self, c: int, radix: int = 2) -> None:
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(c, c * radix, 3, padding=1, groups=radix, bias=False)
        self.bn0 = nn.BatchNorm2d(c * radix)
        self.fc1, self.bn1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.BatchNorm2d(c // 2), nn.Conv2d(c // 2, c * radix, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.conv(x)))
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        attn = self.fc2(F.relu(self.bn1(self.fc1(gap))))
        attn = F.softmax(attn.view(b, 1, self.radix, -1).transpose(1, 2), dim=1).reshape(b, -1)
        return (x * attn.view(b, self.radix, rc // self.radix, 1, 1)).sum(dim=1)


class ResNeStNet(nn.Module):
    """Stem conv (3x3/2), split-attention blocks around an avg-pool downsampling (ResNeSt's avd)."""

    def __init__(self, strides: Sequence[int] = (2, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, strides[0], 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = SplitAttention(16)
        self.avd = nn.AvgPool2d(3, strides[1], 1)
        self.block2 = SplitAttention(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.avd(self.block1(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_layout_tracks_radix_groups_and_the_gate() -> None:
    cg = capture(ResNeStNet().eval(), torch.empty(1, 3, 32, 32))
    propagate_layout(cg.gm)
    sizes = {n.name: spatial_size(n) for n in cg.gm.graph.nodes if n.op != "output"}
    assert sizes["reshape"] == (16, 16)  # (N, radix, C, H, W)
    assert sizes["sum_2"] == (16, 16)
    assert sizes["view"] is None and sizes["transpose"] is None  # the gate's (N, 1, radix, C) view


def test_resnest_student() -> None:
    """k=2: stem stride 4, avd stride 1. The teacher peaks in block 1 at 16x16, where the radix map
    (N, 2, 16, H, W) and its product with the attention are live, with the (1, 32) attention:
    2 * (32 * 16 * 16 * 4) + 32 * 4 = 65,664 B. The student runs block 1 (and block 2) at 8x8:
    2 * (32 * 8 * 8 * 4) + 128 = 16,512 B."""
    student = _check_student(ResNeStNet, (2, 2), (4, 1), (1, 3, 32, 32))
    assert [s.student for s in student.strides] == [4, 1]
    assert (analyze(_teacher(ResNeStNet()), (1, 3, 32, 32)).peak_bytes, student.peak_bytes) == (65_664, 16_512)


# ------------------------------------------------------------------------------------------ "same" padding
class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding computed from the input size with math.ceil (timm's tf_* models):
    torch.fx cannot trace it (math.ceil and max of a traced size)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    def __init__(self, strides: Sequence[int] = (2, 2, 2)) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 32, 3, strides[0], bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.conv1 = Conv2dSame(32, 16, 3, strides[1])
        self.conv2 = Conv2dSame(16, 16, 3, strides[2])
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(F.relu(self.bn(self.stem(x)))))))
        return self.head(self.drop(x.mean((2, 3))))


def test_same_padding_net_is_not_fx_traceable() -> None:
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.fx raises
        fx.symbolic_trace(SameNet())
    assert analyze_downsampling(SameNet(), torch.empty(1, 3, 33, 33)).method == "export"


def test_same_padding_student_from_the_exported_graph() -> None:
    """k=2 at 33x33 ("same" padding gives ceil sizes: 17, 9, 5): stem stride 4 gives 9x9, conv2
    stride 1 keeps 5x5 at the end. Zero pads that only convs read are free in deploy form
    (docs/definitions.md §2), so the teacher peaks at its stem: input 3 * 33 * 33 * 4 + output
    32 * 17 * 17 * 4 = 50,060 B; the student's stem output is 9x9: the reference built with strides
    [4, 2, 1] says so too."""
    student = _check_student(SameNet, (2, 2, 2), (4, 2, 1), (1, 3, 33, 33))
    assert student.recipe.changes[0].new.stride == 4
    assert analyze(_teacher(SameNet()), (1, 3, 33, 33)).peak_bytes == 3 * 33 * 33 * 4 + 32 * 17 * 17 * 4 == 50_060
    assert student.peak_bytes == 3 * 33 * 33 * 4 + 32 * 9 * 9 * 4


def test_same_padding_student_reads_each_pad_at_its_resolution() -> None:
    """The export fixes spatial sizes, so a "same" pad is a constant: at 36x36 the teacher's conv1 reads
    18x18 and pads (0, 1); the student's conv1 reads 9x9, which needs (1, 1), the pad the teacher
    exported at 18x18 has there. The reference (pads computed at run time) agrees on the output."""
    assert analyze_downsampling(SameNet(), torch.empty(1, 3, 36, 36)).static_sizes
    student = _check_student(SameNet, (2, 2, 2), (4, 2, 1), (1, 3, 36, 36))
    pads = [n.args[1] for n in student.module.graph.nodes if "pad" in str(n.target)]
    assert pads[1] == [1, 1, 1, 1]


class SameResNet(nn.Module):
    """A "same"-padded strided conv beside an average-pool shortcut (NFNet's downsampling block)."""

    def __init__(self, strides: Sequence[int] = (2, 2)) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, strides[0])
        self.conv = Conv2dSame(8, 8, 3, strides[1])
        self.short = nn.AvgPool2d(strides[1], strides[1], ceil_mode=True) if strides[1] > 1 else nn.Identity()
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        return self.head((F.relu(self.conv(x)) + self.short(x)).mean((2, 3)))


def test_restrided_same_conv_keeps_same_padding() -> None:
    """k=2 at 32x32: the block's conv goes from stride 2 to 1. The teacher pads its 16x16 input by
    (0, 1) for stride 2; kept at stride 1 that gives 15x15 against the shortcut's 16x16. "SAME" padding
    stays "SAME": (1, 1) for stride 1, as the reference built with stride 1 computes it."""
    student = _check_student(SameResNet, (2, 2), (4, 1), (1, 3, 32, 32))
    pads = [n.args[1] for n in student.module.graph.nodes if "pad" in str(n.target)]
    assert pads == [[0, 0, 0, 0], [1, 1, 1, 1]]


def test_exported_student_trains_saves_and_exports() -> None:
    teacher = _teacher(SameNet())
    gm = aggressive_pool(teacher, torch.empty(1, 3, 32, 32), factor=2).module
    x = torch.randn(4, 3, 32, 32)  # another batch: the exported graph's batch is symbolic
    gm.train()
    torch.manual_seed(1)
    a = gm(x)
    a.sum().backward()
    assert gm.get_submodule("stem").weight.grad is not None and gm.get_submodule("stem").weight.grad.abs().sum() > 0
    assert gm.bn.running_mean.abs().sum() > 0  # batch statistics updated in train mode
    gm.eval()
    b, c = gm(x), gm(x)
    torch.testing.assert_close(b, c)  # eval: running statistics, no dropout
    assert not torch.allclose(a, b)
    buffer = io.BytesIO()
    torch.save(gm.state_dict(), buffer)
    again = copy.deepcopy(gm)
    again.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    torch.testing.assert_close(again(x), b)
    exported = torch.export.export(gm, (x,), strict=False).module()
    torch.testing.assert_close(exported(x), b)


class StringPaddingNet(nn.Module):
    """Functional convs with ``padding`` given as a string: torch.conv2d's schema match is ambiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1), nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.w1, None, 2, "valid"))
        x = F.relu(F.conv2d(x, self.w2, None, 1, "same"))
        return F.conv2d(x, self.w2, None, 2, "valid").mean((2, 3))


def test_string_padding_is_read_without_a_traceback() -> None:
    student = aggressive_pool(StringPaddingNet().eval(), torch.empty(1, 3, 33, 33), factor=2)
    assert [(s.teacher, s.student) for s in student.strides] == [(2, 4), (2, 1)]
    assert student.module(torch.randn(1, 3, 33, 33)).shape == (1, 8)


def test_uncapturable_model_is_one_line() -> None:
    class Data(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if float(x.sum()) > 0 else x

    with pytest.raises(PassError, match="cannot capture") as info:
        analyze_downsampling(nn.Sequential(nn.Conv2d(3, 3, 1), Data()), torch.empty(1, 3, 8, 8))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ weight standardisation
class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d: the weight is standardised on every forward (a batch norm over it, no
    running statistics) and the conv is a functional call with tuple stride/padding arguments."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdNet(nn.Module):
    def __init__(self, strides: Sequence[int] = (2, 2, 2), branch: bool = False) -> None:
        super().__init__()
        self.branch = branch
        self.stem = StdConv(3, 16, 3, strides[0], 1)
        self.conv1 = StdConv(16, 16, 3, strides[1], 1)
        self.conv2 = StdConv(16, 8, 3, strides[2], 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch and x.shape[-1] % 2:  # control flow on a size: torch.fx cannot trace it
            x = F.pad(x, [0, 1, 0, 1])
        x = F.relu(self.conv2(F.relu(self.conv1(F.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def test_weight_standardised_student() -> None:
    """The kernel of a conv whose weight is computed is read from the weight's shape. k=2 at 32x32:
    stem stride 4, conv2 stride 1. The standardised weights are parameter-side (not activations), so
    the teacher peaks at its stem: 3 * 32 * 32 * 4 + 16 * 16 * 16 * 4 = 28,672 B; the student's stem
    writes 8x8: 12,288 + 4,096 = 16,384 B."""
    student = _check_student(StdNet, (2, 2, 2), (4, 2, 1), (1, 3, 32, 32))
    assert (analyze(_teacher(StdNet()), (1, 3, 32, 32)).peak_bytes, student.peak_bytes) == (28_672, 16_384)


def test_weight_standardised_student_on_the_exported_graph_of_a_meta_model() -> None:
    """Not fx-traceable and built on the meta device (as a sweep builds it): the exported graph keeps
    the weight's batch norm in training mode (no running statistics) when the student is in eval."""
    with torch.device("meta"):
        teacher = StdNet(branch=True).eval()
    assert analyze_downsampling(teacher, torch.empty(1, 3, 32, 32, device="meta")).method == "export"
    student = aggressive_pool(teacher, torch.empty(1, 3, 32, 32, device="meta"), factor=2)
    assert [s.student for s in student.strides] == [4, 2, 1]
    assert student.peak_bytes == 16_384
    real = aggressive_pool(_teacher(StdNet(branch=True)), torch.empty(1, 3, 32, 32), factor=2).module.eval()
    reference = _teacher(StdNet((4, 2, 1)))
    reference.load_state_dict(_teacher(StdNet()).state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(real(x), reference(x))


# ------------------------------------------------------------------------------------------ token mixing
class TokenMix(nn.Module):
    """Linear attention over a map's tokens (EfficientViT's LiteMLA): flattened to ``(N, C, H*W)``,
    mixed by two matmuls, reshaped back with sizes read from the map. The guard on the map's size is
    Python control flow: torch.fx cannot trace it, so the student comes from the exported graph, whose
    sizes torch.export writes as expressions of the model input's."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h * w == 1:
            return x
        q, k, v = self.qkv(x).reshape(b, 3, c, h * w).unbind(1)
        kv = v @ F.relu(k).transpose(-1, -2)  # (N, C, C): no spatial axis left
        return x + self.proj((kv @ F.relu(q)).reshape(b, c, h, w) / (h * w))


class TokenMixNet(nn.Module):
    def __init__(self, strides: Sequence[int] = (2, 2, 2)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, strides[0], 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, strides[1], 1)
        self.mix = TokenMix(16)
        self.conv2 = nn.Conv2d(16, 16, 3, strides[2], 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(F.relu(self.conv1(F.relu(self.bn(self.stem(x))))))
        return self.head(F.relu(self.conv2(x)).mean((2, 3)))


def test_layout_follows_tokens_through_matmuls() -> None:
    """Rows of a matmul come from its first operand, columns from its second: ``kv @ q`` has the
    tokens of ``q`` (``(h, w)`` in its last dim), ``v @ k^T`` none, so the reshape back is a map."""
    cg = capture(TokenMixNet(), torch.empty(1, 3, 32, 32), method="export")
    propagate_layout(cg.gm)
    matmuls = [n for n in cg.gm.graph.nodes if "matmul" in str(n.target)]
    assert [layout_of(n).dims[1:] for n in matmuls] == [(("",), ("",)), (("",), ("h", "w"))]
    assert spatial_size(next(iter(matmuls[1].users))) == (8, 8)


def test_token_mixing_student_reads_sizes_from_its_maps() -> None:
    """k=2 at 32x32: stem stride 4, conv2 stride 1; the token mixer runs at 4x4 instead of 8x8, so the
    reshape back must read 4x4 from the map it reshapes, not (32 - 1) // 4 + 1 from the input. Peak:
    the mixer's input, qkv output, tokens and result at the student's 4x4 equal the reference's."""
    assert analyze_downsampling(TokenMixNet(), torch.empty(1, 3, 32, 32)).method == "export"
    _check_student(TokenMixNet, (2, 2, 2), (4, 2, 1), (1, 3, 32, 32))


# ------------------------------------------------------------------------------------------ space to depth
class SpaceToDepthNet(nn.Module):
    """TResNet's stem: each 4x4 pixel block moves into channels by view/permute/reshape (every element
    kept), then a stride-1 conv. The rearrangement downsamples but has no stride to change."""

    def __init__(self, strides: Sequence[int] = (2, 2), pool: int = 1) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(48, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(pool, pool) if pool > 1 else nn.Identity()
        self.conv1 = nn.Conv2d(16, 16, 3, strides[0], 1)
        self.conv2 = nn.Conv2d(16, 16, 3, strides[1], 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        x = x.view(n, c, h // 4, 4, w // 4, 4).permute(0, 3, 5, 1, 2, 4).reshape(n, c * 16, h // 4, w // 4)
        x = self.pool(F.relu(self.bn(self.stem(x))))
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


def test_space_to_depth_is_a_fixed_downsampling() -> None:
    """The view splits H into (H // 4, 4): the piece computed from the map keeps the axis, the literal
    4 joins the channels. The view is a downsampling point the student keeps (stride 4, fixed)."""
    a = analyze_downsampling(SpaceToDepthNet(), torch.empty(1, 3, 64, 64))
    assert [(lv.points[0].kind, lv.stride, lv.out_size) for lv in a.levels] == [
        ("space_to_depth", 4, (16, 16)), ("conv", 2, (8, 8)), ("conv", 2, (4, 4))]
    assert a.stem.level is None and a.stem.end == "pool"


def test_space_to_depth_student_keeps_the_rearrangement() -> None:
    """k=2 at 64x64: the rearrangement stays 4x4 (16x16 maps), a 2x2 pool goes behind the stride-1
    stem, conv2 gives up its stride. Both peak where the permuted blocks are copied into channels:
    the input and its copy, 2 * 3 * 64 * 64 * 4 = 98,304 B (the pool comes after the stem)."""
    student = _check_student(lambda s: SpaceToDepthNet(s[:2], pool=s[2]), (2, 2, 1), (2, 1, 2), (1, 3, 64, 64))
    assert [c.describe() for c in student.recipe.changes] == [
        "conv2 (conv): stride 2 -> 1", "stem_pool (max_pool): inserted after pool, 2x2 stride 2"]
    assert student.peak_bytes == analyze(SpaceToDepthNet(), (1, 3, 64, 64)).peak_bytes == 2 * 3 * 64 * 64 * 4


def test_a_net_that_only_rearranges_after_its_stem_is_refused_saying_so() -> None:
    """``pixel_unshuffle`` keeps every element: a fixed downsampling, so nothing after the stem can give
    up the factor, and the refusal names what it kept."""
    from passes import AbsorbError

    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.PixelUnshuffle(2), nn.Conv2d(32, 8, 3, 1, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    a = analyze_downsampling(net, torch.empty(1, 3, 16, 16))
    assert [(p.kind, p.stride) for lv in a.levels for p in lv.points] == [("space_to_depth", 2)]
    with pytest.raises(AbsorbError, match=r"\(none; kept as they are, space-to-depth: 1 x2\) gives up only x1"):
        aggressive_pool(net, torch.empty(1, 3, 16, 16), factor=2)
