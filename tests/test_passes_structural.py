"""Aggressive pooling on tiny structural cases (Torch-Pruning style): each exercises one coupling rule."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memplan.analyze import analyze
from passes import (
    AbsorbError,
    InsertPool,
    PassError,
    Recipe,
    Restride,
    aggressive_pool,
    analyze_downsampling,
    apply_recipe,
)

SHAPE = (1, 3, 32, 32)


def _head(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5))


class StridedShortcut(nn.Module):
    """Residual block whose strided 3×3 main path and strided 1×1 shortcut meet at an add."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))) + self.shortcut(x))


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block1 = StridedShortcut(8, 16)
        self.block2 = StridedShortcut(16, 32)
        self.head = _head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))))


class ConcatNet(nn.Module):
    """Two strided branches (conv, and max-pool + 1×1 conv) concatenated, as in Inception reductions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.branch_conv = nn.Conv2d(8, 8, 3, 2, 1)
        self.branch_pool = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 8, 1))
        self.reduce = nn.Conv2d(16, 16, 3, 2, 1)
        self.head = _head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch_conv(x), self.branch_pool(x)], dim=1)
        return self.head(self.reduce(F.relu(x)))


class DepthwiseNet(nn.Module):
    """MobileNet-style: conv-only stem, strided depthwise convs, grouped pointwise convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6())
        self.dw1 = nn.Conv2d(16, 16, 3, 2, 1, groups=16)
        self.pw1 = nn.Conv2d(16, 32, 1, groups=2)
        self.dw2 = nn.Conv2d(32, 32, 5, 2, 2, groups=32)
        self.pw2 = nn.Conv2d(32, 32, 1)
        self.head = _head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pw2(self.dw2(F.relu6(self.pw1(self.dw1(self.stem(x)))))))


class SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SENet(nn.Module):
    """Squeeze-excitation between strided convs: the 1×1 gate must stay out of the downsampling levels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.conv1 = nn.Conv2d(16, 16, 3, 2, 1)
        self.se = SE(16)
        self.conv2 = nn.Conv2d(16, 32, 3, 2, 1)
        self.head = _head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.se(F.relu(self.conv1(F.relu(self.stem(x)))))))


class AvgPoolShortcutNet(nn.Module):
    """Residual blocks whose shortcut downsamples with a functional avg-pool (ResNet-D style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.main1 = nn.Conv2d(8, 8, 3, 2, 1)
        self.main2 = nn.Conv2d(8, 16, 3, 2, 1)
        self.proj2 = nn.Conv2d(8, 16, 1)
        self.head = _head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.main1(x) + F.avg_pool2d(x, 2))
        x = F.relu(self.main2(x) + self.proj2(F.avg_pool2d(x, kernel_size=2, stride=2)))
        return self.head(x)


