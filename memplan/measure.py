"""Measured peak activation memory next to the theoretical one (docs/definitions.md §1).

Three measurements, each counting the input like the theory does:

- **torch eager, CPU**: ``torch.profiler`` with ``profile_memory=True``; the peak of the running
  sum of its allocation/free events during one ``no_grad`` forward, plus the input.
- **torch CUDA** (when a GPU is present): ``max_memory_allocated`` above the allocated bytes before
  the forward, plus the input.
- **onnxruntime**: a child process loads the model, touches its shared libraries' pages (so code
  paged in by the first run does not count), resets its peak RSS (``/proc/self/clear_refs``), runs
  once and reports ``VmHWM`` minus ``VmRSS`` before the run, plus the input. It runs twice: with
  onnxruntime's memory arena and memory patterns (its default) and with both off (every tensor
  malloc'd alone, large blocks returned to the OS at once: ``MALLOC_MMAP_THRESHOLD_``).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    >>> m = measure_torch_cpu(net, torch.zeros(1, 3, 32, 32))
    >>> m.backend, m.peak_bytes >= (3 + 8) * 32 * 32 * 4
    ('torch eager CPU', True)
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from memplan.errors import MemplanError

__all__ = ["Estimate", "MeasureReport", "Measurement", "measure", "measure_onnxruntime", "measure_torch_cpu",
           "measure_torch_cuda"]

NOTES = {
    "torch eager CPU": "runs as written (BN not folded, activations in place only where the code says so); "
                       "max_pool2d also keeps int64 indices; oneDNN reorders weights and allocates conv "
                       "scratch per call",
    "torch CUDA": "caching allocator rounds blocks up to 512 B; cuDNN workspaces count; as-written graph",
    "onnxruntime, no arena": "runs onnxruntime's optimized graph (theory row above: fusions, and on x86 the "
                             "NCHWc layout with channels padded to 8/16 plus reorder copies); in-place reuse "
                             "(MayInplace) can go below the bound; MLAS im2col/packing workspaces and 4 KiB "
                             "pages add to it",
    "onnxruntime, arena": "onnxruntime's default: as above, and the BFC arena grows in power-of-two chunks and "
                          "keeps them (RSS counts only the pages a run touches)",
}


@dataclass(frozen=True)
class Estimate:
    """A theoretical peak (lower bound of program order) under some form."""

    label: str
    peak_bytes: int


@dataclass(frozen=True)
class Measurement:
    """One measured peak; ``peak_bytes`` None when the backend is unavailable (``note`` says why)."""

    backend: str
    peak_bytes: int | None
    method: str
    note: str
    latency_ms: float | None = None


@dataclass
class MeasureReport:
    """Theory and measurements for one model and input shape."""

    model: str
    input_shape: list[int]
    input_bytes: int
    theory: list[Estimate]
    measured: list[Measurement]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``memplan measure --json``)."""
        return asdict(self)

    def format(self) -> str:
        """The table ``memplan measure`` prints: each measurement relative to the deploy-form theory."""
        from memplan.report import fmt_bytes

        ref = self.theory[0].peak_bytes
        lines = [f"model   {self.model}", f"input   {'x'.join(map(str, self.input_shape))} float32 "
                 f"({fmt_bytes(self.input_bytes)}, counted in every row)", "",
                 f"  {'':<40} {'peak':>12} {'vs ' + self.theory[0].label:>12} {'latency':>10}"]
        for e in self.theory:
            lines.append(f"  {'theory: ' + e.label:<40} {fmt_bytes(e.peak_bytes):>12} {e.peak_bytes / ref:>11.2f}x")
        for m in self.measured:
            peak = fmt_bytes(m.peak_bytes) if m.peak_bytes is not None else "n/a"
            ratio = f"{m.peak_bytes / ref:.2f}x" if m.peak_bytes is not None else ""
            lat = f"{m.latency_ms:.1f} ms" if m.latency_ms is not None else ""
            lines.append(f"  {'measured: ' + m.backend:<40} {peak:>12} {ratio:>12} {lat:>10}")
        lines += ["", "why they differ:"] + [f"  {m.backend}: {m.note}" for m in self.measured]
        lines += [f"  ({m.backend}: {m.method})" for m in self.measured if m.peak_bytes is not None]
        return "\n".join(lines)


