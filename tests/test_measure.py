"""Measured peak activation memory: PyTorch profiler events, CUDA (skipped without a GPU), onnxruntime in a
child process, and the ``memplan measure`` command."""

import json

import pytest
import torch
from torch import nn

from memplan import analyze
from memplan.cli import main
from memplan.export import export_onnx
from memplan.measure import measure_onnxruntime, measure_torch_cpu, measure_torch_cuda

MIB = 2**20


def _wide():
    """Big enough maps that 4 KiB pages and small heap allocations are noise: input 3 MiB, maps 4-8 MiB."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1), nn.ReLU()).eval()


SHAPE = (1, 3, 512, 512)


def test_torch_cpu_profiler_peak():
    model = _wide()
    m = measure_torch_cpu(model, torch.randn(SHAPE))
    as_written = analyze(model, SHAPE, form="as-written").peak_bytes
    assert m.backend == "torch eager CPU" and m.peak_bytes is not None
    assert as_written <= m.peak_bytes <= 2 * as_written  # eager runs the as-written graph, plus scratch
    assert "BN not folded" in m.note


def test_torch_cuda_reports_or_explains():
    m = measure_torch_cuda(_wide(), torch.randn(1, 3, 64, 64))
    if torch.cuda.is_available():
        assert m.peak_bytes >= analyze(_wide(), (1, 3, 64, 64), form="as-written").peak_bytes
    else:
        assert m.peak_bytes is None and "no CUDA" in m.note


@pytest.fixture(scope="module")
def wide_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("measure") / "wide.onnx"
    export_onnx(_wide(), torch.randn(SHAPE), path, random_samples=1)
    return path


@pytest.mark.parametrize("arena", [False, True], ids=["no-arena", "arena"])
def test_onnxruntime_child_process(wide_onnx, arena):
    deploy = analyze(_wide(), SHAPE).peak_bytes  # input 3 MiB + 8 MiB conv map
    m = measure_onnxruntime(wide_onnx, [SHAPE], arena=arena, runs=2)
    assert m.backend == ("onnxruntime, arena" if arena else "onnxruntime, no arena")
    assert m.latency_ms > 0
    # RSS-based: the 8 MiB map must show; workspaces, arena chunks and allocator slack stay bounded
    assert 0.7 * deploy <= m.peak_bytes <= 3 * deploy + 4 * MIB, (m.peak_bytes / MIB, deploy / MIB)


def test_cli_measure_json(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["measure", "zoo:resnet_tiny", "--runs", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "theory: deploy" in table and "why they differ" in table and "onnxruntime, no arena" in table
    doc = json.loads(out.read_text())
    assert doc["input_shape"] == [1, 1, 28, 28]
    assert doc["theory"][0] == {"label": "deploy", "peak_bytes": analyze_tiny()}
    backends = [m["backend"] for m in doc["measured"]]
    assert backends == ["torch eager CPU", "torch CUDA", "onnxruntime, no arena", "onnxruntime, arena",
                        "onnxruntime, no reuse"]
    assert all(m["peak_bytes"] > 0 for m in doc["measured"] if m["backend"] != "torch CUDA")


def analyze_tiny():
    from memplan.zoo import create_model

    return analyze(create_model("resnet_tiny"), (1, 1, 28, 28)).peak_bytes


def test_cli_measure_onnx_file(wide_onnx, capsys):
    assert main(["measure", str(wide_onnx), "--runs", "1", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["backend"] for m in doc["measured"]] == ["onnxruntime, no arena", "onnxruntime, arena",
                                                      "onnxruntime, no reuse"]
    assert doc["theory"][0]["peak_bytes"] == analyze(_wide(), SHAPE).peak_bytes
