"""The CLI's error and safety contract: every bad input is one stderr line, exit 2, no traceback, and
nothing is written or replaced; run directories are locked; files never name code to run unless
``--trust-code``; writes are atomic even on a full disk."""

import errno
import json
import os
import pickle

import pytest
import torch
import yaml

from distill.run import RunDir
from memplan import io
from memplan.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["image_size=16", "train_subset=100", "batch_size=50", "device=cpu"]


class _Evil:
    """Unpickling this runs ``os.system``: what a malicious checkpoint does."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A directory of hostile inputs, built once."""
    d = tmp_path_factory.mktemp("hostile")
    (d / "syntax.py").write_text("def net(:\n")
    (d / "raises.py").write_text("def net():\n    raise RuntimeError('factory exploded')\n")
    (d / "notmodule.py").write_text("def net():\n    return 42\n")
    (d / "a_file").write_text("precious")
    os.mkfifo(d / "fifo")
    (d / "not.onnx").write_text("not a model")
    torch.save({"model": _Evil()}, d / "evil.pt")
    (d / "corrupt.pt").write_bytes(b"PK\x03\x04garbage")
    torch.save(torch.zeros(3, 1, 9, 9), d / "wrong_shape.pt")
    (d / "bad_pool.json").write_text(json.dumps({"format": "memplan-student-recipe/1", "model": "ResNet",
                                                  "input_shape": [1, 1, 28, 28], "factor": 2, "pool": "median",
                                                  "absorb": "stem", "changes": []}))
    # a run directory whose config names code to run, and one with a malicious checkpoint
    for name, cfg in (("evil_run", {"model": "subprocess:run", "model_kwargs": {"args": "touch PWNED"}}),
                      ("run", {"model": "zoo:resnet_tiny", "model_kwargs": {"num_classes": 10, "in_chans": 1}})):
        run = RunDir(d / name)
        with run.lock():
            run.write_config(cfg)
            run.write_info("train", (1, 1, 28, 28))
    with RunDir(d / "evil_ckpt").lock() as run:
        run.write_config({"model": "zoo:resnet_tiny", "model_kwargs": {"num_classes": 10, "in_chans": 1}})
        run.write_info("train", (1, 1, 28, 28))
    torch.save({"model": _Evil()}, d / "evil_ckpt" / "student.pt")
    return d


def _snapshot(d):
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(d.rglob("*")) if not p.name.startswith(".memplan.lock")}


CASES = {
    # analyze
    "analyze-overflowing-input": ["analyze", "zoo:resnet18", "--input", "1,3,99999999999,99999999999"],
    "analyze-unknown-spec": ["analyze", "zoo:nope"],
    "analyze-syntax-error-file": ["analyze", "{d}/syntax.py:net"],
    "analyze-factory-raises": ["analyze", "{d}/raises.py:net"],
    "analyze-not-a-module": ["analyze", "{d}/notmodule.py:net"],
    "analyze-json-to-a-directory": ["analyze", "zoo:resnet_tiny", "--json", "{d}/run"],
    "analyze-json-to-a-fifo": ["analyze", "zoo:resnet_tiny", "--json", "{d}/fifo"],
    "analyze-plot-into-a-file-as-dir": ["analyze", "zoo:resnet_tiny", "--plot", "{d}/a_file/x.png"],
    "analyze-not-onnx": ["analyze", "{d}/not.onnx"],
    # student
    "student-out-is-a-file": ["student", "zoo:resnet_tiny", "--factor", "2", "--out", "{d}/a_file"],
    "student-recipe-unknown-pool": ["student", "zoo:resnet_tiny", "--recipe", "{d}/bad_pool.json"],
    "student-bad-budget": ["student", "zoo:resnet_tiny", "--budget", "lots"],
    # export
    "export-untrusted-run-config": ["export", "{d}/evil_run", "--out", "{d}/x.onnx"],
    "export-malicious-checkpoint": ["export", "{d}/evil_ckpt", "--out", "{d}/x.onnx"],
    "export-real-wrong-shape": ["export", "zoo:resnet_tiny", "--real", "{d}/wrong_shape.pt", "--out", "{d}/x.onnx"],
    "export-real-malicious": ["export", "zoo:resnet_tiny", "--real", "{d}/evil.pt", "--out", "{d}/x.onnx"],
    "export-real-corrupt": ["export", "zoo:resnet_tiny", "--real", "{d}/corrupt.pt", "--out", "{d}/x.onnx"],
    "export-onto-a-fifo": ["export", "zoo:resnet_tiny", "--out", "{d}/fifo"],
    # train / distill
    "train-non-finite-lr": ["train", "zoo:resnet_tiny", "--data", "digits", "--out", "{d}/t1", "lr=nan", *TINY],
    "train-out-is-a-file": ["train", "zoo:resnet_tiny", "--data", "digits", "--out", "{d}/a_file", *TINY],
    "train-output-unusable": ["train", "torch.nn:Flatten", "--data", "digits", "--out", "{d}/t2", *TINY],
    "train-resume-untrusted": ["train", "--resume", "{d}/evil_run"],
    "train-config-untrusted": ["train", "--config", "{d}/evil_run/config.yaml", "--out", "{d}/t3"],
    "distill-teacher-untrusted": ["distill", "--teacher", "{d}/evil_run", "--factor", "2", "--out", "{d}/t4"],
    "distill-teacher-malicious": ["distill", "--teacher", "{d}/evil_ckpt", "--factor", "2", "--method", "kd",
                                  "--data", "digits", "--out", "{d}/t5", *TINY],
    "pipeline-teacher-untrusted": ["pipeline", "zoo:resnet_tiny", "--data", "digits", "--factor", "2",
                                   "--teacher", "{d}/evil_run", "--out", "{d}/t6"],
}


