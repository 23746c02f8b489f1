"""ONNX export: parity with onnxruntime for every zoo CNN and its k=4 student with RED blocks, ONNX peak
equal to the PyTorch deploy-form peak, the legacy fallback, parity failures and the CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import single_input_models
from sklearn.datasets import load_digits

from distill.red import attach_red
from distill.run import RunDir
from memplan import analyze
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.export import export_onnx
from memplan.onnx_frontend import analyze_onnx
from memplan.zoo import create_model, default_input
from passes.aggressive_pool import aggressive_pool

SIZE = 64  # ImageNet-size models are exported at 64x64 (the graph, not the canvas, costs time)
# Export costs 2-20 s per model on 2 cores, so the default run keeps one model per family (BasicBlock
# ResNet, MobileNetV2, MobileNetV3, DenseNet, UNet, the 28x28 ResNet); `-m slow` runs the rest.
SLOW = {"densenet121", "mobilenet_v2_small", "resnet18_small", "resnet34", "resnet50", "resnext50_32x4d", "vgg11_bn"}
NO_STUDENT = {"unet_small"}  # a decoder: aggressive pooling does not apply (PassError by design)
AT_224 = {"resnet18", "mobilenet_v2"}  # also compare peaks at 224x224 (same file, input dims overridden)


def _shape(name):
    shape = list(default_input(name))
    shape[2:] = [min(d, SIZE) for d in shape[2:]]
    return tuple(shape)


def real_batch(shape, n=4):
    """``n`` real handwritten digits (sklearn's bundled set) resized and normalised to ``shape``."""
    digits = torch.from_numpy(load_digits().images[:n]).float().unsqueeze(1) / 16.0
    x = F.interpolate(digits, size=shape[2:], mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.25).repeat(1, shape[1], 1, 1)


def _variant(name, variant):
    model = create_model(name).eval()
    shape = _shape(name)
    if variant == "student+red":
        s = aggressive_pool(model, torch.empty(shape), factor=4)
        model = attach_red(s.module, s.stage_map).eval()
    return model, shape


CASES = [
    pytest.param(name, variant, marks=[pytest.mark.slow] if name in SLOW else [], id=f"{name}-{variant}")
    for name in single_input_models() for variant in ("teacher", "student+red")
    if not (variant == "student+red" and name in NO_STUDENT)
]


@pytest.mark.parametrize("name,variant", CASES)
def test_export_parity_and_onnx_peak(tmp_path, name, variant):
    model, shape = _variant(name, variant)
    path = tmp_path / "m.onnx"
    res = export_onnx(model, torch.randn(shape), path, real_inputs=real_batch(shape, n=2), random_samples=1)
    assert res.exporter == "dynamo" and not res.warnings
    assert [p.inputs for p in res.parity] == ["random", "real"] and res.max_abs_diff <= 1e-4
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert 0 < len(res.folded) <= n_bn
    if variant == "student+red":  # both BNs of every RED block are folded
        assert sum(bn.startswith("red_") for _, bn in res.folded) == 2 * len(model.red_points)
    # the exported graph has the same deploy-form peak as the PyTorch model (docs/definitions.md §1), exactly
    assert analyze_onnx(path).peak_bytes == analyze(model, shape).peak_bytes
    if name in AT_224:
        big = (1, 3, 224, 224)
        peak = analyze_onnx(path, input_shapes=[big]).peak_bytes
        assert peak == analyze(model, big).peak_bytes
        if (name, variant) == ("resnet18", "teacher"):
            assert peak == 4_014_080  # docs/definitions.md §3: 3.828125 MiB


def test_dynamic_batch(tmp_path):
    model = create_model("resnet_tiny")
    res = export_onnx(model, torch.randn(1, 1, 28, 28), tmp_path / "d.onnx", dynamic_batch=True,
                      real_inputs=real_batch((1, 1, 28, 28), n=5))
    assert res.dynamic_batch and res.max_abs_diff <= 1e-4
    import onnx

    dim0 = onnx.load(str(tmp_path / "d.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    assert analyze_onnx(tmp_path / "d.onnx").peak_bytes == analyze(model, (1, 1, 28, 28)).peak_bytes
    assert analyze_onnx(tmp_path / "d.onnx", input_shapes=[(4, 1, 28, 28)]).peak_bytes == \
        analyze(model, (4, 1, 28, 28)).peak_bytes


def test_legacy_fallback_warns(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated torch.export failure")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    model = create_model("resnet_tiny")
    with pytest.warns(UserWarning, match="fell back to the legacy"):
        res = export_onnx(model, torch.randn(1, 1, 28, 28), tmp_path / "l.onnx", random_samples=1)
    assert res.exporter == "legacy" and "simulated" in res.warnings[0] and res.max_abs_diff <= 1e-4
    assert analyze_onnx(tmp_path / "l.onnx").peak_bytes == analyze(model, (1, 1, 28, 28)).peak_bytes


def test_model_over_the_protobuf_limit_keeps_its_weights_beside_it(tmp_path, monkeypatch):
    """A model over protobuf's 2 GiB limit (ViT-H) cannot be one file: its tensors go to
    ``<name>.data`` (ONNX external data). With the limit lowered to 1 KiB a small net takes that path:
    the files stand beside each other, the model file holds no weights, onnxruntime's parity and the
    analysis (which reads small tensors and leaves weights on disk) are those of the one-file export."""
    import onnx

    import memplan.export

    model, x = create_model("resnet_tiny"), torch.randn(1, 1, 28, 28)
    whole = export_onnx(model, x, tmp_path / "one.onnx")
    monkeypatch.setattr(memplan.export, "PROTOBUF_LIMIT", 1024)
    split = export_onnx(model, x, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "one.onnx"]
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert sizes["big.onnx"] + sizes["big.onnx.data"] >= sizes["one.onnx"] > 2 * sizes["big.onnx"], sizes
    assert split.max_abs_diff == whole.max_abs_diff
    stored = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    assert {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"} == \
        {"big.onnx.data"}
    assert analyze_onnx(tmp_path / "big.onnx").peak_bytes == analyze_onnx(tmp_path / "one.onnx").peak_bytes
    (tmp_path / "big.onnx.data").unlink()
    with pytest.raises(MemplanError, match="cannot load the external data of .*big.onnx.data"):
        analyze_onnx(tmp_path / "big.onnx")


def test_parity_failure_writes_nothing(tmp_path):
    with pytest.raises(Exception, match=r"differs from PyTorch by .* not written"):
        export_onnx(create_model("resnet_tiny"), torch.randn(1, 1, 28, 28), tmp_path / "f.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary


def test_cli_export_with_real_inputs(tmp_path, capsys):
    real = tmp_path / "digits.npy"
    np.save(real, real_batch((1, 1, 28, 28), n=3).numpy())
    out = tmp_path / "t.onnx"
    assert main(["export", "zoo:resnet_tiny", "--out", str(out), "--real", str(real), "--dynamic-batch"]) == 0
    text = capsys.readouterr().out
    assert "parity, real inputs (3 samples)" in text and "BatchNorm folded" in text and out.is_file()
    assert main(["analyze", str(out), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] == analyze(create_model("resnet_tiny"), (1, 1, 28, 28)).peak_bytes


def _run_dir(tmp_path, red):
    teacher = create_model("resnet_tiny")
    s = aggressive_pool(teacher, torch.empty(1, 1, 28, 28), factor=4)
    student = attach_red(s.module, s.stage_map) if red else s.module
    for p in student.parameters():  # "trained" weights: the rebuilt student must get these, not the teacher's
        torch.nn.init.normal_(p, std=0.05)
    run = tmp_path / ("red" if red else "plain")
    run.mkdir()
    recipe = {**s.recipe.to_json(), "red_placement": "input+output" if red else None}  # as the trainer writes it
    (run / "recipe.json").write_text(json.dumps(recipe))
    torch.save(student.state_dict(), run / "student.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"teacher": "zoo:resnet_tiny", "teacher_kwargs": {"num_classes": 10, "in_chans": 1}, "factor": 4, "epochs": 1}
    ))
    return run, student.eval()


@pytest.mark.parametrize("red", [False, True], ids=["plain", "red"])
def test_run_directory(tmp_path, capsys, red):
    run, student = _run_dir(tmp_path, red)
    model, shape = RunDir.open(run).load_model(), RunDir.open(run).input_shape()
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), student(x))
    if red:
        out = tmp_path / "s.onnx"
        assert main(["export", str(run), "--out", str(out)]) == 0
        assert "max |diff|" in capsys.readouterr().out
        assert analyze_onnx(out).peak_bytes == analyze(student, shape).peak_bytes


def test_unsupported_run_directory_is_one_line_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run\n")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a memplan run directory" in err


class _ShapeBranch(torch.nn.Module):
    """Not fx-traceable (a branch on the input's shape): folding falls back to torch.export's graph."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
        self.fc, self.bn1 = torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2)

    def forward(self, x):
        if x.shape[2] > 4:
            x = x[:, :, 1:, 1:]
        return self.bn1(self.fc(self.bn(self.conv(x)).mean((2, 3))))


def test_fold_batchnorm_without_fx():
    from memplan.export import fold_batchnorm

    model = _ShapeBranch()
    for bn in (model.bn, model.bn1):  # non-trivial statistics, so a wrong fold would show
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model.eval()
    folded, pairs = fold_batchnorm(model, torch.zeros(1, 3, 9, 9))
    assert pairs == [("conv", "bn"), ("fc", "bn1")] and isinstance(folded.bn, torch.nn.Identity)
    assert isinstance(model.bn, torch.nn.BatchNorm2d)  # the original is untouched
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_pads_moves_border_pads_into_the_ops_and_keeps_the_function(tmp_path):
    import onnx
    from torch import nn

    class Borders(nn.Module):  # the explicit pads a patched model's border patches carry
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.conv2 = nn.Conv2d(8, 8, 3)

        def forward(self, x):
            y = self.conv(F.pad(x, (1, 0, 2, 1)))  # zeros before a conv: the exporter folds it already
            y = F.max_pool2d(F.pad(y, (0, 1, 1, 0), value=float("-inf")), 3, 2)  # -inf before a max pool: folded
            return self.conv2(F.pad(y, (1, 1, 1, 1), value=1.0))  # ones before a conv: a real Pad, kept

    net, x = Borders().eval(), torch.randn(1, 3, 20, 20)
    plain, folded = tmp_path / "plain.onnx", tmp_path / "folded.onnx"
    export_onnx(net, x, plain, random_samples=2)
    r = export_onnx(net, x, folded, random_samples=2, fold_pads=True)  # parity with PyTorch checked on export
    pads = [[n.op_type for n in onnx.load(str(f)).graph.node].count("Pad") for f in (plain, folded)]
    assert pads == [2, 1] and r.max_abs_diff <= 1e-5
    # plain: conv1's output (8x21x19) and its -inf padded copy (8x22x20) at the Pad; folded: no copy,
    # the peak is conv1 itself (its input 3x20x20 and output)
    assert analyze_onnx(plain).peak_bytes == (8 * 21 * 19 + 8 * 22 * 20) * 4
    assert analyze_onnx(folded).peak_bytes == (3 * 20 * 20 + 8 * 21 * 19) * 4
