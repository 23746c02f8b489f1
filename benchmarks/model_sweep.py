"""Sweep models this project did not write: every torchvision classifier and timm CNNs/hybrids.

Per model, at its default input, each a column (docs/definitions.md §1-§2):

- ``as_written``: memplan's as-written peak (and the capture method it used);
- ``reference``: the independent aten-level peak (:func:`memplan.reference.aten_reference`);
  it passes within 1 % of ``as_written`` (the table derives the match from the two peaks);
- ``deploy``: memplan's deploy peak;
- ``student``: ``passes.aggressive_pool(..., factor=4)``: teacher/student deploy ratio, or its refusal;
- ``export``: memplan's ONNX export (``memplan.export`` or ``distill.export``) and its parity;
- ``onnx``: the exported file's deploy peak against PyTorch's (``memplan.onnx_frontend``).

Every column records its seconds; a column that fails records its one-line error and the sweep
goes on; each column has a timeout. Rows go to ``benchmarks/results/model_sweep.json`` as they
finish; columns already there are skipped on re-run (``--retry-errors`` redoes failed ones). A model
that crashed the process is recorded as such when the sweep restarts. torchvision and timm are
not in the project's venv: run it in one that has them, e.g.

    /work/venv-vision/bin/python benchmarks/model_sweep.py --columns as_written,reference,deploy
    /work/venv-vision/bin/python benchmarks/model_sweep.py            # all columns
    /work/venv-vision/bin/python benchmarks/model_sweep.py --table    # coverage table only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "model_sweep.json"
COLUMNS = ("as_written", "reference", "deploy", "student", "export", "onnx")
MATCH_TOLERANCE = 0.01

# timm architectures: one or two small members of each CNN family and of CNN/attention hybrids,
# chosen by family so the sweep covers the design space, not by whether they pass.
TIMM_FAMILIES = (
    "resnet18", "resnet26d", "resnet50", "resnetv2_50", "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t",
    "skresnet18", "res2net50_14w_8s", "resnest14d", "resnet18d", "wide_resnet50_2", "regnetx_002", "regnety_002",
    "regnetz_b16", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0", "tf_efficientnetv2_b0",
    "efficientnetv2_rw_t", "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv3_large_100",
    "tf_mobilenetv3_small_minimal_100", "mobilenetv4_conv_small", "mnasnet_small", "mixnet_s", "tf_mixnet_s",
    "spnasnet_100", "fbnetc_100", "ghostnet_100", "ghostnetv2_100", "lcnet_050", "rexnet_100", "tinynet_e",
    "densenet121", "dla34", "dla46_c", "dpn48b", "hrnet_w18_small", "inception_v3", "inception_v4",
    "xception41", "selecsls42b", "vovnet39a", "ese_vovnet19b_dw", "cspresnet50", "cspdarknet53", "darknet17",
    "cs3darknet_s", "repvgg_a0", "repghostnet_050", "nf_resnet26", "nfnet_l0", "dm_nfnet_f0", "convnext_atto",
    "convnextv2_atto", "convmixer_768_32", "resmlp_12_224", "gernet_s", "hardcorenas_a", "fastvit_t8",
    "mobileone_s0", "tresnet_m", "bat_resnext26ts", "botnet26t_256", "halonet26t", "lambda_resnet26t",
    "lamhalobotnet50ts_256", "sebotnet33ts_256", "coatnet_nano_rw_224", "coatnext_nano_rw_224",
    "maxvit_nano_rw_256", "mobilevit_xxs", "mobilevitv2_050", "efficientformer_l1", "efficientformerv2_s0",
    "levit_128s", "edgenext_xx_small", "poolformer_s12", "convit_tiny", "cait_xxs24_224", "volo_d1_224",
    "inception_next_atto", "efficientvit_b0", "efficientvit_m0", "fasternet_t0", "starnet_s1", "rdnet_tiny",
)


def model_names() -> list[tuple[str, str]]:
    """``(source, name)``: every installed torchvision classifier and segmentation model (dict
    outputs), and the timm families above."""
    names: list[tuple[str, str]] = []
    with contextlib.suppress(ImportError):
        import torchvision

        names += [("torchvision", n) for n in sorted(torchvision.models.list_models(module=torchvision.models))]
        names += [("segmentation", n)
                  for n in sorted(torchvision.models.list_models(module=torchvision.models.segmentation))]
    with contextlib.suppress(ImportError):
        import timm

        available = set(timm.list_models())
        names += [("timm", n) for n in TIMM_FAMILIES if n in available]
    return names


def build(source: str, name: str, device: str) -> tuple[Any, tuple[int, ...]]:
    """The model (random weights, eval, never downloaded) on ``device`` and its default input shape."""
    import torch

    torch.manual_seed(0)  # the same random weights on every run (parity depends on them)
    with torch.device(device):
        if source == "segmentation":  # no backbone download either; 520 is their weights' resize
            import torchvision

            model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
            shape = (1, 3, 520, 520)
        elif source == "torchvision":
            import torchvision

            model = torchvision.models.get_model(name, weights=None)
            size = getattr(model, "image_size", None)  # ViTs fix their input size
            if not isinstance(size, int):
                size = 299 if name == "inception_v3" else 224
            shape = (1, 3, size, size)
        else:
            import timm

            model = timm.create_model(name, pretrained=False)
            shape = (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return model.eval(), tuple(int(s) for s in shape)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def alarm(_signum: int, _frame: Any) -> None:
        raise _Timeout(f"timed out after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _export_fn() -> Callable[..., Any]:
    try:
        from memplan.export import export_onnx
    except ImportError:
        from distill.export import export_onnx
    return export_onnx


class ModelRun:
    """The columns of one model; each method returns the column's fields (raises on failure)."""

    def __init__(self, source: str, name: str, row: dict[str, Any], exports: Path | None = None) -> None:
        self.source, self.name, self.row = source, name, row
        self._meta: Any = None
        self._cpu: Any = None
        self.tmp = tempfile.mkdtemp(prefix="sweep-")
        self.onnx_path = (exports / f"{source}-{name}.onnx") if exports else Path(self.tmp) / "m.onnx"

    def model(self, real: bool = False) -> Any:
        """Built once per device: meta (shape-only, fast) unless real weights are needed."""
        if real or self._meta is None and self._cpu is not None:
            if self._cpu is None:
                self._cpu, self.row["input_shape"] = build(self.source, self.name, "cpu")
            return self._cpu
        if self._meta is None:
            try:
                self._meta, self.row["input_shape"] = build(self.source, self.name, "meta")
            except Exception:  # noqa: BLE001 - some initialisers need real tensors
                return self.model(real=True)
        return self._meta

    def shape(self) -> tuple[int, ...]:
        self.model()
        return tuple(self.row["input_shape"])

    def as_written(self) -> dict[str, Any]:
        import warnings

        from memplan import analyze

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = analyze(self.model(), self.shape(), form="as-written")
        notes = [str(w.message).splitlines()[0] for w in caught if "aten-level capture" in str(w.message)]
        return {"peak_bytes": r.peak_bytes, "method": r.method, "peak_node": r.peak_node,
                **({"warning": notes[0]} if notes else {})}

    def reference(self) -> dict[str, Any]:
        import torch

        from memplan.reference import aten_reference

        ref = aten_reference(self.model(), torch.empty(self.shape(), device="meta"))
        return {"peak_bytes": ref.peak_bytes, "peak_call": ref.peak_call,
                "byproduct_bytes": ref.byproduct_bytes, "param_side_bytes": ref.param_side_bytes}

    def deploy(self) -> dict[str, Any]:
        from memplan import analyze

        r = analyze(self.model(), self.shape())
        return {"peak_bytes": r.peak_bytes, "peak_node": r.peak_node, "method": r.method}

    def student(self) -> dict[str, Any]:
        import torch

        import passes
        from memplan.capture import capture, target_name

        x = torch.empty(self.shape(), device="meta")
        cg = capture(self.model(), x)
        attention = any(any(k in target_name(n, cg.gm).lower() for k in ATTENTION_OPS) for n in cg.gm.graph.nodes)
        self.row["attention"] = attention  # recorded before the pass can fail: the table splits CNNs from the rest
        s = passes.aggressive_pool(self.model(), x, factor=4)
        teacher = self.row.get("deploy", {}).get("peak_bytes")
        return {"peak_bytes": s.peak_bytes, "ratio": round(teacher / s.peak_bytes, 3) if teacher else None}

    def export(self) -> dict[str, Any]:
        import torch

        self.onnx_path.unlink(missing_ok=True)  # a stale file must not stand in for a failed export
        r = _export_fn()(self.model(real=True), torch.zeros(self.shape()), self.onnx_path)
        p = r.parity[0]  # export raises when parity fails: relative to the output scale, with the fp32 allowance
        return {"exporter": r.exporter, "max_abs_diff": p.max_abs_diff, "max_rel_diff": p.max_rel_diff,
                "tolerance": r.tolerance, "fp32_noise": p.fp32_noise, "parity": True}

    def onnx(self) -> dict[str, Any]:
        from memplan.onnx_frontend import analyze_onnx

        if not self.onnx_path.exists():
            raise RuntimeError("no exported file (export column failed, or ran without --keep-exports)")
        return {"peak_bytes": analyze_onnx(self.onnx_path).peak_bytes}

    def close(self) -> None:
        for p in Path(self.tmp).glob("*"):
            p.unlink()
        os.rmdir(self.tmp)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def sweep(columns: list[str], path: Path, timeout: int, retry_errors: bool, only: str | None,
          redo: Sequence[str] = (), exports: Path | None = None) -> dict[str, Any]:
    """Run the missing ``columns`` of every model (and the ``redo`` ones again), saving after each column;
    with ``exports`` the exported files stay there, so the ``onnx`` column can be re-run alone."""
    doc = load(path)
    rows = doc["rows"]
    for source, name in model_names():
        key = f"{source}:{name}"
        if only and only not in key:
            continue
        row = rows.setdefault(key, {"source": source, "model": name})
        if row.pop("running", None):  # the process died inside this model last time
            for c in columns:
                row.setdefault(c, {"error": "crashed the sweep process"})
        todo = [c for c in columns if c not in row or c in redo or (retry_errors and "error" in row[c])]
        if not todo:
            continue
        row["running"] = True
        save(doc, path)
        run = ModelRun(source, name, row, exports)
        try:
            for c in todo:
                t0 = time.perf_counter()
                try:
                    with _deadline(timeout):
                        result = getattr(run, c)()
                except BaseException as e:  # noqa: BLE001 - a column's failure is its result
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    result = {"error": _one_line(e)}
                result["seconds"] = round(time.perf_counter() - t0, 3)
                row[c] = result
                save(doc, path)
                rel = _rel(row, c, PAIRS[c]) if c in PAIRS else None
                print(f"{key:<45} {c:<10} {_cell(result)}" + (f" rel_diff={rel:+.4%}" if rel is not None else ""),
                      flush=True)
        finally:
            row.pop("running", None)
            run.close()
            save(doc, path)
    return doc


