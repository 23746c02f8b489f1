"""DDPM UNets: shapes, fx tracing, memplan's peaks (hand-computed), the k=2 student and its RED sites."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from distill.diffusion_student import diffusion_student, red_student
from memplan.analyze import analyze
from memplan.zoo import ZooError, create_model, default_input
from passes.downsampling import PassError

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


def test_k2_student_from_the_pass_with_folded_tail(single_thread):
    teacher = create_model("ddpm_unet_small", base_channels=8, norm_groups=4).eval()
    shape = (1, 1, 32, 32)
    s = diffusion_student(teacher, shape, factor=2)
    assert [(lv.label, lv.teacher, lv.student) for lv in s.student.strides] == [
        ("conv_in", 1, 2), ("downsamples.0.conv", 2, 2), ("downsamples.1.conv", 2, 1)]
    # the folded tail: conv_out becomes ConvTranspose2d(8 -> 1, 2, stride 2); no TailUpsample is left
    assert isinstance(s.module.conv_out, torch.nn.ConvTranspose2d)
    assert (s.module.conv_out.in_channels, s.module.conv_out.out_channels) == (8, 1)
    assert not any(n.op == "call_module" and n.target == "tail" for n in s.module.graph.nodes)
    # the same network as the zoo constructor with the ReDistill k=2 strides: equal outputs on its weights
    hand = create_model("ddpm_unet_small", base_channels=8, norm_groups=4, strides=[2, 2, 1]).eval()
    hand.load_state_dict({k: v for k, v in s.module.state_dict().items() if not k.startswith("_tensor_constant")})
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 500])
    with torch.no_grad():
        torch.testing.assert_close(s.module.eval()(x, t), hand(x, t))
    # weights from the teacher, except the new tail
    assert torch.equal(s.module.get_submodule("down_blocks.0.0.conv1").weight,
                       teacher.get_submodule("down_blocks.0.0.conv1").weight)
    # the fold keeps the pass's peak, and equals the zoo-built student's
    student_peak = analyze(s.module, example(shape)).peak_bytes
    assert student_peak == s.student.peak_bytes == analyze(hand, example(shape)).peak_bytes
    for sites in (6, 2):
        red, s_taps, t_taps = red_student(s, sites)
        assert len(s_taps) == len(t_taps) == sites
        with torch.no_grad():
            assert red(x, t).shape == x.shape
    # 2 sites (head out, tail in: 8-channel 16×16 maps) stay under the peak
    red2, _, _ = red_student(s, 2)
    assert analyze(red2, example(shape)).peak_bytes == student_peak
    with pytest.raises(PassError, match="RED site configurations"):
        red_student(s, 3)
