"""``memplan patch MODEL``: run the memory-heavy early part patch by patch (:mod:`passes.patch`).

Prints the unpatched and patched deploy-form peaks (docs/definitions.md §1-§2), the split node, the
grid, the MAC overhead of the halos and the max |Δ| of the outputs on a seeded random input.
``--stream-input`` counts the input image per patch (a camera delivering rows) instead of resident.
``--out DIR`` writes ``plan.json`` (re-applied with ``--plan``) and ``patched.pt`` (the patched
module's state_dict, which has the original's keys). ``--onnx FILE`` exports the patched model
(BatchNorm folded first, in the graph form for ONNX runtimes) and reports its peak as memplan's ONNX
frontend sees it; ``--measure`` adds onnxruntime's measured peak. ``--runtime ort`` (or
``ort-noreuse``) picks, of the best plan of each halo mode, the one whose exported file onnxruntime
is predicted to run smallest (memplan's search ranks plans by the deploy form; onnxruntime reorders
and reuses buffers its own way, see docs/definitions.md §2 and §8).

Example:
    $ memplan patch zoo:mobilenet_v2 --input 1,3,224,224 --json -
    $ memplan patch zoo:resnet18 --budget 1.5MiB --stream-input --out runs/r18-patch
    $ memplan patch zoo:resnet18 --patches 3x4 --onnx r18-patched.onnx --measure
    $ memplan patch zoo:mobilenet_v2 --runtime ort-noreuse --onnx mnv2-patched.onnx
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memplan.cli import command
from memplan.errors import MemplanError
from memplan.io import save_torch, write_json, write_text_atomic
from memplan.report import fmt_bytes, parse_bytes
from memplan.specs import default_input, load_model, parse_shape
from passes.patch import HALOS, PatchError, PatchPlan, PatchResult, apply_plan, patch_model

JSON_KEYS = ("peak_bytes", "patched_peak_bytes", "split_node", "patches", "mac_overhead", "max_abs_diff")


def parse_grid(text: str) -> tuple[int, int]:
    """``"4"`` → (4, 4), ``"3x4"`` → (3, 4): tiles along height and width.

    >>> parse_grid("4"), parse_grid("3x4")
    ((4, 4), (3, 4))
    """
    parts = text.lower().replace("×", "x").split("x")
    try:
        grid = tuple(int(p) for p in parts)
    except ValueError:
        raise MemplanError(f"bad --patches '{text}': use N (an NxN grid) or RxC, e.g. 4 or 3x4") from None
    if len(grid) == 1:
        grid = grid * 2
    if len(grid) != 2 or min(grid) < 1:
        raise MemplanError(f"bad --patches '{text}': use N (an NxN grid) or RxC with positive integers")
    return grid  # type: ignore[return-value]


@command("patch", "patch-based execution: run the early layers tile by tile, exactly, for a lower peak")
def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``memplan patch``."""
    p.add_argument("model", help="zoo:NAME, torchvision:NAME, timm:NAME, FILE.py:CALLABLE or pkg.module:CALLABLE")
    p.add_argument("--input", help="input shape, e.g. 1,3,224,224 (default: the model's, or the plan's)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--patches", metavar="N|RxC", help="fix the grid (N = NxN); the split is still chosen")
    how.add_argument("--budget", help="least MAC overhead whose peak fits, e.g. 256KiB, 1.5MiB, 800000")
    how.add_argument("--plan", metavar="PATH", help="re-apply a plan.json written by --out")
    p.add_argument("--split", metavar="NODE", help="fix the split node (a node name of the traced graph)")
    p.add_argument("--stream-input", action="store_true",
                   help="count the input image per patch (streamed rows) instead of resident")
    p.add_argument("--halo", choices=HALOS, default="auto",
                   help="recompute each patch's halo (MCUNetV2), cache it between full-width row bands "
                        "(every row computed once), mixed (cached, but an expansion's rows recomputed from "
                        "its narrower input), or search all (default)")
    p.add_argument("--max-overhead", type=float, default=0.2, metavar="FRACTION",
                   help="without --patches/--budget: most extra MACs allowed (default 0.2 = 20%%)")
    p.add_argument("--out", metavar="DIR", help="write DIR/plan.json and DIR/patched.pt (state_dict)")
    p.add_argument("--onnx", metavar="FILE.onnx", help="export the patched model and analyse the file")
    p.add_argument("--measure", action="store_true", help="with --onnx: measure onnxruntime's peak (child RSS)")
    p.add_argument("--runtime", choices=("deploy", *RUNTIME_PICKS), default="deploy",
                   help="rank plans by the deploy form (default) or by the peak onnxruntime is predicted to need "
                        "for the exported file (the best plan of each halo mode is exported and predicted)")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON ('-' = stdout)")
    p.set_defaults(func=run)