def _inputs(inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)


def _nbytes(inputs: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs)


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Silence C-level writes to fd 2 (kineto prints 'profiler_start/stop' lines on every profile)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def measure_torch_cpu(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> Measurement:
    """Peak of the profiler's CPU allocation events during one eval forward, plus the input bytes."""
    from torch.profiler import ProfilerActivity, profile

    xs = _inputs(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*xs)  # warm-up: lazy initialisation is not activation memory
            with _stderr_to_devnull(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                model(*xs)
    finally:
        model.train(was_training)
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return Measurement("torch eager CPU", peak + _nbytes(xs), "torch.profiler memory events: peak of the "
                       "running allocation sum + input", NOTES["torch eager CPU"])


def measure_torch_cuda(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> Measurement:
    """``torch.cuda.max_memory_allocated`` above the pre-forward level, plus the input bytes."""
    method = "max_memory_allocated - allocated before the forward + input"
    if not torch.cuda.is_available():
        return Measurement("torch CUDA", None, method, "no CUDA device here")
    dev = torch.device("cuda")
    m = copy.deepcopy(model).to(dev).eval()
    xs = [t.to(dev) for t in _inputs(inputs)]
    with torch.no_grad():
        m(*xs)  # warm-up: cuDNN handles, autotuning, lazy modules
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        m(*xs)
        end.record()
        torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base + _nbytes(xs)
    return Measurement("torch CUDA", peak, method, NOTES["torch CUDA"], latency_ms=start.elapsed_time(end))


# The child: only numpy + onnxruntime are imported, so the parent's torch does not blur the RSS.
_ORT_CHILD = r"""
import ctypes, json, os, sys, time
import numpy as np
import onnxruntime as ort

path, arena, threads, runs = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
shapes = json.loads(sys.argv[5])

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def touch_libraries():
    with open("/proc/self/maps") as f:
        maps = [line.split() for line in f]
    for parts in maps:
        if len(parts) < 6 or not parts[1].startswith("r") or ".so" not in parts[5]:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        try:
            hi = min(hi, lo + os.stat(parts[5]).st_size - int(parts[2], 16))
        except OSError:
            continue
        for a in range(lo, hi, 1 << 20):
            ctypes.string_at(a, min(1 << 20, hi - a))

so = ort.SessionOptions()
so.enable_cpu_mem_arena = arena
so.enable_mem_pattern = arena
so.intra_op_num_threads = threads
so.log_severity_level = 3
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {i.name: rng.standard_normal(s).astype(np.float32) for i, s in zip(sess.get_inputs(), shapes)}
touch_libraries()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
base = status("VmRSS")
sess.run(None, feeds)
peak = status("VmHWM")
times = []
for _ in range(runs):
    t = time.perf_counter()
    sess.run(None, feeds)
    times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"baseline": base, "peak": peak, "reset": reset,
                  "latency_ms": 1e3 * times[len(times) // 2] if times else None}))
"""


def measure_onnxruntime(
    path: str | Path, input_shapes: Sequence[Sequence[int]], *, arena: bool = True, threads: int = 0,
    runs: int = 5, timeout: float = 600.0,
) -> Measurement:
    """Peak RSS growth of one onnxruntime run in a child process, plus the input bytes.

    ``input_shapes``: one float32 shape per graph input. ``threads`` 0 = onnxruntime's default.
    ``runs`` more runs give the median latency.

    Example:
        >>> import tempfile, torch
        >>> from memplan.export import export_onnx
        >>> path = tempfile.mkdtemp() + "/n.onnx"
        >>> _ = export_onnx(torch.nn.Conv2d(3, 16, 3, padding=1), torch.zeros(1, 3, 256, 256), path)
        >>> m = measure_onnxruntime(path, [(1, 3, 256, 256)], arena=False, runs=1)
        >>> m.backend, m.peak_bytes > 4 * 2**20  # the 4 MiB output map shows up
        ('onnxruntime, no arena', True)
    """
    backend = "onnxruntime, arena" if arena else "onnxruntime, no arena"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-c", _ORT_CHILD, str(path), "1" if arena else "0", str(threads), str(runs),
           json.dumps([list(s) for s in input_shapes])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise MemplanError(f"onnxruntime measurement of {path} took over {timeout:.0f} s") from e
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln[0].isspace()]
        error = next((ln for ln in reversed(lines) if not ln.startswith("Traceback")), "(no output)")
        raise MemplanError(f"onnxruntime measurement of {path} failed: {error}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    input_bytes = sum(4 * _numel(s) for s in input_shapes)
    method = "child process: VmHWM - VmRSS before one run + input" + (
        "" if doc["reset"] else " (peak RSS could not be reset: session creation may be included)")
    return Measurement(backend, doc["peak"] - doc["baseline"] + input_bytes, method, NOTES[backend],
                       latency_ms=doc["latency_ms"])


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def measure(
    model: str | nn.Module, input_shape: Sequence[int] | None = None, *, name: str = "", runs: int = 5,
    threads: int = 0,
) -> MeasureReport:
    """Theory and measurements for a model spec, an ``nn.Module`` or an ``.onnx`` file (module docstring).

    A PyTorch model is measured in eager PyTorch (CPU, and CUDA when present) and, exported with
    BN folded (:func:`memplan.export.export_onnx`), in onnxruntime. An ONNX file is measured in
    onnxruntime only.

    Example:
        >>> r = measure("zoo:resnet_tiny", runs=1)
        >>> [m.backend for m in r.measured]
        ['torch eager CPU', 'torch CUDA', 'onnxruntime, no arena', 'onnxruntime, arena']
    """
    from memplan.analyze import analyze
    from memplan.onnx_frontend import analyze_onnx, load_onnx, set_input_dims
    from memplan.onnx_ort import analyze_ort_optimized
    from memplan.specs import default_input, load_model

    is_onnx = isinstance(model, (str, Path)) and str(model).endswith(".onnx")
    with tempfile.TemporaryDirectory() as tmp:
        if is_onnx:  # a static copy: onnxruntime runs the shape that is analysed (symbolic batch = 1)
            label = name or str(model)
            path = Path(tmp) / "static.onnx"
            onnx.save(set_input_dims(load_onnx(model), [input_shape] if input_shape else None), str(path))
            deploy = analyze_onnx(path)
            shape = deploy.input_shape
            theory = [Estimate("deploy", deploy.peak_bytes),
                      Estimate("deploy + in-place eltwise", analyze_onnx(path, inplace_elementwise=True).peak_bytes)]
            measured = []
        else:
            from memplan.export import export_onnx

            label = name or (model if isinstance(model, str) else type(model).__name__)
            module = load_model(model) if isinstance(model, str) else model
            shape = list(input_shape or (default_input(model) if isinstance(model, str) else (1, 3, 224, 224)))
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            theory = [Estimate(f, analyze(module, x, form=f).peak_bytes) for f in ("deploy", "as-written")]
            theory.append(Estimate("deploy + in-place eltwise", analyze(module, x, inplace_elementwise=True).peak_bytes))
            measured = [measure_torch_cpu(module, x), measure_torch_cuda(module, x)]
            path = Path(tmp) / "model.onnx"
            export_onnx(module, x, path, random_samples=1)
        theory.append(Estimate("onnxruntime's optimized graph",
                               analyze_ort_optimized(path, input_shapes=[shape]).peak_bytes))
        measured += [measure_onnxruntime(path, [shape], arena=a, threads=threads, runs=runs) for a in (False, True)]
    return MeasureReport(model=label, input_shape=list(shape), input_bytes=4 * _numel(shape), theory=theory,
                         measured=measured)
