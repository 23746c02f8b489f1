"""The ONNX frontend on hand-built graphs: aliases, static (shape) chains, form rules, dims, dtypes, and
one-line errors for malformed, truncated or non-ONNX files; plus onnxruntime's optimized graph."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from memplan.cli import main
from memplan.errors import MemplanError
from memplan.export import export_onnx
from memplan.onnx_frontend import analyze_onnx, graph_from_onnx, load_onnx, set_input_dims
from memplan.onnx_ort import analyze_ort_optimized

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), **kw):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], **kw)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _conv_bn_relu(batch="N"):
    """x[N,3,8,8] -> Conv(4) -> BatchNorm -> Relu -> Flatten -> y; BN and conv params are initializers."""
    x = helper.make_tensor_value_info("x", F32, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("y", F32, [batch, 256])
    inits = [_init("w", np.ones((4, 3, 1, 1), np.float32))] + [
        _init(n, np.ones(4, np.float32)) for n in ("scale", "bias", "mean", "var")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["y"], name="flat"),
    ]
    return _model(nodes, [x], [y], inits)


def test_forms_follow_the_pytorch_rules():
    deploy, params = graph_from_onnx(_conv_bn_relu())
    assert [(o.name, o.kind, len(o.writes)) for o in deploy.ops] == [
        ("conv", "conv", 1), ("bn", "bn", 0), ("relu", "act", 0), ("flat", "other", 0)]
    assert params == 4 * 3 * 4 + 4 * 4 * 4
    assert sorted(st.nbytes for st in deploy.storages.values()) == [768, 1024]  # input, conv output (batch 1)
    written, _ = graph_from_onnx(_conv_bn_relu(), form="as-written")
    assert [len(o.writes) for o in written.ops] == [1, 1, 1, 0]  # Flatten is an alias in every form
    assert analyze_onnx(_conv_bn_relu(), form="as-written").peak_bytes == 1024 + 1024  # conv and BN outputs


def test_input_dims_and_dtype_what_if():
    assert analyze_onnx(_conv_bn_relu()).peak_bytes == 768 + 1024  # symbolic batch -> 1
    assert analyze_onnx(_conv_bn_relu(), input_shapes=[(2, 3, 16, 16)]).peak_bytes == 8 * (768 + 1024)
    assert analyze_onnx(_conv_bn_relu(batch=1), dtype="float16").peak_bytes == (768 + 1024) // 2
    onnx.checker.check_model(set_input_dims(_conv_bn_relu(batch=1), [(2, 3, 16, 16)]), full_check=True)
    with pytest.raises(MemplanError, match="rank 4"):
        analyze_onnx(_conv_bn_relu(), input_shapes=[(1, 3, 8)])
    with pytest.raises(MemplanError, match="1 input"):
        analyze_onnx(_conv_bn_relu(), input_shapes=[(1, 3, 8, 8), (1, 3, 8, 8)])


def test_shape_chains_are_static_and_views_alias():
    """Shape -> Gather -> Concat -> Reshape: only the Reshape (an alias) and the real ops remain."""
    x = helper.make_tensor_value_info("x", F32, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", F32, [1, 256])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [1])
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
        helper.make_node("Shape", ["s"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Concat", ["n", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["s", "target"], ["flat"], name="reshape"),
        helper.make_node("Identity", ["flat"], ["y"], name="id"),
        helper.make_node("ArgMax", ["flat"], ["idx"], name="argmax", axis=1, keepdims=0),
    ]
    m = _model(nodes, [x], [y, idx], [_init("zero", np.array([0])), _init("minus1", np.array([-1]))])
    g, _ = graph_from_onnx(m)
    assert [o.name for o in g.ops] == ["sig", "reshape", "id", "argmax"]
    assert [len(o.writes) for o in g.ops] == [1, 0, 0, 1]
    sig_out = g.ops[0].writes[0]
    assert g.storages[sig_out].is_output  # reached through two aliases
    assert g.storages[g.ops[3].writes[0]].nbytes == 8  # int64 index, unchanged by the dtype what-if
    g16, _ = graph_from_onnx(m, dtype="float16")
    assert g16.storages[g16.ops[3].writes[0]].nbytes == 8 and g16.storages[g16.ops[0].writes[0]].nbytes == 512


def test_inplace_elementwise_option():
    """a = sigmoid(x); y = a + tanh(a): the add may overwrite tanh's output (its only reader), not a."""
    x = helper.make_tensor_value_info("x", F32, [1, 16])
    y = helper.make_tensor_value_info("y", F32, [1, 16])
    nodes = [helper.make_node("Sigmoid", ["x"], ["a"]), helper.make_node("Tanh", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    m = _model(nodes, [x], [y])
    assert analyze_onnx(m).peak_bytes == 3 * 64
    assert analyze_onnx(m, inplace_elementwise=True).peak_bytes == 2 * 64


def test_initializers_listed_as_inputs_are_parameters():
    m = _conv_bn_relu(batch=1)
    m.graph.input.extend([helper.make_tensor_value_info("w", F32, [4, 3, 1, 1])])
    g, params = graph_from_onnx(m)
    assert [st.nbytes for st in g.storages.values() if st.is_input] == [768] and params == 112


def test_unknown_shape_is_a_clear_error():
    x = helper.make_tensor_value_info("x", F32, [1, 4])
    y = helper.make_tensor_value_info("y", F32, [1, 4])
    nodes = [helper.make_node("Mystery", ["x"], ["m"], domain="custom.ops"), helper.make_node("Relu", ["m"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)])
    with pytest.raises(MemplanError, match="static shape to 'm'"):
        graph_from_onnx(m)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small real export: conv-BN-ReLU stem, a residual conv-BN-ReLU block, pooling and a linear head."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
            self.body = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, 1, 1), torch.nn.BatchNorm2d(16),
                                            torch.nn.ReLU())
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.body(x)
            return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    export_onnx(Net(), torch.randn(1, 3, 32, 32), path, random_samples=1)
    return path


def test_ort_optimized_graph(exported):
    plain = analyze_onnx(exported)
    for level in ("extended", "all"):
        r = analyze_ort_optimized(exported, level=level)
        assert r.method == f"onnxruntime-{level}" and r.peak_bytes > 0
    ext = analyze_ort_optimized(exported, level="extended")
    assert "FusedConv" in {t.op for t in ext.timeline}
    assert ext.peak_bytes == plain.peak_bytes  # fusing activations into convs changes no storage in deploy form


def _bad_files(tmp_path, exported):
    data = exported.read_bytes()
    files = {
        "text.onnx": b"this is not an ONNX model\n",
        "random.onnx": np.random.default_rng(0).bytes(4096),
        "empty.onnx": b"",
        "truncated.onnx": data[: len(data) // 2],
        "tensor.onnx": _init("t", np.ones(3, np.float32)).SerializeToString(),  # valid protobuf, not a model
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return [tmp_path / n for n in files] + [tmp_path / "missing.onnx"]


def test_malformed_files_are_one_line_errors(tmp_path, exported, capsys):
    for path in _bad_files(tmp_path, exported):
        with pytest.raises(MemplanError, match=path.name):
            load_onnx(path)
        assert main(["analyze", str(path)]) == 2, path.name
        err = capsys.readouterr().err.strip()
        assert err.startswith("memplan analyze: error:") and "\n" not in err and path.name in err


def test_cli_analyze_onnx(exported, capsys):
    assert main(["analyze", str(exported), "--ort-optimized", "--input", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime-all" in out and "1x3x64x64" in out