HALO_WORDS = {"recompute": "recomputed per patch", "cache": "cached between row bands",
              "mixed": "cached between row bands (expansions recomputed)"}
BAND_PACE = {"split": ", bands paced by the split map", "input": ", bands paced by the input rows"}


def run(args: argparse.Namespace) -> int:
    """Execute ``memplan patch``."""
    if args.measure and not args.onnx:
        raise MemplanError("--measure needs --onnx FILE (the patched file onnxruntime runs)")
    if args.runtime != "deploy" and (args.plan or args.patches or args.budget or args.halo != "auto"):
        raise MemplanError("--runtime ranks the best plan of each halo mode: it cannot be combined with --plan, "
                           "--patches, --budget or --halo")
    if args.max_overhead < 0:
        raise MemplanError(f"bad --max-overhead {args.max_overhead}: must be >= 0")
    model = load_model(args.model)
    plan = PatchPlan.load(args.plan) if args.plan else None
    shape = parse_shape(args.input) if args.input else plan.input_shape if plan else default_input(args.model)
    if plan is not None:
        plan = PatchPlan(plan.split_node, plan.grid, tuple(shape), plan.stream_input or args.stream_input,
                         plan.halo, plan.pace)
        result = apply_plan(model, plan)
    elif args.runtime != "deploy":
        result, picks = patch_for_runtime(model, shape, args.runtime, split_node=args.split,
                                          stream_input=args.stream_input, max_mac_overhead=args.max_overhead)
    else:
        result = patch_model(
            model, shape, grid=parse_grid(args.patches) if args.patches else None,
            budget=parse_bytes(args.budget) if args.budget else None, split_node=args.split,
            stream_input=args.stream_input, max_mac_overhead=args.max_overhead, halo=args.halo)
    doc: dict[str, Any] = {"model": args.model, **result.to_json()}
    if args.runtime != "deploy":
        doc.update({"runtime": args.runtime, "runtime_candidates": picks,
                    "runtime_peak_bytes": min(c["predicted_bytes"] for c in picks)})
    written = write_outputs(result, args.out) if args.out else []
    if args.onnx:
        doc.update(onnx_report(model, result.plan, args.onnx, measure=args.measure))
        written.append(args.onnx)
    if args.json != "-":
        print(format_summary(doc, written))
    if args.json:
        write_json(doc, args.json)
    return 0


def write_outputs(result: PatchResult, out: str) -> list[str]:
    """Write ``plan.json`` and ``patched.pt`` under ``out`` atomically; returns the paths."""
    import json

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise MemplanError(f"cannot write to '{out}': it exists and is not a directory")
    write_text_atomic(path / "plan.json", json.dumps(result.plan.to_json(), indent=2) + "\n")
    save_torch(result.module.state_dict(), path / "patched.pt")
    return [str(path / "plan.json"), str(path / "patched.pt")]


