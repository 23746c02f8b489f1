"""Hand-computed peaks on tiny graphs, the paper's numbers, and the capture fallbacks (docs/definitions.md §1-§3)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memplan import CaptureError, MemplanError, analyze, capture
from memplan.liveness import lifetimes

F32 = 4


def peak(model, shape, **kw):
    return analyze(model, shape, **kw).peak_bytes


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1)
        self.b = nn.Conv2d(2, 4, 1)
        self.c = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_chain():
    # 4x4 maps: input 16 el, a 32, b 64, c 16 -> steps: in+a=48, a+b=96, b+c=80 elements
    r = analyze(Chain(), (1, 1, 4, 4))
    assert [t.live_bytes for t in r.timeline] == [48 * F32, 96 * F32, 80 * F32]
    assert r.peak_bytes == 96 * F32 and r.peak_node == "b"
    assert r.input_bytes == 16 * F32
    assert r.activation_sum_bytes == (32 + 64 + 16) * F32
    assert r.param_bytes == sum(p.numel() for p in Chain().parameters()) * F32


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


def test_residual_add_forms():
    n = 3 * 4 * 4 * F32  # every tensor has the same size
    # as written: conv | bn (conv, bn, x live) | add (bn, x, add) | relu (add, relu)
    aw = analyze(Residual(), (1, 3, 4, 4), form="as-written")
    assert [t.live_bytes for t in aw.timeline] == [2 * n, 3 * n, 3 * n, 2 * n]
    # deploy: bn folded into conv, relu in place on the add's output
    dp = analyze(Residual(), (1, 3, 4, 4), form="deploy")
    assert [t.live_bytes for t in dp.timeline] == [2 * n, 2 * n, 3 * n, n]
    assert dp.peak_node == "add"
    # MayInplace: the add overwrites the conv output, which only it reads
    mi = analyze(Residual(), (1, 3, 4, 4), form="deploy", inplace_elementwise=True)
    assert mi.peak_bytes == 2 * n


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1)
        self.b = nn.Conv2d(2, 5, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_concat():
    hw = 2 * 2
    r = analyze(Concat(), (1, 2, 2, 2))
    # a: in+a | b: in+a+b | cat: a+b+cat(8)
    assert [t.live_bytes for t in r.timeline] == [(2 + 3) * hw * F32, (2 + 3 + 5) * hw * F32, 16 * hw * F32]


class SplitChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.head = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        a, b = torch.chunk(self.conv(x), 2, dim=1)
        c, d = torch.split(b, 1, dim=1)
        return self.head(a) * c + d


def test_split_chunk_are_aliases_of_their_base():
    hw = 3 * 3 * F32
    r = analyze(SplitChunk(), (1, 1, 3, 3))
    # conv output (4 ch) stays live until its last piece (d) is read by the final add
    sizes = {t.node: t.live_bytes for t in r.timeline}
    assert sizes["conv"] == (1 + 4) * hw
    assert sizes["head"] == (4 + 2) * hw  # input died after conv
    assert sizes["mul"] == (4 + 2 + 2) * hw  # head(a) * c broadcasts to 2 channels
    assert sizes["add"] == (4 + 2 + 2) * hw  # head's output died at mul
    assert r.peak_bytes == 8 * hw
    assert {t.node for t in r.timeline} >= {"chunk", "split", "getitem"}


class ViewChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        y = self.conv(x).flatten(1).view(1, -1).reshape(1, 32)
        return self.fc(y)


def test_view_chain_is_free_and_extends_life():
    r = analyze(ViewChain(), (1, 1, 4, 4))
    live = {t.node: t.live_bytes for t in r.timeline}
    assert live["flatten"] == live["view"] == live["reshape"] == 32 * F32
    assert live["fc"] == (32 + 3) * F32
    assert r.activation_sum_bytes == (32 * 4 + 3) * F32  # aliases are listed by per-layer sums


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.conv(x))
        y.add_(x)
        return torch.sigmoid(y)


def test_inplace_relu_and_add_cost_nothing_new():
    n = 2 * 2 * 2 * F32
    r = analyze(InPlace(), (1, 2, 2, 2), form="as-written")
    assert [t.live_bytes for t in r.timeline] == [2 * n, 2 * n, 2 * n, 2 * n]
    g = r.graph
    assert [len(o.writes) for o in g.ops] == [1, 0, 0, 1]
    assert g.ops[2].mutates  # add_ writes into the conv's storage


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 1, 1)
        self.b = nn.Conv2d(1, 1, 1)
        self.c = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        a = self.a(x)
        return a, self.c(self.b(a))


def test_multiple_outputs_live_to_the_end():
    n = 4 * F32
    r = analyze(TwoOutputs(), (1, 1, 2, 2))
    assert [t.live_bytes for t in r.timeline] == [2 * n, 2 * n, 3 * n]
    ends = {r.graph.storages[lt.storage].producer: lt.end for lt in r.lifetimes}
    assert ends["a"] == ends["c"] == 2 and ends["b"] == 2


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.Hardswish()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.act(self.bn(self.conv(x))))


def test_as_written_vs_deploy():
    hw = 8 * 8
    aw = analyze(ConvBnRelu(), (1, 1, 8, 8), form="as-written")
    dp = analyze(ConvBnRelu(), (1, 1, 8, 8), form="deploy")
    assert aw.peak_bytes == 8 * hw * F32  # bn out + hardswish out
    assert dp.peak_bytes == 5 * hw * F32  # input + conv out (bn folded, act in place)
    assert dp.form == "deploy" and aw.form == "as-written"


def test_dtype_what_if():
    shape = (1, 1, 8, 8)
    assert peak(ConvBnRelu(), shape, dtype="int8") * 4 == peak(ConvBnRelu(), shape)
    assert peak(ConvBnRelu(), shape, dtype="float16") * 2 == peak(ConvBnRelu(), shape)


class ShapeBranch(nn.Module):
    """Control flow on the input's shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.big = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.block(x)
        if y.shape[-1] > 16:
            y = self.big(y)
        return y


