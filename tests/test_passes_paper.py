"""ReDistill's numbers (docs/definitions.md §3, §4, §6), RED attachment and budget search on zoo models."""

from __future__ import annotations

import copy

import pytest
import torch

from distill.features import FeatureTap
from distill.red import REDBlock, attach_red
from memplan.analyze import analyze
from memplan.zoo import create_model
from passes import AbsorbError, BudgetError, aggressive_pool, fit_budget

IMAGENET = (1, 3, 224, 224)


@pytest.fixture(scope="module")
def resnet18_k4():
    teacher = create_model("resnet18").eval()
    return teacher, aggressive_pool(teacher, torch.empty(IMAGENET, device="meta"), factor=4)


def test_resnet18_k4_is_the_paper_student(resnet18_k4) -> None:
    teacher, student = resnet18_k4
    m = student.module
    assert (m.conv1.stride, m.maxpool.stride, m.maxpool.kernel_size) == ((8, 8), 1, 3)
    assert [m.get_submodule(f"layer{i}.0.conv1").stride[0] for i in (1, 2, 3, 4)] == [1, 2, 2, 1]
    assert [m.get_submodule(f"layer{i}.0.downsample.0").stride[0] for i in (2, 3, 4)] == [2, 2, 1]
    assert student.peak_bytes == 802_816
    assert student.transfer.complete
    # identical to the hand-written zoo student [8, 1, 1, 2, 2, 1] carrying the teacher's weights
    reference = create_model("resnet18", strides=[8, 1, 1, 2, 2, 1]).eval()
    reference.load_state_dict(teacher.state_dict())
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(m.eval()(x), reference(x))


def test_resnet18_stage_map(resnet18_k4) -> None:
    _, student = resnet18_k4
    outputs = [(p.student, p.teacher, p.size) for p in student.stage_map.outputs]
    assert outputs == [
        ("relu", "layer2_1_relu_1", (28, 28)),
        ("layer1_1_relu_1", "layer2_1_relu_1", (28, 28)),
        ("layer2_1_relu_1", "layer3_1_relu_1", (14, 14)),
        ("layer3_1_relu_1", "layer4_1_relu_1", (7, 7)),
    ]
    assert [p.stage for p in student.stage_map.pairs if p.position == "input"] == [1, 2, 3]


def test_resnet50_k4_peak() -> None:
    student = aggressive_pool(create_model("resnet50"), torch.empty(IMAGENET, device="meta"), factor=4)
    assert student.peak_bytes == 2_408_448
    assert [s.student for s in student.strides] == [8, 1, 2, 2, 1]


def test_resnet_tiny_matches_the_calibration_student() -> None:
    """docs/definitions.md §6: stem, then a 4×4 max-pool, later strides 1; RED on stem, stage 1, stage 2 at 7×7."""
    student = aggressive_pool(create_model("resnet_tiny"), torch.empty(1, 1, 28, 28), factor=4)
    reference = create_model("resnet_tiny", strides=[1, 4, 1, 1, 1])
    assert student.peak_bytes == analyze(reference, (1, 1, 28, 28)).peak_bytes
    outputs = student.stage_map.outputs
    assert [p.student for p in outputs] == ["stem_pool", "layer1_1_relu_1", "layer2_1_relu_1"]
    assert {(p.teacher, p.size) for p in outputs} == {("layer3_1_relu_1", (7, 7))}


def test_absorb_latest_shrinks_every_stage() -> None:
    student = aggressive_pool(create_model("resnet18"), torch.empty(1, 3, 64, 64), factor=4, absorb="latest")
    assert [s.student for s in student.strides] == [8, 2, 2, 1, 1]


def test_resnet_tiny_cannot_absorb_eight() -> None:
    with pytest.raises(AbsorbError, match=r"layer3.0 x2, layer2.0 x2\) gives up only x4"):
        aggressive_pool(create_model("resnet_tiny"), torch.empty(1, 1, 28, 28), factor=8)


def test_unet_student_is_four_times_smaller() -> None:
    """ReDistill's encoder-decoder student at k=2: the teacher peaks at its last concat, where the
    transposed conv's output, the skip and the concat (16 + 16 + 32 channels at 64x64, fp32) are live:
    64 * 64 * 64 * 4 = 1,048,576 B; the student runs that concat at 32x32: 262,144 B."""
    student = aggressive_pool(create_model("unet_small"), torch.empty(1, 3, 64, 64), factor=2)
    assert analyze(create_model("unet_small"), (1, 3, 64, 64)).peak_bytes == 1_048_576
    assert student.peak_bytes == 262_144


@pytest.fixture(scope="module")
def tiny():
    teacher = create_model("resnet_tiny").eval()
    return teacher, aggressive_pool(teacher, torch.empty(1, 1, 28, 28), factor=4)


@pytest.mark.parametrize("placement,blocks", [("output", 3), ("input+output", 5)])
def test_attach_red_inserts_blocks_by_graph_rewriting(tiny, placement: str, blocks: int) -> None:
    teacher, student = tiny
    red = attach_red(student.module, student.stage_map, placement)
    assert len(red.red_points) == blocks and len(red.red_teachers) == blocks
    assert all(isinstance(red.get_submodule(name), REDBlock) for name in red.red_points)
    assert [n.name for n in red.graph.nodes if n.name.startswith("red_")] == red.red_points
    assert not any(name.startswith("red_") for name, _ in student.module.named_modules())  # a copy
    kept = copy.deepcopy(red)
    assert (kept.red_points, kept.red_teachers) == (red.red_points, red.red_teachers)
    x = torch.randn(2, 1, 28, 28)
    targets = list(dict.fromkeys(red.red_teachers))  # teacher points repeat; FeatureTap wants unique names
    tap_s, tap_t = FeatureTap(red.red_points), FeatureTap(targets)
    logits, s_feats = tap_s(tap_s.prepare(red.eval()), x)
    _, t_feats = tap_t(tap_t.prepare(teacher), x)
    assert logits.shape == (2, 10)
    assert [f.shape[2:] for f in s_feats] == [t_feats[targets.index(t)].shape[2:] for t in red.red_teachers]
    assert analyze(red, (1, 1, 28, 28)).peak_bytes >= student.peak_bytes


def test_red_blocks_raise_the_peak_and_fit_budget_avoids_them() -> None:
    teacher, shape = create_model("resnet18"), (1, 3, 64, 64)
    x = torch.empty(shape)
    k2 = aggressive_pool(teacher, x, factor=2, absorb="latest")
    with_red = analyze(attach_red(k2.module, k2.stage_map, "output"), shape).peak_bytes
    assert with_red > k2.peak_bytes  # a RED block holds 3 maps at once: on a large early map that is the peak
    fit = fit_budget(teacher, x, k2.peak_bytes, REDBlock)
    assert fit.peak_bytes <= k2.peak_bytes < with_red
    assert (fit.student.recipe.factor, fit.placement) != (2, "output")
    assert fit.candidates[0].factor == 2 and fit.candidates[-1].peak_bytes == fit.peak_bytes
    bare = fit_budget(teacher, x, k2.peak_bytes)
    assert (bare.student.recipe.factor, bare.placement, bare.peak_bytes) == (2, None, k2.peak_bytes)


def test_fit_budget_reports_the_best_achievable_peak() -> None:
    with pytest.raises(BudgetError, match=r"fits 1.00 KiB .*best achievable deployed peak is .* bytes; k="):
        fit_budget(create_model("resnet_tiny"), torch.empty(1, 1, 28, 28), 1024, REDBlock)
