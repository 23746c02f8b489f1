"""DDPM UNets: shapes, fx tracing, memplan's peaks (hand-computed), the k=2 student and its RED sites."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from distill.diffusion_student import diffusion_student, red_student
from memplan.analyze import analyze
from memplan.zoo import ZooError, create_model, default_input

F32 = 4


def example(shape):
    return [torch.empty(shape, device="meta"), torch.zeros(shape[0], dtype=torch.long, device="meta")]


@pytest.mark.parametrize("name", [pytest.param("ddpm_unet", marks=pytest.mark.slow), "ddpm_unet_small"])
def test_output_shape_equals_input_and_fx_traces(name):
    shape = default_input(name)
    with torch.device("meta"):
        model = create_model(name).eval()
    x, t = torch.empty(2, *shape[1:], device="meta"), torch.tensor([0, 999], device="meta")
    assert model(x, t).shape == x.shape
    gm = fx.symbolic_trace(model)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "t"]
    assert gm(x, t).shape == x.shape


def test_small_unet_runs_on_real_tensors_with_float_time_steps():
    model = create_model("ddpm_unet_small", base_channels=8, norm_groups=4).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out_int = model(x, torch.tensor([1, 2, 3]))
        out_float = model(x, torch.tensor([1.0, 2.0, 3.0]))
        traced = fx.symbolic_trace(model)(x, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(out_int, out_float)
    torch.testing.assert_close(traced, out_int)


@pytest.mark.parametrize(
    ("name", "strides", "peak"),
    [
        # peak at the first level-0 decoder block's conv1: the concat (384 ch) and its GroupNorm output
        # (SiLU in place), the two level-0 skips still saved (conv_in, block 1 out: 128 ch each), the
        # conv1 output (128 ch), all at 32×32, plus the 512-wide time embedding
        pytest.param("ddpm_unet", None, (2 * 384 + 3 * 128) * 32 * 32 * F32 + 512 * F32, marks=pytest.mark.slow),
        # the k=2 student: the same live set at 16×16; only the time embedding keeps its size
        pytest.param("ddpm_unet", [2, 2, 2, 1], (2 * 384 + 3 * 128) * 16 * 16 * F32 + 512 * F32,
                     marks=pytest.mark.slow),
        # small: concat (96 ch) + its GroupNorm output, conv_in skip (32 ch), conv1 out (32 ch), embedding 128
        ("ddpm_unet_small", None, (2 * 96 + 2 * 32) * 32 * 32 * F32 + 128 * F32),
        ("ddpm_unet_small", [2, 2, 1], (2 * 96 + 2 * 32) * 16 * 16 * F32 + 128 * F32),
    ],
)
def test_deploy_peaks_at_32px(name, strides, peak):
    with torch.device("meta"):
        model = create_model(name, **({"strides": strides} if strides else {}))
    r = analyze(model, example(default_input(name)))
    assert r.peak_bytes == peak
    assert r.peak_node.endswith("_0_conv1") and r.peak_node.startswith("up_blocks_")


def test_stride_list_is_checked():
    with pytest.raises(ZooError, match=r"strides needs 4 entries \[conv_in, down0, down1, down2\]"):
        create_model("ddpm_unet", strides=[2, 2, 1])
    with pytest.raises(ZooError, match="positive integers"):
        create_model("ddpm_unet_small", strides=[2, 0, 1])


def test_k2_student_shapes_sites_and_red(single_thread):
    teacher = create_model("ddpm_unet_small", base_channels=8, norm_groups=4).eval()
    shape = (1, 1, 32, 32)
    s = diffusion_student(teacher, shape, factor=2)
    assert tuple(s.module.strides) == (2, 2, 1)
    sizes = [(p.student, p.teacher, p.size) for p in s.stage_map.pairs]
    assert sizes == [
        ("conv_in", "downsamples.0", (16, 16)),
        ("down_attns_0_0", "down_attns.1.0", (16, 16)),
        ("down_attns_1_0", "down_attns.2.0", (8, 8)),
        ("up_attns_1_1", "up_attns.0.1", (8, 8)),
        ("up_attns_2_0", "up_attns.1.0", (16, 16)),
        ("act_out", "up_attns.1.1", (16, 16)),
    ]
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 500])
    with torch.no_grad():
        assert s.module(x, t).shape == x.shape
    # everything but the new transposed-conv tail comes from the teacher
    assert torch.equal(s.module.get_submodule("down_blocks.0.0.conv1").weight,
                       teacher.get_submodule("down_blocks.0.0.conv1").weight)
    for sites in (6, 2):
        red, s_taps, t_taps = red_student(s, sites)
        assert len(s_taps) == len(t_taps) == sites
        with torch.no_grad():
            assert red(x, t).shape == x.shape
        # 4x fewer pixels: the RED blocks at 16×16 (8 ch: 3 maps of 8 KiB) stay under the student's peak
        assert analyze(red, example(shape)).peak_bytes == analyze(s.module, example(shape)).peak_bytes
