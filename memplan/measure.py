"""Measured peak activation memory next to the theoretical one (docs/definitions.md §1).

Three measurements, each counting the input like the theory does:

- **torch eager, CPU**: ``torch.profiler`` with ``profile_memory=True``; the peak of the running
  sum of its allocation/free events during one ``no_grad`` forward, plus the input.
- **torch CUDA** (when a GPU is present): ``max_memory_allocated`` above the allocated bytes before
  the forward, plus the input.
- **onnxruntime, the clean method** (:func:`measure_onnxruntime`): a child process (numpy and
  onnxruntime only), 1 intra-op thread, memory patterns off and the CPU arena off (or on: a fresh
  session per sample), ``MALLOC_MMAP_THRESHOLD_=65536`` so a freed tensor goes back to the OS at
  once; two warm-up runs, then for each of 5 samples the peak-RSS counter is reset (writing ``5`` to
  ``/proc/self/clear_refs`` resets ``VmHWM``) and one run's ``VmHWM - VmRSS`` is read; min, median
  and max are kept and the input bytes added. Stable to well under 1 % on the zoo.
- **onnxruntime's allocator trace** (:func:`trace_onnxruntime`, when a C compiler is present): an
  ``LD_PRELOAD`` hook logs every heap block of at least 4 KiB of one warm run;
  :func:`compare_trace` names each block by the predicted tensor it holds, so a difference between
  ``--runtime ort`` and onnxruntime is a list of tensors and nodes.

The torch profiler row stays beside them and differs for known reasons: eager PyTorch runs the
as-written graph (BN not folded, out-of-place activations), keeps max-pool indices and allocates
oneDNN scratch, none of which onnxruntime's optimized graph does.

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
import itertools
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

__all__ = ["AllocTrace", "Estimate", "MeasureReport", "Measurement", "TraceComparison", "compare_trace", "measure",
           "measure_onnxruntime", "measure_torch_cpu", "measure_torch_cuda", "trace_onnxruntime"]

NOTES = {
    "torch eager CPU": "runs as written (BN not folded, activations in place only where the code says so); "
                       "max_pool2d also keeps int64 indices; oneDNN reorders weights and allocates conv "
                       "scratch per call",
    "torch CUDA": "caching allocator rounds blocks up to 512 B; cuDNN workspaces count; as-written graph",
    "onnxruntime, no arena": "what '--runtime ort' predicts: onnxruntime's optimized graph (fusions; on x86 the "
                             "NCHWc layout, channels padded to the block size, reorder copies) in its own order, "
                             "its in-place kernels, their scratch (int8 conv accumulators, im2col) and planner frees; "
                             "RSS adds 4 KiB pages, untouched tails and the heap's fragmentation under 64 KiB",
    "onnxruntime, arena": "as above through the BFC arena ('--runtime ort-arena'): power-of-two regions it keeps; "
                          "RSS counts only the pages a run touches",
    "onnxruntime, no reuse": "arena off and SessionOptions.enable_mem_reuse = False ('--runtime ort-noreuse'): no "
                             "freed buffer is handed to a later tensor, so none stays allocated between its users "
                             "(a patched model's patches are then freed one by one); more, smaller heap blocks",
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
    samples: tuple[int, ...] = ()  # repeated measurements, sorted (min = first, max = last)


@dataclass
class MeasureReport:
    """Theory and measurements for one model and input shape."""

    model: str
    input_shape: list[int]
    input_bytes: int
    theory: list[Estimate]
    measured: list[Measurement]
    extra: dict[str, Any] = field(default_factory=dict)
    input_dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``memplan measure --json``)."""
        return asdict(self)

    def format(self) -> str:
        """The table ``memplan measure`` prints: each measurement relative to the deploy-form theory."""
        from memplan.report import fmt_bytes

        ref = self.theory[0].peak_bytes
        lines = [f"model   {self.model}", f"input   {'x'.join(map(str, self.input_shape))} {self.input_dtype} "
                 f"({fmt_bytes(self.input_bytes)}, counted in every row)", "",
                 f"  {'':<40} {'peak':>12} {'vs ' + self.theory[0].label:>12} {'latency':>10}"]
        for e in self.theory:
            lines.append(f"  {'theory: ' + e.label:<40} {fmt_bytes(e.peak_bytes):>12} {e.peak_bytes / ref:>11.2f}x")
        for m in self.measured:
            peak = fmt_bytes(m.peak_bytes) if m.peak_bytes is not None else "n/a"
            ratio = f"{m.peak_bytes / ref:.2f}x" if m.peak_bytes is not None else ""
            lat = f"{m.latency_ms:.1f} ms" if m.latency_ms is not None else ""
            spread = (f"  min {fmt_bytes(m.samples[0])} / max {fmt_bytes(m.samples[-1])}"
                      if len(m.samples) > 1 else "")
            lines.append(f"  {'measured: ' + m.backend:<40} {peak:>12} {ratio:>12} {lat:>10}{spread}")
        lines += ["", "why they differ:"] + [f"  {m.backend}: {m.note}" for m in self.measured]
        lines += [f"  ({m.backend}: {m.method})" for m in self.measured if m.peak_bytes is not None]
        if "ort_trace" in self.extra:
            t = self.extra["ort_trace"]
            lines += ["", "onnxruntime vs --runtime ort, tensor by tensor:",
                      TraceComparison(**{**t, "extra_allocations": [tuple(x) for x in t["extra_allocations"]],
                                         "missing_buffers": [tuple(x) for x in t["missing_buffers"]],
                                         "steps": [tuple(x) for x in t["steps"]]}).format()]
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

