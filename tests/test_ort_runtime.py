"""``--runtime ort``: onnxruntime's plan predicted on hand-built graphs whose plan is computed by hand,
checked against onnxruntime's own allocations (allocator trace) and RSS, the CLI, the BFC arena
model and the RED export form."""

import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from memplan.cli import main
from memplan.errors import MemplanError
from memplan.export import export_onnx
from memplan.measure import compare_trace, measure_onnxruntime, trace_onnxruntime
from memplan.ort_runtime import OrtGraph, OrtNode, frame_bytes, plan_ort, predict_ort, simulate_bfc_arena

SHAPE = [1, 16, 64, 64]
MAP = 16 * 64 * 64 * 4  # 256 KiB: every map of the hand-built graphs


def _planned(p):  # the tensors' buffers, without the run's execution frame (24 B per value, test below)
    return [b for b in p.buffers if b.kind != "frame"]


def _save(tmp_path, nodes, out_shape=SHAPE, inits=()):
    v = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    nodes = [helper.make_node(op, ins, outs, name=f"n{i}") for i, (op, ins, outs) in enumerate(nodes)]
    graph = helper.make_graph(nodes, "g", [v("x", SHAPE)], [v("y", out_shape)], initializer=list(inits))
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_chain_runs_in_place(tmp_path):
    # Relu allocates; Sigmoid and Tanh (MayInplace) overwrite it; Add (no in-place in onnxruntime) writes y
    path = _save(tmp_path, [("Relu", ["x"], ["a"]), ("Sigmoid", ["a"], ["b"]), ("Tanh", ["b"], ["c"]),
                            ("Add", ["c", "x"], ["y"])])
    p = predict_ort(path)
    assert [(b.tensor, b.kind, b.tensors) for b in _planned(p)] == [("a", "allocate", ("a", "b", "c")),
                                                                    ("y", "output", ("y",))]
    assert p.reuse == {"a": "allocate", "b": "inplace", "c": "inplace", "y": "output"}
    assert p.peak_bytes == 3 * MAP + frame_bytes(p.graph)  # x + a + y


def test_branch_blocks_in_place(tmp_path):
    # a is still read by the Add, so the Sigmoid cannot overwrite it; the Add allocates too
    path = _save(tmp_path, [("Relu", ["x"], ["a"]), ("Sigmoid", ["a"], ["b"]), ("Add", ["a", "b"], ["y"])])
    p = predict_ort(path)
    assert p.reuse == {"a": "allocate", "b": "allocate", "y": "output"}
    assert p.peak_bytes == 4 * MAP + frame_bytes(p.graph)  # x + a + b + y at the Add


def test_reshape_is_an_alias(tmp_path):
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [16, 64 * 64])
    path = _save(tmp_path, [("Relu", ["x"], ["a"]), ("Reshape", ["a", "shape"], ["r"]), ("Sigmoid", ["r"], ["s"]),
                            ("Mul", ["s", "s"], ["y"])], out_shape=[16, 64 * 64], inits=[shape])
    p = predict_ort(path)
    assert p.reuse["r"] == "alias" and p.reuse["s"] == "inplace"  # the sigmoid overwrites the relu's buffer
    assert p.placement["s"] == "a" and p.peak_bytes == 3 * MAP + frame_bytes(p.graph)


def _graph(nodes, sizes, outputs):
    shapes = {t: (n,) for t, n in sizes.items()}
    return OrtGraph(nodes=[OrtNode(f"n{i}", "", op, tuple(ins), tuple(outs)) for i, (op, ins, outs) in enumerate(nodes)],
                    nbytes=dict(sizes), shapes=shapes, planner_shapes={t: ((n,), 1) for t, n in sizes.items()},
                    inputs=["x"], outputs=outputs, initializers=set())


def test_freelist_reuse_keeps_the_buffer_until_its_last_user():
    # a dies at n1; c (same shape) takes a's buffer at n2; the buffer lives from n0 to c's last reader n3
    g = _graph([("Neg", ["x"], ["a"]), ("Neg", ["a"], ["b"]), ("Neg", ["b"], ["c"]), ("Add", ["c", "b"], ["y"])],
               {"x": 100, "a": 100, "b": 100, "c": 100, "y": 100}, ["y"])
    p = plan_ort(g)
    assert p.reuse == {"a": "allocate", "b": "allocate", "c": "freelist", "y": "output"}
    assert [(b.tensor, b.alloc_step, b.free_step) for b in _planned(p)] == [("a", 0, 3), ("b", 1, 3), ("y", 3, 3)]
    assert p.live_bytes == [100 + 5 * 24, 200 + 5 * 24, 200 + 5 * 24, 300 + 5 * 24]  # + the frame: 5 values