def _cell(result: dict[str, Any]) -> str:
    if "error" in result:
        return "ERROR " + result["error"][:120]
    fields = ("peak_bytes", "ratio", "method", "max_abs_diff", "seconds")
    return " ".join(f"{k}={result[k]}" for k in fields if k in result)


def _rel(row: dict[str, Any], column: str, against: str) -> float | None:
    """(column's peak - against's peak) / against's peak, when both were measured."""
    a, b = row.get(column, {}).get("peak_bytes"), row.get(against, {}).get("peak_bytes")
    return (a - b) / b if a is not None and b else None


ATTENTION_OPS = ("softmax", "scaled_dot_product")  # a model computing one is an attention model, not a CNN
PAIRS = {"reference": "as_written", "onnx": "deploy"}  # column -> the memplan column it must match


def ok(column: str, row: dict[str, Any]) -> bool:
    """Whether a column met its target: no error; reference/onnx within 1 % of memplan's peak."""
    result = row.get(column)
    if not result or "error" in result:
        return False
    if column in PAIRS:
        rel = _rel(row, column, PAIRS[column])
        return rel is not None and abs(rel) <= MATCH_TOLERANCE
    if column == "export":
        return bool(result.get("parity"))
    return True


def coverage(doc: dict[str, Any]) -> str:
    """Per column: models meeting the target / models with the column recorded, then every failure."""
    rows = list(doc["rows"].values())
    lines = [f"{'column':<22} {'ok':>5} {'total':>6} {'share':>7}   (models: {len(rows)})"]

    def line(label: str, done: list[dict[str, Any]], column: str) -> None:
        good = sum(ok(column, r) for r in done)
        share = f"{100 * good / len(done):.1f}%" if done else "-"
        lines.append(f"{label:<22} {good:>5} {len(done):>6} {share:>7}")

    for c in COLUMNS:
        line(c, [r for r in rows if c in r], c)
    # the ONNX target is over exported models: a file that was never written has no peak to compare
    line("onnx (exported models)", [r for r in rows if "onnx" in r and ok("export", r)], "onnx")
    # the student target is over classification CNNs: no attention op (softmax), not a segmentation model
    cnns = [r for r in rows if "student" in r and r.get("attention") is False and r["source"] != "segmentation"]
    line("student (CNNs)", cnns, "student")
    # the target counts a precise refusal of a net that genuinely upsamples (the error names the node)
    precise = [r for r in cnns if ok("student", r) or r["student"]["error"].startswith("UpsamplingError")]
    good = f"{100 * len(precise) / len(cnns):.1f}%" if cnns else "-"
    lines.append(f"{'  or UpsamplingError':<22} {len(precise):>5} {len(cnns):>6} {good:>7}")
    refused = [r for r in cnns if not ok("student", r) and r["student"]["error"].startswith("AbsorbError")]
    lines.append(f"  of which refused for lack of downsampling to absorb (AbsorbError): {len(refused)}")
    lines.append("")
    lines.append("remaining failures:")
    for r in rows:
        for c in COLUMNS:
            if c in r and not ok(c, r):
                res = r[c]
                rel = _rel(r, c, PAIRS[c]) if c in PAIRS else None
                why = res.get("error") or (f"{c} {res['peak_bytes']} vs {PAIRS[c]} "
                                           f"{r.get(PAIRS[c], {}).get('peak_bytes')} ({rel:+.2%})"
                                           if rel is not None else str(res))
                lines.append(f"  {r['source']}:{r['model']:<32} {c:<10} {why[:200]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--columns", default=",".join(COLUMNS), help="comma-separated subset of " + ",".join(COLUMNS))
    parser.add_argument("--timeout", type=int, default=300, help="seconds per column per model")
    parser.add_argument("--retry-errors", action="store_true", help="redo columns that recorded an error")
    parser.add_argument("--only", help="models whose 'source:name' contains this (e.g. timm:)")
    parser.add_argument("--redo", default="", help="comma-separated columns to run again although recorded")
    parser.add_argument("--keep-exports", metavar="DIR", help="keep exported files in DIR (never commit them); "
                        "the onnx column then runs without re-exporting")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--table", action="store_true", help="print the coverage table of --out and exit")
    parser.add_argument("--merge", nargs="+", metavar="FILE",
                        help="merge the rows of sweeps run in parallel (one --out each) into --out and exit")
    args = parser.parse_args()
    path = Path(args.out)
    if args.merge:
        doc = load(path)
        for other in args.merge:  # column by column: a partial sweep adds to the rows it did
            for key, row in load(Path(other))["rows"].items():
                doc["rows"].setdefault(key, {}).update(row)
        save(doc, path)
        print(coverage(doc))
        return
    if args.table:
        print(coverage(load(path)))
        return
    columns = [c for c in args.columns.split(",") if c]
    bad = set(columns) - set(COLUMNS)
    if bad:
        sys.exit(f"unknown columns {sorted(bad)} (use {', '.join(COLUMNS)})")
    import torch

    torch.set_num_threads(1)
    exports = Path(args.keep_exports) if args.keep_exports else None
    if exports:
        exports.mkdir(parents=True, exist_ok=True)
    doc = sweep(columns, path, args.timeout, args.retry_errors, args.only,
                [c for c in args.redo.split(",") if c], exports)
    print()
    print(coverage(doc))


if __name__ == "__main__":
    main()