path, arena, threads, repeats, runs = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
shapes, trace, trim_heap, mem_reuse = json.loads(sys.argv[6]), sys.argv[7], sys.argv[8] == "1", sys.argv[9] == "1"

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False

def session():
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.enable_mem_pattern = False
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_mem_reuse = mem_reuse
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

def trim():  # hand the heap's free pages back, so a run that needs them again is seen touching them
    if trim_heap and libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))

try:
    libc = ctypes.CDLL("libc.so.6")
except OSError:
    libc = None
sess = session()
rng = np.random.default_rng(0)
def feed(kind, shape):  # a float input gets normal noise, an integer one its type's full range
    dtype = np.dtype({"float": "float32", "double": "float64", "float16": "float16"}.get(kind, kind))
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -128), min(info.max, 255) + 1, shape).astype(dtype)

feeds = {i.name: feed(i.type[len("tensor("):-1], s) for i, s in zip(sess.get_inputs(), shapes)}
sess.run(None, feeds)
sess.run(None, feeds)  # two warm-ups: code pages, lazily built kernels, the heap's small-block pool
if trace:
    hook = ctypes.CDLL(None)
    hook.memplan_trace_start(ctypes.c_size_t(4096))
    sess.run(None, feeds)
    hook.memplan_trace_stop(trace.encode())
samples, reset = [], True
for _ in range(repeats):
    if arena:  # a fresh arena per sample: a warm one already holds the run's memory
        del sess
        sess = session()
    trim()
    reset &= reset_peak()
    base = status("VmRSS")
    out = sess.run(None, feeds)
    samples.append(status("VmHWM") - base)
    del out
times = []
for _ in range(runs):
    t = time.perf_counter()
    sess.run(None, feeds)
    times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"samples": samples, "reset": reset, "input_bytes": sum(f.nbytes for f in feeds.values()),
                  "latency_ms": 1e3 * times[len(times) // 2] if times else None}))
"""

# An allocator hook for the per-tensor trace: records every malloc/posix_memalign/free of at least
# ``min`` bytes between memplan_trace_start and memplan_trace_stop (glibc's __libc_* underneath).
_HOOK_C = r"""
#include <stddef.h>
#include <stdio.h>
#include <errno.h>
extern void *__libc_malloc(size_t); extern void __libc_free(void *); extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t); extern void *__libc_memalign(size_t, size_t);
#define CAP 2000000
static struct { void *p; size_t n; } rec[CAP];
static long cnt; static volatile int on; static size_t minsz = 4096;
static void add(void *p, size_t n) { if (on && cnt < CAP) { rec[cnt].p = p; rec[cnt].n = n; cnt++; } }
void memplan_trace_start(size_t m) { minsz = m; cnt = 0; on = 1; }
long memplan_trace_stop(const char *path) {
  on = 0; FILE *f = fopen(path, "w"); if (!f) return -1;
  for (long i = 0; i < cnt; i++) fprintf(f, "%c %p %zu\n", rec[i].n ? '+' : '-', rec[i].p, rec[i].n);
  fclose(f); return cnt; }
