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


def test_quantized_patched_model_keeps_its_patch_at_a_time_order(tmp_path):
    # onnxruntime's pre-processing saves its own topological order, which runs a patched model's
    # patches breadth-first (every patch live at once); quantize_onnx puts the source order back
    import numpy as np
    import torch
    from torch import nn

    from memplan.commands.patch import export_patched
    from memplan.onnx_ort import analyze_onnx_file
    from memplan.quantize import quantize_onnx
    from passes.patch import patch_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(4), nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    shape = (1, 3, 64, 64)
    plan = patch_model(net, shape, grid=(4, 1), split_node="_4", verify=1).plan
    fp32, int8 = tmp_path / "patched.onnx", tmp_path / "patched_int8.onnx"
    export_patched(net, plan, fp32, tolerance=1e-3)
    calib = np.random.default_rng(0).standard_normal((6, 3, 64, 64)).astype(np.float32)
    quantize_onnx(fp32, int8, calib[:4], calib[4:])
    convs = lambda p: [n.name for n in onnx.load(str(p)).graph.node if n.op_type == "Conv"]  # noqa: E731
    assert convs(int8) == convs(fp32)
    # then the int8 file runs one patch at a time too: its activations about a quarter of the fp32 file's
    fp32_peak, int8_peak = analyze_onnx_file(fp32).peak_bytes, analyze_onnx_file(int8).peak_bytes
    input_bytes = 3 * 64 * 64 * 4  # the float input, resident
    assert (int8_peak - input_bytes) * 4 <= (fp32_peak - input_bytes) * 1.05, (fp32_peak, int8_peak)


def test_integer_input_takes_the_uint8_image_exactly(tmp_path, capsys):
    """integer_input drops the input's QuantizeLinear: the file takes uint8 pixels (1 byte each), and on
    the image quantized by the recorded scale and zero point it computes what the float-input int8
    file computes on the float image."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from memplan.export import export_onnx
    from memplan.onnx_ort import analyze_onnx_file
    from memplan.quantize import quantize_input, quantize_onnx
    from memplan.zoo import create_model

    fp32 = tmp_path / "fp32.onnx"
    export_onnx(create_model("resnet_tiny"), torch.zeros(1, 1, 16, 16), fp32)
    calib = np.random.default_rng(0).standard_normal((12, 1, 16, 16)).astype(np.float32)
    plain, integer = tmp_path / "int8.onnx", tmp_path / "int8_u8.onnx"
    quantize_onnx(fp32, plain, calib[:8], calib[8:])
    q = quantize_onnx(fp32, integer, calib[:8], calib[8:], integer_input=True)
    model = onnx.load(str(integer))
    x = model.graph.input[0]
    assert x.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert not any(n.op_type == "QuantizeLinear" and x.name in n.input for n in model.graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    assert (float(meta["memplan.input_scale"]), int(meta["memplan.input_zero_point"])) == \
        (q.input_scale, q.input_zero_point)
    image = np.random.default_rng(1).standard_normal((1, 1, 16, 16)).astype(np.float32)
    run = lambda p, feed: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {x.name: feed})[0]
    np.testing.assert_array_equal(run(integer, quantize_input(image, q.input_scale, q.input_zero_point)),
                                  run(plain, image))
    assert analyze_onnx_file(integer).input_bytes == 16 * 16
    assert analyze_onnx_file(plain).input_bytes == 16 * 16 * 4
    from memplan.measure import measure

    report = measure(str(integer), (1, 1, 16, 16), runs=1, repeats=1)
    assert (report.input_dtype, report.input_bytes) == ("uint8", 16 * 16)  # its own input type, not float
    out = tmp_path / "cli.onnx"
    assert main(["export", "zoo:resnet_tiny", "--input", "1,1,16,16", "--int8", "--calib", "digits",
                 "--calib-samples", "16", "--int8-input", "--out", str(out)]) == 0
    assert "input uint8, x_q = round(x / " in capsys.readouterr().out
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_integer_input_needs_int8(tmp_path, capsys):
    assert main(["export", "zoo:resnet_tiny", "--input", "1,1,16,16", "--int8-input",
                 "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--int8-input only applies with --int8" in capsys.readouterr().err


def test_integer_input_of_a_patched_model_quantizes_its_slices_alike(tmp_path):
    """A patched file slices the float image before quantizing each slice: with integer_input every
    slice gets the image's one calibrated range, the QuantizeLinears go, and the slices run on the
    uint8 image. The resident input then costs a quarter."""
    import numpy as np
    import torch
    from torch import nn

    from memplan.commands.patch import export_patched
    from memplan.onnx_ort import analyze_onnx_file
    from memplan.quantize import quantize_onnx
    from passes.patch import patch_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(16, 8, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    shape = (1, 3, 64, 64)
    plan = patch_model(net, shape, grid=(4, 1), split_node="_2", verify=1, halo="recompute").plan
    fp32, int8, u8 = tmp_path / "p.onnx", tmp_path / "q.onnx", tmp_path / "u.onnx"
    export_patched(net, plan, fp32, tolerance=1e-3)
    calib = np.random.default_rng(0).standard_normal((6, *shape[1:])).astype(np.float32)
    quantize_onnx(fp32, int8, calib[:4], calib[4:])
    q = quantize_onnx(fp32, u8, calib[:4], calib[4:], integer_input=True)
    model = onnx.load(str(u8))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert sum(n.op_type == "Slice" for n in model.graph.node) >= 4  # the bands still slice the image
    lo, hi = min(0.0, calib[:4].min()), max(0.0, calib[:4].max())
    assert q.input_scale == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert q.top1_agreement == 1.0 and q.max_rel_diff < 0.05
    a, b = analyze_onnx_file(int8), analyze_onnx_file(u8)
    assert (a.input_bytes, b.input_bytes) == (3 * 64 * 64 * 4, 3 * 64 * 64)
    # the input is live at both peaks; the float slices the first file quantizes are gone as well
    assert a.peak_bytes - b.peak_bytes >= 0.9 * (a.input_bytes - b.input_bytes)