def test_export_fallback_keeps_module_paths():
    r = analyze(ShapeBranch(), (1, 3, 32, 32), form="as-written")
    assert r.method == "export"
    assert {t.module for t in r.timeline} >= {"block.0", "big"}
    # in, conv(4x32x32) | relu out | big out 4x16x16
    assert r.peak_bytes == (4 * 32 * 32 * 2) * F32
    assert analyze(ShapeBranch(), (1, 3, 32, 32)).peak_bytes == (3 + 4) * 32 * 32 * F32


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.head(x)
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.stem(x))


def test_uncapturable_model_names_module_and_reason():
    with pytest.raises(CaptureError) as e:
        capture(Outer(), torch.empty(1, 3, 4, 4))
    msg = str(e.value)
    assert "Outer.gate" in msg and "torch.export failed" in msg and "\n" not in msg


def test_bad_shape():
    with pytest.raises(MemplanError):
        analyze(Chain(), (1, 0, 4))


def test_lifetimes_reject_bad_order():
    r = analyze(Chain(), (1, 1, 4, 4))
    with pytest.raises(ValueError):
        lifetimes(r.graph, ["a", "b"])


def test_huge_input_allocates_no_activations():
    # resnet18 at 2048x2048 would need >1 GiB of real activations; fake tensors need none
    code = (
        "import resource, torch; from memplan import analyze; from memplan.zoo import create_model\n"
        "m = create_model('resnet18')\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "r = analyze(m, (1, 3, 2048, 2048))\n"
        "print(r.peak_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    peak_bytes, grown_kib = int(out[0]), int(out[1])
    assert peak_bytes == (64 * 1024 * 1024 + 64 * 512 * 512) * F32
    assert grown_kib < 200 * 1024
