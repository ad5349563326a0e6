"""Schedules: the paper's, Eq. 9 retention, the solver and parsing."""

from __future__ import annotations

import pytest

from lightkv_export.errors import InputError
from lightkv_export.method.schedule import Schedule, Stage, parse_schedule, reachable_range, resolve, solve


def eq9(num_layers, stages):
    """Eq. 9 written out: layer l (1-based) keeps prod(1 - rho_k) over stages merged before it."""
    total = 0.0
    for layer in range(1, num_layers + 1):
        frac = 1.0
        for lam, _, rho in stages:
            if lam < layer:
                frac *= 1 - rho
        total += frac
    return total / num_layers


def test_paper_llava_schedule():
    s = parse_schedule("12:4:0.5,18:2:0.5,24:1:0.5", 32)
    assert s.stages == (Stage(12, 4, 0.5), Stage(18, 2, 0.5), Stage(24, 1, 0.5))
    assert s.retention == pytest.approx((12 + 6 * 0.5 + 6 * 0.25 + 8 * 0.125) / 32)
    assert s.retention == pytest.approx(0.546875)  # the paper's "55% of vision tokens"


def test_paper_qwen_schedule():
    s = parse_schedule("12:6:0.5,17:4:0.5,22:2:0.5", 28)
    assert s.retention == pytest.approx(eq9(28, [(12, 6, 0.5), (17, 4, 0.5), (22, 2, 0.5)]))
    assert s.retention == pytest.approx(16.5 / 28)
    assert s.layer_groups() == [(1, 12), (13, 17), (18, 22), (23, 28)]


def test_solver_reproduces_the_paper_schedules_from_their_retention():
    assert str(solve(28, 16.5 / 28, (6, 4, 2))) == "12:6:0.5,17:4:0.5,22:2:0.5"
    assert str(solve(32, 0.546875, (4, 2, 1))) == "12:4:0.5,18:2:0.5,24:1:0.5"


@pytest.mark.parametrize("num_layers", [8, 12, 28, 32, 40])
@pytest.mark.parametrize("ratio", [0.3, 0.45, 0.55, 0.7, 0.9])
def test_solver_lands_within_tolerance(num_layers, ratio):
    lo, _ = reachable_range(num_layers, (6, 4, 2))
    if ratio < lo:
        pytest.skip(f"{ratio} is below the reachable {lo:.3f} for {num_layers} layers (tested below)")
    s = solve(num_layers, ratio, (6, 4, 2))
    assert abs(s.retention - ratio) <= 0.01
    assert s.retention == pytest.approx(eq9(num_layers, [(t.layer, t.windows, t.ratio) for t in s.stages]))
    assert all(t.ratio <= 0.5 for t in s.stages)


def test_unreachable_ratio_names_the_range():
    with pytest.raises(InputError, match=r"reachable range is 0\.17\d to 0\.99\d"):
        solve(28, 0.1, (6, 4, 2))
    with pytest.raises(InputError, match="reachable range"):
        solve(8, 1.5, (2, 2, 1))


def test_zero_and_one_mean_identity_with_the_same_stage_layers():
    for ratio in (0.0, 1.0):
        s = solve(28, ratio, (6, 4, 2))
        assert s.is_identity and s.retention == 1.0
        assert [t.layer for t in s.stages] == [t.layer for t in solve(28, 0.55, (6, 4, 2)).stages]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("12:4", "LAYER:WINDOWS:RATIO"),
        ("a:4:0.5", "LAYER:WINDOWS:RATIO"),
        ("", "no stages"),
        ("18:4:0.5,12:2:0.5", "must increase"),
        ("32:4:0.5", "must increase and lie in 1..31"),
        ("12:0:0.5", "windows"),
        ("12:4:1.0", "ratio"),
    ],
)
def test_bad_schedules(text, message):
    with pytest.raises(InputError, match=message):
        parse_schedule(text, 32)


def test_resolve_needs_exactly_one_of_ratio_and_schedule():
    with pytest.raises(InputError, match="exactly one"):
        resolve(28, ratio=0.5, schedule="12:4:0.5", windows=(6, 4, 2))
    with pytest.raises(InputError, match="exactly one"):
        resolve(28, ratio=None, schedule=None, windows=(6, 4, 2))
    assert resolve(28, ratio=None, schedule="12:4:0.5", windows=(6,)).stages == (Stage(12, 4, 0.5),)


def test_kept_per_layer_and_identity_flag():
    s = Schedule(4, (Stage(1, 2, 0.5), Stage(3, 1, 0.5)))
    assert s.kept_per_layer() == [1.0, 0.5, 0.5, 0.25]
    assert not s.is_identity


def test_capped_stages_are_the_ones_above_half():
    schedule = parse_schedule("2:2:0.5,4:2:0.7,6:1:0.95", 8)
    assert [str(s) for s in schedule.capped_stages()] == ["4:2:0.7", "6:1:0.95"]
    assert schedule.kept_before(8) == 0.5**3  # a capped stage keeps half, not 1 - its ratio
    assert parse_schedule("2:2:0.5,4:1:0.3", 8).capped_stages() == ()


def test_a_first_merge_layer_keeps_every_stage_after_it_and_says_why():
    """Family.first_merge_layer (Qwen3-VL's DeepStack adds vision features after layers 1..3): the solver places
    every stage after it, reaches the ratio there, and an explicit schedule before it is refused with the reason."""
    free = solve(28, 0.55, (6, 4, 2))
    floor = solve(28, 0.55, (6, 4, 2), first_layer=3, why="DeepStack")
    assert min(s.layer for s in floor.stages) >= 3
    assert abs(floor.retention - 0.55) <= 0.01 and abs(free.retention - 0.55) <= 0.01
    identity = resolve(28, ratio=0.0, schedule=None, windows=(6, 4, 2), first_layer=5, why="DeepStack")
    assert identity.is_identity and min(s.layer for s in identity.stages) >= 5
    with pytest.raises(InputError, match=r"after decoder layer 3 at the earliest \(DeepStack\)"):
        resolve(28, ratio=None, schedule="2:4:0.5,10:2:0.5", windows=(4, 2), first_layer=3, why="DeepStack")
    assert str(resolve(28, ratio=None, schedule="3:4:0.5", windows=(4,), first_layer=3)) == "3:4:0.5"
    lo_free, _ = reachable_range(28, (6, 4, 2))
    lo_floor, _ = reachable_range(28, (6, 4, 2), first_layer=20)
    assert lo_floor > lo_free  # later stages keep more: the strongest compression is out of reach
    with pytest.raises(InputError, match="reachable range"):
        solve(28, lo_free + 0.02, (6, 4, 2), first_layer=20, why="DeepStack")
    with pytest.raises(InputError, match="no merge stage fits"):
        solve(4, 0.55, (2,), first_layer=4, why="DeepStack")
