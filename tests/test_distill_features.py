import pytest
import torch
from torch import nn

from distill.features import FeatureTap, LogitsOnly
from distill.red import REDBlock


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.red = REDBlock(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        return self.head(self.red(self.down(x)))


def test_tap_returns_same_logits_and_feature_shapes():
    torch.manual_seed(0)
    net = ResidualNet().eval()
    tap = FeatureTap(["stem", "add", "red", "down"])
    tapped = tap.prepare(net).eval()
    x = torch.randn(2, 1, 8, 8)
    logits, feats = tap(tapped, x)
    torch.testing.assert_close(logits, net(x))
    assert [tuple(f.shape) for f in feats] == [(2, 4, 8, 8), (2, 4, 8, 8), (2, 8, 4, 4), (2, 8, 4, 4)]
    torch.testing.assert_close(feats[2], net.red(net.down(feats[1])))


def test_tap_shares_parameters_with_the_original():
    net = ResidualNet()
    tapped = FeatureTap(["red"]).prepare(net)
    assert {id(p) for p in tapped.parameters()} == {id(p) for p in net.parameters()}
    with torch.no_grad():
        net.head[2].bias.fill_(5.0)
    assert torch.equal(tapped.get_submodule("head.2").bias, net.head[2].bias)


def test_tap_is_a_graph_rewrite_not_hooks():
    net = ResidualNet()
    tapped = FeatureTap(["red"]).prepare(net)
    assert all(not m._forward_hooks for m in tapped.modules())
    assert all(not m._forward_hooks for m in net.modules())
    # the tapped container stays a single leaf call
    assert [n.target for n in tapped.graph.nodes if n.op == "call_module"].count("red") == 1


def test_unknown_name_lists_nodes():
    with pytest.raises(ValueError, match="no module call or node named 'nope'.*add"):
        FeatureTap(["nope"]).prepare(ResidualNet())


def test_module_called_twice_is_ambiguous():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    with pytest.raises(ValueError, match="called 2 times"):
        FeatureTap(["conv"]).prepare(Twice())
    # the fx node name of the second call addresses it
    tap = FeatureTap(["conv_1"])
    out, (second,) = tap(tap.prepare(Twice()), torch.randn(1, 2, 3, 3))
    assert torch.equal(out, second)


def test_bad_arguments():
    with pytest.raises(TypeError):
        FeatureTap("red")
    with pytest.raises(ValueError, match="at least one"):
        FeatureTap([])
    with pytest.raises(TypeError, match="prepare"):
        FeatureTap(["red"])(ResidualNet(), torch.randn(1, 1, 8, 8))


def test_logits_only_returns_no_features():
    net = ResidualNet()
    assert LogitsOnly().prepare(net) is net
    logits, feats = LogitsOnly()(net.eval(), torch.randn(1, 1, 8, 8))
    assert logits.shape == (1, 3) and feats == []


def test_tap_on_an_fx_graph_module_by_node_name():
    torch.manual_seed(0)
    net = ResidualNet().eval()
    gm = torch.fx.symbolic_trace(net)  # the form graph-rewrite passes hand over
    red_out = [n.name for n in gm.graph.nodes if n.op == "call_function"][-1]  # RED block's final add
    tap = FeatureTap(["add", red_out])
    x = torch.randn(2, 1, 8, 8)
    logits, (residual, red) = tap(tap.prepare(gm).eval(), x)
    torch.testing.assert_close(logits, net(x))
    assert residual.shape == (2, 4, 8, 8) and red.shape == (2, 8, 4, 4)
    torch.testing.assert_close(red, net.red(net.down(residual)))
