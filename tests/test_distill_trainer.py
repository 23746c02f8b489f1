import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from distill.config import ConfigError, TrainConfig, load_config
from distill.data import load_data
from distill.red import REDBlock
from distill.run import RunDir, state_digest
from distill.trainer import main, train

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()


pytestmark = pytest.mark.usefixtures("single_thread")


def conv_bn_relu(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyTeacher(nn.Module):
    """8x8 digits: stage1 at 8x8, stage2 and stage3 at 4x4."""

    def __init__(self, in_chans=1, num_classes=10, width=8):
        super().__init__()
        self.stage1 = conv_bn_relu(in_chans, width, 1)
        self.stage2 = conv_bn_relu(width, 2 * width, 2)
        self.stage3 = conv_bn_relu(2 * width, 2 * width, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.stage3(self.stage2(self.stage1(x))))


class TinyStudent(nn.Module):
    """Aggressive-pool student (stride 2 in the stem) with RED blocks on both 4x4 maps."""

    def __init__(self, in_chans=1, num_classes=10, width=8):
        super().__init__()
        self.stem = conv_bn_relu(in_chans, width, 2)
        self.red1 = REDBlock(width)
        self.stage = conv_bn_relu(width, 2 * width, 1)
        self.red2 = REDBlock(2 * width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.red2(self.stage(self.red1(self.stem(x)))))


def base_config(out_dir=None, **kw):
    defaults = dict(
        model=TinyStudent,
        data="digits",
        train_subset=320,
        epochs=2,
        batch_size=32,
        lr=0.2,
        seed=7,
        out_dir=str(out_dir) if out_dir else None,
        device="cpu",
    )
    return TrainConfig(**{**defaults, **kw})


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    result = train(base_config(out, model=TinyTeacher, epochs=3, train_subset=640))
    assert result.last_test_acc > 60
    return out


def distill_config(out_dir, teacher_dir, **kw):
    return base_config(
        out_dir,
        teacher=TinyTeacher,
        teacher_checkpoint=str(teacher_dir),
        teacher_taps=["stage2", "stage3"],
        **kw,
    )


def eval_ce(model, data="digits"):
    bundle = load_data(data, train_subset=320, seed=7)
    x = bundle.preprocess(bundle.val.images, train=False)
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), bundle.val.labels).item()


def strip_timing(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]


def test_one_epoch_lowers_the_loss_and_writes_run_files(tmp_path):
    torch.manual_seed(7)
    before = eval_ce(TinyStudent())
    result = train(base_config(tmp_path, epochs=1, method="red-blocks"))
    assert eval_ce(result.student) < before

    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "student.pt"} <= files
    assert not any(name.endswith(".tmp") for name in files)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(record) == {
        "epoch",
        "train_loss",
        "train_acc",
        "val_acc",
        "test_acc",
        "lr",
        "seconds",
        "images_per_s",
    }
    assert set(record["train_loss"]) == {"total", "task"} and record["epoch"] == 1
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["task_weight"] == 1.0 and saved["model"].endswith(":TinyStudent")
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(last) >= {"model", "optimizer", "scheduler", "epoch", "rng"} and last["epoch"] == 1
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["test_acc"] == result.best_test_acc and best["epoch"] == result.best_epoch == 1
    student = torch.load(tmp_path / "student.pt", weights_only=True)
    assert state_digest(student) == result.state_digest == state_digest(result.student.state_dict())


def test_distillation_logs_every_term_and_keeps_teacher_frozen(tmp_path, teacher_ckpt):
    teacher_state = torch.load(teacher_ckpt / "student.pt", weights_only=True)
    result = train(distill_config(tmp_path, teacher_ckpt, method="red+kd", alpha=2.0, epochs=1))
    terms = result.history[0]["train_loss"]
    assert set(terms) == {"total", "task", "red", "kd"}
    assert terms["total"] == pytest.approx(terms["task"] + terms["red"] + terms["kd"], rel=1e-6)
    assert 0 <= terms["red"] <= 0.5 * 2.0 * 2.0
    assert state_digest(torch.load(teacher_ckpt / "student.pt", weights_only=True)) == state_digest(
        teacher_state
    )


