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
