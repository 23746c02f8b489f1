"""ReDistill's second application: a 4x-lower-memory DDPM denoiser on Fashion-MNIST, distilled with RED.

Fashion-MNIST (all 60k training images) zero-padded to 32×32 and scaled to [-1, 1]. Teacher: the
small DDPM UNet (``memplan.zoo.ddpm_unet_small`` at ``--base`` channels), DDPM ε-prediction with
T=1000 and a linear β schedule, Adam (linear warm-up 100 steps, grad-norm clip 1), EMA weights.
Student: its k=2 encoder–decoder student from the student pass (:func:`passes.aggressive_pool`: head
stride 2, deepest DownSample stride 1, the matching UpSample's ×2 removed), with the pass's inserted
tail folded into the last conv (:func:`distill.diffusion_student.fold_tail`: ``conv_out`` becomes a
ConvTranspose2d stride 2 from the decoder's last map; a transposed conv after the 1-channel output
cannot predict per-pixel noise), initialised from the teacher's EMA weights where shapes match; 4x
fewer pixels at every map before the deepest level. Every student trains for the same
``--student-steps`` with each method: ``none`` (plain denoising), ``output`` (0.5 denoising + 0.5
MSE to the teacher's ε), ``red6`` / ``red2`` (RED blocks at the pass's "6-site" / "2-site" stage-map
selection, 0.5 denoising + 0.5 RED loss), and the control ``red6-blocks`` (the 6 RED blocks, plain
denoising: their capacity without the RED loss). Distillation targets come from the teacher's EMA weights.

Quality, all offline: 5,000 DDIM samples (eta 0, ``--ddim-steps`` steps) per sampling seed (two
seeds) against the 10,000 test images, on the penultimate features of a Fashion-MNIST classifier
trained here (cached under ``--cache``): "FID on Fashion-MNIST-classifier features (not Inception
FID)", precision/recall (Kynkäänniemi et al., k=3), and the classifier's class histogram of the
samples. Memory: deploy-form peak at 1×1×32×32, batch 1, fp32 (docs/definitions.md §1–2), RED blocks
included. A sample grid per method is written next to the JSON (``*.png``, not committed).

Resumable: every finished run is written at once to the JSON and skipped on re-run; an
interrupted training run continues from ``runs/diffusion_fashion_mnist/<run>/last.pt``.

Usage:
    python benchmarks/diffusion_fashion_mnist.py                 # everything (~20 min of one free CPU core)
    python benchmarks/diffusion_fashion_mnist.py --student-steps 1800 --methods none,red6 \
        --out benchmarks/results/diffusion_fashion_mnist_1800.json  # longer students: continues their last.pt
                                                                    # (constant LR: same as an 1800-step run;
                                                                    # copy the teacher row over to skip its eval)
    python benchmarks/diffusion_fashion_mnist.py --teacher-steps 20 --student-steps 10 --samples 200 \\
        --out /tmp/smoke.json --runs /tmp/smoke                   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.data import load_data
from distill.diffusion import DiffusionObjective, NoiseSchedule, pad_to_unit_range, train_denoiser
from distill.diffusion_student import diffusion_student, red_student
from distill.quality import (
    FID_NAME,
    class_histogram,
    classifier_features,
    frechet_distance,
    histogram_entropy,
    precision_recall,
    train_classifier,
)
from distill.red import ort_friendly
from memplan.analyze import analyze
from memplan.io import write_text_atomic
from memplan.report import fmt_bytes
from memplan.zoo import create_model

RESULTS = Path(__file__).parent / "results" / "diffusion_fashion_mnist.json"
METHODS = {"none": ("none", None), "red6": ("red", 6), "output": ("output", None), "red2": ("red", 2),
           "red6-blocks": ("red-blocks", 6)}
SAMPLE_SEEDS = (0, 1)


def example(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Meta inputs (image, time step) for the memory analysis."""
    return [torch.empty(shape, device="meta"), torch.zeros(shape[0], dtype=torch.long, device="meta")]


