"""``memplan student``: factor, budget and recipe modes, outputs, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from memplan.cli import main
from memplan.commands.student import parse_bytes
from memplan.errors import MemplanError

KEYS = {"teacher_peak_bytes", "student_peak_bytes", "student_with_red_peak_bytes", "factor", "changes", "stage_map"}


def _json(capsys, *argv: str) -> dict:
    assert main(["student", *argv, "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


def test_factor_prints_summary_and_writes_recipe_and_weights(tmp_path, capsys) -> None:
    assert main(["student", "zoo:resnet_tiny", "--factor", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in ("teacher peak", "student peak", "+ RED blocks", "stem_pool", "layer2.0", "2 -> 1",
                 "stage map", "layer3_1_relu_1", "92/92 student tensors copied", "recipe.json"):
        assert text in out
    state = torch.load(tmp_path / "student.pt")
    assert "layer1.0.conv1.weight" in state and not any(k.startswith("red_") for k in state)
    again = _json(capsys, "zoo:resnet_tiny", "--recipe", str(tmp_path / "recipe.json"))
    first = _json(capsys, "zoo:resnet_tiny", "--factor", "4")
    assert KEYS <= again.keys()
    assert {k: again[k] for k in KEYS} == {k: first[k] for k in KEYS}
    assert first["student_peak_bytes"] < first["teacher_peak_bytes"] <= 150528
    assert first["student_with_red_peak_bytes"] >= first["student_peak_bytes"]
    assert [c["action"] for c in first["changes"]][-1] == "insert_pool"


def test_budget_picks_a_fitting_student(capsys) -> None:
    doc = _json(capsys, "zoo:resnet_tiny", "--budget", "60KiB")
    assert doc["student_with_red_peak_bytes"] <= 60 * 1024 == doc["budget_bytes"]
    assert doc["factor"] in (2, 4)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["zoo:resnet_tiny", "--factor", "8"], "factor 8 cannot be absorbed"),
        (["zoo:resnet_tiny", "--budget", "1KiB"], "best achievable deployed peak"),
        (["zoo:resnet_tiny", "--budget", "lots"], "bad memory size 'lots'"),
        (["zoo:unet_small", "--factor", "16"], "factor 16 cannot be absorbed"),
        (["zoo:resnet_tiny", "--factor", "2", "--input", "1,x"], "bad input shape"),
        (["zoo:resnet_tiny", "--recipe", "/nonexistent/recipe.json"], "cannot read recipe"),
    ],
)
def test_errors_are_one_line_exit_2(argv: list[str], message: str, capsys) -> None:
    assert main(["student", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_parse_bytes() -> None:
    assert parse_bytes("512KiB") == 524288
    assert parse_bytes("1.5MiB") == 1572864
    assert parse_bytes("800000") == 800000
    assert parse_bytes("2kb") == 2000
    for bad in ("", "KiB", "-5", "1.5XiB", "0"):
        with pytest.raises(MemplanError):
            parse_bytes(bad)