void *malloc(size_t n) { void *p = __libc_malloc(n); if (n >= minsz) add(p, n); return p; }
void *calloc(size_t a, size_t b) { void *p = __libc_calloc(a, b); if (a * b >= minsz) add(p, a * b); return p; }
void *realloc(void *q, size_t n) { if (q) add(q, 0); void *p = __libc_realloc(q, n); if (n >= minsz) add(p, n); return p; }
void free(void *p) { if (p) add(p, 0); __libc_free(p); }
void *memalign(size_t a, size_t n) { void *p = __libc_memalign(a, n); if (n >= minsz) add(p, n); return p; }
void *aligned_alloc(size_t a, size_t n) { return memalign(a, n); }
int posix_memalign(void **r, size_t a, size_t n) {
  void *p = __libc_memalign(a, n); if (!p) return ENOMEM; if (n >= minsz) add(p, n); *r = p; return 0; }
"""


def _allocator_hook() -> Path | None:
    """The hook as a shared library (built once with the system C compiler); None when there is none."""
    import hashlib
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not sys.platform.startswith("linux"):
        return None
    out = Path(tempfile.gettempdir()) / f"memplan-alloc-hook-{hashlib.sha1(_HOOK_C.encode()).hexdigest()[:12]}.so"
    if not out.exists():
        src = out.with_suffix(".c")
        src.write_text(_HOOK_C)
        tmp = out.with_suffix(f".{os.getpid()}.so")
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(tmp)], capture_output=True,
                              check=False)
        if proc.returncode != 0:
            return None
        os.replace(tmp, out)
    return out


@dataclass(frozen=True)
class AllocTrace:
    """The heap blocks (>= 4 KiB) one onnxruntime run allocated and freed, in order: ``(+1 | -1, bytes)``."""

    events: tuple[tuple[int, int], ...]

    @property
    def peak_bytes(self) -> int:
        """The peak of the running sum of the traced blocks."""
        cur = peak = 0
        for sign, n in self.events:
            cur += sign * n
            peak = max(peak, cur)
        return peak


def _run_child(path: str | Path, input_shapes: Sequence[Sequence[int]], *, arena: bool, threads: int, repeats: int,
               runs: int, timeout: float, trace: Path | None = None, preload: Path | None = None,
               mmap_threshold: int = 65536, trim_heap: bool = True, mem_reuse: bool = True) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(mmap_threshold), MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    cmd = [sys.executable, "-c", _ORT_CHILD, str(path), "1" if arena else "0", str(threads), str(repeats), str(runs),
           json.dumps([list(s) for s in input_shapes]), str(trace or ""), "1" if trim_heap else "0",
           "1" if mem_reuse else "0"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise MemplanError(f"onnxruntime measurement of {path} took over {timeout:.0f} s") from e
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln[0].isspace()]
        error = next((ln for ln in reversed(lines) if not ln.startswith("Traceback")), "(no output)")
        raise MemplanError(f"onnxruntime measurement of {path} failed: {error}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trace_onnxruntime(path: str | Path, input_shapes: Sequence[Sequence[int]], *, timeout: float = 600.0,
                      mem_reuse: bool = True) -> AllocTrace | None:
    """The allocation trace of one warm onnxruntime run (arena off, 1 thread; ``mem_reuse=False``:
    ``SessionOptions.enable_mem_reuse`` off), or None without a C compiler.

    Example:
        >>> import tempfile, torch
        >>> from memplan.export import export_onnx
        >>> path = tempfile.mkdtemp() + "/n.onnx"
        >>> _ = export_onnx(torch.nn.Conv2d(3, 16, 3, padding=1), torch.zeros(1, 3, 64, 64), path)
        >>> t = trace_onnxruntime(path, [(1, 3, 64, 64)])
        >>> t is None or t.peak_bytes >= 16 * 64 * 64 * 4  # the output map was allocated
        True
    """
    hook = _allocator_hook()
    if hook is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "trace.txt"
        _run_child(path, input_shapes, arena=False, threads=1, repeats=0, runs=0, timeout=timeout, trace=log,
                   preload=hook, mem_reuse=mem_reuse)
        live: dict[str, int] = {}
        events = []
        for line in log.read_text().splitlines():
            kind, ptr, n = line.split()
            if kind == "+":
                live[ptr] = int(n)
                events.append((1, int(n)))
            elif ptr in live:
                events.append((-1, live.pop(ptr)))
    return AllocTrace(tuple(events))


def measure_onnxruntime(
    path: str | Path, input_shapes: Sequence[Sequence[int]], *, arena: bool = False, threads: int = 1,
    repeats: int = 5, runs: int = 5, timeout: float = 600.0, mmap_threshold: int = 65536, trim_heap: bool = True,
    mem_reuse: bool = True, sessions: int = 1,
) -> Measurement:
    """The clean method: peak RSS growth of one onnxruntime run in a child process, plus the input bytes.

    The child runs ``threads`` intra-op threads (1: no per-thread buffers), the CPU arena off (or
    on, a fresh session per sample) and memory patterns off, with ``MALLOC_MMAP_THRESHOLD_=65536``
    so every freed tensor goes back to the OS at once; after two warm-up runs it hands the heap's free
    pages back (``malloc_trim``, unless ``trim_heap`` is False: then blocks under the threshold reuse
    pages RSS growth cannot see) and resets the peak-RSS counter (``/proc/self/clear_refs``) before
    each of ``repeats`` measured runs. ``peak_bytes`` is the
    median, ``samples`` all of them. ``runs`` more runs give the median latency. ``sessions`` > 1
    measures that many child processes, each its own session: onnxruntime may run a graph of
    parallel branches in another order in each (:func:`memplan.ort_runtime.predict_ort`), and
    ``peak_bytes`` is then the highest session's median.

    Example:
        >>> import tempfile, torch
        >>> from memplan.export import export_onnx
        >>> path = tempfile.mkdtemp() + "/n.onnx"
        >>> _ = export_onnx(torch.nn.Conv2d(3, 16, 3, padding=1), torch.zeros(1, 3, 256, 256), path)
        >>> m = measure_onnxruntime(path, [(1, 3, 256, 256)], repeats=3, runs=1)
        >>> from memplan.ort_runtime import predict_ort
        >>> p = predict_ort(path)  # input 0.75 MiB, the conv's 4 MiB NCHWc map and its 4 MiB NCHW copy
        >>> m.backend, p.peak_bytes // 2**18, abs(m.peak_bytes / p.peak_bytes - 1) < 0.1
        ('onnxruntime, no arena', 35, True)
    """
    backend = "onnxruntime, arena" if arena else "onnxruntime, no arena" if mem_reuse else "onnxruntime, no reuse"
    docs = [_run_child(path, input_shapes, arena=arena, threads=threads, repeats=max(1, repeats), runs=runs,
                       timeout=timeout, mmap_threshold=mmap_threshold, trim_heap=trim_heap, mem_reuse=mem_reuse)
            for _ in range(max(1, sessions))]
    medians, samples_all = [], []
    for doc in docs:
        per = sorted(s + doc["input_bytes"] for s in doc["samples"])
        medians.append(per[len(per) // 2])
        samples_all += per
    samples = tuple(sorted(samples_all))
    trimmed = ", heap trimmed" if trim_heap else ""
    per_session = f"median of {len(samples) // len(docs)} + input" + (
        f", the highest of {len(docs)} sessions" if len(docs) > 1 else "")
    method = (f"child process, {threads} thread(s), arena {'on' if arena else 'off'}, memory patterns off, "
              f"MALLOC_MMAP_THRESHOLD_={mmap_threshold}{trimmed}; VmHWM - VmRSS over one run after 2 warm-ups, "
              f"{per_session}") + ("" if all(d["reset"] for d in docs) else " (peak RSS could not be reset)")
    latencies = sorted(d["latency_ms"] for d in docs if d["latency_ms"] is not None)
    return Measurement(backend, max(medians), method, NOTES[backend],
                       latency_ms=latencies[len(latencies) // 2] if latencies else None, samples=samples)


def available_memory() -> int:
    """Bytes the kernel says a new allocation can get (``MemAvailable``), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def check_fits(needed_bytes: int, what: str) -> None:
    """Refuse to run a measurement that needs more than 80% of the available memory (one-line error).

    >>> check_fits(1, "tiny")
    >>> check_fits(2**62, "huge")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    memplan.errors.MemplanError: measuring huge would need about ... of memory ...
    """
    available = available_memory()
    if available and needed_bytes > 0.8 * available:
        from memplan.report import fmt_bytes

        raise MemplanError(f"measuring {what} would need about {fmt_bytes(needed_bytes)} of memory (activations and "
                           f"weights), more than the {fmt_bytes(available)} available: analyse it instead (memplan "
                           "analyze never allocates activations)")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def measure(
    model: str | nn.Module, input_shape: Sequence[int] | None = None, *, name: str = "", runs: int = 5,
    threads: int = 1, repeats: int = 5, trace: bool = False,
) -> MeasureReport:
    """Theory and measurements for a model spec, an ``nn.Module`` or an ``.onnx`` file (module docstring).

    A PyTorch model is measured in eager PyTorch (CPU, and CUDA when present) and, exported with
    BN folded (:func:`memplan.export.export_onnx`), in onnxruntime by the clean method
    (:func:`measure_onnxruntime`, arena off and on, ``repeats`` samples each). An ONNX file is measured
    in onnxruntime only. Beside them: the ``--runtime ort`` / ``ort-arena`` predictions and, with
    ``trace`` (and a C compiler), the allocator trace that says which tensors a difference comes from.

    Example:
        >>> r = measure("zoo:resnet_tiny", runs=1, repeats=1, trace=False)
        >>> [m.backend for m in r.measured]
        ['torch eager CPU', 'torch CUDA', 'onnxruntime, no arena', 'onnxruntime, arena', 'onnxruntime, no reuse']
    """
    from memplan.analyze import analyze
    from memplan.onnx_frontend import analyze_onnx, load_onnx, set_input_dims
    from memplan.onnx_ort import analyze_ort_optimized
    from memplan.ort_runtime import RUNTIMES, plan_ort, sample_orders, worst_plan
    from memplan.specs import default_input, load_model

    is_onnx = isinstance(model, (str, Path)) and str(model).endswith(".onnx")
    with tempfile.TemporaryDirectory() as tmp:
        if is_onnx:  # a static copy: onnxruntime runs the shape that is analysed (symbolic batch = 1)
            label = name or str(model)
            path = Path(tmp) / "static.onnx"
            onnx.save(set_input_dims(load_onnx(model), [input_shape] if input_shape else None), str(path))
            deploy = analyze_onnx(path)
            shape = deploy.input_shape
            check_fits(deploy.peak_bytes + deploy.param_bytes, label)
            theory = [Estimate("deploy", deploy.peak_bytes),
                      Estimate("deploy + in-place eltwise", analyze_onnx(path, inplace_elementwise=True).peak_bytes)]
            measured = []
        else:
            from memplan.export import export_onnx

            label = name or (model if isinstance(model, str) else type(model).__name__)
            module = load_model(model) if isinstance(model, str) else model
            shape = list(input_shape or (default_input(model) if isinstance(model, str) else (1, 3, 224, 224)))
            meta = torch.empty(shape, device="meta")  # the analysis allocates nothing
            theory = [Estimate(f, analyze(module, meta, form=f).peak_bytes) for f in ("deploy", "as-written")]
            theory.append(Estimate("deploy + in-place eltwise",
                                   analyze(module, meta, inplace_elementwise=True).peak_bytes))
            params = sum(p.numel() * p.element_size() for p in module.parameters())
            check_fits(theory[1].peak_bytes + params, label)  # eager PyTorch holds the as-written peak
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            measured = [measure_torch_cpu(module, x), measure_torch_cuda(module, x)]
            path = Path(tmp) / "model.onnx"
            export_onnx(module, x, path, random_samples=1)
        theory.append(Estimate("onnxruntime's optimized graph",
                               analyze_ort_optimized(path, input_shapes=[shape]).peak_bytes))
        orders = sample_orders(path, [shape])  # every runtime planned on the same sampled orders
        plan = worst_plan(orders)
        theory += [Estimate(f"predicted: --runtime {runtime}", worst_plan(orders, runtime).peak_bytes)
                   for runtime in RUNTIMES]
        measured += [measure_onnxruntime(path, [shape], arena=a, threads=threads, repeats=repeats, runs=runs)
                     for a in (False, True)]
        measured.append(measure_onnxruntime(path, [shape], threads=threads, repeats=repeats, runs=runs,
                                            mem_reuse=False))
        extra: dict[str, Any] = {}
        if trace:
            traced = trace_onnxruntime(path, [shape])
            if traced is not None:
                no_arena = next(m for m in measured if m.backend == "onnxruntime, no arena")
                extra["ort_trace"] = asdict(compare_trace(plan_ort(plan.graph), traced, no_arena.peak_bytes))
    x_name = plan.graph.inputs[0]  # the file's own input type (an integer-input int8 file takes uint8)
    return MeasureReport(model=label, input_shape=list(shape), input_bytes=plan.graph.nbytes[x_name], theory=theory,
                         measured=measured, extra=extra, input_dtype=plan.graph.dtypes.get(x_name, "float32"))


