"""The model sweep's core check on every installed torchvision/timm model: as-written = aten reference.

Skipped where torchvision and timm are absent (CI); run in a venv that has them:
``python -m pytest tests/test_model_sweep.py -m slow``.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("model_sweep", Path(__file__).parent.parent / "benchmarks" / "model_sweep.py")
model_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_sweep)

MODELS = model_sweep.model_names()


@pytest.mark.slow
@pytest.mark.skipif(not MODELS, reason="neither torchvision nor timm is installed")
@pytest.mark.parametrize(("source", "name"), MODELS, ids=[f"{s}:{n}" for s, n in MODELS] or None)
def test_as_written_matches_aten_reference(source, name):
    from memplan import analyze
    from memplan.reference import aten_reference

    model, shape = model_sweep.build(source, name, "meta")
    aw = analyze(model, shape, form="as-written").peak_bytes
    ref = aten_reference(model, torch.empty(shape, device="meta")).peak_bytes
    assert abs(aw - ref) <= model_sweep.MATCH_TOLERANCE * ref
    assert analyze(model, shape).peak_bytes <= aw  # deploy never needs more than as-written


def test_coverage_table_counts_cnns_and_refusals():
    """The student target is over classification CNNs (no attention op, not segmentation); an
    UpsamplingError (a net that upsamples, refused naming the node) is a precise refusal, an AbsorbError
    refusal is counted apart; ONNX peaks must be within 1 % of PyTorch's deploy peak."""
    rows = {
        "a": {"source": "timm", "model": "a", "attention": False, "student": {"ratio": 4.0},
              "deploy": {"peak_bytes": 100}, "export": {"parity": True}, "onnx": {"peak_bytes": 100}},
        "b": {"source": "timm", "model": "b", "attention": False, "student": {"error": "AbsorbError: none"},
              "deploy": {"peak_bytes": 100}, "export": {"parity": True}, "onnx": {"peak_bytes": 102}},
        "c": {"source": "timm", "model": "c", "attention": True, "student": {"error": "PassError: x"},
              "deploy": {"peak_bytes": 100}, "export": {"error": "EncodeError: big"}, "onnx": {"error": "no file"}},
        "d": {"source": "segmentation", "model": "d", "attention": False, "student": {"error": "PassError: y"}},
        "e": {"source": "timm", "model": "e", "attention": False, "student": {"error": "UpsamplingError: node 'u'"}},
    }
    table = model_sweep.coverage({"rows": rows})
    lines = {line.split()[0] + (" " + line.split()[1] if line.split()[1].startswith("(") else ""): line.split()
             for line in table.splitlines() if len(line.split()) > 1 and not line.startswith(" ")}
    assert lines["student"][1:3] == ["1", "5"]
    assert lines["student (CNNs)"][2:4] == ["1", "3"]
    assert "  or UpsamplingError       2      3   66.7%" in table
    assert lines["onnx"][1:3] == ["1", "3"]
    assert "onnx (exported models)     1      2" in table
    assert "(AbsorbError): 1" in table