def export_patched(model: nn.Module, plan: PatchPlan, path: str | Path, *,
                   tolerance: float = 1e-4) -> tuple[PatchResult, Any]:
    """Fold BatchNorm, re-apply ``plan`` in the ONNX form (``target="onnx"``), export with parity checked
    and the border patches' explicit pads folded into the convs and max pools that read them.

    BN is folded before patching because a BN called once per patch is not folded by the exporter.
    Returns the patched (folded) result and the :class:`ExportResult`.
    """
    from memplan.export import export_onnx, fold_batchnorm

    x = torch.randn(plan.input_shape, generator=torch.Generator().manual_seed(0))
    folded, _ = fold_batchnorm(model, x)
    patched = apply_plan(folded, plan, check=False, target="onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export_onnx(patched.module, x, path, random_samples=1, tolerance=tolerance, fold_pads=True)
    return patched, exported


RUNTIME_PICKS = ("ort", "ort-noreuse")
# (halo, pace) of the plans --runtime compares: recomputed patches, cached bands paced by the split
# map, mixed bands paced by the input (without expansions the same as cached bands paced by the input)
RUNTIME_PLANS = (("recompute", None), ("cache", "split"), ("mixed", "input"))


def patch_for_runtime(model: nn.Module, shape: tuple[int, ...], runtime: str, **search: Any
                      ) -> tuple[PatchResult, list[dict[str, Any]]]:
    """The best plan of each halo mode (:data:`RUNTIME_PLANS`), exported and predicted for onnxruntime
    (``runtime``: ``ort`` or ``ort-noreuse``); returns the one predicted smallest and every candidate.

    ``search`` goes to :func:`passes.patch.patch_model` (``split_node``, ``stream_input``,
    ``max_mac_overhead``). A mode without a plan within the limits is skipped; none at all raises.
    """
    import tempfile

    from memplan.ort_runtime import predict_ort

    if runtime not in RUNTIME_PICKS:
        raise MemplanError(f"unknown runtime '{runtime}' (use {' or '.join(RUNTIME_PICKS)})")
    best: tuple[int, PatchResult] | None = None
    picks: list[dict[str, Any]] = []
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (halo, pace) in enumerate(RUNTIME_PLANS):
            try:
                r = patch_model(model, shape, halo=halo, pace=pace, **search)
            except PatchError as e:
                errors.append(f"{halo}: {e}")
                continue
            path = Path(tmp) / f"candidate{i}.onnx"
            export_patched(model, r.plan, path, tolerance=1e-3)
            predicted = predict_ort(path, [r.plan.input_shape], runtime=runtime).peak_bytes
            picks.append({"halo": r.plan.halo, "pace": r.plan.pace, "split_node": r.plan.split_node,
                          "patches": list(r.plan.grid), "patched_peak_bytes": r.patched_peak_bytes,
                          "mac_overhead": round(r.mac_overhead, 6), "predicted_bytes": predicted})
            if best is None or predicted < best[0]:
                best = (predicted, r)
    if best is None:
        raise PatchError("no plan for --runtime: " + "; ".join(errors))
    return best[1], picks


def onnx_report(model: nn.Module, plan: PatchPlan, path: str | Path, *, measure: bool = False) -> dict[str, Any]:
    """Export the patched model to ``path`` and analyse the file: the keys ``--onnx`` adds to the JSON."""
    from memplan.measure import measure_onnxruntime
    from memplan.onnx_frontend import analyze_onnx

    patched, exported = export_patched(model, plan, path)
    report = analyze_onnx(path)
    doc: dict[str, Any] = {"onnx_path": str(path), "onnx_peak_bytes": report.peak_bytes,
                           "onnx_parity_max_abs_diff": exported.max_abs_diff,
                           "onnx_form_patched_peak_bytes": patched.patched_peak_bytes}
    if plan.stream_input:
        inputs = {s for s, st in report.graph.storages.items() if st.is_input}
        from memplan.liveness import live_bytes

        doc["onnx_stream_peak_bytes"] = max(live_bytes([lt for lt in report.lifetimes if lt.storage not in inputs],
                                                       len(report.order)))
    if measure:
        from memplan.ort_runtime import sample_orders, worst_plan

        orders = sample_orders(path, [plan.input_shape])  # both settings planned on the same orders
        # onnxruntime's default session, and one with enable_mem_reuse off
        for key, runtime, reuse in (("", "ort", True), ("_noreuse", "ort-noreuse", False)):
            doc[f"ort{key}_predicted_peak_bytes"] = worst_plan(orders, runtime).peak_bytes
            doc[f"ort{key}_measured_peak_bytes"] = measure_onnxruntime(path, [plan.input_shape], arena=False, runs=1,
                                                                       mem_reuse=reuse).peak_bytes
    return doc


def format_summary(doc: dict[str, Any], written: list[str]) -> str:
    """The lines ``memplan patch`` prints."""
    peak, patched = doc["peak_bytes"], doc["patched_peak_bytes"]
    grid = "x".join(map(str, doc["patches"]))
    lines = [
        f"model            {doc['model']}  input {'x'.join(map(str, doc['input_shape']))}  deploy form"
        f"{'  (input streamed per patch)' if doc['stream_input'] else ''}",
        f"unpatched peak   {fmt_bytes(peak):>12} ({peak:,} bytes)",
        f"patched peak     {fmt_bytes(patched):>12} ({patched:,} bytes)  {peak / patched:.2f}x lower",
        f"split            after '{doc['split_node']}' ({'x'.join(map(str, doc['split_shape'][1:]))}), "
        f"grid {grid}, halo {HALO_WORDS[doc['halo']]}{BAND_PACE[doc['pace']] if doc['halo'] != 'recompute' else ''}; "
        f"patching stops where {doc['bounded_by']}",
        f"MACs             {doc['mac_overhead']:.3f}x the unpatched model's ({doc['patched_macs']:,} vs "
        f"{doc['macs']:,})",
    ]
    if doc.get("max_abs_diff") is not None:
        lines.append(f"outputs          max |diff| {doc['max_abs_diff']:.3g} (output scale {doc['output_scale']:.3g})")
    if "onnx_peak_bytes" in doc:
        lines.append(f"ONNX             {fmt_bytes(doc['onnx_peak_bytes'])} in the exported graph, parity "
                     f"{doc['onnx_parity_max_abs_diff']:.3g}")
    if "ort_measured_peak_bytes" in doc:
        lines.append(f"onnxruntime      {fmt_bytes(doc['ort_measured_peak_bytes'])} measured, "
                     f"{fmt_bytes(doc['ort_predicted_peak_bytes'])} predicted (no arena); with "
                     f"enable_mem_reuse off {fmt_bytes(doc['ort_noreuse_measured_peak_bytes'])} measured, "
                     f"{fmt_bytes(doc['ort_noreuse_predicted_peak_bytes'])} predicted (--runtime ort-noreuse)")
    if doc.get("runtime_candidates"):
        lines.append(f"--runtime        {doc['runtime']}: the best plan of each halo mode, exported and predicted")
    for c in doc.get("runtime_candidates", ()):
        chosen = c["halo"] == doc["halo"] and c["pace"] == doc["pace"] and c["split_node"] == doc["split_node"]
        lines.append(f"{'':<17}{c['halo']:<9} {c['pace']:<5} after '{c['split_node']}' grid "
                     f"{'x'.join(map(str, c['patches']))}: {fmt_bytes(c['predicted_bytes'])} predicted (deploy "
                     f"{fmt_bytes(c['patched_peak_bytes'])}){'  <- chosen' if chosen else ''}")
    if written:
        lines.append(f"wrote            {', '.join(written)}")
    return "\n".join(lines)


__all__ = ["JSON_KEYS", "RUNTIME_PICKS", "RUNTIME_PLANS", "PatchError", "configure", "export_patched",
           "format_summary", "onnx_report", "parse_grid", "patch_for_runtime", "run", "write_outputs"]
