"""Aggressive pooling over every zoo CNN (and torchvision's, when installed) at k = 2 and 4."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import single_input_models

from memplan.zoo import create_model, default_input
from passes import analyze_downsampling, build_student, plan_student

SMALL = (1, 3, 64, 64)


def _shape(name: str) -> tuple[int, ...]:
    """64×64 for the ImageNet models (fast); the small-image variants at their own input."""
    shape = default_input(name)
    return shape if shape[-1] <= 64 else SMALL


def _sweep(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """Models live on the meta device (no weights to initialise or copy). build_student propagates
    shapes and refuses output shapes other than the teacher's; real forwards are left to the
    structural and paper tests."""
    teacher = model.eval()
    analysis = analyze_downsampling(teacher, torch.empty(shape, device="meta"))
    for factor in (2, 4):
        student = build_student(teacher, torch.empty(shape, device="meta"), plan_student(analysis, factor), analysis)
        assert student.peak_bytes <= analysis.peak_bytes
        # an encoder-decoder's inserted tail and re-strided transposed convs get fresh weights
        assert student.transfer.complete or (analysis.encoder_decoder and not student.transfer.unused)
        assert any(s.teacher != s.student for s in student.strides)


@pytest.mark.parametrize("name", single_input_models())
def test_zoo_cnn(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    _sweep(model, _shape(name))


TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "vgg11_bn",
               "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_0"]


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_cnn(name: str) -> None:
    import torchvision

    try:
        with torch.device("meta"):  # no memory for the weights
            model = torchvision.models.get_model(name, weights=None)
    except NotImplementedError:  # an initialiser that reads values (regnet) needs real tensors
        model = torchvision.models.get_model(name, weights=None)
    _sweep(model, SMALL)