def peak_of(model: nn.Module, shape: tuple[int, ...]) -> int:
    return analyze(model, example(shape)).peak_bytes


def save_grid(samples: torch.Tensor, path: Path, n: int = 64) -> None:
    """An 8×8 grid of the first ``n`` samples as a grey PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = int(min(n, len(samples)) ** 0.5)
    x = ((samples[: side * side, 0] + 1) / 2).clamp(0, 1)
    h, w = x.shape[-2:]
    grid = x.reshape(side, side, h, w).permute(0, 2, 1, 3).reshape(side * h, side * w)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid.numpy(), cmap="gray", vmin=0, vmax=1)


class Results:
    """The JSON document, written atomically after every finished run."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        for key in ("config",):
            if key in self.doc and self.doc[key] != header[key]:
                raise SystemExit(f"{path} holds results for another {key}: {self.doc[key]} (use --out)")
        self.doc.update(header)
        self.doc.setdefault("runs", {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.doc, indent=2) + "\n")


def evaluate(model: nn.Module, schedule: NoiseSchedule, classifier: nn.Module, real: torch.Tensor,
             args: argparse.Namespace, grid: Path | None) -> dict[str, Any]:
    """FID / precision / recall / class histogram of ``args.samples`` DDIM samples per sampling seed."""
    per_seed = []
    model.eval()
    for seed in SAMPLE_SEEDS:
        t0 = time.perf_counter()
        x = schedule.ddim_sample(model, (args.samples, 1, 32, 32), steps=args.ddim_steps, seed=seed)
        seconds = time.perf_counter() - t0
        if grid is not None and seed == SAMPLE_SEEDS[0]:
            save_grid(x, grid)
        feats, preds = classifier_features(classifier, x)
        p, r = precision_recall(real, feats, k=3)
        hist = class_histogram(preds, 10)
        per_seed.append({"seed": seed, "fid": frechet_distance(real, feats), "precision": p, "recall": r,
                         "class_histogram": hist, "class_entropy_bits": histogram_entropy(hist),
                         "sampling_seconds": seconds})
    fids = [s["fid"] for s in per_seed]
    return {"fid": sum(fids) / len(fids), "fid_spread": max(fids) - min(fids),
            "precision": sum(s["precision"] for s in per_seed) / len(per_seed),
            "recall": sum(s["recall"] for s in per_seed) / len(per_seed), "per_seed": per_seed}


