"""Model zoo sweep: every registered model builds, traces and runs; stride lists; torchvision identity."""

from __future__ import annotations

import doctest

import pytest
import torch
from conftest import single_input_models
from torch import fx, nn

from memplan import zoo

NAMES = zoo.list_models()
IMAGE_NAMES = single_input_models()  # the denoisers (forward(x, t)) are swept in test_diffusion_zoo.py
TORCHVISION_NAMES = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "vgg11_bn",
    "densenet121",
]


def _small_input(name: str, max_side: int = 64, device: str = "cpu") -> torch.Tensor:
    """The model's default input with H and W capped at ``max_side`` (keeps the sweep fast)."""
    n, c, *spatial = zoo.default_input(name)
    return torch.randn(n, c, *(min(s, max_side) for s in spatial), device=device)


def _meta_model(name: str, **kwargs) -> nn.Module:
    """Build on the meta device: no weight init, shape-only forwards (fast)."""
    with torch.device("meta"):
        return zoo.create_model(name, **kwargs).eval()


def _spatial_sizes(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple[int, int]]:
    """H×W of the outputs of the submodules ``names`` during one forward on ``x``."""
    sizes: dict[str, tuple[int, int]] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: sizes.__setitem__(n, tuple(out.shape[-2:]))
        )
        for n in names
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return sizes


def test_registry_lists_expected_models():
    expected = set(TORCHVISION_NAMES) | {
        "resnet34",
        "resnet18_small",
        "resnet_tiny",
        "resnet10_narrow",
        "mobilenet_v2_small",
        "densenet_small",
        "unet_small",
    }
    assert expected <= set(NAMES)
    assert NAMES == sorted(NAMES)
    assert zoo.default_input("resnet18") == (1, 3, 224, 224)
    assert zoo.default_input("resnet_tiny") == (1, 1, 28, 28)


def test_unknown_model_is_one_line_value_error():
    with pytest.raises(zoo.UnknownModelError, match="unknown zoo model 'resnet19'; known: .*resnet18") as info:
        zoo.create_model("resnet19")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    with pytest.raises(ValueError):
        zoo.default_input("nope")


def test_register_model_rejects_duplicates():
    from memplan.registry import DuplicateNameError
    from memplan.zoo.resnet import resnet18

    with pytest.raises(DuplicateNameError, match="zoo model 'resnet18' is already registered"):
        zoo.register_model(resnet18)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_build_trace_forward(name):
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=7).eval()
    x = _small_input(name)
    graph_module = fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(x)
        traced_out = graph_module(x)
    expected = (1, 7, *x.shape[2:]) if name.startswith("unet") else (1, 7)
    assert tuple(out.shape) == expected
    torch.testing.assert_close(traced_out, out)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_in_chans_and_stride_validation(name):
    model = _meta_model(name, in_chans=2, num_classes=3)
    x = _small_input(name, device="meta")
    assert model(torch.randn(1, 2, *x.shape[2:], device="meta")).shape[:2] == (1, 3)
    n_strides = len(model.strides)
    with pytest.raises(ValueError, match=f"strides needs {n_strides} entries"):
        zoo.create_model(name, strides=[1] * (n_strides + 1))
    with pytest.raises(ValueError, match="positive integers"):
        zoo.create_model(name, strides=[0] * n_strides)


def test_redistill_resnet18_student_shapes():
    x = torch.randn(1, 3, 224, 224, device="meta")
    teacher = _meta_model("resnet18")
    student = _meta_model("resnet18", strides=[8, 1, 1, 2, 2, 1])
    t = _spatial_sizes(teacher, x, ["conv1", "maxpool", "layer4"])
    s = _spatial_sizes(student, x, ["conv1", "maxpool", "layer4"])
    assert t == {"conv1": (112, 112), "maxpool": (56, 56), "layer4": (7, 7)}
    assert s == {"conv1": (28, 28), "maxpool": (28, 28), "layer4": (7, 7)}
    # Same parameter shapes: unchanged layers can be copied from the teacher.
    student.load_state_dict(teacher.state_dict())


@pytest.mark.parametrize(
    ("name", "student_strides", "feature_module"),
    [
        ("resnet50", [8, 1, 1, 2, 2, 1], "layer4"),
        ("resnext50_32x4d", [4, 2, 1, 1, 2, 2], "layer4"),
        ("mobilenet_v2", [8, 1, 2, 2, 1, 1, 1, 1], "features"),
        ("mobilenet_v3_small", [8, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1], "features"),
        ("vgg11_bn", [8, 2, 2, 1, 1], "features"),
        ("densenet121", [8, 2, 2, 1, 1], "features"),
        ("densenet_small", [2, 8, 2, 1, 1], "features"),
        ("resnet18_small", [1, 4, 1, 1, 1, 2], "layer4"),
        ("resnet_tiny", [1, 4, 1, 1, 1], "layer3"),
        ("resnet10_narrow", [8, 1, 1, 2, 2, 1], "layer4"),
        ("resnet10_narrow", [16, 1, 1, 2, 1, 1], "layer4"),
        ("mobilenet_v2_small", [4, 1, 1, 1, 2, 1, 1, 1], "features"),
    ],
)
def test_k4_students_keep_final_feature_map(name, student_strides, feature_module):
    x = _small_input(name, device="meta")
    teacher = _spatial_sizes(_meta_model(name), x, [feature_module])
    student_model = _meta_model(name, strides=student_strides)
    student = _spatial_sizes(student_model, x, [feature_module])
    assert student == teacher
    assert student_model.strides == tuple(student_strides)


