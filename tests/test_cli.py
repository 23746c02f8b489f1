"""`memplan analyze` end to end: table, JSON keys, plot, and one-line errors with exit code 2."""

import json
import textwrap

import pytest

from memplan.cli import main

KEYS = {
    "model", "input_shape", "form", "dtype", "peak_bytes", "peak_node", "live_at_peak", "timeline",
    "input_bytes", "param_bytes", "activation_sum_bytes",
}


def test_analyze_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "t.png"
    assert main(["analyze", "zoo:resnet18", "--input", "1,3,224,224", "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert KEYS <= set(doc)
    assert doc["peak_bytes"] == 4_014_080 and doc["peak_node"] == "maxpool"
    assert doc["input_shape"] == [1, 3, 224, 224] and doc["form"] == "deploy"
    assert png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "3.828 MiB" in table and "layer1" in table


def test_json_to_stdout_is_pure_json(capsys):
    assert main(["analyze", "zoo:resnet18", "--input", "1,3,64,64", "--dtype", "int8", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # conv1 output 64x32x32 + maxpool output 64x16x16, one byte each
    assert doc["dtype"] == "int8" and doc["peak_bytes"] == 64 * 32 * 32 + 64 * 16 * 16


def test_user_file_callable(tmp_path, capsys):
    f = tmp_path / "net.py"
    f.write_text(textwrap.dedent("""
        import torch.nn as nn
        def build():
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    """))
    assert main(["analyze", f"{f}:build", "--input", "1,3,16,16", "--json", "-", "--form", "as-written"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["peak_bytes"] == (8 + 8) * 16 * 16 * 4  # conv out + non-inplace relu out


def test_several_inputs(tmp_path, capsys):
    """One --input per forward argument, with its dtype. As written the add's inputs are live with
    its output at the peak: conv 8 * 16 * 16 * 4 + embedding 8 * 4 + add 8,192 = 16,416 B."""
    f = tmp_path / "net.py"
    f.write_text(textwrap.dedent("""
        import torch.nn as nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.emb = nn.Conv2d(3, 8, 3, padding=1), nn.Embedding(10, 8)
            def forward(self, x, t):
                return self.conv(x) + self.emb(t)[:, :, None, None]
    """))
    argv = ["analyze", f"{f}:Net", "--input", "1,3,16,16", "--input", "1:int64", "--form", "as-written", "--json", "-"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] == 8 * 16 * 16 * 4 * 2 + 8 * 4 == 16_416


def test_zoo_denoiser_gets_its_time_step(capsys):
    """A zoo denoiser's time step is added to its image input, at the image's batch."""
    import torch

    from memplan.analyze import analyze
    from memplan.zoo import create_model

    assert main(["analyze", "zoo:ddpm_unet_small", "--input", "2,1,32,32", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    x, t = torch.empty(2, 1, 32, 32, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    assert doc["peak_bytes"] == analyze(create_model("ddpm_unet_small"), [x, t]).peak_bytes


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["analyze", "zoo:not_a_model"], "unknown zoo model"),
        (["analyze", "zoo:resnet18", "--input", "1,x,3"], "bad input shape"),
        (["analyze", "zoo:resnet18", "--input", "1,3,0,4"], "bad input shape"),
        (["analyze", "missing_file.py:build"], "does not exist"),
        (["analyze", "no_such_pkg_xyz.mod:build"], "cannot import"),
        (["analyze", "collections:OrderedDict"], "not a torch.nn.Module"),
        (["analyze", "zoo:resnet18", "--input", "1,3,8,8:complex"], "unknown dtype 'complex'"),
        (["analyze", "zoo:resnet18", "--runtime", "ort", "--input", "1,3,8,8", "--input", "1"], "one --input"),
    ],
)
def test_errors_are_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_missing_optional_package(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # import timm -> ImportError
    assert main(["analyze", "timm:resnet18"]) == 2
    err = capsys.readouterr().err.strip()
    assert "timm is not installed" in err and "\n" not in err


def test_untraceable_model_error(tmp_path, capsys):
    f = tmp_path / "gate.py"
    f.write_text(textwrap.dedent("""
        import torch.nn as nn
        class Gate(nn.Module):
            def forward(self, x):
                return x * 2 if x.sum() > 0 else x
        def build():
            return nn.Sequential(nn.Conv2d(3, 3, 1), Gate())
    """))
    assert main(["analyze", f"{f}:build", "--input", "1,3,8,8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot capture model Sequential" in err and "Sequential.1" in err and "\n" not in err
