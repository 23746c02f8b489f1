"""Capture on models whose memory hides inside modules or in parameters (docs/definitions.md §1).

One tiny structural model per failure class: composite torch.nn modules (attention with weights, a
Transformer encoder, an LSTM), a weight-standardised conv, a dict-output model. Each asserts a
hand-computed peak and/or equality with the independent aten-level reference.
"""

import torch
import torch.nn.functional as F
from torch import nn

from memplan import analyze, capture
from memplan.reference import aten_reference

F32 = 4


def both(model, shape, **kw):
    """memplan's as-written report and the aten reference for ``model`` at ``shape``."""
    model.eval()
    return analyze(model, shape, form="as-written", **kw), aten_reference(model, torch.empty(shape))


class Attention(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads)

    def forward(self, x):
        out, weights = self.mha(x, x, x, need_weights=True, average_attn_weights=False)
        return out, weights


def test_attention_weights_are_counted():
    tokens, dim, heads = 32, 16, 4
    r, ref = both(Attention(dim, heads), (tokens, 1, dim))
    assert r.method == "aten" and r.peak_bytes == ref.peak_bytes
    scores = heads * tokens * tokens * F32  # the score/softmax tensors a leaf MHA hid
    sizes = [st.nbytes for st in r.graph.storages.values()]
    assert sizes.count(scores) >= 2  # q@k^T and its softmax
    # peak: the softmax step holds the scores, their softmax, v (in the packed q/k/v copy) and the input
    assert r.peak_bytes >= 2 * scores + tokens * dim * F32
    assert {t.module for t in r.timeline} >= {"mha"}


def test_transformer_encoder_internals_match_reference():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    r, ref = both(enc, (20, 1, 32))
    assert r.peak_bytes == ref.peak_bytes
    # the 20x64 feed-forward hidden map of each layer is an activation of its own
    assert sum(st.nbytes == 20 * 64 * F32 for st in r.graph.storages.values()) >= 2
    assert any(t.module.startswith("layers.1.") for t in r.timeline)


def test_lstm_internals_match_reference():
    r, ref = both(nn.LSTM(16, 32, num_layers=2), (10, 1, 16))
    assert r.method == "aten" and r.peak_bytes == ref.peak_bytes
    # layer 0's output sequence (10x32) feeds layer 1: both are live at layer 1's kernel
    assert r.peak_bytes >= 2 * 10 * 32 * F32


class StdConv2d(nn.Conv2d):
    """A weight-standardised conv in the style of timm's ScaledStdConv2d."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * 0.5).view(-1), training=True, momentum=0.0, eps=1e-5)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


def test_weight_standardisation_is_parameter_side():
    net = nn.Sequential(StdConv2d(3, 8, 3, padding=1), nn.ReLU())
    r, ref = both(net, (1, 3, 8, 8))
    x, conv = 3 * 64 * F32, 8 * 64 * F32
    assert r.method == "fx"
    assert r.peak_bytes == ref.peak_bytes == 2 * conv  # relu output + conv output; the weight is not live
    assert [t.live_bytes for t in r.timeline] == [x + conv, 2 * conv]
    # the standardised 8x27 weight (and the scaled gain) are computed from parameters only
    assert r.param_side_bytes >= 8 * 27 * F32 and ref.param_side_bytes >= 8 * 27 * F32
    cg = capture(net.eval(), torch.empty(1, 3, 8, 8))
    assert {n.name for n in cg.gm.graph.nodes if n.meta["memplan"].param_side} >= {"batch_norm", "reshape_as"}


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 1)
        self.seg = nn.Conv2d(4, 2, 1)
        self.aux = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        y = self.body(x)
        return {"out": self.seg(y), "aux": [self.aux(y)]}


def test_dict_outputs_live_to_the_end():
    hw = 4 * 4 * F32
    r, ref = both(TwoHeads(), (1, 3, 4, 4))
    # body: in+body | seg: body+seg | aux: body+seg+aux (seg is an output, so it stays)
    assert [t.live_bytes for t in r.timeline] == [7 * hw, 6 * hw, 7 * hw]
    assert r.peak_bytes == ref.peak_bytes == 7 * hw


def test_aten_level_drops_unread_byproducts_and_keeps_paper_number():
    # max_pool2d at aten level is max_pool2d_with_indices; its indices are read by nothing
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
    net.eval()
    fx_r = analyze(net, (1, 3, 16, 16), form="as-written", method="fx")
    aten_r = analyze(net, (1, 3, 16, 16), form="as-written", method="aten")
    assert (fx_r.method, aten_r.method) == ("fx", "aten")
    assert fx_r.peak_bytes == aten_r.peak_bytes == aten_reference(net, torch.empty(1, 3, 16, 16)).peak_bytes
    assert analyze(net, (1, 3, 16, 16), method="aten").peak_bytes == analyze(net, (1, 3, 16, 16)).peak_bytes


def test_one_kernel_modules_stay_leaves():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2), nn.LayerNorm(2), nn.Dropout())
    cg = capture(net.eval(), torch.empty(1, 3, 8, 8))
    assert cg.method == "fx" and cg.opaque == []


def test_matmul_copy_inside_one_call_is_seen():
    class Scores(nn.Module):
        def forward(self, x):  # (B, T, H*D) -> (B, H, T, D): matmul must copy q to batch it
            q = x.view(2, 8, 4, 16).permute(0, 2, 1, 3)
            return torch.matmul(q, q.transpose(-1, -2))

    r, ref = both(Scores(), (2, 8, 64))
    assert r.method == "aten" and r.peak_bytes == ref.peak_bytes
    x = scores = 2 * 8 * 64 * F32  # the copy of q has the input's size; scores 2x4x8x8 too
    assert r.peak_bytes == x + 2 * scores  # input, q's copy (read by bmm) and the scores


def test_forced_fx_level_reports_opaque_nodes():
    cg = capture(Attention().eval(), torch.empty(8, 1, 16), method="fx")
    assert cg.opaque == ["mha"]  # fx cannot see inside: said, not hidden


class FilledBuffer(nn.Module):
    """A zero buffer built from constants that the input is then written into."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        out = torch.zeros(1, 8, 4, 4)
        out[:, :3] = x
        return self.conv(out)


def test_constant_written_with_activations_is_an_activation():
    hw = 4 * 4 * F32
    r, ref = both(FilledBuffer(), (1, 3, 4, 4))
    # the 8-channel buffer holds the input's data: input (3) + buffer (8) at the write
    assert r.peak_bytes == ref.peak_bytes == (3 + 8) * hw
    assert r.timeline[-1].op == "Conv2d" and r.timeline[-1].live_bytes == (8 + 2) * hw
    assert r.param_side_bytes == ref.param_side_bytes == 0
