"""Teacher to deployed student in one call: train, derive, distil, export, verify, analyse, measure, report.

:func:`run_pipeline` runs these stages into one output directory ``RUN``:

1. **teacher**: train ``model`` on ``data`` (:func:`distill.trainer.train`, run directory
   ``RUN/teacher``), or take a given run directory of ``memplan train`` (or a checkpoint in one).
2. **student**: the aggressive-pooling student (docs/definitions.md §4) of factor ``factor``, or the least
   aggressive one whose deployed peak (RED blocks included) fits ``budget_bytes``
   (:func:`passes.fit_budget`, recipe in ``RUN/recipe.json``).
3. **distill**: train the student with ``method`` (default ``red``) against the teacher
   (run directory ``RUN/student``).
4. **export**: BN-folded ONNX of both models (``RUN/teacher.onnx``, ``RUN/student.onnx``), checked
   against PyTorch on random and real validation images (:func:`memplan.export.export_onnx`).
5. **analyse/measure**: deploy-form peak of the PyTorch models, peak of the exported and of
   onnxruntime's optimized graph, and measured onnxruntime peak RSS and latency
   (:func:`memplan.measure.measure`); timeline plots ``RUN/{teacher,student}_timeline.png``.
6. **report**: ``RUN/report.md`` (teacher vs student table) and ``RUN/report.json`` (the same
   numbers, :class:`PipelineResult`).

Re-running with the same ``out_dir`` resumes: a finished training run is reused as it is, an
interrupted one continues from its ``last.pt`` (its config must not have changed); export, analysis
and measurement take seconds and run again, so the report always describes the files beside it.

Example:
    >>> import tempfile
    >>> cfg = PipelineConfig("zoo:resnet_tiny", data="digits", out_dir=tempfile.mkdtemp(), factor=2,
    ...                      epochs=1, overrides=["train_subset=100", "batch_size=50"], latency_runs=1)
    >>> r = run_pipeline(cfg)
    >>> r.teacher.peak_bytes, r.student.peak_bytes, r.student.red_blocks
    (12288, 5120, 5)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.config import TrainConfig, load_config
from distill.data import DataBundle, load_data
from distill.losses import build_objective
from distill.red import REDBlock
from distill.run import RunDir
from distill.trainer import train
from memplan.analyze import analyze
from memplan.errors import MemplanError
from memplan.export import export_onnx
from memplan.io import write_json, write_text_atomic
from memplan.measure import measure
from memplan.plot import plot_timeline
from memplan.report import fmt_bytes
from passes import fit_budget

__all__ = ["PIPELINE_KEYS", "Accuracy", "ModelSummary", "PipelineConfig", "PipelineResult", "format_report", "format_table",
           "run_pipeline"]

log = logging.getLogger("memplan.pipeline")

# TrainConfig keys the pipeline sets itself (from its own arguments), so overrides may not
PIPELINE_KEYS = ("model", "data", "teacher", "teacher_kwargs", "teacher_checkpoint", "factor", "recipe", "method",
                 "epochs", "out_dir", "resume")
PARITY_SAMPLES = 16  # real validation images checked against onnxruntime
INT8_CALIBRATION = 256  # validation images that calibrate the int8 models (and test images of their parity check)


@dataclass(frozen=True)
class PipelineConfig:
    """What :func:`run_pipeline` does; exactly one of ``factor`` and ``budget_bytes``.

    ``model``: the teacher architecture (``zoo:NAME``, ``pkg.module:factory``, ``file.py:factory``).
    ``teacher``: a finished run directory of :func:`distill.trainer.train` on ``model`` (or a
    ``best.pt``/``last.pt``/``student.pt`` in one) instead of training a teacher; ``trust_code`` lets its
    ``config.yaml`` name code (file/module specs). ``teacher_epochs``
    None: ``epochs``. ``input_shape``: the deploy input ``(N, C, H, W)`` that is analysed, measured
    and exported; its H sets the training ``image_size`` (None: batch 1 at the data's size).
    ``overrides``: ``key=value`` :class:`~distill.config.TrainConfig` settings for both training
    runs (``lr=0.05``, ``train_subset=200``...), except :data:`PIPELINE_KEYS`. ``latency_runs`` and
    ``ort_threads``: onnxruntime runs behind the median latency, and its intra-op threads. ``int8``:
    also quantize both ONNX models (static QDQ, calibrated on validation images) and report them.
    ``patch``: also run the trained student's early stage patch by patch (:func:`passes.patch.patch_model`,
    RED blocks included; ``stream_input``: the input arrives per patch) and report its peak.
    """

    model: str
    data: str
    out_dir: str
    factor: int | None = None
    budget_bytes: int | None = None
    teacher: str | None = None
    method: str = "red"
    epochs: int = 10
    teacher_epochs: int | None = None
    input_shape: tuple[int, ...] | None = None
    overrides: Sequence[str] = ()
    latency_runs: int = 20
    ort_threads: int = 1
    trust_code: bool = False
    int8: bool = False
    patch: bool = False
    stream_input: bool = False


@dataclass(frozen=True)
class Accuracy:
    """Test accuracy (%) of a training run: last epoch, and at the epoch best on validation."""

    epochs: int
    last_test_acc: float
    best_epoch: int
    best_val_acc: float
    best_test_acc: float

    @classmethod
    def from_run(cls, run: RunDir) -> Accuracy:
        """Read ``metrics.jsonl`` of a run directory (best: the first epoch of highest ``val_acc``)."""
        records = run.history()
        if not records:
            raise MemplanError(f"run '{run.path}' has no finished epoch in {RunDir.METRICS}")
        best = max(records, key=lambda r: r["val_acc"])
        return cls(records[-1]["epoch"], records[-1]["test_acc"], best["epoch"], best["val_acc"], best["test_acc"])


@dataclass(frozen=True)
class Int8Summary:
    """The static int8 twin of an exported model (``memplan export --int8``), run by onnxruntime.

    ``test_acc``: top-1 on the whole test split (%); ``top1_agreement``/``max_abs_diff``: against the
    fp32 file on the quantizer's held-out images; peaks and latency as in :class:`ModelSummary`.
    """

    onnx: str
    test_acc: float
    top1_agreement: float
    max_abs_diff: float
    onnx_peak_bytes: int
    ort_graph_peak_bytes: int
    measured_peak_bytes: int
    latency_ms: float


@dataclass(frozen=True)
class ModelSummary:
    """Teacher or student: files, memory (bytes, input counted), accuracy, size and speed.

    ``peak_bytes``: PyTorch deploy form (docs/definitions.md §2); ``onnx_peak_bytes``: the exported ONNX graph;
    ``ort_graph_peak_bytes``: the graph onnxruntime runs after its optimizations;
    ``measured_peak_bytes`` / ``measured_no_arena_peak_bytes``: peak RSS growth of one onnxruntime
    run with its default memory arena / without it; ``latency_ms``: median onnxruntime latency
    (arena on). ``params``: parameters of the PyTorch model (BatchNorm included).
    """

    run_dir: str
    weights: str
    onnx: str
    timeline_png: str
    params: int
    red_blocks: int
    peak_bytes: int
    peak_node: str
    onnx_peak_bytes: int
    ort_graph_peak_bytes: int
    measured_peak_bytes: int
    measured_no_arena_peak_bytes: int
    latency_ms: float
    parity_max_abs_diff: float
    accuracy: Accuracy
    int8: Int8Summary | None = None


@dataclass(frozen=True)
class PipelineResult:
    """Everything ``RUN/report.json`` holds; ``report.md`` renders the same numbers."""

    out_dir: str
    model: str
    data: str
    input_shape: tuple[int, ...]
    method: str
    factor: int
    budget_bytes: int | None
    red_placement: str | None
    changes: list[str]  # the student rewrite (passes recipe), in words
    ort_threads: int
    latency_runs: int
    teacher: ModelSummary
    student: ModelSummary
    peak_ratio: float  # teacher / student, deploy form
    measured_peak_ratio: float  # teacher / student, onnxruntime with its arena
    report_md: str
    report_json: str
    student_patch: dict[str, Any] | None = None  # passes.patch.PatchResult.to_json() of the trained student

    def to_json(self) -> dict[str, Any]:
        """The ``report.json`` document."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# training stages


