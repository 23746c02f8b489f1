"""The one model-spec resolver: prefixes, files and modules, trust, no downloads, one-line errors."""

import sys
import types

import pytest
from torch import nn

from memplan.errors import MemplanError
from memplan.specs import (
    UntrustedCodeError,
    build_model,
    default_input,
    is_code_spec,
    parse_shape,
    resolve_factory,
)


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A stand-in torchvision whose builders fail if asked to download weights."""
    calls = []

    def lraspp(*, weights=None, progress=True, num_classes=None, weights_backbone="IMAGENET1K_V1", **kwargs):
        calls.append({"weights": weights, "weights_backbone": weights_backbone, "num_classes": num_classes})
        if weights is not None or weights_backbone is not None:
            raise RuntimeError("would download weights")
        return nn.Conv2d(3, num_classes or 21, 1)

    def resnet(*, weights=None, progress=True, **kwargs):
        calls.append({"weights": weights, **kwargs})
        return nn.Linear(2, kwargs.get("num_classes", 1000))

    builders = {"lraspp_mobilenet_v3_large": lraspp, "resnet18": resnet}

    def get_model_builder(name):
        if name not in builders:
            raise ValueError(f"Unknown model {name}")
        return builders[name]

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.get_model_builder = get_model_builder
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
    return calls


def test_torchvision_specs_never_download(fake_torchvision):
    model = build_model("torchvision:lraspp_mobilenet_v3_large")
    assert isinstance(model, nn.Conv2d) and fake_torchvision[-1]["weights_backbone"] is None
    assert build_model("torchvision:resnet18", {"num_classes": 7}).out_features == 7
    assert "weights_backbone" not in fake_torchvision[-1]  # only passed where the builder takes it
    with pytest.raises(MemplanError, match="unknown torchvision model 'nope'"):
        build_model("torchvision:nope")


def test_zoo_factory_keeps_the_model_defaults():
    assert build_model("zoo:resnet_tiny").conv1.in_channels == 1
    assert build_model("zoo:resnet_tiny", {"num_classes": 3}).fc.out_features == 3


def test_code_specs_need_trust():
    assert is_code_spec("subprocess:run") and is_code_spec("net.py:Net") and not is_code_spec("zoo:resnet18")
    with pytest.raises(UntrustedCodeError, match="run.yaml names the model factory 'subprocess:run'.*--trust-code"):
        resolve_factory("subprocess:run", trust_code=False, source="run.yaml")
    assert resolve_factory("torch.nn:Identity") is nn.Identity  # typed by the user: trusted


@pytest.mark.parametrize(("spec", "match"), [
    ("nonsense", "bad model spec 'nonsense'"),
    ("torch.nn:DoesNotExist", "'DoesNotExist' is not defined in 'torch.nn'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("missing_file.py:f", "model file 'missing_file.py' does not exist"),
    ("torch.nn:Identity", None),
])
def test_spec_errors_are_one_line(spec, match):
    if match is None:
        assert isinstance(build_model(spec), nn.Identity)
        return
    with pytest.raises(MemplanError, match=match) as info:
        build_model(spec)
    assert "\n" not in str(info.value)


def test_factory_failures_and_non_modules(tmp_path):
    (tmp_path / "f.py").write_text("def boom():\n    raise KeyError('x')\ndef num():\n    return 3\n")
    with pytest.raises(MemplanError, match=r"building model '.*f.py:boom' failed: KeyError"):
        build_model(f"{tmp_path}/f.py:boom")
    with pytest.raises(MemplanError, match="returned int, not a torch.nn.Module"):
        build_model(f"{tmp_path}/f.py:num")


def test_shapes_and_default_inputs():
    assert parse_shape("1x3x8x8") == (1, 3, 8, 8) and default_input("zoo:resnet_tiny") == (1, 1, 28, 28)
    with pytest.raises(MemplanError, match="beyond any memory"):
        parse_shape("1,3,99999999999,99999999999")
    with pytest.raises(MemplanError, match="positive"):
        parse_shape("1,0,3")
