"""The trainer's diffusion task through the CLI: teacher, RED student from its run, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from distill.run import RunDir
from memplan.cli import main

TINY = ["--data", "digits", "--epochs", "1", "batch_size=64", "lr=1e-3", "train_subset=100", "seed=0"]


@pytest.mark.slow
def test_train_then_distill_red_from_the_run(tmp_path, capsys, single_thread):
    teacher = tmp_path / "teacher"
    rc = main(["train", "zoo:ddpm_unet_small", "--task", "diffusion", "--out", str(teacher), *TINY, "image_size=16",
               'model_kwargs={"base_channels": 8, "norm_groups": 4}'])
    assert rc == 0
    assert "train loss       denoise" in capsys.readouterr().out
    # 90 train+val digits at batch 64: 2 steps per epoch
    history = RunDir(teacher).history()
    assert [r["epoch"] for r in history] == [1] and set(history[0]["train_loss"]) == {"denoise", "total"}
    student = tmp_path / "red"
    rc = main(["distill", "--task", "diffusion", "--teacher", str(teacher), "--factor", "2", "--method", "red",
               "--out", str(student), *TINY, 'method_options={"diffusion": {"sites": 2}}'])
    assert rc == 0
    record = RunDir(student).history()[0]
    assert set(record["train_loss"]) == {"denoise", "red", "total"}
    loss = record["train_loss"]
    assert loss["total"] == pytest.approx(0.5 * loss["denoise"] + 0.5 * loss["red"], rel=1e-4)
    state = torch.load(student / "student.pt", weights_only=True)
    assert {k.split(".")[0] for k in state if k.startswith("red_")} == {"red_out0", "red_in15"}
    assert json.loads((student / "run.json").read_text())["kind"] == "distill"


def test_unknown_method_is_a_one_line_error(tmp_path, capsys):
    rc = main(["train", "zoo:ddpm_unet_small", "--task", "diffusion", "--out", str(tmp_path / "x"), *TINY,
               "method=kd"])
    err = capsys.readouterr().err
    assert rc == 2 and "the diffusion task's methods are ['none', 'output', 'red', 'red-blocks'], got 'kd'" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_diffusion_option_is_a_one_line_error(tmp_path, capsys):
    rc = main(["train", "zoo:ddpm_unet_small", "--task", "diffusion", *TINY, 'method_options={"diffusion": {"emma": 1}}'])
    err = capsys.readouterr().err
    assert rc == 2 and "method_options.diffusion: unknown keys ['emma']" in err