def _train_stage(cfg: TrainConfig, stage: str) -> RunDir:
    """Train ``cfg`` into ``cfg.out_dir``; a run already there is resumed (finished: nothing to do)."""
    run = RunDir(str(cfg.out_dir))
    resume = run.has("last.pt")
    log.info("%s: %s %s", stage, "continuing (a finished run is reused)" if resume else "training", run.path)
    train(dataclasses.replace(cfg, resume=str(run.path) if resume else None))
    return run


def _teacher_config(run: RunDir, model: str, trust_code: bool) -> TrainConfig:
    """The teacher run's saved config; it must have trained ``model`` (not a derived student)."""
    trained = run.config(trust_code=trust_code)
    if trained.model != model:
        raise MemplanError(f"teacher run '{run.path}' trained {trained.model or 'a derived student'!r}, not {model!r}")
    return trained


def _base_config(config: PipelineConfig) -> TrainConfig:
    """The training settings both runs share: data, image size and the user's overrides."""
    owned = sorted({o.partition("=")[0].strip() for o in config.overrides} & set(PIPELINE_KEYS))
    if owned:
        raise MemplanError(f"override(s) {owned} are set by the pipeline; use its arguments (--data, --epochs, "
                           "--teacher-epochs, --method, --factor/--budget, --teacher, --out)")
    size = [f"image_size={config.input_shape[2]}"] if config.input_shape else []
    return load_config(None, [f"data={config.data}", *size, *config.overrides])