def test_resnet_widths_default_and_custom():
    assert _meta_model("resnet18").widths == (64, 128, 256, 512)
    assert _meta_model("resnet_tiny").widths == (16, 32, 64)
    model = _meta_model("resnet18", widths=[8, 16, 24, 32], in_chans=1, num_classes=10)
    assert model.widths == (8, 16, 24, 32)
    assert model.conv1.out_channels == model.bn1.num_features == 8
    assert [model.get_submodule(f"layer{i}")[-1].conv2.out_channels for i in (1, 2, 3, 4)] == [8, 16, 24, 32]
    assert model.fc.in_features == 32
    assert model.layer1[0].downsample is None  # stem width = widths[0]: no projection needed
    bottleneck = _meta_model("resnet50", widths=[4, 8, 16, 32])
    assert bottleneck.conv1.out_channels == 4 and bottleneck.fc.in_features == 128
    # Module names and state_dict keys do not depend on the widths.
    assert list(model.state_dict()) == list(_meta_model("resnet18").state_dict())


def test_resnet_widths_validated_like_strides():
    with pytest.raises(
        zoo.ZooError, match=r"resnet: widths needs 4 entries \[layer1, layer2, layer3, layer4\], got 2"
    ):
        zoo.create_model("resnet18", widths=[8, 16])
    with pytest.raises(ValueError, match="widths must be positive integers"):
        zoo.create_model("resnet18", widths=[8, 0, 16, 32])
    with pytest.raises(ValueError, match="widths must be positive integers"):
        zoo.create_model("resnet_tiny", widths=[8, 16.0, 32])


def test_narrow_imagenet_stem_resnet_student_on_96px():
    x = torch.randn(1, 1, 96, 96, device="meta")
    assert zoo.default_input("resnet10_narrow") == (1, 3, 96, 96)
    teacher = _meta_model("resnet10_narrow", in_chans=1)
    assert teacher.widths == (16, 32, 64, 128) and teacher.fc.out_features == 10
    assert [len(teacher.get_submodule(f"layer{i}")) for i in (1, 2, 3, 4)] == [1, 1, 1, 1]
    student = _meta_model("resnet10_narrow", in_chans=1, strides=[8, 1, 1, 2, 2, 1])
    names = ["conv1", "layer1", "layer4"]
    assert _spatial_sizes(teacher, x, names) == {"conv1": (48, 48), "layer1": (24, 24), "layer4": (3, 3)}
    assert _spatial_sizes(student, x, names) == {"conv1": (12, 12), "layer1": (12, 12), "layer4": (3, 3)}
    student.load_state_dict(teacher.state_dict())


def test_small_stem_and_pool_conventions():
    tiny = _meta_model("resnet_tiny")
    assert isinstance(tiny.maxpool, nn.Identity) and tiny.conv1.kernel_size == (3, 3)
    assert _spatial_sizes(tiny, torch.randn(1, 1, 28, 28, device="meta"), ["layer1", "layer2", "layer3"]) == {
        "layer1": (28, 28),
        "layer2": (14, 14),
        "layer3": (7, 7),
    }
    student = _meta_model("resnet_tiny", strides=[1, 4, 1, 1, 1])
    assert isinstance(student.maxpool, nn.MaxPool2d) and student.maxpool.kernel_size == 4
    vgg_pool = _meta_model("vgg11_bn", strides=[1, 2, 2, 2, 2]).features[3]
    assert (vgg_pool.kernel_size, vgg_pool.stride) == (1, 1)
    with pytest.raises(ValueError, match="stem must be"):
        zoo.create_model("resnet18", stem="cifar")


def test_unet_output_matches_input_size():
    model = zoo.create_model("unet_small", in_chans=1, num_classes=3, strides=[2, 4, 1]).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 48, 40)).shape == (1, 3, 48, 40)


def test_docstring_examples_run():
    results = doctest.testmod(zoo, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


def _randomize_norm_stats(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so eps/affine differences show up in the outputs."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=generator)
            m.running_var.uniform_(0.5, 1.5, generator=generator)
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
            m.bias.data.normal_(0, 0.1, generator=generator)


def _traced_ops(model: nn.Module) -> list[str]:
    """The traced graph, node by node (ops, targets, arguments, in-place flags), minus type annotations."""
    return [node.format_node() for node in fx.symbolic_trace(model).graph.nodes if node.op != "placeholder"]


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_identical_to_torchvision(name):
    tv_models = pytest.importorskip("torchvision.models")
    reference = getattr(tv_models, name)(weights=None).eval()
    ours = _meta_model(name)  # takes the reference's tensors below
    _randomize_norm_stats(reference)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    leaf_reprs = [
        {n: repr(m) for n, m in model.named_modules() if not list(m.children())}
        for model in (ours, reference)
    ]
    assert leaf_reprs[0] == leaf_reprs[1]
    assert _traced_ops(ours) == _traced_ops(reference)
    ours.load_state_dict(reference.state_dict(), assign=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
