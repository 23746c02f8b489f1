"""docs/definitions.md §3: the ReDistill paper's peak memory numbers, deploy form, 1x3x224x224 fp32."""

import pytest

from memplan import analyze
from memplan.zoo import create_model

STUDENT = [8, 1, 1, 2, 2, 1]


@pytest.mark.parametrize(
    "name,strides,expected,peak_node",
    [
        ("resnet18", None, 4_014_080, "maxpool"),
        ("resnet18", STUDENT, 802_816, "conv1"),
        ("resnet50", None, 9_633_792, "add"),
        ("resnet50", STUDENT, 2_408_448, "add"),
    ],
)
def test_paper_peaks(name, strides, expected, peak_node):
    model = create_model(name, **({"strides": strides} if strides else {}))
    r = analyze(model, (1, 3, 224, 224))
    assert r.peak_bytes == expected
    assert r.peak_node == peak_node


def test_resnet18_peak_contents():
    r = analyze(create_model("resnet18"), (1, 3, 224, 224))
    # conv1 output 3.0625 MiB + pool output 0.765625 MiB
    assert [(t.tensor, t.bytes) for t in r.live_at_peak] == [("conv1", 3_211_264), ("maxpool", 802_816)]
    s = analyze(create_model("resnet18", strides=STUDENT), (1, 3, 224, 224))
    assert s.input_bytes == 602_112 and r.peak_bytes / s.peak_bytes == 5.0


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_matches_zoo(name):
    tv = pytest.importorskip("torchvision.models")
    ours = analyze(create_model(name), (1, 3, 224, 224))
    theirs = analyze(tv.get_model(name, weights=None), (1, 3, 224, 224))
    assert theirs.peak_bytes == ours.peak_bytes
    assert theirs.peak_node == ours.peak_node