def _load_data(cfg: TrainConfig) -> DataBundle:
    """The splits the training runs see (same data spec, validation split, subset and size)."""
    return load_data(cfg.data, val_fraction=cfg.val_fraction, train_subset=cfg.train_subset, seed=cfg.seed,
                     image_size=cfg.image_size)


def _deploy_shape(config: PipelineConfig, bundle: DataBundle) -> tuple[int, ...]:
    batch = config.input_shape[0] if config.input_shape else 1
    shape = (batch, bundle.in_chans, *bundle.input_size)
    if config.input_shape is not None and tuple(config.input_shape) != shape:
        raise MemplanError(f"--input {','.join(map(str, config.input_shape))} does not fit the data: "
                           f"{config.data} gives {bundle.in_chans} channel(s) at a square image size "
                           f"(e.g. {','.join(map(str, shape))})")
    return shape


# ---------------------------------------------------------------------------------------------
# export, analysis, measurement


def ort_accuracy(path: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of an ONNX classifier in onnxruntime, one image at a time (a static batch of 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    hits = sum(int(session.run(None, {name: images[i : i + 1].numpy()})[0].argmax() == labels[i])
               for i in range(len(images)))
    return 100.0 * hits / max(1, len(images))


def _int8(name: str, onnx_path: Path, shape: tuple[int, ...], bundle: DataBundle, config: PipelineConfig
          ) -> Int8Summary:
    """Quantize ``onnx_path`` to ``OUT/NAME_int8.onnx``, then score, analyse and measure it."""
    from memplan.quantize import quantize_onnx

    path = Path(config.out_dir) / f"{name}_int8.onnx"
    log.info("%s: int8 quantization %s", name, path)
    calib = bundle.preprocess(bundle.val.images[:INT8_CALIBRATION], train=False)
    test = bundle.preprocess(bundle.test.images, train=False)
    q = quantize_onnx(onnx_path, path, calib.numpy(), test[:INT8_CALIBRATION].numpy())
    report = measure(str(path), shape, name=f"{name} int8", runs=config.latency_runs, threads=config.ort_threads)
    theory = {e.label: e.peak_bytes for e in report.theory}
    measured = {m.backend: m for m in report.measured}
    return Int8Summary(str(path), ort_accuracy(path, test, bundle.test.labels), q.top1_agreement, q.max_abs_diff,
                       theory["deploy"], theory["onnxruntime's optimized graph"],
                       int(measured["onnxruntime, arena"].peak_bytes), float(measured["onnxruntime, arena"].latency_ms))


def _patch(student: nn.Module, shape: tuple[int, ...], config: PipelineConfig) -> dict[str, Any]:
    """The trained student (RED blocks included) with its early stage run patch by patch."""
    from passes.patch import patch_model

    log.info("student: patch-based execution of the early stage")
    return patch_model(student.eval(), shape, stream_input=config.stream_input).to_json()


def _summarize(
    name: str, model: nn.Module, run: RunDir, weights: str, shape: tuple[int, ...], real: torch.Tensor,
    config: PipelineConfig, bundle: DataBundle,
) -> ModelSummary:
    """Export ``model`` to ``OUT/NAME.onnx`` (parity on ``real`` images), analyse, measure, plot its timeline."""
    out = Path(config.out_dir)
    onnx_path, png = out / f"{name}.onnx", out / f"{name}_timeline.png"
    log.info("%s: export %s, analyse, measure", name, onnx_path)
    exported = export_onnx(model, real[: shape[0]], onnx_path, real_inputs=real)
    deploy = analyze(model, shape, name=f"{config.model} {name}")
    plot_timeline(deploy, png)
    report = measure(str(onnx_path), shape, name=name, runs=config.latency_runs, threads=config.ort_threads)
    theory = {e.label: e.peak_bytes for e in report.theory}
    measured = {m.backend: m for m in report.measured}
    return ModelSummary(
        run_dir=str(run),
        weights=str(run / weights),
        onnx=str(onnx_path),
        timeline_png=str(png),
        params=sum(p.numel() for p in model.parameters()),
        red_blocks=len(getattr(model, "red_points", [])),
        peak_bytes=deploy.peak_bytes,
        peak_node=deploy.peak_node,
        onnx_peak_bytes=theory["deploy"],
        ort_graph_peak_bytes=theory["onnxruntime's optimized graph"],
        measured_peak_bytes=int(measured["onnxruntime, arena"].peak_bytes),
        measured_no_arena_peak_bytes=int(measured["onnxruntime, no arena"].peak_bytes),
        latency_ms=float(measured["onnxruntime, arena"].latency_ms),
        parity_max_abs_diff=exported.max_abs_diff,
        accuracy=Accuracy.from_run(run),
        int8=_int8(name, onnx_path, shape, bundle, config) if config.int8 else None,
    )


# ---------------------------------------------------------------------------------------------
# the pipeline


def run_pipeline(config: PipelineConfig) -> PipelineResult:
    """Run every stage (module docstring) and write ``report.md``/``report.json`` into ``config.out_dir``.

    Raises :class:`MemplanError` with a one-line message for bad arguments, data or checkpoints.
    """
    if (config.factor is None) == (config.budget_bytes is None):
        raise MemplanError("give exactly one of factor (e.g. 2) and a memory budget")
    if config.input_shape is not None and len(config.input_shape) != 4:
        raise MemplanError(f"input shape {config.input_shape} is not N,C,H,W")
    needs_red = build_objective(config.method).needs_red_blocks
    if config.teacher is not None:  # refuse a bad --teacher before anything is written
        _teacher_config(RunDir.from_checkpoint(config.teacher)[0], config.model, config.trust_code)
    base = _base_config(config)
    bundle = _load_data(base)
    shape = _deploy_shape(config, bundle)
    with RunDir(config.out_dir).lock():  # one pipeline per output directory
        return _run_locked(config, needs_red, base, bundle, shape)


def _run_locked(config: PipelineConfig, needs_red: bool, base: TrainConfig, bundle: DataBundle,
                shape: tuple[int, ...]) -> PipelineResult:
    out = Path(config.out_dir)

    teacher_run, teacher_weights = _teacher_stage(config, base, out)
    teacher = teacher_run.load_model(teacher_weights, trust_code=config.trust_code)
    student_cfg = _student_config(config, base, teacher_run, teacher_weights, out)
    if config.budget_bytes is not None:
        student_cfg = _fit_budget(student_cfg, teacher, shape, config.budget_bytes, needs_red, out)
    student_run = _train_stage(student_cfg, "student")
    student = student_run.load_model("student.pt", trust_code=config.trust_code)
    recipe, placement = student_run.recipe()

    real = bundle.preprocess(bundle.val.images[: max(PARITY_SAMPLES, shape[0])], train=False)
    t = _summarize("teacher", teacher, teacher_run, teacher_weights, shape, real, config, bundle)
    s = _summarize("student", student, student_run, "student.pt", shape, real, config, bundle)
    result = PipelineResult(
        out_dir=str(out),
        model=config.model,
        data=config.data,
        input_shape=shape,
        method=config.method,
        factor=recipe.factor,
        budget_bytes=config.budget_bytes,
        red_placement=placement,
        changes=[c.describe() for c in recipe.changes],
        ort_threads=config.ort_threads,
        latency_runs=config.latency_runs,
        teacher=t,
        student=s,
        peak_ratio=t.peak_bytes / s.peak_bytes,
        measured_peak_ratio=t.measured_peak_bytes / s.measured_peak_bytes,
        report_md=str(out / "report.md"),
        report_json=str(out / "report.json"),
        student_patch=_patch(student, shape, config) if config.patch or config.stream_input else None,
    )
    write_json(result.to_json(), result.report_json)
    write_text_atomic(result.report_md, format_report(result))
    return result


def _teacher_stage(config: PipelineConfig, base: TrainConfig, out: Path) -> tuple[RunDir, str]:
    """Train the teacher into ``out/teacher`` (or take ``config.teacher``): its run directory and weights file."""
    if config.teacher is None:
        cfg = dataclasses.replace(base, model=config.model, method="none", out_dir=str(out / "teacher"),
                                  epochs=config.teacher_epochs or config.epochs)
        return _train_stage(cfg, "teacher"), "student.pt"
    return RunDir.from_checkpoint(config.teacher)


def _student_config(
    config: PipelineConfig, base: TrainConfig, teacher_run: RunDir, teacher_weights: str, out: Path
) -> TrainConfig:
    """The distillation run of the student of factor ``config.factor`` (a budget sets the recipe later)."""
    trained = _teacher_config(teacher_run, config.model, config.trust_code)
    return dataclasses.replace(
        base, teacher=config.model, teacher_kwargs=trained.model_kwargs, method=config.method,
        teacher_checkpoint=str(teacher_run / teacher_weights), factor=config.factor, epochs=config.epochs,
        out_dir=str(out / "student"))


def _fit_budget(
    cfg: TrainConfig, teacher: nn.Module, shape: tuple[int, ...], budget: int, with_red: bool, out: Path
) -> TrainConfig:
    """``cfg`` training the least aggressive student that fits ``budget`` (its recipe in ``out/recipe.json``)."""
    fit = fit_budget(teacher, torch.empty(shape, device="meta"), budget, REDBlock if with_red else None,
                     pool=cfg.pool)
    log.info("student: k=%d (absorb %s) fits %s: deployed peak %s", fit.student.recipe.factor,
             fit.student.recipe.absorb, fmt_bytes(budget), fmt_bytes(fit.peak_bytes))
    fit.student.recipe.save(out / "recipe.json")
    return dataclasses.replace(cfg, recipe=str(out / "recipe.json"), placement=fit.placement or cfg.placement)


# ---------------------------------------------------------------------------------------------
# report


def _bytes(n: int) -> str:
    return f"{fmt_bytes(n)} ({n:,} B)"


def _ratio(teacher: float, student: float) -> str:
    return f"{teacher / student:.2f}×"


def _bytes_row(label: str, attr: str) -> tuple[str, Callable[[Any], str], Callable[[Any, Any], str]]:
    """A table row showing ``attr`` (bytes) of each model and the teacher / student ratio."""
    return label, lambda m: _bytes(getattr(m, attr)), lambda t, s: _ratio(getattr(t, attr), getattr(s, attr))


# (row label, ModelSummary -> cell, (teacher, student) -> last column): the table of report.md
ROWS: list[tuple[str, Callable[[ModelSummary], str], Callable[[ModelSummary, ModelSummary], str]]] = [
    _bytes_row("theoretical peak (PyTorch, deploy form)", "peak_bytes"),
    _bytes_row("ONNX graph peak (exported file)", "onnx_peak_bytes"),
    _bytes_row("ORT-graph peak (onnxruntime's optimized graph)", "ort_graph_peak_bytes"),
    _bytes_row("measured peak (onnxruntime, peak RSS growth)", "measured_peak_bytes"),
    ("test accuracy, last epoch", lambda m: f"{m.accuracy.last_test_acc:.2f}% (epoch {m.accuracy.epochs})",
     lambda t, s: f"{s.accuracy.last_test_acc - t.accuracy.last_test_acc:+.2f} pts"),
    ("test accuracy, best-on-val epoch",
     lambda m: f"{m.accuracy.best_test_acc:.2f}% (epoch {m.accuracy.best_epoch}, val {m.accuracy.best_val_acc:.2f}%)",
     lambda t, s: f"{s.accuracy.best_test_acc - t.accuracy.best_test_acc:+.2f} pts"),
    ("parameters", lambda m: f"{m.params:,}", lambda t, s: _ratio(t.params, s.params)),
    ("ORT latency (median)", lambda m: f"{m.latency_ms:.3f} ms", lambda t, s: _ratio(t.latency_ms, s.latency_ms)),
    ("ONNX parity, max abs diff", lambda m: f"{m.parity_max_abs_diff:.2e}", lambda t, s: ""),
]


INT8_ROWS: list[tuple[str, Callable[[Int8Summary], str], Callable[[Int8Summary, Int8Summary], str]]] = [
    ("int8: test accuracy (onnxruntime)", lambda q: f"{q.test_acc:.2f}%",
     lambda t, s: f"{s.test_acc - t.test_acc:+.2f} pts"),
    ("int8: top-1 agreement with fp32", lambda q: f"{100 * q.top1_agreement:.2f}%", lambda t, s: ""),
    _bytes_row("int8: ONNX graph peak", "onnx_peak_bytes"),
    _bytes_row("int8: ORT-graph peak", "ort_graph_peak_bytes"),
    _bytes_row("int8: measured peak (onnxruntime)", "measured_peak_bytes"),
    ("int8: ORT latency (median)", lambda q: f"{q.latency_ms:.3f} ms", lambda t, s: _ratio(t.latency_ms, s.latency_ms)),
]


def format_table(result: PipelineResult) -> str:
    """The teacher vs student markdown table of ``report.md`` (also what ``memplan pipeline`` prints)."""
    red = f" + {result.student.red_blocks} RED" if result.student.red_blocks else ""
    t, s = result.teacher, result.student
    lines = [f"| | teacher | student (k={result.factor}{red}) | teacher / student (accuracy: Δ) |",
             "|---|---:|---:|---:|"]
    lines += [f"| {label} | {cell(t)} | {cell(s)} | {last(t, s)} |" for label, cell, last in ROWS]
    if t.int8 is not None and s.int8 is not None:
        lines += [f"| {label} | {cell(t.int8)} | {cell(s.int8)} | {last(t.int8, s.int8)} |"
                  for label, cell, last in INT8_ROWS]
    return "\n".join(lines)


def _patch_line(result: PipelineResult) -> str:
    q = result.student_patch
    return (f"**Patched student** (early stage patch by patch, split at `{q['split_node']}`, grid "
            f"{'×'.join(map(str, q['patches']))}, {q['halo']} halos, MACs ×{q['mac_overhead']:.3f}, input "
            f"{'streamed per patch' if q['stream_input'] else 'resident'}): peak {_bytes(q['patched_peak_bytes'])}, "
            f"{result.teacher.peak_bytes / q['patched_peak_bytes']:.2f}× below the teacher (deploy form; outputs "
            f"equal to max |Δ| {q['max_abs_diff']:.2g}).")


def format_report(result: PipelineResult) -> str:
    """``report.md``: what ran, the teacher vs student table, notes and the timeline plots."""
    t, s = result.teacher, result.student
    out = Path(result.out_dir)
    how = (f"budget {_bytes(result.budget_bytes)} → k={result.factor}" if result.budget_bytes is not None
           else f"factor k={result.factor}")
    changes = "; ".join(result.changes) or "none"
    placement = f", RED blocks: {s.red_blocks} ({result.red_placement})" if s.red_blocks else ", no RED blocks"
    shape = "×".join(map(str, result.input_shape))
    return "\n".join([
        f"# memplan pipeline: {result.model} on {result.data}",
        "",
        f"Input {shape} float32. Student: {how}, method `{result.method}`{placement}.",
        f"Rewrite: {changes}.",
        f"Runs: teacher `{t.weights}`, student `{s.weights}`. ONNX: `{Path(t.onnx).name}`, `{Path(s.onnx).name}`.",
        "",
        f"**Peak activation memory: {_bytes(t.peak_bytes)} → {_bytes(s.peak_bytes)}, "
        f"{result.peak_ratio:.2f}× lower** (deploy form; measured in onnxruntime: "
        f"{result.measured_peak_ratio:.2f}×).",
        "",
        format_table(result),
        "",
        *([_patch_line(result), ""] if result.student_patch else []),
        "Peaks count the input and exclude parameters (docs/definitions.md §1); the student's include its RED blocks. "
        f"Teacher peaks at `{t.peak_node}`, the student at `{s.peak_node}`. The measured peak is the peak RSS "
        "growth of one onnxruntime run (default settings, memory arena on) in a child process (`memplan "
        "measure`): arena chunks, allocator granularity, in-place reuse and layout changes make it differ from "
        "the theory, most for small inputs. report.json also holds the run without the arena, which is unstable "
        "for models this small (freed heap pages are reused). "
        f"Latency: median of {result.latency_runs} onnxruntime runs, {result.ort_threads} thread(s). Accuracy: "
        "test split, in percent; best-on-val is the test accuracy at the epoch with the best validation accuracy.",
        "",
        f"![teacher timeline]({Path(t.timeline_png).relative_to(out)})",
        "",
        f"![student timeline]({Path(s.timeline_png).relative_to(out)})",
        "",
    ])

