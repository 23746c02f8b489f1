"""The ONNX frontend and the exporter on what other people's models and files contain (issue classes):
decomposed activations and Split are the same deploy form as in PyTorch, unread outputs without
shapes, checker-rejected but loadable files, constant-built weights, the onnx package's real model
files, external data, "same"-padding export, parity relative to the output scale, int8 graphs."""

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from memplan import analyze
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.export import export_onnx, fold_batchnorm, fold_batchnorm_onnx
from memplan.onnx_frontend import analyze_onnx, graph_from_onnx

F32 = TensorProto.FLOAT
MAP = 8 * 16 * 16 * 4  # one 8-channel 16x16 fp32 map


def _legacy(model, shape, path, opset=11):
    """What the TorchScript exporter writes at an old opset (its own decompositions)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(shape),), str(path), dynamo=False, opset_version=opset)
    return path


def _exported(model, path, exporter):
    """Export ``model`` at SHAPE with memplan's exporter or the legacy one; the file's op types."""
    if exporter == "memplan":
        export_onnx(model, torch.randn(SHAPE), path, random_samples=1)
    else:
        _legacy(model, SHAPE, path)
    return {n.op_type for n in onnx.load(str(path)).graph.node}


class HardSwishByHand(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3.0) / 6.0


class SwishByHand(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class Chain(nn.Module):
    """conv(3->8) -> act -> conv(8->8) -> act -> mean: the activations are the only readers of their input."""

    def __init__(self, act):
        super().__init__()
        self.c1, self.a1, self.c2, self.a2 = nn.Conv2d(3, 8, 3, padding=1), act, nn.Conv2d(8, 8, 3, padding=1), act

    def forward(self, x):
        return self.a2(self.c2(self.a1(self.c1(x)))).mean((2, 3))


ACTS = {
    "silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "mish": nn.Mish(),
    "hardswish": nn.Hardswish(), "softplus": nn.Softplus(), "hardswish_by_hand": HardSwishByHand(),
    "swish_by_hand": SwishByHand(),
}
SHAPE = (1, 3, 16, 16)


@pytest.mark.parametrize("exporter", ["memplan", "legacy11"])
@pytest.mark.parametrize("act", list(ACTS))
def test_decomposed_activation_is_one_activation(tmp_path, act, exporter):
    """Every exporter's decomposition (Sigmoid+Mul, HardSigmoid+Mul, Div/Erf/Add/Mul, Pow/Tanh chains,
    Softplus+Greater+Where) is one activation in place: two 8x16x16 maps at the second conv, on both
    frontends (unfused, SiLU alone would hold three at its Mul)."""
    model = Chain(ACTS[act]).eval()
    path = tmp_path / "m.onnx"
    ops = _exported(model, path, exporter)
    assert analyze(model, SHAPE).peak_bytes == 2 * MAP
    assert analyze_onnx(path).peak_bytes == 2 * MAP, sorted(ops)
    assert analyze_onnx(path, form="as-written").peak_bytes >= 2 * MAP


def test_fused_activation_not_in_place_when_its_input_is_read_elsewhere(tmp_path):
    """c = conv(x); out = conv(silu(c)) + c: the SiLU writes one new map (not two), as in PyTorch."""

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            c = self.c1(x)
            return self.c2(c * torch.sigmoid(c)) + c

    model = Res().eval()
    path = _legacy(model, SHAPE, tmp_path / "r.onnx")
    assert analyze_onnx(path).peak_bytes == analyze(model, SHAPE).peak_bytes == 3 * MAP
    g, _ = graph_from_onnx(path)
    # one storage for the fused pair, allocated where the region starts (its first full-size output)
    assert [len(o.writes) for o in g.ops if o.op in ("Sigmoid", "Mul")] == [1, 0]


class MBConv(nn.Module):
    """EfficientNet's block: expand conv-BN-SiLU, depthwise conv-BN-SiLU, squeeze-excite, project conv-BN,
    residual; the exported file spells each SiLU Sigmoid + Mul and the SE gate's too."""

    def __init__(self, c=8, e=4):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, c * e, 1, bias=False), nn.BatchNorm2d(c * e), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(c * e, c * e, 3, padding=1, groups=c * e, bias=False),
                                nn.BatchNorm2d(c * e), nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c * e, 2, 1), nn.SiLU(), nn.Conv2d(2, c * e, 1),
                                nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(c * e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        h = self.dw(self.expand(x))
        return x + self.project(h * self.se(h))


def test_efficientnet_block_matches_pytorch(tmp_path):
    """Peak at the SE product: the 32-channel map, the gated copy and the block input (8 channels)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), MBConv()).eval()
    path = tmp_path / "mb.onnx"
    export_onnx(model, torch.randn(SHAPE), path, random_samples=1)
    assert analyze_onnx(path).peak_bytes == analyze(model, SHAPE).peak_bytes == (32 + 32 + 8) * 16 * 16 * 4 + 32 * 4


class CSP(nn.Module):
    """c = conv(x) (16 ch); a, b = chunk(c); out = conv(cat(a, relu(conv(b))))."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        a, b = self.c1(x).chunk(2, 1)
        return self.c3(torch.cat([a, torch.relu(self.c2(b))], 1))


@pytest.mark.parametrize("exporter", ["memplan", "legacy11"])
def test_split_pieces_are_views(tmp_path, exporter):
    """Split (dynamo) or two Slices (legacy) of a map only they read are views of it: the 16-channel map
    lives until the concat, beside relu(conv(b)) and the concat's output: 16 + 8 + 16 channels."""
    model = CSP().eval()
    path = tmp_path / "c.onnx"
    assert {"Split", "Slice"} & _exported(model, path, exporter)
    assert analyze_onnx(path).peak_bytes == analyze(model, SHAPE).peak_bytes == 5 * MAP


class ECA(nn.Module):
    """ECA/SE-style gate broadcast with ``expand_as`` (a view in PyTorch, an ``Expand`` node in ONNX)."""

    def __init__(self):
        super().__init__()
        self.c1, self.gate, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = self.c1(x)
        y = torch.sigmoid(self.gate(h.mean((2, 3), keepdim=True)))
        return self.c2(h * y.expand_as(h))


@pytest.mark.parametrize("exporter", ["memplan", "legacy11"])
def test_broadcast_expand_is_a_view(tmp_path, exporter):
    """An Expand only element-wise ops read is their broadcast: at the product the map h, the (1, 8)
    gate and the product are live: 2 maps + 32 B (a materialised Expand would add a third map)."""
    model = ECA().eval()
    path = tmp_path / "e.onnx"
    assert "Expand" in _exported(model, path, exporter)
    assert analyze_onnx(path).peak_bytes == analyze(model, SHAPE).peak_bytes == 2 * MAP + 32


class SDPA(nn.Module):
    """Two heads of self-attention over 64 tokens with ``F.scaled_dot_product_attention``."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def test_fused_attention_holds_its_scores_in_deploy_form(tmp_path):
    """A fused attention op holds the scores and their softmax in deploy form, as its exported
    MatMul/Softmax/MatMul does: 2 x (1, 2, 64, 64) fp32 = 65,536 B beside the qkv projection
    (12,288 B). As written, PyTorch's CPU kernel is one op: only qkv and the output (16,384 B)."""
    model = SDPA().eval()
    export_onnx(model, torch.randn(1, 64, 16), tmp_path / "a.onnx", random_samples=1)
    assert analyze_onnx(tmp_path / "a.onnx").peak_bytes == analyze(model, (1, 64, 16)).peak_bytes \
        == 2 * 2 * 64 * 64 * 4 + 12_288
    assert analyze(model, (1, 64, 16), form="as-written").peak_bytes == 12_288 + 4_096


class TransposedSum(nn.Module):
    """``h.transpose(2, 3) + h``: a view read by an add in PyTorch, a ``Transpose`` copy in ONNX."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = self.c1(x)
        return self.c2(h.transpose(2, 3) + h)


class Selected(nn.Module):
    """Two halves of a map picked with ``p[:, 0]`` / ``p[:, 1]``: views in PyTorch, ``Gather`` in ONNX."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        p = self.c1(x).reshape(1, 2, 4, 16, 16)
        return self.c2(p[:, 0] * p[:, 1])


@pytest.mark.parametrize("model,op,expected", [
    (TransposedSum, "Transpose", 2 * MAP),  # h and the sum (a materialised Transpose: 3 maps)
    (Selected, "Gather", 3 * MAP // 2),  # the map and the half-size product (copied halves: 2 maps)
])
def test_layout_views_match_pytorch(tmp_path, model, op, expected):
    """A Transpose read only by strided readers (element-wise, matmul, layout) and the constant-index
    Gather pieces of a map are views of it, as permute and select are in PyTorch."""
    m = model().eval()
    assert op in _exported(m, tmp_path / "v.onnx", "memplan")
    assert analyze_onnx(tmp_path / "v.onnx").peak_bytes == analyze(m, SHAPE).peak_bytes == expected


class MaskedTokenAttention(nn.Module):
    """Swin-style attention over a map's tokens: q, k, v are permuted views of one projection (eager
    matmul copies them contiguous: aten ``clone``), and the additive mask is built from
    ``x.new_zeros`` (shape only: a constant for a runtime)."""

    def __init__(self):
        super().__init__()
        self.conv, self.qkv, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 24), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = self.conv(x)
        n, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)  # (1, 256, 8) tokens
        q, k, v = self.qkv(t).reshape(n, hh * ww, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        mask = t.new_zeros(hh * ww, hh * ww)
        mask[: hh * ww // 2, hh * ww // 2:] = -100.0
        a = ((q @ k.transpose(-2, -1)) + mask).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(n, hh * ww, c).transpose(1, 2).reshape(n, c, hh, ww)
        return self.out(y)


def test_eager_matmul_copies_and_shape_only_masks_match_onnx(tmp_path):
    """PyTorch's deploy form counts what ONNX's does: the contiguous copies eager matmul makes of the
    permuted q and k are views (as a Transpose read by MatMul is), and the mask computed from a
    shape is parameter-side (the exporter folds it into a constant), in the aten reference too."""
    from memplan.reference import aten_reference

    m = MaskedTokenAttention().eval()
    _exported(m, tmp_path / "a.onnx", "memplan")
    r = analyze(m, SHAPE)
    assert r.peak_bytes == analyze_onnx(tmp_path / "a.onnx").peak_bytes
    assert r.param_side_bytes >= 256 * 256 * 4  # the mask
    ref = aten_reference(m, torch.empty(SHAPE))
    assert analyze(m, SHAPE, form="as-written").peak_bytes == ref.peak_bytes


# --------------------------------------------------------------------------- hand-built ONNX files
def _vi(name, shape, dtype=F32):
    return helper.make_tensor_value_info(name, dtype, shape)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def test_unread_output_needs_no_shape():
    """An opset-9 Dropout's mask has no inferred shape; nothing reads it, so it is no storage."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Dropout", ["r"], ["d", "mask"], ratio=0.5),
             helper.make_node("Sigmoid", ["d"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [_vi("x", [1, 64])], [_vi("y", [1, 64])]),
                          opset_imports=[helper.make_opsetid("", 9)])
    inferred = onnx.shape_inference.infer_shapes(m)
    assert "mask" not in {v.name for v in inferred.graph.value_info}
    g, _ = graph_from_onnx(m)
    # x and relu's output; the Dropout is a view (it allocates nothing, so it is no reader that keeps
    # the sigmoid from running in place over it); no mask
    assert sorted(st.nbytes for st in g.storages.values()) == [256, 256]
    assert analyze_onnx(m).peak_bytes == 512


def _ir3(extra_nodes=()):
    """IR 3, opset 9, the conv weight an initializer that is not a graph input (the checker refuses)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"]), *extra_nodes]
    outputs = [_vi("y", [1, 4, 8, 8])] + [_vi(n.output[0], [1, 4, 8, 8]) for n in extra_nodes]
    g = helper.make_graph(nodes, "g", [_vi("x", [1, 3, 8, 8])], outputs, [_init("w", np.ones((4, 3, 1, 1), np.float32))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)


def test_checker_rejected_but_loadable_file_is_a_warning(tmp_path, capsys):
    path = tmp_path / "ir3.onnx"
    onnx.save(_ir3(), str(path))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(onnx.load(str(path)))
    with pytest.warns(UserWarning, match="onnx.checker rejects it .* but onnxruntime loads it"):
        r = analyze_onnx(path)
    assert (r.peak_bytes, r.param_bytes) == (3 * 64 * 4 + 4 * 64 * 4, 4 * 3 * 4)
    bad = tmp_path / "bad.onnx"  # onnxruntime refuses it too (an input nothing defines): an error
    onnx.save(_ir3([helper.make_node("Add", ["c", "ghost"], ["z"])]), str(bad))
    assert main(["analyze", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.onnx is not a valid ONNX model" in err and "onnxruntime" in err and "\n" not in err


def test_constant_built_weights_are_parameters():
    """ConstantOfShape builds the conv weight (the light_* files' trick) and a Constant * Constant the
    bias: both are parameters counted once, as the conv consumes them; no activation."""
    nodes = [
        helper.make_node("ConstantOfShape", ["wshape"], ["w"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Constant", [], ["b0"], value=numpy_helper.from_array(np.ones(4, np.float32))),
        helper.make_node("Mul", ["b0", "two"], ["b"]),
        helper.make_node("Conv", ["x", "w", "b"], ["c"]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 6, 6])],
                          [_init("wshape", np.array([4, 3, 3, 3], np.int64)), _init("two", np.float32(2.0))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    graph, params = graph_from_onnx(m)
    assert [o.op for o in graph.ops] == ["Conv", "Relu"]
    assert params == 4 * 3 * 3 * 3 * 4 + 4 * 4  # the built weight and the built bias, nothing else
    assert analyze_onnx(m).peak_bytes == 3 * 64 * 4 + 4 * 36 * 4  # x + conv output (6x6, no padding)


LIGHT = sorted((Path(onnx.__file__).parent / "backend/test/data/light").glob("light_*.onnx"))
# parameter counts published for the architectures (torchvision's VGG19 and ResNet50); ResNet50's
# file also holds its BNs' running mean and var (53,120), both hold the Reshape target (2 int64)
PARAMS = {"light_vgg19": 143_667_240 * 4 + 16, "light_resnet50": (25_557_032 + 53_120) * 4 + 16}
PEAKS = {"light_resnet50": 9_633_792,  # docs/definitions.md §3
         "light_vgg19": 2 * 64 * 224 * 224 * 4}  # conv1_2: its input and output, 64 channels at 224


@pytest.mark.skipif(not LIGHT, reason="the installed onnx package ships no light_* model files")
@pytest.mark.parametrize("path", LIGHT, ids=[p.stem for p in LIGHT])
def test_onnx_package_model_files_analyse(path):
    r = analyze_onnx(path)
    assert r.input_bytes == 3 * 224 * 224 * 4 and r.peak_bytes > r.input_bytes
    stored = sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)  # shapes only: < 25 KiB
    assert stored < 2**15 and r.param_bytes > 2**20  # the weights are ConstantOfShape outputs
    if path.stem in PEAKS:
        assert r.peak_bytes == PEAKS[path.stem]
        assert r.param_bytes == PARAMS[path.stem]


def test_external_data_missing_or_escaping_is_one_line(tmp_path, capsys):
    m = _ir3()
    m.ir_version = 8
    m.opset_import[0].version = 17
    onnx.save(m, str(tmp_path / "ok.onnx"), save_as_external_data=True, location="ok.data", size_threshold=0)
    assert analyze_onnx(tmp_path / "ok.onnx").param_bytes == 48
    for where in ("gone.data", "../outside.data"):
        model = onnx.load(str(tmp_path / "ok.onnx"), load_external_data=False)
        for e in model.graph.initializer[0].external_data:
            if e.key == "location":
                e.value = where
        path = tmp_path / f"{where.strip('./').split('.')[0]}.onnx"
        onnx.save(model, str(path))
        with pytest.raises(MemplanError, match="external data"):
            analyze_onnx(path)
        assert main(["analyze", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("memplan analyze: error: cannot load the external data") and "\n" not in err


# --------------------------------------------------------------------------- export
def _pad_same(x, k, s, d=1):
    """TF "same" padding from the input's size (timm's pad_same)."""
    ih, iw = x.size()[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + (k - 1) * d + 1 - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + (k - 1) * d + 1 - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]) if ph or pw else x


class Conv2dSame(nn.Conv2d):
    def forward(self, x):
        x = _pad_same(x, self.kernel_size[0], self.stride[0], self.dilation[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct(nn.BatchNorm2d):
    """A BN subclass that also applies its activation (timm's BatchNormAct2d)."""

    def forward(self, x):
        return F.silu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps))


class SameNet(nn.Module):
    """timm tf_*-style: "same"-padded convs (not fx-traceable) each followed by a BN+activation module."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = Conv2dSame(3, 8, 3, 2, bias=False), BatchNormAct(8)
        self.c2, self.bn2 = Conv2dSame(8, 8, 3, 1, groups=8, bias=False), BatchNormAct(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.bn2(self.c2(self.bn1(self.c1(x)))).mean((2, 3)))


def test_same_padding_export_keeps_the_function(tmp_path):
    model = SameNet()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(1, 3, 17, 17)
    folded, pairs = fold_batchnorm(model, x)  # swapping BatchNormAct for Identity would drop its SiLU
    assert pairs == []
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)
    res = export_onnx(model, x, tmp_path / "s.onnx")
    assert res.max_rel_diff <= 1e-5 and res.max_abs_diff <= 1e-5
    assert sorted(bn for _, bn in res.folded) == ["bn1", "bn2"]
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "s.onnx")).graph.node}
    # the padded copy is the conv's padding on both frontends, whether the exporter folded the Pad (dynamo)
    # or kept it (legacy): input + first conv output, 3x17x17 + 8x9x9 fp32
    peak = analyze(model, tuple(x.shape)).peak_bytes
    assert peak == analyze_onnx(tmp_path / "s.onnx").peak_bytes == (3 * 17 * 17 + 8 * 9 * 9) * 4
    assert analyze_onnx(_legacy(model, tuple(x.shape), tmp_path / "l.onnx")).peak_bytes == peak


def test_parity_is_relative_to_the_output_scale(tmp_path):
    """A random deep net whose logits reach ~1e9: fp32 rounding alone exceeds 1e-4 absolute."""
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        conv = nn.Conv2d(8, 8, 3, padding=1)
        nn.init.normal_(conv.weight, std=10.0)
        layers += [conv, nn.ReLU()]
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *layers, nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    res = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "big.onnx")
    p = res.parity[0]
    assert p.output_scale > 1e6 and p.max_abs_diff > 1e-4  # what a fixed absolute tolerance refused
    assert p.max_rel_diff <= 1e-5 and p.max_abs_diff / p.output_scale <= 1e-5
    assert "relative to the output scale" in res.summary()


class Cancels(nn.Module):
    """(x + 2^24) - 2^24: exact in fp64, 0 in fp32 for x = 0.5 (2^24 + 0.5 rounds to 2^24)."""

    def forward(self, x):
        return (x + 2.0**24) - 2.0**24


def test_fp32_noise_is_pytorchs_own_rounding(tmp_path):
    """The parity allowance is measured: PyTorch fp32 vs fp64 on the same input, relative to
    max(1, scale). Here fp32 returns 0 where fp64 returns 0.5: noise 0.5. An export within the
    fixed tolerance never measures it (0.0 recorded)."""
    from memplan.export import _fp32_noise

    assert _fp32_noise(Cancels(), [(torch.full((1, 4), 0.5),)]) == 0.5
    assert export_onnx(Cancels(), torch.zeros(1, 4), tmp_path / "c.onnx").parity[0].fp32_noise == 0.0


def test_parity_above_the_tolerance_measures_the_fp32_noise(tmp_path):
    """Above the tolerance the fp64 run is made: with a positive tolerance its difference is either
    the allowance the export passed with or named in the refusal; a tolerance of 0 gets no allowance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(MemplanError, match="PyTorch fp32 vs fp64"):
        export_onnx(model, x, tmp_path / "n.onnx", tolerance=0.0)
    try:
        res = export_onnx(model, x, tmp_path / "n.onnx", tolerance=1e-12)
    except MemplanError as e:
        assert "PyTorch fp32 vs fp64" in str(e)
    else:
        p = res.parity[0]
        assert 0.0 < p.max_rel_diff <= 4 * p.fp32_noise and "fp32-vs-fp64" in res.summary()


def test_fold_batchnorm_onnx_is_exact():
    """Conv+BN and Gemm(transB)+BN left in a file are folded; onnxruntime gives the same outputs."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)

    def bn(name, inp, out, c):
        return helper.make_node("BatchNormalization", [inp, f"{name}.g", f"{name}.b", f"{name}.m", f"{name}.v"], [out],
                                name=name, epsilon=1e-3), [
            _init(f"{name}.g", rng.uniform(0.5, 2, c).astype(np.float32)),
            _init(f"{name}.b", rng.uniform(-1, 1, c).astype(np.float32)),
            _init(f"{name}.m", rng.uniform(-1, 1, c).astype(np.float32)),
            _init(f"{name}.v", rng.uniform(0.5, 2, c).astype(np.float32))]

    bn1, p1 = bn("bn1", "c", "cb", 4)
    bn2, p2 = bn("bn2", "l", "y", 3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn1,
             helper.make_node("GlobalAveragePool", ["cb"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["l"], name="fc", transB=1, beta=0.5), bn2]
    inits = [_init("w", rng.standard_normal((4, 2, 3, 3)).astype(np.float32)),
             _init("fw", rng.standard_normal((3, 4)).astype(np.float32)),
             _init("fb", rng.standard_normal(3).astype(np.float32)), *p1, *p2]
    m = helper.make_model(helper.make_graph(nodes, "g", [_vi("x", [2, 2, 5, 5])], [_vi("y", [2, 3])], inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(m)
    assert fold_batchnorm_onnx(m) == [("conv", "bn1"), ("fc", "bn2")]
    assert [n.op_type for n in m.graph.node] == ["Conv", "GlobalAveragePool", "Flatten", "Gemm"]
    onnx.checker.check_model(m, full_check=True)
    np.testing.assert_allclose(run(m), before, rtol=1e-5, atol=1e-5)


def test_unsupported_opset_is_one_line(tmp_path, capsys):
    assert main(["export", "zoo:resnet_tiny", "--out", str(tmp_path / "x.onnx"), "--opset", "99"]) == 2
    err = capsys.readouterr().err.strip()
    assert "opset 99 is not supported" in err and "\n" not in err and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- int8
class SmallCNN(nn.Module):
    """conv-relu, a residual conv-relu (peak: three 8x16x16 maps at its add), a strided conv, pool, fc."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = x + torch.relu(self.c2(x))
        return self.fc(F.max_pool2d(torch.relu(self.c3(x)), 2).mean((2, 3)))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The fp32 export of SmallCNN and its int8 twins (QDQ and QOperator, per-channel, static)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    d = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    export_onnx(SmallCNN().eval(), torch.randn(SHAPE), d / "fp32.onnx", random_samples=1)
    for fmt in ("QDQ", "QOperator"):
        quantize_static(str(d / "fp32.onnx"), str(d / f"{fmt}.onnx"), Reader(), quant_format=getattr(QuantFormat, fmt),
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return d


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_int8_activations_are_a_quarter(quantized, fmt):
    """fp32 peak: three 8x16x16 maps at the residual add (24 KiB). int8: the same three maps at one byte
    each; the fp32 input (3 KiB) and its int8 copy are less, so the peak is exactly a quarter."""
    fp32 = analyze_onnx(quantized / "fp32.onnx")
    q = analyze_onnx(quantized / f"{fmt}.onnx")
    assert fp32.peak_bytes == 3 * MAP
    assert q.peak_bytes == 3 * MAP // 4
    int8_weights = 8 * 3 * 9 + 8 * 8 * 9 + 16 * 8 * 9 + 10 * 16
    assert int8_weights < q.param_bytes < fp32.param_bytes / 2  # weights counted as the int8 tensors
    if fmt == "QDQ":  # as written, each dequantized map is a fp32 tensor of its own
        assert analyze_onnx(quantized / f"{fmt}.onnx", form="as-written").peak_bytes > q.peak_bytes