def table(doc: dict[str, Any]) -> str:
    """Markdown table of the finished runs."""
    runs = doc["runs"]
    head = (f"| run | peak (deploy, RED incl.) | peak (RED in slices) | params | {FID_NAME} (mean of 2 seeds, spread) | precision | "
            "recall | class entropy (bits, max 3.32) | s/step |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name in ["real-train", "teacher", *METHODS]:
        r = runs.get(name)
        if r is None:
            continue
        ent = sum(s["class_entropy_bits"] for s in r["per_seed"]) / len(r["per_seed"])
        peak = fmt_bytes(r["peak_bytes"]) if "peak_bytes" in r else "-"
        params = f"{r['params']:,}" if "params" in r else "-"
        sliced = fmt_bytes(r.get("peak_chunked_bytes", r["peak_bytes"])) if "peak_bytes" in r else "-"
        sps = f"{r['seconds_per_step']:.3f}" if "seconds_per_step" in r else "-"
        lines.append(f"| {name} | {peak} | {sliced} | {params} | {r['fid']:.2f} ± {r['fid_spread']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {ent:.2f} | {sps} |")
    return "\n".join(lines)


def target(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The issue's target: >= 4x lower peak with RED; RED's FID nearer the teacher's than none/output by > seed spread."""
    runs = doc["runs"]
    if not all(k in runs for k in ("teacher", *METHODS)):
        return None
    teacher = runs["teacher"]
    spread = max(r["fid_spread"] for k, r in runs.items() if k in ("teacher", *METHODS))
    gap = {k: abs(runs[k]["fid"] - teacher["fid"]) for k in METHODS}
    ratio = {k: teacher["peak_bytes"] / runs[k]["peak_bytes"] for k in ("red6", "red2")}
    chunked = {k: teacher["peak_bytes"] / runs[k]["peak_chunked_bytes"] for k in ("red6", "red2")
               if "peak_chunked_bytes" in runs[k]}
    best_red = min(("red6", "red2"), key=gap.__getitem__)
    baseline = min(gap["none"], gap["output"])
    memory_ok = all(v >= 4.0 for v in ratio.values()) or (len(chunked) == 2 and all(v >= 4.0 for v in chunked.values()))
    fid_ok = gap[best_red] + spread < baseline
    text = (f"peak teacher/student with RED: red6 {ratio['red6']:.3f}x, red2 {ratio['red2']:.3f}x "
            + ("; RED blocks computed in channel slices (distill.red.ort_friendly, the same function): "
               + ", ".join(f"{k} {v:.3f}x" for k, v in chunked.items()) if chunked else "")
            + f" ({'>=' if memory_ok else 'NOT >='} 4x); FID gap to the teacher: "
            + ", ".join(f"{k} {v:.2f}" for k, v in gap.items())
            + f"; largest spread between two sampling seeds {spread:.2f}; best RED ({best_red}) "
            + ("beats" if fid_ok else "does NOT beat") + " none and output by more than that spread; "
            + "the RED loss over the RED blocks alone (red6 vs red6-blocks): "
            + ("nearer by more than the spread" if gap["red6"] + spread < gap["red6-blocks"] else "NOT nearer by more "
               "than the spread"))
    return {"met": bool(memory_ok and fid_ok), "memory_met": memory_ok, "fid_met": fid_ok, "text": text,
            "peak_ratio": ratio, "peak_ratio_chunked": chunked, "fid_gap_to_teacher": gap, "seed_spread": spread}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=int, default=16, help="teacher base channels")
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--student-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--ddim-steps", type=int, default=8)
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--red-loss", default="cosine", choices=("cosine", "mse"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=Path("runs/diffusion_fashion_mnist"))
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "memplan")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (1, 1, 32, 32)
    config = {k: getattr(args, k) for k in ("base", "teacher_steps", "student_steps", "batch", "lr", "ema",
                                             "ddim_steps", "samples", "red_loss", "data")}
    results = Results(args.out, {
        "benchmark": "diffusion_fashion_mnist", "config": config, "device": "cpu", "threads": args.threads,
        "machine": platform.machine(), "fid_name": FID_NAME, "sampling_seeds": list(SAMPLE_SEEDS),
        "schedule": {"T": 1000, "beta": "linear 1e-4..0.02", "sampler": f"DDIM eta=0, {args.ddim_steps} steps"},
        "steps": {"teacher": args.teacher_steps, "each student": args.student_steps, "batch": args.batch},
        "student": "passes.aggressive_pool(factor=2) on the teacher, tail folded into conv_out "
                   "(distill.diffusion_student); RED sites: the pass's 6-site / 2-site placements",
    })

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    bundle = load_data(args.data)
    train_x = pad_to_unit_range(torch.cat([bundle.train.images, bundle.val.images]))
    train_y = torch.cat([bundle.train.labels, bundle.val.labels])
    test_x = pad_to_unit_range(bundle.test.images)
    log(f"data: {len(train_x)} train, {len(test_x)} test images")
    classifier = train_classifier(train_x, train_y, cache_dir=args.cache)
    real, test_pred = classifier_features(classifier, test_x)
    results.doc["classifier_test_accuracy"] = float((test_pred == bundle.test.labels).float().mean())
    log(f"classifier test accuracy {results.doc['classifier_test_accuracy']:.4f}")
    schedule = NoiseSchedule()
    runs = results.doc["runs"]
    if "real-train" not in runs:  # the floor: real training images against the test set
        feats, preds = classifier_features(classifier, train_x[: args.samples])
        p_, r_ = precision_recall(real, feats, k=3)
        hist = class_histogram(preds, 10)
        runs["real-train"] = {"fid": frechet_distance(real, feats), "fid_spread": 0.0, "precision": p_,
                              "recall": r_, "per_seed": [{"class_histogram": hist,
                                                          "class_entropy_bits": histogram_entropy(hist)}]}
        results.save()

    def train(name: str, model: nn.Module, steps: int, **kw: Any) -> Any:
        return train_denoiser(model, train_x, steps=steps, batch_size=args.batch, lr=args.lr, ema_decay=args.ema,
                              schedule=schedule, seed=0, run_dir=args.runs / name,
                              log=lambda m: log(f"[{name}] {m}"), **kw)

    torch.manual_seed(0)
    teacher = create_model("ddpm_unet_small", base_channels=args.base, norm_groups=min(8, args.base // 4))
    for name, row in runs.items():  # rows from before the sliced-RED column: a peak needs no weights
        sites = METHODS.get(name, (None, None))[1]
        if sites is not None and "peak_chunked_bytes" not in row:
            row["peak_chunked_bytes"] = peak_of(
                ort_friendly(red_student(diffusion_student(teacher, shape, factor=2), sites)[0]), shape)
            results.save()
    if all(k in runs for k in ("teacher", *args.methods.split(","))):
        results.doc["target"] = target(results.doc)
        results.save()
        print(table(results.doc))
        if results.doc["target"]:
            print(results.doc["target"]["text"])
        return
    t_out = train("teacher", teacher, args.teacher_steps)
    teacher_ema = t_out.ema
    if "teacher" not in runs:
        row = {"peak_bytes": peak_of(teacher, shape), "params": sum(p.numel() for p in teacher.parameters()),
               "seconds_per_step": t_out.seconds_per_step, "steps": args.teacher_steps}
        row.update(evaluate(teacher_ema, schedule, classifier, real, args, args.out.with_name("diffusion_fmnist_teacher.png")))
        runs["teacher"] = row
        results.save()
        log(f"teacher: FID {row['fid']:.2f}")
    for name in args.methods.split(","):
        method, sites = METHODS[name]
        if name in runs:
            continue
        student = diffusion_student(teacher_ema, shape, factor=2)
        if sites is not None:
            model, s_taps, t_taps = red_student(student, sites)
            if method == "red-blocks":
                s_taps, t_taps = [], []
        else:
            model, s_taps, t_taps = student.module, [], []
        objective = DiffusionObjective(method, red_loss=args.red_loss)
        out = train(name, model, args.student_steps, objective=objective, teacher=teacher_ema,
                    student_taps=s_taps, teacher_taps=t_taps)
        row = {"method": method, "sites": sites, "student_source": student.source, "red_points": s_taps,
               "red_teachers": t_taps, "peak_bytes": peak_of(model, shape),
               "peak_chunked_bytes": peak_of(ort_friendly(model), shape),  # the same function, RED in slices
               "peak_without_red": peak_of(student.module, shape),
               "params": sum(p.numel() for p in model.parameters()), "seconds_per_step": out.seconds_per_step,
               "steps": args.student_steps, "final_losses": out.losses[-1] if out.losses else {}}
        row.update(evaluate(out.ema, schedule, classifier, real, args,
                            args.out.with_name(f"diffusion_fmnist_{name}.png")))
        runs[name] = row
        results.save()
        log(f"{name}: FID {row['fid']:.2f}")
    results.doc["target"] = target(results.doc)
    results.save()
    print(table(results.doc))
    if results.doc["target"]:
        print(results.doc["target"]["text"])


if __name__ == "__main__":
    main()
