import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import METHODS, DistillMethod, LossInputs, build_objective, register
from memplan.registry import DuplicateNameError


def inputs(**kw):
    defaults = {"student_logits": torch.zeros(1, 2), "labels": torch.tensor([0])}
    return LossInputs(**{**defaults, **kw})


def test_registry_has_mdistiller_names():
    assert {"none", "red-blocks", "kd", "fitnet", "at", "red"} <= set(METHODS)


def test_none_is_plain_cross_entropy_with_weight_one():
    obj = build_objective("none")
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    out = obj(LossInputs(logits, torch.tensor([2])))
    assert obj.task_weight == 1.0 and list(out.terms) == ["task"]
    assert out.total.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([2])).item())
    assert not obj.needs_teacher and not obj.needs_features


def test_red_blocks_only_needs_blocks_but_no_teacher():
    obj = build_objective("red-blocks")
    assert obj.needs_red_blocks and not obj.needs_teacher and obj.task_weight == 1.0


def test_kd_equal_logits_is_zero():
    logits = torch.randn(4, 5)
    out = build_objective("kd")(inputs(student_logits=logits, teacher_logits=logits, labels=torch.arange(4)))
    assert out.terms["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_kd_known_value():
    # T=4: teacher logits [4 ln 3, 0] -> p_t = [3/4, 1/4]; student [0, 0] -> p_s = [1/2, 1/2]
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    obj = build_objective("kd")
    out = obj(inputs(teacher_logits=torch.tensor([[4 * math.log(3.0), 0.0]])))
    assert obj.task_weight == 0.5 and obj.distill_weight == 0.5
    assert out.terms["kd"].item() == pytest.approx(0.5 * 16 * kl, rel=1e-5)
    assert out.terms["task"].item() == pytest.approx(0.5 * math.log(2.0), rel=1e-6)
    assert out.total.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-6)


def test_kd_temperature_option_and_weights():
    obj = build_objective("kd", task_weight=0.1, distill_weight=0.9, options={"kd": {"temperature": 1.0}})
    out = obj(inputs(teacher_logits=torch.tensor([[math.log(3.0), 0.0]])))
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert out.terms["kd"].item() == pytest.approx(0.9 * kl, rel=1e-5)
    assert out.terms["task"].item() == pytest.approx(0.1 * math.log(2.0), rel=1e-6)


def test_at_hand_example():
    s = torch.tensor([[[[1.0, 0.0]]]])  # attention [1, 0]
    t = torch.tensor([[[[0.0, -2.0]]]])  # squared then normalised -> [0, 1]
    at = METHODS["at"]()
    torch.testing.assert_close(at.attention(t), torch.tensor([[0.0, 1.0]]))
    obj = build_objective("at")
    out = obj(inputs(student_feats=[s, s], teacher_feats=[t, t]))
    # per pair mean((a_s - a_t)^2) = 1; summed over 2 pairs; beta 1000; distill weight 0.5
    assert out.terms["at"].item() == pytest.approx(0.5 * 1000 * 2.0)
    same = obj(inputs(student_feats=[s], teacher_feats=[3 * s]))
    assert same.terms["at"].item() == pytest.approx(0.0, abs=1e-6)


def test_at_rejects_spatial_mismatch():
    with pytest.raises(ValueError, match="spatial"):
        build_objective("at")(
            inputs(student_feats=[torch.ones(1, 1, 2, 2)], teacher_feats=[torch.ones(1, 1, 4, 4)])
        )


def test_fitnet_builds_trainable_regressors_and_hand_value():
    obj = build_objective("fitnet")
    s, t = torch.randn(2, 3, 4, 4), torch.full((2, 5, 4, 4), 2.0)
    obj.setup([s], [t])
    reg = obj.methods[0].regressors[0]
    assert reg[0].in_channels == 3 and reg[0].out_channels == 5 and reg[0].kernel_size == (1, 1)
    assert {id(p) for p in reg.parameters()} <= {id(p) for p in obj.parameters()}
    with torch.no_grad():
        reg[0].weight.zero_()
        reg[0].bias.zero_()
    # regressor output is 0 (conv 0, BN of a constant 0, ReLU) -> MSE = mean(2^2) = 4; weight 100
    out = obj(
        inputs(
            student_logits=torch.zeros(2, 2),
            labels=torch.tensor([0, 1]),
            student_feats=[s],
            teacher_feats=[t],
        )
    )
    assert out.terms["fitnet"].item() == pytest.approx(0.5 * 100 * 4.0)
    out.total.backward()
    assert reg[0].weight.grad is not None


def test_fitnet_forward_before_setup_fails():
    with pytest.raises(RuntimeError, match="setup"):
        build_objective("fitnet")(
            inputs(student_feats=[torch.ones(1, 1, 2, 2)], teacher_feats=[torch.ones(1, 1, 2, 2)])
        )


def test_red_averages_attachments_with_alpha():
    x = torch.rand(1, 2, 3, 3) + 0.1
    obj = build_objective("red", options={"red": {"alpha": 10.0}})
    assert obj.needs_red_blocks and obj.needs_features and obj.needs_teacher
    out = obj(inputs(student_feats=[x, x], teacher_feats=[x, -x]))  # losses 0 and 2 -> mean 1
    assert out.terms["red"].item() == pytest.approx(0.5 * 10.0 * 1.0, rel=1e-5)


def test_combination_has_all_terms_and_sums():
    x = torch.rand(2, 2, 3, 3)
    logits = torch.randn(2, 4)
    obj = build_objective("red+kd")
    out = obj(LossInputs(logits, torch.tensor([1, 3]), torch.randn(2, 4), [x], [x * 2]))
    assert list(out.terms) == ["task", "red", "kd"]
    assert out.total.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-6)


def test_setup_checks_feature_pairs():
    obj = build_objective("red")
    with pytest.raises(ValueError, match="matched features"):
        obj.setup([torch.ones(1, 1, 2, 2)], [])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        obj.setup([torch.ones(1, 4)], [torch.ones(1, 4)])


@pytest.mark.parametrize(
    ("spec", "options", "match"),
    [
        ("kdd", None, "unknown distillation method"),
        ("none+kd", None, "cannot be combined"),
        ("kd+kd", None, "repeats"),
        ("kd", {"kd": {"temp": 2}}, "bad options"),
        ("kd", {"kdd": {}}, "unknown methods"),
    ],
)
def test_build_objective_errors(spec, options, match):
    with pytest.raises(ValueError, match=match):
        build_objective(spec, options=options)


def test_options_for_other_registered_methods_are_ignored():
    assert build_objective("kd", options={"red": {"alpha": 50}}).spec == "kd"


def test_register_new_method_extends_combinations():
    @register("l2-logits")
    class L2Logits(DistillMethod):
        def forward(self, inputs):
            return {"l2": (inputs.student_logits - inputs.teacher_logits).pow(2).mean()}

    try:
        out = build_objective("kd+l2-logits")(inputs(teacher_logits=torch.tensor([[1.0, -1.0]])))
        assert set(out.terms) == {"task", "kd", "l2"}
        assert out.terms["l2"].item() == pytest.approx(0.5 * 1.0)
        with pytest.raises(DuplicateNameError, match="already registered"):
            register("l2-logits")(L2Logits)
    finally:
        del METHODS["l2-logits"]
