"""``memplan train`` / ``memplan distill`` on the digits data, one tiny epoch each."""

import json

import pytest
import torch
import yaml

from distill.run import RunDir, state_digest
from memplan.cli import main

TINY = ["image_size=16", "train_subset=200", "batch_size=50", "device=cpu", "seed=3"]
RUN_FILES = {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "student.pt"}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "teacher"
    assert main(["train", "zoo:resnet_tiny", "--data", "digits", "--epochs", "1", "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_run_and_prints_accuracies(teacher_run, capsys):
    assert RUN_FILES <= {p.name for p in teacher_run.iterdir()}
    cfg = yaml.safe_load((teacher_run / "config.yaml").read_text())
    assert cfg["model"] == "zoo:resnet_tiny" and cfg["model_kwargs"] == {"num_classes": 10, "in_chans": 1}
    assert main(["train", "--resume", str(teacher_run)]) == 0  # finished: nothing left to train
    out = capsys.readouterr().out
    assert "test accuracy" in out and "(last epoch, 1)" in out and "best val" in out
    model = RunDir(teacher_run).load_model()
    state = torch.load(teacher_run / "student.pt", weights_only=True)
    assert state_digest(model.state_dict()) == state_digest(state)


def test_distill_red_derives_the_student_and_resumes(teacher_run, tmp_path, capsys):
    out = tmp_path / "red"
    args = ["distill", "--teacher", str(teacher_run), "--factor", "4", "--method", "red", "--alpha", "10",
            "--epochs", "2", "--out", str(out), *TINY]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert RUN_FILES | {"recipe.json"} <= {p.name for p in out.iterdir()}
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["factor"] == 4 and recipe["red_placement"] == "input+output"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["teacher"], cfg["data"], cfg["image_size"], cfg["alpha"]) == ("zoo:resnet_tiny", "digits", 16, 10.0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"red", "task"} <= set(records[0]["train_loss"])

    student = RunDir(out).load_model()
    assert student.red_points == ["red_out0", "red_in1", "red_out1", "red_in2", "red_out2"]
    state = torch.load(out / "student.pt", weights_only=True)
    assert state_digest(student.state_dict()) == state_digest(state)

    # resuming a finished run trains nothing and reports the same accuracies
    assert main(["distill", "--resume", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == first.splitlines()[-1]


@pytest.mark.parametrize(("method", "placement", "losses"), [("at", None, {"at"}), ("red-blocks", "output", set())])
def test_distill_methods_tap_the_stage_map(teacher_run, tmp_path, method, placement, losses):
    out = tmp_path / method
    extra = ["--placement", placement] if placement else []
    assert main(["distill", "--teacher", str(teacher_run / "best.pt"), "--factor", "4", "--method", method,
                 *extra, "--epochs", "1", "--out", str(out), *TINY]) == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    assert set(record["train_loss"]) == {"total", "task"} | losses
    student = RunDir(out).load_model("best.pt")
    assert len(getattr(student, "red_points", [])) == (3 if method == "red-blocks" else 0)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train", "--data", "digits"], "give MODEL"),
        (["train", "zoo:nope", "--data", "digits"], "unknown zoo model 'nope'"),
        (["train", "zoo:resnet_tiny", "--data", "mnist"], "unknown data format 'mnist'"),
        (["train", "zoo:resnet_tiny", "bogus=1"], "unknown config key 'bogus'"),
        (["distill", "--factor", "4"], "give --teacher"),
        (["distill", "--teacher", "{run}", "--method", "red"], "give --factor K or --recipe"),
        (["distill", "--teacher", "{run}/missing", "--factor", "4"], "does not exist"),
        (["distill", "--teacher", "{run}", "--factor", "4", "--method", "magic"], "unknown distillation method"),
        (["distill", "--teacher", "{run}", "--factor", "3"], "factor 3 cannot be absorbed"),
    ],
)
def test_errors_are_one_line_exit_2(teacher_run, tmp_path, capsys, argv, match):
    argv = [a.format(run=teacher_run) for a in argv] + ["--out", str(tmp_path / "x"), *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and err.startswith(f"memplan {argv[0]}: error:")
