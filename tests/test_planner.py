"""Arena planning: every strategy's plan is valid, never below the lower bound, and plan_arena keeps
the smallest; the checker catches overlaps; `memplan analyze` reports the arena."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memplan.analyze import analyze
from memplan.cli import main
from memplan.liveness import Lifetime
from memplan.planner import STRATEGIES, ArenaPlan, PlanError, align_up, check_plan, plan_arena
from memplan.zoo import create_model, default_input


@st.composite
def lifetime_sets(draw):
    n = draw(st.integers(1, 30))
    steps = draw(st.integers(1, 20))
    out = []
    for s in range(n):
        start = draw(st.integers(0, steps - 1))
        end = draw(st.integers(start, steps - 1))
        out.append(Lifetime(s, draw(st.integers(0, 5000)), start, end))
    return out


@settings(max_examples=60, deadline=None)
@given(lifetime_sets(), st.sampled_from([1, 16, 64]))
def test_every_strategy_is_valid_and_at_least_lb(lts, alignment):
    best = plan_arena(lts, alignment=alignment, strategies=list(STRATEGIES))
    assert set(best.candidates) == set(STRATEGIES)
    for name in STRATEGIES:
        plan = plan_arena(lts, alignment=alignment, strategies=[name])
        check_plan(plan, lts)
        assert plan.arena_bytes >= plan.lower_bound_bytes >= max((lt.size for lt in lts), default=0)
        assert best.arena_bytes <= plan.arena_bytes
    assert all(o % alignment == 0 for o in best.offsets.values())
    # the default run stops early only at the lower bound
    assert plan_arena(lts, alignment=alignment).arena_bytes == best.arena_bytes


def test_better_strategy_beats_greedy_by_size():
    # greedy by size puts the 128-byte [0, 4] storage above the 256-byte one and strands a 64-byte gap
    lts = [Lifetime(0, 128, 0, 4), Lifetime(1, 192, 3, 5), Lifetime(2, 256, 0, 1), Lifetime(3, 128, 3, 4)]
    greedy = plan_arena(lts, strategies=["greedy_by_size"])
    best = plan_arena(lts)
    assert (greedy.arena_bytes, best.arena_bytes, best.lower_bound_bytes) == (512, 448, 448)
    assert best.strategy != "greedy_by_size" and best.ratio == 1.0
    check_plan(best, lts)


def test_alignment_rounds_sizes_and_lower_bound():
    lts = [Lifetime(0, 100, 0, 1), Lifetime(1, 10, 1, 1)]
    plan = plan_arena(lts, alignment=64)
    assert plan.sizes == {0: 128, 1: 64} and plan.lower_bound_bytes == 192 == plan.arena_bytes
    assert plan_arena(lts, alignment=1).arena_bytes == 110
    assert align_up(65, 64) == 128


def test_disjoint_lifetimes_share_one_slot():
    lts = [Lifetime(i, 64 * (i + 1), i, i) for i in range(5)]
    plan = plan_arena(lts)
    assert set(plan.offsets.values()) == {0} and plan.arena_bytes == 320


@pytest.mark.parametrize(
    "offsets,sizes,arena,needle",
    [
        ({0: 0, 1: 0}, {0: 64, 1: 64}, 128, "overlap in memory while both live at step 1"),
        ({0: 0, 1: 32}, {0: 64, 1: 64}, 128, "misaligned"),
        ({0: 0, 1: 64}, {0: 64, 1: 64}, 64, "outside"),
        ({0: 0}, {0: 64}, 128, "no offset"),
        ({0: 0, 1: 64}, {0: 64, 1: 32}, 128, "reserves 32 bytes but needs 64"),
    ],
)
def test_checker_rejects_bad_plans(offsets, sizes, arena, needle):
    lts = [Lifetime(0, 64, 0, 1), Lifetime(1, 64, 1, 2)]
    with pytest.raises(PlanError, match=needle):
        check_plan(ArenaPlan(offsets, sizes, arena, 128, 64, "manual"), lts)


def test_checker_accepts_touching_ranges_and_disjoint_times():
    lts = [Lifetime(0, 64, 0, 1), Lifetime(1, 64, 1, 2), Lifetime(2, 64, 2, 3)]
    check_plan(ArenaPlan({0: 0, 1: 64, 2: 0}, {0: 64, 1: 64, 2: 64}, 128, 128, 64, "manual"), lts)


def test_bad_arguments():
    with pytest.raises(PlanError, match="alignment"):
        plan_arena([], alignment=0)
    with pytest.raises(PlanError, match="unknown arena strategy"):
        plan_arena([], strategies=["best_guess"])
    assert plan_arena([]).arena_bytes == 0


def test_real_model_reaches_the_lower_bound():
    r = analyze(create_model("resnet_tiny"), default_input("resnet_tiny"))
    plan = plan_arena(r.lifetimes)
    check_plan(plan, r.lifetimes)
    assert plan.lower_bound_bytes == r.peak_bytes and plan.ratio == 1.0


def test_cli_reports_arena(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["analyze", "zoo:resnet_tiny", "--align", "256", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["arena_bytes"] >= doc["lower_bound_bytes"] >= doc["peak_bytes"]
    assert doc["alignment"] == 256 and doc["arena_ratio"] == doc["arena_bytes"] / doc["lower_bound_bytes"]
    assert doc["order"] == [t["node"] for t in doc["timeline"]] and "program_order_peak_bytes" not in doc
    assert "arena / LB" in capsys.readouterr().out
    assert main(["analyze", "zoo:resnet_tiny", "--align", "0"]) == 2
