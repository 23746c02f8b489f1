import math

import pytest
import torch
import torch.fx as fx

from distill.red import REDBlock, red_loss


@pytest.mark.parametrize("shape", [(2, 4, 7, 7), (1, 3, 5, 9), (3, 16, 1, 1)])
def test_red_block_keeps_shape(shape):
    block = REDBlock(shape[1])
    assert block(torch.randn(shape)).shape == shape


def test_red_block_structure_matches_design():
    block = REDBlock(6)
    assert block.gate_conv.kernel_size == (1, 1) and block.gate_conv.bias is None
    assert block.body_conv.kernel_size == (3, 3) and block.body_conv.padding == (1, 1)
    assert block.body_conv.bias is None
    x = torch.randn(2, 6, 5, 5)
    block.eval()
    gate = torch.sigmoid(block.gate_bn(block.gate_conv(x)))
    body = torch.clamp(block.body_bn(block.body_conv(x)), 0, 6)
    torch.testing.assert_close(block(x), x * gate + body)


def test_red_block_gradients_reach_every_parameter():
    torch.manual_seed(0)
    block = REDBlock(4)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    (block(x) * torch.randn(2, 4, 6, 6)).sum().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_red_block_is_fx_traceable():
    block = REDBlock(3).eval()
    traced = fx.symbolic_trace(block)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(traced(x), block(x))
    assert not any(n.op == "call_function" and "cond" in str(n.target) for n in traced.graph.nodes)


def test_red_block_exports_to_onnx_and_runs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    block = REDBlock(4).eval()
    with torch.no_grad():
        for bn in (block.gate_bn, block.body_bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 4, 6, 6)
    path = tmp_path / "red.onnx"
    torch.onnx.export(block, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), block(x).detach(), atol=1e-5, rtol=1e-5)


def test_red_loss_identical_and_scaled_maps_is_zero():
    x = torch.rand(3, 5, 4, 4) + 0.1
    assert red_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    # cosine ignores positive scale and the channel count of the teacher
    assert red_loss(x, 3.0 * x.mean(1, keepdim=True)).item() == pytest.approx(0.0, abs=1e-6)


def test_red_loss_opposite_maps_is_two():
    x = torch.rand(2, 3, 4, 4) + 0.1
    assert red_loss(x, -x).item() == pytest.approx(2.0, abs=1e-6)


def test_red_loss_hand_example_per_sample_then_batch_mean():
    # sample 0: channel means [1, 0] vs [1, 1] -> 1 - 1/sqrt(2); sample 1: [0, 1] vs [1, 0] -> 1
    s = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]], [[[0.0, 1.0]], [[0.0, 1.0]]]])  # (2, 2, 1, 2)
    t = torch.tensor([[[[1.0, 1.0]]], [[[5.0, 0.0]]]])  # (2, 1, 1, 2)
    expected = ((1 - 1 / math.sqrt(2)) + 1.0) / 2
    assert red_loss(s, t).item() == pytest.approx(expected, abs=1e-6)


def test_red_loss_rejects_spatial_mismatch():
    with pytest.raises(ValueError, match="spatial"):
        red_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        red_loss(torch.rand(2, 4), torch.rand(2, 4))