def test_fitnet_and_at_train_with_explicit_taps(teacher_ckpt):
    for method in ("fitnet", "at"):
        result = train(
            distill_config(None, teacher_ckpt, method=method, epochs=1, student_taps=["stem", "stage"])
        )
        assert math.isfinite(result.history[0]["train_loss"][method])


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, teacher_ckpt, monkeypatch):
    cfg = dict(method="red+fitnet", epochs=2)
    full = train(distill_config(tmp_path / "full", teacher_ckpt, **cfg))

    class Killed(Exception):
        pass

    real_save = RunDir.save

    def save_then_die(self, name, obj):
        real_save(self, name, obj)
        if name == "last.pt":
            raise Killed

    monkeypatch.setattr(RunDir, "save", save_then_die)
    with pytest.raises(Killed):
        train(distill_config(tmp_path / "split", teacher_ckpt, **cfg))
    monkeypatch.setattr(RunDir, "save", real_save)
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["epoch"] == 1

    resumed = train(distill_config(None, teacher_ckpt, resume=str(tmp_path / "split"), **cfg))
    assert strip_timing(resumed.history) == strip_timing(full.history)
    assert resumed.state_digest == full.state_digest
    assert (resumed.best_epoch, resumed.best_test_acc) == (full.best_epoch, full.best_test_acc)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_results_do_not_depend_on_loader_workers():
    serial = train(base_config(None, epochs=1))
    workers = train(base_config(None, epochs=1, num_workers=2))
    assert serial.state_digest == workers.state_digest


def test_resume_and_out_dir_guards(tmp_path):
    train(base_config(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(base_config(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match=r"config differs .*\['lr'\]"):
        train(base_config(None, epochs=1, lr=0.3, resume=str(tmp_path)))
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(base_config(None, resume=str(tmp_path / "missing")))


def test_config_errors(teacher_ckpt):
    with pytest.raises(ConfigError, match="REDBlock"):
        train(base_config(None, model=TinyTeacher, method="red-blocks"))
    with pytest.raises(ConfigError, match="needs teacher"):
        train(base_config(None, method="kd"))
    with pytest.raises(ConfigError, match="teacher_taps"):
        train(base_config(None, method="red", teacher=TinyTeacher, teacher_checkpoint=str(teacher_ckpt)))
    with pytest.raises(ConfigError, match="batch_size"):
        train(base_config(None, batch_size=1000))
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        train(base_config(None, epochs=0))


def test_load_config_yaml_and_typed_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: torch.nn:Identity\nepochs: 5\nlr: 1e-3\nstudent_taps: [a, b]\n")
    cfg = load_config(
        path,
        [
            "epochs=3",
            "nesterov=false",
            "train_subset=null",
            "alpha=50",
            "image_size=32",
            "data=cifar10:/d:x",
            "method_options={kd: {temperature: 2}}",
            "teacher=none",
            "milestones=[2, 4]",
        ],
    )
    assert (cfg.epochs, cfg.lr, cfg.nesterov, cfg.train_subset, cfg.alpha) == (3, 1e-3, False, None, 50.0)
    assert cfg.image_size == 32 and cfg.data == "cifar10:/d:x" and cfg.teacher is None
    assert cfg.student_taps == ["a", "b"] and cfg.method_options == {"kd": {"temperature": 2}}
    assert cfg.milestones == [2, 4] and isinstance(cfg.alpha, float)
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        load_config(path, ["epoch=3"])
    with pytest.raises(ConfigError, match="'epochs': expected int"):
        load_config(path, ["epochs=three"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(path, ["epochs"])
    path.write_text("model: x:y\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['bogus'\]"):
        load_config(path)


def test_cli_entry_point_in_process(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    cfg = {
        "model": f"{THIS}:TinyStudent",
        "data": "digits",
        "train_subset": 200,
        "epochs": 1,
        "batch_size": 50,
    }
    path.write_text(yaml.safe_dump(cfg))
    args = [str(path), f"out_dir={tmp_path / 'run'}", "schedule=step", "device=cpu"]
    assert main(args) == 2  # the config file names code: refused without --trust-code, nothing written
    assert "--trust-code" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main(["--trust-code", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and summary["run_dir"] == str(tmp_path / "run")
    assert main(["--trust-code", f"resume={tmp_path / 'run'}"]) == 0  # complete run: nothing left, same result
    assert (
        json.loads(capsys.readouterr().out.strip().splitlines()[-1])["state_digest"]
        == summary["state_digest"]
    )
    assert main([str(path), "epochs=x"]) == 2


@pytest.mark.slow
def test_torchrun_two_process_gloo(tmp_path):
    path = tmp_path / "cfg.yaml"
    cfg = {
        "model": f"{THIS}:TinyStudent",
        "data": "digits",
        "train_subset": 256,
        "epochs": 1,
        "batch_size": 32,
        "method": "red-blocks",
        "device": "cpu",
        "out_dir": str(tmp_path / "run"),
    }
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "distill.trainer",
        "--trust-code",  # the config file names this test module's model
        str(path),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 only
    digests = summaries[0]["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert state_digest(torch.load(tmp_path / "run" / "student.pt", weights_only=True)) == digests[0]
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["images_per_s"] > 0 and record["epoch"] == 1