@dataclass(frozen=True)
class TraceComparison:
    """The predicted plan against onnxruntime's traced allocations (blocks >= 4 KiB), per tensor and per step.

    ``steps``: (node, predicted live bytes, traced live bytes) after each node's allocations, both
    with the inputs; ``extra_allocations``: traced blocks no predicted buffer accounts for (kernel
    workspaces), with the node they came during; ``missing_buffers``: predicted buffers (>= 4 KiB)
    the trace never allocated; ``rss_minus_trace``: measured RSS peak minus the traced peak (page
    granularity, pages never touched, heap fragmentation, the kernel's lazily updated RSS counters).
    """

    predicted_peak_bytes: int
    traced_peak_bytes: int
    matched: int
    extra_allocations: list[tuple[str, int]]
    missing_buffers: list[tuple[str, int]]
    rss_minus_trace: int | None
    steps: list[tuple[str, int, int]]

    def format(self) -> str:
        """The lines ``memplan measure`` prints under the table."""
        from memplan.report import fmt_bytes

        lines = [f"  allocator trace: peak {fmt_bytes(self.traced_peak_bytes)} vs predicted "
                 f"{fmt_bytes(self.predicted_peak_bytes)} ({self.matched} predicted buffers allocated as planned)"]
        worst = max(self.steps, key=lambda s: abs(s[2] - s[1]), default=None)
        if worst is not None and worst[2] != worst[1]:
            lines.append(f"  largest per-node gap: {fmt_bytes(worst[2] - worst[1])} at '{worst[0]}'")
        for label, items in (("allocated but not predicted", self.extra_allocations),
                             ("predicted but not allocated", self.missing_buffers)):
            if items:
                total = sum(n for _, n in items)
                shown = ", ".join(f"{fmt_bytes(n)} at {t}" for t, n in sorted(items, key=lambda i: -i[1])[:4])
                lines.append(f"  {label}: {len(items)} blocks, {fmt_bytes(total)} ({shown})")
        if self.rss_minus_trace is not None:
            lines.append(f"  RSS - traced peak: {fmt_bytes(self.rss_minus_trace)} (4 KiB pages, allocations under "
                         "4 KiB, glibc's heap fragmentation for blocks under MALLOC_MMAP_THRESHOLD_, lazily "
                         "updated RSS counters)")
        return "\n".join(lines)