def test_every_run_allocates_a_frame_of_all_values(tmp_path):
    """onnxruntime's ExecutionFrame holds one 24-byte OrtValue per value of the graph, allocated as the
    run starts: 300 chained Neg nodes on a small map have 301 values (and no initializer), so a
    7,224-byte block that the allocator trace sees before the first kernel's output."""
    nodes = [("Neg", [f"t{i}" if i else "x"], [f"t{i + 1}" if i < 299 else "y"]) for i in range(300)]
    path = _save(tmp_path, nodes)
    p = predict_ort(path)
    assert (p.buffers[0].kind, p.buffers[0].nbytes, p.buffers[0].alloc_step) == ("frame", 24 * 301, 0)
    trace = trace_onnxruntime(path, [SHAPE])
    if trace is not None:
        cmp = compare_trace(p, trace)
        assert cmp.missing_buffers == [] and cmp.extra_allocations == [], cmp.format()


def test_freelist_needs_the_same_shape():
    g = _graph([("Neg", ["x"], ["a"]), ("Neg", ["a"], ["b"]), ("Neg", ["b"], ["c"]), ("Add", ["c", "b"], ["y"])],
               {"x": 100, "a": 100, "b": 100, "c": 50, "y": 100}, ["y"])
    p = plan_ort(g)
    assert p.reuse["c"] == "allocate" and [b.free_step for b in _planned(p)] == [1, 3, 3, 3]


def test_bfc_arena_growth_and_reuse():
    mib = 2**20
    r = simulate_bfc_arena([("alloc", 0, 3 * mib), ("alloc", 1, mib // 2), ("free", 0, 0), ("alloc", 2, 2 * mib),
                            ("alloc", 3, 5 * mib)])
    # 3 MiB doubles the 1 MiB growth size to a 4 MiB region, taken whole (not twice the request);
    # 0.5 MiB needs a new region of the growth size (4 MiB, then growth doubles to 8 MiB) and splits
    # it; 2 MiB best-fits the 3.5 MiB rest there, not the freed 4 MiB chunk; 5 MiB fits nowhere: 8 MiB
    assert r.regions == (4 * mib, 4 * mib, 8 * mib)
    assert r.touched_bytes == 3 * mib + (mib // 2 + 2 * mib) + 5 * mib


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.Hardswish()).eval()
    path = tmp_path_factory.mktemp("ort") / "cnn.onnx"
    export_onnx(net, torch.randn(1, 3, 256, 256), path, random_samples=1)
    return path


def test_trace_matches_prediction_tensor_by_tensor(small_cnn):
    shape = [(1, 3, 256, 256)]
    trace = trace_onnxruntime(small_cnn, shape)
    if trace is None:
        pytest.skip("no C compiler for the allocator hook")
    p = predict_ort(small_cnn, shape)
    c = compare_trace(p, trace)
    assert c.missing_buffers == [] and c.matched == len([b for b in p.buffers if b.nbytes >= 4096])
    assert c.traced_peak_bytes == c.predicted_peak_bytes  # onnxruntime allocated exactly the predicted buffers


@pytest.mark.slow
def test_prediction_vs_rss(small_cnn):
    shape = [(1, 3, 256, 256)]
    m = measure_onnxruntime(small_cnn, shape, repeats=3, runs=0)
    p = predict_ort(small_cnn, shape)
    assert abs(p.peak_bytes / m.peak_bytes - 1) < 0.10, (p.peak_bytes, m.samples)  # RSS: pages, lazy counters


def test_cli_runtime_json(small_cnn, capsys):
    assert main(["analyze", str(small_cnn), "--runtime", "ort", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["peak_bytes"] == predict_ort(small_cnn).peak_bytes and doc["form"] == "runtime=ort"
    assert {"live_at_peak", "buffers", "placements", "runtime"} <= set(doc)
    assert sum(t["bytes"] for t in doc["live_at_peak"]) == doc["peak_bytes"]
    assert main(["analyze", str(small_cnn), "--runtime", "ort-arena", "--json", "-"]) == 0
    arena = json.loads(capsys.readouterr().out)
    assert arena["peak_bytes"] == arena["arena_touched_bytes"] + arena["input_bytes"] >= doc["peak_bytes"]


def test_cli_runtime_pytorch_model(capsys):
    assert main(["analyze", "zoo:resnet_tiny", "--runtime", "ort", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["input_shape"] == [1, 1, 28, 28] and doc["peak_bytes"] > doc["input_bytes"]


def test_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    for argv in (["analyze", str(bad), "--runtime", "ort"], ["analyze", str(tmp_path / "none.onnx"), "--runtime", "ort"],
                 ["analyze", "zoo:resnet_tiny", "--runtime", "ort", "--order", "best"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err
    with pytest.raises(MemplanError, match="unknown runtime"):
        predict_ort(bad, runtime="tflite")
    # a valid ONNX file onnxruntime cannot load (an op no kernel implements)
    v = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="custom.ops")], "g",
                              [v("x", TensorProto.FLOAT, [1, 4])], [v("y", TensorProto.FLOAT, [1, 4])])
    custom = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)]),
              str(custom))
    assert main(["analyze", str(custom), "--runtime", "ort"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "onnxruntime cannot load" in err and "Frobnicate" in err and "static.onnx" not in err


def test_red_export_form_is_the_same_function_and_smaller(tmp_path):
    from distill.red import REDBlock, ort_friendly

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), REDBlock(64),
                              torch.nn.Conv2d(64, 8, 1)).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # trained-looking statistics, so folding is exercised
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 96, 96)
    form = ort_friendly(net)
    torch.testing.assert_close(form(x), net(x), atol=1e-5, rtol=1e-5)
    export_onnx(net, x, tmp_path / "a.onnx", random_samples=1)
    export_onnx(form, x, tmp_path / "b.onnx", random_samples=1)
    whole, chunked = predict_ort(tmp_path / "a.onnx").peak_bytes, predict_ort(tmp_path / "b.onnx").peak_bytes
    assert chunked < 0.8 * whole, (whole, chunked)


