"""``memplan pipeline`` end to end on a tiny digits fixture: files, report numbers equal to the JSON,
resuming, a given teacher with a memory budget, and one-line errors (exit 2)."""

import json
import re

import pytest

from memplan.cli import main
from memplan.onnx_frontend import analyze_onnx
from memplan.report import fmt_bytes

TINY = ["--epochs", "1", "--latency-runs", "2", "train_subset=200", "batch_size=50", "device=cpu"]
BYTE_ROWS = {  # report.md row label -> report.json key of each model
    "theoretical peak (PyTorch, deploy form)": "peak_bytes",
    "ONNX graph peak (exported file)": "onnx_peak_bytes",
    "ORT-graph peak (onnxruntime's optimized graph)": "ort_graph_peak_bytes",
    "measured peak (onnxruntime, peak RSS growth)": "measured_peak_bytes",
}


pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]  # each test trains two runs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(["pipeline", "zoo:resnet_tiny", "--data", "digits", "--factor", "2", "--int8", "--patch", "--out", str(out),
                 *TINY]) == 0
    return out


def _table(markdown):
    """``{row label: [teacher cell, student cell, last cell]}`` of the report's markdown table."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_files(run):
    names = {p.name for p in run.iterdir()}
    assert {"report.md", "report.json", "student.onnx", "teacher.onnx", "teacher_timeline.png",
            "student_timeline.png", "teacher", "student"} <= names
    doc = json.loads((run / "report.json").read_text())
    assert doc["factor"] == 2 and doc["method"] == "red" and doc["input_shape"] == [1, 1, 8, 8]
    assert doc["student"]["red_blocks"] == 5 and doc["red_placement"] == "input+output"
    for who in ("teacher", "student"):
        m = doc[who]
        assert analyze_onnx(run / f"{who}.onnx").peak_bytes == m["onnx_peak_bytes"] == m["peak_bytes"]
        assert m["parity_max_abs_diff"] <= 1e-4 and m["accuracy"]["epochs"] == 1
    assert doc["student"]["peak_bytes"] < doc["teacher"]["peak_bytes"]


def test_patched_student(run):
    doc = json.loads((run / "report.json").read_text())
    q = doc["student_patch"]
    assert q["peak_bytes"] == doc["student"]["peak_bytes"] and q["patched_peak_bytes"] <= q["peak_bytes"]
    assert f"peak {fmt_bytes(q['patched_peak_bytes'])} ({q['patched_peak_bytes']:,} B)" in (run / "report.md").read_text()


def test_int8_rows(run):
    doc = json.loads((run / "report.json").read_text())
    table = _table((run / "report.md").read_text())
    for col, who in enumerate(("teacher", "student")):
        q = doc[who]["int8"]
        assert (run / f"{who}_int8.onnx").is_file() and q["onnx"].endswith(f"{who}_int8.onnx")
        assert 0 <= q["test_acc"] <= 100 and 0 <= q["top1_agreement"] <= 1
        assert q["onnx_peak_bytes"] <= doc[who]["onnx_peak_bytes"]  # int8 tensors are 1 byte per element
        assert table["int8: test accuracy (onnxruntime)"][col] == f"{q['test_acc']:.2f}%"
        assert int(re.search(r"\(([\d,]+) B\)", table["int8: ONNX graph peak"][col])[1].replace(",", "")) == \
            q["onnx_peak_bytes"]


def test_report_numbers_match_json(run):
    doc = json.loads((run / "report.json").read_text())
    text = (run / "report.md").read_text()
    table = _table(text)
    for col, who in enumerate(("teacher", "student")):
        m = doc[who]
        for label, key in BYTE_ROWS.items():
            assert int(re.search(r"\(([\d,]+) B\)", table[label][col])[1].replace(",", "")) == m[key], label
        acc = m["accuracy"]
        assert table["test accuracy, last epoch"][col].startswith(f"{acc['last_test_acc']:.2f}%")
        best = table["test accuracy, best-on-val epoch"][col]
        assert best.startswith(f"{acc['best_test_acc']:.2f}%") and f"val {acc['best_val_acc']:.2f}%" in best
        assert int(table["parameters"][col].replace(",", "")) == m["params"]
        assert table["ORT latency (median)"][col] == f"{m['latency_ms']:.3f} ms"
    theory = table["theoretical peak (PyTorch, deploy form)"][2]
    assert theory == f"{doc['peak_ratio']:.2f}×" and f"{doc['peak_ratio']:.2f}× lower" in text
    assert f"{doc['measured_peak_ratio']:.2f}×" in table["measured peak (onnxruntime, peak RSS growth)"][2]
    assert "![teacher timeline](teacher_timeline.png)" in text


def test_rerun_reuses_finished_training(run, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/last.pt")}
    assert len(stamps) == 2
    assert main(["pipeline", "zoo:resnet_tiny", "--data", "digits", "--factor", "2", "--out", str(run), *TINY]) == 0
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/last.pt")} == stamps
    assert "theoretical peak" in capsys.readouterr().out


def test_given_teacher_and_budget(run, tmp_path):
    out = tmp_path / "budget"
    assert main(["pipeline", "zoo:resnet_tiny", "--data", "digits", "--budget", "4.5KiB", "--teacher",
                 str(run / "teacher" / "best.pt"), "--out", str(out), *TINY]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert not (out / "teacher").exists() and doc["teacher"]["weights"] == str(run / "teacher" / "best.pt")
    assert doc["budget_bytes"] == 4608 and doc["factor"] == 4 and doc["student"]["peak_bytes"] <= 4608
    assert (out / "student.onnx").is_file() and "budget 4.50 KiB" in (out / "report.md").read_text()


@pytest.mark.parametrize(("extra", "match"), [
    (["--factor", "2", "lr=abc"], "config key 'lr'"),
    (["--factor", "2", "epochs=3"], "set by the pipeline"),
    (["--factor", "2", "--input", "1,3,8,8"], "does not fit the data"),
    (["--factor", "2", "--method", "nope"], "unknown distillation method"),
    (["--budget", "10XB"], "bad memory size"),
    (["--factor", "2", "--teacher", "/nonexistent/run"], "does not exist"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    assert main(["pipeline", "zoo:resnet_tiny", "--data", "digits", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("memplan pipeline: error:") and match in err
    assert not out.exists()
