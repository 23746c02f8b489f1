"""Static int8 export: QDQ graph with per-channel int8 weights, parity reported, one-line errors."""

import onnx
import pytest

from memplan.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_export_int8_writes_a_qdq_model_and_reports_parity(tmp_path, capsys):
    out = tmp_path / "m8.onnx"
    assert main(["export", "zoo:resnet_tiny", "--input", "1,1,16,16", "--int8", "--calib", "digits",
                 "--calib-samples", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "int8 QDQ, per-channel weights, 32 calibration samples" in text and "top-1 agreement" in text
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert int8_weights and all(i.dims[0] > 1 for i in int8_weights)  # conv weights, quantized per channel
    scales = {i.name: i for i in model.graph.initializer}
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
                   {w.name for w in int8_weights}]
    assert per_channel and all(len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1
                               for n in per_channel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m8.onnx"]  # the fp32 intermediate is gone


@pytest.mark.parametrize(("extra", "match"), [
    (["--int8"], "--int8 needs --calib"),
    (["--calib", "digits"], "--int8 needs --calib"),
    (["--int8", "--calib", "digits", "--input", "1,3,16,16"], "gives 1x16x16 images; the model takes 3x16x16"),
    (["--int8", "--calib", "nope"], "unknown data format 'nope'"),
])
def test_int8_errors_are_one_line(tmp_path, capsys, extra, match):
    args = ["export", "zoo:resnet_tiny", "--input", "1,1,16,16", *extra, "--out", str(tmp_path / "m.onnx")]
    if "--input" in extra[1:]:
        args = ["export", "zoo:resnet_tiny", *extra, "--out", str(tmp_path / "m.onnx")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
    assert not list(tmp_path.iterdir())