def compare_trace(plan: Any, trace: AllocTrace, measured_bytes: int | None = None) -> TraceComparison:
    """Align ``trace`` with ``plan`` (an :class:`memplan.ort_runtime.OrtPlan`): traced allocations are
    matched in order to the predicted buffers of the same size, so each traced block is named by
    the tensor it holds, and the unmatched ones say where onnxruntime differs.

    Example:
        >>> from memplan.ort_runtime import OrtGraph, OrtNode, plan_ort
        >>> g = OrtGraph(nodes=[OrtNode("r", "", "Relu", ("x",), ("a",)), OrtNode("n", "", "Neg", ("a",), ("y",))],
        ...              nbytes={"x": 8192, "a": 8192, "y": 8192}, shapes={}, planner_shapes={},
        ...              inputs=["x"], outputs=["y"], initializers=set())
        >>> c = compare_trace(plan_ort(g), AllocTrace(((1, 8192), (1, 65536), (-1, 65536), (1, 8192), (-1, 8192))))
        >>> c.matched, c.extra_allocations, c.traced_peak_bytes
        (2, [('r', 65536)], 81920)
    """
    buffers = [b for b in plan.buffers if b.nbytes >= 4096]
    alloc_events = [(b.alloc_step, i) for i, b in enumerate(buffers)]
    alloc_events.sort()
    pending = [buffers[i] for _, i in alloc_events]
    cursor = 0
    live: dict[int, tuple[int, str]] = {}  # open traced block id -> (bytes, tensor or "")
    open_blocks: list[tuple[int, int]] = []  # (bytes, id) stack for frees by size
    extra: list[tuple[str, int]] = []
    matched = 0
    step_node = plan.graph.nodes[0].name if plan.graph.nodes else ""
    traced_at_step: dict[str, int] = {}
    cur = peak = 0
    for k, (sign, n) in enumerate(trace.events):
        if sign > 0:
            j = next((j for j in range(cursor, min(cursor + 8, len(pending))) if pending[j].nbytes == n), None)
            if j is not None:
                for skipped in pending[cursor:j]:
                    extra.append((skipped.tensor, -skipped.nbytes))
                b = pending[j]
                cursor = j + 1
                step_node = plan.graph.nodes[b.alloc_step].name
                matched += 1
                live[k] = (n, b.tensor)
            else:
                extra.append((step_node, n))
                live[k] = (n, "")
            open_blocks.append((n, k))
            cur += n
        else:
            idx = next((i for i in range(len(open_blocks) - 1, -1, -1) if open_blocks[i][0] == n), None)
            if idx is not None:
                live.pop(open_blocks.pop(idx)[1], None)
            cur -= n
        peak = max(peak, cur)
        traced_at_step[step_node] = max(traced_at_step.get(step_node, 0), cur)
    missing = [(b.tensor, b.nbytes) for b in pending[cursor:]] + [(t, -n) for t, n in extra if n < 0]
    extra = [(t, n) for t, n in extra if n > 0]
    inputs = plan.input_bytes
    seen = [0] * (len(plan.graph.nodes) + 1)  # the predicted buffers the hook sees (>= 4 KiB) live per step
    for b in buffers:
        seen[b.alloc_step] += b.nbytes
        seen[b.free_step + 1] -= b.nbytes
    live = list(itertools.accumulate(seen[:-1]))
    steps = [(node.name, live[i] + inputs, traced_at_step[node.name] + inputs)
             for i, node in enumerate(plan.graph.nodes) if node.name in traced_at_step]
    return TraceComparison(predicted_peak_bytes=max(live, default=0) + inputs, traced_peak_bytes=peak + inputs,
                           matched=matched,
                           extra_allocations=extra, missing_buffers=missing,
                           rss_minus_trace=None if measured_bytes is None else measured_bytes - (peak + inputs),
                           steps=steps)