@pytest.mark.parametrize("argv", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(hostile, argv, capsys, monkeypatch):
    monkeypatch.chdir(hostile)
    before = _snapshot(hostile)
    assert main([a.format(d=hostile) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"memplan {argv[0]}: error: ") and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out
    assert _snapshot(hostile) == before, "a failed command changed files"
    assert not (hostile / "PWNED").exists()
    assert (hostile / "a_file").read_text() == "precious" and (hostile / "fifo").is_fifo()


def test_untrusted_config_names_the_trust_flag(hostile, capsys):
    assert main(["export", str(hostile / "evil_run"), "--out", str(hostile / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "subprocess:run" in err and "--trust-code" in err


def test_a_locked_run_directory_refuses_a_second_writer(tmp_path, capsys):
    out = tmp_path / "run"
    with RunDir(out).lock():
        assert main(["train", "zoo:resnet_tiny", "--data", "digits", "--epochs", "1", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "is in use by another memplan process" in err and f"pid {os.getpid()}" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_every_directory_memplan_writes_is_accepted_as_a_run(tmp_path, capsys):
    """``memplan student --out`` writes a run that ``memplan export`` accepts (it refused it before)."""
    out = tmp_path / "student"
    assert main(["student", "zoo:resnet_tiny", "--factor", "2", "--out", str(out)]) == 0
    assert RunDir.open(out).kind == "student" and RunDir.open(out).input_shape() == (1, 1, 28, 28)
    assert main(["export", str(out), "--out", str(tmp_path / "s.onnx")]) == 0
    assert (tmp_path / "s.onnx").stat().st_size > 0
    capsys.readouterr()


def _full_disk(monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", fsync)
    return real_fsync


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")
    _full_disk(monkeypatch)
    with pytest.raises(io.WriteError, match="No space left on device"):
        io.write_json({"new": 1}, target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_student_out_on_a_full_disk_leaves_no_corrupt_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    assert main(["student", "zoo:resnet_tiny", "--factor", "2", "--out", str(out)]) == 0
    good = (out / "student.pt").read_bytes()
    _full_disk(monkeypatch)
    assert main(["student", "zoo:resnet_tiny", "--factor", "4", "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "student.pt").read_bytes() == good  # the old, complete file: never half a new one
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_new_files_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        io.write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


def test_checkpoints_load_weights_only(tmp_path):
    torch.save({"model": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="refusing checkpoint"):
        io.load_torch(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(pickle.UnpicklingError):  # what torch itself does without weights_only
        torch.load(tmp_path / "evil.pt", weights_only=True)


def test_trusted_code_runs_when_asked(tmp_path, capsys):
    (tmp_path / "net.py").write_text("import torch\ndef net(num_classes=10, in_chans=1):\n"
                                     "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))\n")
    out = tmp_path / "run"
    assert main(["train", f"{tmp_path}/net.py:net", "--data", "digits", "--epochs", "1", "--out", str(out), *TINY]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["model"].endswith("net.py:net")
    assert main(["export", str(out), "--out", str(tmp_path / "n.onnx")]) == 2  # the run's config names code
    assert main(["export", str(out), "--trust-code", "--out", str(tmp_path / "n.onnx")]) == 0
    capsys.readouterr()