class Stride1StemNet(nn.Module):
    """Small-image net: a stride-1 stem, then two strided stages."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.stage1 = StridedShortcut(8, 16)
        self.stage2 = StridedShortcut(16, 16)
        self.head = _head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(F.relu(self.bn1(self.conv1(x))))))


CASES = [ResidualNet, ConcatNet, DepthwiseNet, SENet, AvgPoolShortcutNet, Stride1StemNet]


def _teacher(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = cls().eval()
    for m in model.modules():  # non-trivial BN statistics, so weight transfer is observable
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("cls", CASES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("factor", [2, 4])
def test_student_keeps_logits_and_lowers_peak(cls: type[nn.Module], factor: int) -> None:
    teacher = _teacher(cls)
    x = torch.randn(2, *SHAPE[1:])
    student = aggressive_pool(teacher, torch.empty(SHAPE), factor=factor)
    assert student.module.eval()(x).shape == teacher(x).shape
    assert student.peak_bytes < analyze(teacher, SHAPE).peak_bytes
    assert student.peak_bytes == analyze(student.module, SHAPE).peak_bytes
    assert student.transfer.complete
    assert student.stage_map.outputs, "a shrunk student has RED sites"
    teacher_points = analyze_downsampling(teacher, torch.empty(SHAPE)).feature_points
    assert {pair.teacher for pair in student.stage_map.pairs} <= set(teacher_points)


@pytest.mark.parametrize("cls", CASES, ids=lambda c: c.__name__)
def test_recipe_round_trips_and_reapplies(cls: type[nn.Module], tmp_path) -> None:
    teacher = _teacher(cls)
    student = aggressive_pool(teacher, torch.empty(SHAPE), factor=2)
    recipe = Recipe.from_json(json.loads(json.dumps(student.recipe.to_json())))
    assert recipe == student.recipe
    student.recipe.save(tmp_path / "recipe.json")
    again = apply_recipe(copy.deepcopy(teacher), Recipe.load(tmp_path / "recipe.json"))
    x = torch.randn(1, *SHAPE[1:])
    torch.testing.assert_close(again.module.eval()(x), student.module.eval()(x))
    assert again.stage_map == student.stage_map


@pytest.mark.parametrize("cls", CASES, ids=lambda c: c.__name__)
def test_factor_one_is_the_teacher(cls: type[nn.Module]) -> None:
    teacher = _teacher(cls)
    student = aggressive_pool(teacher, torch.empty(SHAPE), factor=1)
    x = torch.randn(2, *SHAPE[1:])
    assert student.recipe.changes == () and student.stage_map.pairs == ()
    assert torch.equal(student.module.eval()(x), teacher(x))
    assert student.module.state_dict().keys() == teacher.state_dict().keys()


def _targets(student: object) -> dict[str, tuple[int, int]]:
    return {c.target: (c.old.stride, c.new.stride) for c in student.recipe.changes if isinstance(c, Restride)}


def test_strided_shortcut_changes_with_its_main_path() -> None:
    a = analyze_downsampling(ResidualNet(), torch.empty(SHAPE))
    assert [sorted(p.target for p in lv.points) for lv in a.levels] == [
        ["stem.0"], ["block1.conv1", "block1.shortcut.0"], ["block2.conv1", "block2.shortcut.0"]]
    changed = _targets(aggressive_pool(ResidualNet(), torch.empty(SHAPE), factor=2))
    assert changed == {"stem.0": (2, 4), "block2.conv1": (2, 1), "block2.shortcut.0": (2, 1)}


def test_concat_branches_form_one_level() -> None:
    a = analyze_downsampling(ConcatNet(), torch.empty(SHAPE))
    assert sorted(p.kind for p in a.levels[1].points) == ["conv", "max_pool"]
    changed = _targets(aggressive_pool(ConcatNet(), torch.empty(SHAPE), factor=4))
    assert changed == {"stem.0": (2, 8), "branch_conv": (2, 1), "branch_pool.0": (2, 1), "reduce": (2, 1)}


def test_depthwise_strides_move_and_groups_stay() -> None:
    student = aggressive_pool(DepthwiseNet(), torch.empty(SHAPE), factor=4).module
    assert student.get_submodule("stem.0").stride == (8, 8)
    assert (student.dw1.stride, student.dw2.stride, student.dw2.groups) == ((1, 1), (1, 1), 32)


def test_se_gate_is_not_a_downsampling_point() -> None:
    a = analyze_downsampling(SENet(), torch.empty(SHAPE))
    assert [lv.label for lv in a.levels] == ["stem", "conv1", "conv2"]


def test_functional_avg_pool_shortcut_is_restrided() -> None:
    student = aggressive_pool(AvgPoolShortcutNet(), torch.empty(SHAPE), factor=4)
    pools = [n for n in student.module.graph.nodes if n.target is F.avg_pool2d]
    assert [(n.kwargs["kernel_size"], n.kwargs["stride"]) for n in pools] == [(1, 1), (1, 1)]


def test_stride1_stem_gets_an_inserted_pool() -> None:
    student = aggressive_pool(Stride1StemNet(), torch.empty(SHAPE), factor=4)
    inserts = [c for c in student.recipe.changes if isinstance(c, InsertPool)]
    assert inserts == [InsertPool(after="relu", name="stem_pool", kind="max_pool", size=4)]
    assert isinstance(student.module.stem_pool, nn.MaxPool2d)
    assert student.stage_map.outputs[0].student == "stem_pool"


@pytest.mark.parametrize("pool,cls", [("max", nn.MaxPool2d), ("avg", nn.AvgPool2d)])
def test_pool_option_inserts_a_pool_after_a_strided_stem(pool: str, cls: type[nn.Module]) -> None:
    student = aggressive_pool(ResidualNet(), torch.empty(SHAPE), factor=2, pool=pool)
    assert isinstance(student.module.stem_pool, cls) and student.module.get_submodule("stem.0").stride == (2, 2)
    assert student.module.eval()(torch.zeros(SHAPE)).shape == (1, 5)


def test_unabsorbable_factor_is_a_clear_error() -> None:
    with pytest.raises(AbsorbError, match="factor 8 cannot be absorbed.*at most 4"):
        aggressive_pool(ResidualNet(), torch.empty(SHAPE), factor=8)


def test_bad_arguments() -> None:
    with pytest.raises(PassError, match="positive integer"):
        aggressive_pool(ResidualNet(), torch.empty(SHAPE), factor=0)
    with pytest.raises(PassError, match="unknown pool"):
        aggressive_pool(ResidualNet(), torch.empty(SHAPE), factor=2, pool="median")


class SpaceToDepth(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(nn.functional.conv2d(x[:, :, ::2, ::2], torch.ones(4, 3, 1, 1)), 1).flatten(1)


class Upsampler(nn.Module):
    """Upsamples by repeating rows: not a transposed conv or an interpolation, so it cannot be re-scaled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).repeat_interleave(2, dim=2)


def test_unsupported_models_are_refused_clearly() -> None:
    with pytest.raises(PassError, match="not a conv, max-pool or avg-pool"):
        analyze_downsampling(SpaceToDepth(), torch.empty(SHAPE))
    with pytest.raises(PassError, match="upsamples 16x16 -> 32x16 but is not a transposed conv or an interpolation"):
        analyze_downsampling(Upsampler(), torch.empty(SHAPE))


def test_recipe_for_another_model_is_refused() -> None:
    recipe = aggressive_pool(ResidualNet(), torch.empty(SHAPE), factor=2).recipe
    with pytest.raises(PassError, match="recipe does not match"):
        apply_recipe(DepthwiseNet(), recipe)


class ReusedPoolNet(nn.Module):
    """LeNet style: one ``self.pool`` called after each conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1, 1)
        self.pool = nn.MaxPool2d(2)
        self.head = _head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(F.relu(self.conv2(self.pool(F.relu(self.conv1(x)))))))


def test_reused_weight_free_module_is_split_per_call_site() -> None:
    teacher = ReusedPoolNet().eval()
    student = aggressive_pool(teacher, torch.empty(SHAPE), factor=2)
    m = student.module
    assert (m.pool.kernel_size, m.pool_1.kernel_size) == (4, 1)
    assert m(torch.zeros(SHAPE)).shape == (1, 5)
    again = apply_recipe(ReusedPoolNet(), student.recipe)
    assert again.module.pool_1.stride == 1


class SharedConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.down = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.down(self.down(self.stem(x))), 1).flatten(1)


def test_shared_module_with_weights_is_refused() -> None:
    with pytest.raises(PassError, match="module 'down' is called at 2 places .* has weights"):
        aggressive_pool(SharedConvNet(), torch.empty(SHAPE), factor=2)