def _qlinearconv(tmp_path, c, m, k, *, group=1, w_dtype=TensorProto.INT8, w_zero=0, side=64):
    """x (uint8, 1 x c x side x side: every tensor >= the trace's 4 KiB) -> one QLinearConv (k x k, 'same' padding) -> y (uint8)."""
    import numpy as np

    w = (np.arange(m * (c // group) * k * k) % 7 - 3 + (w_zero if w_dtype == TensorProto.UINT8 else 0))
    inits = [helper.make_tensor("w", w_dtype, [m, c // group, k, k], w.tolist()),
             helper.make_tensor("xs", TensorProto.FLOAT, [], [0.02]),
             helper.make_tensor("xz", TensorProto.UINT8, [], [128]),
             helper.make_tensor("ws", TensorProto.FLOAT, [m], [0.01] * m),
             helper.make_tensor("wz", w_dtype, [m], [w_zero] * m),
             helper.make_tensor("ys", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("yz", TensorProto.UINT8, [], [128])]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="conv",
                            kernel_shape=[k, k], pads=[k // 2] * 4, group=group)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c, side, side])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, m, side, side])],
                              initializer=inits)
    path = tmp_path / f"q{c}_{m}_{k}_{group}_{w_dtype}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_qlinearconv_scratch_follows_the_kernel_path(tmp_path):
    from memplan.ort_runtime import conv_sym_dispatch

    sym = conv_sym_dispatch(False) is not None  # MLAS's symmetric uint8 x int8 kernel on this CPU
    pixels, int32_acc = 64 * 64, 4 * 16 * 64 * 64  # the accumulator of a 16-channel 64x64 output
    cases = [  # (c, m, k, group, weight type, weight zero point) -> temporary buffers, in allocation order
        ((3, 16, 3, 1, TensorProto.INT8, 0), [("int32 accumulator", int32_acc), ("im2col", 3 * 9 * pixels)]),
        ((16, 16, 3, 1, TensorProto.INT8, 0), [("indirection buffer", 8 * 9 * pixels)] if sym else
         [("int32 accumulator", int32_acc), ("im2col", 16 * 9 * pixels)]),
        ((16, 16, 3, 16, TensorProto.INT8, 0), [] if sym else [("int32 accumulator", int32_acc)]),
        ((16, 16, 1, 1, TensorProto.INT8, 0), [] if sym else [("int32 accumulator", int32_acc)]),
        ((16, 16, 3, 1, TensorProto.UINT8, 128), [("int32 accumulator", int32_acc), ("im2col", 16 * 9 * pixels)]),
    ]
    cases[2][1].append(("indirection buffer", 8 * 9 * pixels))  # a depthwise conv always has one
    for (c, m, k, group, wt, wz), expected in cases:
        path = _qlinearconv(tmp_path, c, m, k, group=group, w_dtype=wt, w_zero=wz)
        p = predict_ort(path)
        scratch = [(b.tensor.rpartition("(")[2][:-1], b.nbytes) for b in p.buffers if b.kind == "scratch"]
        assert scratch == expected, (c, m, k, group, wt)
        trace = trace_onnxruntime(path, [(1, c, 64, 64)])
        if trace is not None:  # onnxruntime allocated exactly these blocks (>= 4 KiB), and nothing else
            cmp = compare_trace(p, trace)
            assert cmp.extra_allocations == [] and cmp.missing_buffers == [], (c, m, k, group, wt, cmp.format())
            assert cmp.traced_peak_bytes == cmp.predicted_peak_bytes


@pytest.mark.parametrize("k", [1, 3])
def test_convinteger_scratch_is_one_im2col(tmp_path, k):
    # dynamic quantization's ConvInteger: a uint8 im2col (16 channels x k*k taps x 64*64 pixels) unless pointwise
    w = helper.make_tensor("w", TensorProto.UINT8, [16, 16, k, k], [(i % 5) + 126 for i in range(16 * 16 * k * k)])
    node = helper.make_node("ConvInteger", ["x", "w"], ["y"], name="conv", kernel_shape=[k, k], pads=[k // 2] * 4)
    graph = helper.make_graph([node], "ci", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 16, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 16, 64, 64])], initializer=[w])
    path = tmp_path / "ci.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    p = predict_ort(path)
    assert [b.nbytes for b in p.buffers if b.kind == "scratch"] == ([16 * 9 * 64 * 64] if k == 3 else [])
    trace = trace_onnxruntime(path, [(1, 16, 64, 64)])
    if trace is not None:
        cmp = compare_trace(p, trace)
        assert cmp.extra_allocations == [] and cmp.missing_buffers == [], cmp.format()


def test_no_reuse_frees_what_the_freelist_would_keep(tmp_path):
    # b dies at the Concat; c (b's shape) comes after two 2-map tensors. With memory reuse the freelist
    # hands b's buffer to c, so it stays allocated through the Neg over the 2-map concat (6 maps live);
    # with SessionOptions.enable_mem_reuse = False nothing is handed on (5 maps: x, big, big2, ...)
    inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", 0), ("e", 16), ("ax", 1))]
    path = _save(tmp_path, [("Neg", ["x"], ["a"]), ("Neg", ["a"], ["b"]), ("Concat", ["b", "b"], ["big"]),
                            ("Neg", ["big"], ["big2"]), ("Slice", ["big2", "s", "e", "ax"], ["c"]),
                            ("Neg", ["c"], ["y"])], inits=inits)
    onnx_model = onnx.load(str(path))
    onnx_model.graph.node[2].attribute.append(helper.make_attribute("axis", 1))
    onnx.save(onnx_model, str(path))
    reuse, fresh = predict_ort(path), predict_ort(path, runtime="ort-noreuse")
    assert reuse.reuse["c"] == "freelist" and reuse.placement["c"] == "b"
    assert fresh.reuse["c"] == "allocate"
    frame = frame_bytes(reuse.graph)
    assert (reuse.peak_bytes, fresh.peak_bytes) == (6 * MAP + frame, 5 * MAP + frame)
    for plan, mem_reuse in ((reuse, True), (fresh, False)):
        trace = trace_onnxruntime(path, [SHAPE], mem_reuse=mem_reuse)
        if trace is not None:
            cmp = compare_trace(plan, trace)
            assert cmp.missing_buffers == [] and cmp.traced_peak_bytes == cmp.predicted_peak_bytes, cmp.format()


def test_prediction_takes_the_worst_of_the_orders_onnxruntime_chooses(monkeypatch):
    # onnxruntime may order parallel branches differently in each session (its NCHWc pass inserts nodes
    # in a varying order): two branches x -> 400 B -> 10 B, run one after the other (peak: one 400 B
    # map, 520 B with the input) or side by side (both, 910 B)
    import memplan.ort_runtime as ort_runtime

    def graph(depth_first):
        a = [("Neg", ["x"], ["a1"]), ("Neg", ["a1"], ["a2"])]
        b = [("Neg", ["x"], ["b1"]), ("Neg", ["b1"], ["b2"])]
        nodes = a + b if depth_first else [a[0], b[0], a[1], b[1]]
        sizes = {"x": 100, "a1": 400, "b1": 400, "a2": 10, "b2": 10, "y": 10}
        return _graph([*nodes, ("Add", ["a2", "b2"], ["y"])], sizes, ["y"])

    calls = []
    monkeypatch.setattr(ort_runtime, "load_ort_graph",
                        lambda path, shapes=None: calls.append(1) or graph(len(calls) % 2 == 1))
    p = ort_runtime.predict_ort("unused.onnx", sessions=2, max_sessions=4)
    assert len(calls) == 4 and p.orders_seen == 2  # the first two sessions disagreed: two more were sampled
    frame = 6 * 24  # the execution frame: x, a1, a2, b1, b2, y
    assert p.peak_range == (520 + frame, 910 + frame) and p.peak_bytes == 910 + frame
    calls.clear()
    monkeypatch.setattr(ort_runtime, "load_ort_graph", lambda path, shapes=None: calls.append(1) or graph(True))
    p = ort_runtime.predict_ort("unused.onnx", sessions=2, max_sessions=4)
    assert len(calls) == 2 and (p.orders_seen, p.peak_range, p.peak_bytes) == (1, (520 + frame, 520 + frame), 520 + frame)
