"""Patch memory: unpatched vs patched deploy-form peak (passes.patch), 1x3x224x224, fp32, batch 1.

Models: the zoo's resnet18, resnet50, mobilenet_v2, vgg11_bn, densenet121; ``darknet53``, a
DarkNet-53-style net with a stride-1 stem defined in this file (3x3/1 stem conv, five stages of a
3x3/2 conv and [1, 2, 8, 8, 4] residual blocks of 1x1 C/2 + 3x3 C, BN + LeakyReLU(0.1), global pool,
linear); and ``resnet18_k4_red``, the ResNet18 k=4 student (``passes.aggressive_pool``) with RED
blocks at input+output (``distill.red.attach_red``).

Per model four settings, all with at most 20% extra MACs: input resident, input streamed per patch
(``--stream-input``), both searching recomputed halos (MCUNetV2), cached row bands (paced by the
split map or by the input) and mixed bands (expansions recomputed, the rest cached) (``halo="auto"``),
and streamed and resident with recomputed halos only. Each row: split node, grid, peaks, reduction, MAC overhead (patched /
unpatched), max |Δ| of the outputs on a seeded random input (and relative to the output scale).
For the two resident settings the patched model is exported to ONNX (BN folded, ``target="onnx"`` form) and
its peak is reported as memplan's ONNX frontend sees the file and as onnxruntime predicts and
measures it (no arena; with memory reuse, its default, and without: ``enable_mem_reuse = False``,
also at ``MALLOC_MMAP_THRESHOLD_=4096``), next to the unpatched export. Targets: MobileNetV2 >= 5x, ResNet18
>= 4x, DarkNet-style >= 4x, the RED student with streaming >= 12x below the ResNet18 teacher
(4,014,080 B), at <= 20% MAC overhead. Rows are written to ``benchmarks/results/patch_memory.json``
as they finish and skipped when re-run.

Usage:
    python benchmarks/patch_memory.py [--only NAME ...] [--no-onnx] [--remeasure-onnx] [--redo SETTING ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import passes
from distill.red import attach_red
from memplan.commands.patch import export_patched
from memplan.export import export_onnx
from memplan.io import write_json
from memplan.measure import measure_onnxruntime
from memplan.onnx_frontend import analyze_onnx
from memplan.ort_runtime import predict_ort
from memplan.zoo import create_model
from passes.patch import PatchError, PatchPlan, patch_model

RESULTS = Path(__file__).parent / "results" / "patch_memory.json"
SHAPE = (1, 3, 224, 224)
TEACHER_R18 = 4_014_080  # docs/definitions.md §3
MAX_OVERHEAD = 0.2
# (label, stream_input, halo): halo "auto" searches recomputed halos (MCUNetV2), cached and mixed row bands
SETTINGS = (("resident", False, "auto"), ("stream", True, "auto"), ("stream, recompute", True, "recompute"),
            ("resident, recompute", False, "recompute"))
ONNX_SETTINGS = ("resident", "resident, recompute")  # exported and measured in onnxruntime
TARGETS = {"mobilenet_v2": 5.0, "resnet18": 4.0, "darknet53": 4.0, "resnet18_k4_red": 12.0}


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.1, inplace=True))


class _DarkBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = _ConvBN(c, c // 2, 1)
        self.conv2 = _ConvBN(c // 2, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class DarkNetStyle(nn.Module):
    """DarkNet-53 layout with a stride-1 stem (see the module docstring)."""

    def __init__(self, blocks: tuple[int, ...] = (1, 2, 8, 8, 4), num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_ConvBN(3, 32, 3)]
        c = 32
        for n in blocks:
            layers.append(_ConvBN(c, 2 * c, 3, stride=2))
            c *= 2
            layers += [_DarkBlock(c) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics, so equality is checked on a model whose BNs do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "darknet53":
        return _randomize_bn(DarkNetStyle(), 0)
    if name == "resnet18_k4_red":
        student = passes.aggressive_pool(create_model("resnet18"), torch.empty(SHAPE), factor=4)
        return _randomize_bn(attach_red(student.module, student.stage_map, "input+output"), 0)
    return _randomize_bn(create_model(name), 0)


MODELS = ("resnet18", "resnet50", "mobilenet_v2", "vgg11_bn", "densenet121", "darknet53", "resnet18_k4_red")


def run_setting(name: str, model: nn.Module, setting: str, stream: bool, halo: str, onnx: bool,
                **fixed: object) -> dict:
    row: dict = {"model": name, "setting": setting, "input": list(SHAPE)}
    t = time.perf_counter()
    try:
        r = patch_model(model, SHAPE, stream_input=stream, max_mac_overhead=MAX_OVERHEAD, halo=halo, verify=3,
                        **fixed)
    except PatchError as e:
        return {**row, "error": str(e)}
    row.update(r.to_json())
    row["seconds"] = round(time.perf_counter() - t, 1)
    row["rel_diff"] = r.max_abs_diff / r.output_scale if r.output_scale else None
    reference = TEACHER_R18 if name == "resnet18_k4_red" else r.peak_bytes
    row["reduction_vs_reference"] = round(reference / r.patched_peak_bytes, 3)
    target = TARGETS.get(name)
    if target is not None:
        row["target"] = target
        row["target_met"] = (row["reduction_vs_reference"] >= target and r.mac_overhead <= 1 + MAX_OVERHEAD
                             and row["rel_diff"] is not None and row["rel_diff"] <= 1e-5)
    if onnx:
        row.update(onnx_columns(model, r.plan))
    return row


def onnx_columns(model: nn.Module, plan: PatchPlan) -> dict:
    """The patched model exported and run in onnxruntime (arena off), with memory reuse on (its default)
    and off (``SessionOptions.enable_mem_reuse = False``, ``--runtime ort-noreuse``), beside the
    unpatched export."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path, plain = Path(tmp) / "patched.onnx", Path(tmp) / "plain.onnx"
        _, exported = export_patched(model, plan, path, tolerance=1e-3)
        export_onnx(model, torch.randn(SHAPE), plain, random_samples=1, tolerance=1e-3)
        out["onnx_peak_bytes"] = analyze_onnx(path).peak_bytes
        out["onnx_parity_max_abs_diff"] = exported.max_abs_diff
        for label, f in (("patched", path), ("unpatched", plain)):
            plan = predict_ort(f)
            out[f"ort_predicted_{label}_bytes"], out[f"ort_orders_seen_{label}"] = plan.peak_bytes, plan.orders_seen
            # onnxruntime may order the patches differently in each session: the highest of 3 then
            kw = {"runs": 1, "repeats": 3, "sessions": 3 if plan.orders_seen > 1 else 1}
            out[f"ort_measured_{label}_bytes"] = measure_onnxruntime(f, [SHAPE], **kw).peak_bytes
            out[f"ort_predicted_{label}_noreuse_bytes"] = predict_ort(f, runtime="ort-noreuse").peak_bytes
            out[f"ort_measured_{label}_noreuse_bytes"] = measure_onnxruntime(f, [SHAPE], mem_reuse=False,
                                                                           **kw).peak_bytes
            out[f"ort_measured_{label}_noreuse_4k_bytes"] = measure_onnxruntime(
                f, [SHAPE], mem_reuse=False, mmap_threshold=4096, **kw).peak_bytes
    return out


def remeasure_onnx(doc: dict, names: list[str]) -> None:
    """Re-run :func:`onnx_columns` for the finished ONNX rows of ``names``, their plans rebuilt from the rows."""
    for name in names:
        rows = [r for r in doc["rows"] if r["model"] == name and r["setting"] in ONNX_SETTINGS and "error" not in r]
        if not rows:
            continue
        model = build(name)
        for r in rows:
            plan = PatchPlan(r["split_node"], tuple(r["patches"]), tuple(r["input_shape"]), r["stream_input"],
                             r["halo"], r.get("pace", "split"))
            r.update(onnx_columns(model, plan))
            write_json(doc, str(RESULTS))
            print_table([r])


def kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**10:.0f}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':<16} {'setting':<17} {'split':<22} {'grid':>6} {'halo':<9} {'peak KiB':>9} {'patched':>8} {'ratio':>6} "
            f"{'MACs':>6} {'rel |d|':>8} {'ONNX':>7} {'ORT pat':>8} {'noreuse':>8} {'ORT unp':>8}  target")
    print("Patch-based execution, 1x3x224x224 fp32 deploy form (ratio: vs unpatched; the RED student: vs the "
          "ResNet18 teacher)")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<16} {r['setting']:<17} {r['error'][:90]}")
            continue
        grid = "x".join(map(str, r["patches"]))
        halo = r["halo"] + ("/in" if r.get("pace") == "input" and r["halo"] != "recompute" else "")
        target = f">= {r['target']:g}x {'met' if r['target_met'] else 'NOT met'}" if "target" in r else ""
        print(f"{r['model']:<16} {r['setting']:<17} {r['split_node'][:22]:<22} {grid:>6} {halo:<9} "
              f"{kib(r['peak_bytes']):>9} "
              f"{kib(r['patched_peak_bytes']):>8} {r['reduction_vs_reference']:>5.2f}x {r['mac_overhead']:>6.3f} "
              f"{r['rel_diff']:>8.1e} {kib(r.get('onnx_peak_bytes')):>7} {kib(r.get('ort_measured_patched_bytes')):>8} "
              f"{kib(r.get('ort_measured_patched_noreuse_4k_bytes')):>8} "
              f"{kib(r.get('ort_measured_unpatched_bytes')):>8}  {target}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, choices=MODELS)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and onnxruntime measurement")
    p.add_argument("--remeasure-onnx", action="store_true",
                   help="re-run only the onnxruntime columns of finished rows (plans read from the rows)")
    p.add_argument("--redo", nargs="*", default=(), choices=[s[0] for s in SETTINGS],
                   help="run these settings again for the selected models (their rows are replaced)")
    args = p.parse_args()
    torch.set_num_threads(1)
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    models = set(args.only or MODELS)
    doc["rows"] = [r for r in doc["rows"] if not (r["model"] in models and r["setting"] in args.redo)]
    if args.remeasure_onnx:
        remeasure_onnx(doc, list(args.only or MODELS))
    done = {(r["model"], r["setting"]) for r in doc["rows"]}
    for name in args.only or MODELS:
        todo = [s for s in SETTINGS if (name, s[0]) not in done]
        if not todo:
            continue
        model = build(name)
        for setting, stream, halo in todo:
            row = run_setting(name, model, setting, stream, halo, onnx=setting in ONNX_SETTINGS and not args.no_onnx)
            doc["rows"].append(row)
            write_json(doc, str(RESULTS))
            print_table([row])
    order = {m: i for i, m in enumerate(MODELS)}
    print()
    print_table(sorted(doc["rows"], key=lambda r: (order.get(r["model"], 99), r["setting"])))


if __name__ == "__main__":
    main()
