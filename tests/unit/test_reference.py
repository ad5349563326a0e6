"""The reference op against hand-computed cases and an independent loop-per-window implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightkv_export.errors import InputError
from lightkv_export.method.layout import (
    band_sizes,
    derive_grid,
    merge_count,
    merge_counts,
    plan_stage,
    pseudo_square,
    window_layout,
)
from lightkv_export.method.reference import lightkv_merge
from lightkv_export.method.spans import VisionSpan


def naive_merge(hidden, guidance, spans, windows, ratio, grid_mode="true"):
    """Loops over rows, images, windows and tokens: slow, obvious, written independently of the op."""
    out_rows, kept_rows = [], []
    for b, row in enumerate(spans):
        x = hidden[b].float()
        xi = guidance[b].float()
        value = {s: x[s].clone() for s in range(x.shape[0])}
        removed = set()
        for span in row:
            if span.length < 8 * windows * windows or ratio == 0:
                continue
            h, w = span.grid if grid_mode == "true" else pseudo_square(span.length)
            rows = [k for k, n in enumerate(band_sizes(h, windows)) for _ in range(n)]
            cols = [k for k, n in enumerate(band_sizes(w, windows)) for _ in range(n)]
            members: dict[int, list[int]] = {}
            for i in range(span.length):
                members.setdefault(rows[i // w] * windows + cols[i % w], []).append(span.start + i)
            for label in sorted(members):
                toks = members[label]
                a_set, b_set = toks[0::2], toks[1::2]
                r = min(math.floor(round(ratio * len(toks), 9)), len(toks) // 2)
                scored = []
                for ai, a in enumerate(a_set):
                    sims = [float(x[a] @ x[bb]) / (float(x[a].norm() * x[bb].norm()) + 1e-8) for bb in b_set]
                    best = max(range(len(sims)), key=lambda j: (sims[j], -j)) if sims else None
                    scored.append((sims[best] if sims else -math.inf, ai, a, b_set[best] if sims else None))
                scored.sort(key=lambda t: (-t[0], t[1]))
                groups: dict[int, list[int]] = {}
                for _, _, a, bb in scored[:r]:
                    groups.setdefault(bb, []).append(a)
                    removed.add(a)
                for bb, srcs in groups.items():
                    num = xi[bb] * x[bb] + sum(xi[a] * x[a] for a in srcs)
                    value[bb] = num / (xi[bb] + sum(xi[a] for a in srcs))
        kept = [s for s in range(x.shape[0]) if s not in removed]
        kept_rows.append(kept)
        out_rows.append(torch.stack([value[s] for s in kept]).to(hidden.dtype))
    return out_rows, kept_rows


def random_case(seed, spans, seq, dim=16, dtype=torch.float32, batch=None):
    g = torch.Generator().manual_seed(seed)
    batch = len(spans) if batch is None else batch
    hidden = torch.randn(batch, seq, dim, generator=g).to(dtype)
    guidance = torch.rand(batch, seq, generator=g) + 0.05
    return hidden, guidance


def assert_matches_naive(hidden, guidance, spans, windows, ratio, grid_mode="true", atol=1e-5):
    res = lightkv_merge(hidden, guidance, spans, windows=windows, ratio=ratio, grid_mode=grid_mode)
    rows, kept = naive_merge(hidden, guidance, spans, windows, ratio, grid_mode)
    for b in range(len(spans)):
        n = int(res.lengths[b])
        assert res.kept[b, :n].tolist() == kept[b]
        assert (res.kept[b, n:] == -1).all()
        torch.testing.assert_close(res.hidden[b, :n].float(), rows[b].float(), atol=atol, rtol=1e-4)
        assert (res.hidden[b, n:] == 0).all()
    return res


def test_band_sizes_uneven_first_bands_longer():
    assert band_sizes(7, 3) == [3, 2, 2]
    assert band_sizes(6, 3) == [2, 2, 2]
    assert band_sizes(2, 3) == [1, 1, 0]


def test_window_layout_non_square_grid_uneven_bands():
    # 3 x 5 grid, 2 windows per side: rows split [2, 1], columns split [3, 2].
    members, sizes = window_layout(15, (3, 5), 2)
    assert sizes.tolist() == [6, 4, 3, 2]
    assert members[0].tolist() == [0, 1, 2, 5, 6, 7]
    assert members[1].tolist() == [3, 4, 8, 9, -1, -1]
    assert members[2].tolist() == [10, 11, 12, -1, -1, -1]
    assert members[3].tolist() == [13, 14, -1, -1, -1, -1]


def test_window_layout_partial_last_row():
    members, sizes = window_layout(7, (2, 4), 2)  # 8 cells, the last one absent
    assert sizes.tolist() == [2, 2, 2, 1]
    assert members[3].tolist() == [6, -1]


def test_official_grid_is_padded_pseudo_square():
    assert pseudo_square(36) == (6, 6)
    assert pseudo_square(37) == (7, 7)
    assert pseudo_square(10) == (4, 4)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.29, 0.3, 0.33, 0.45, 0.5, 0.55, 0.7, 0.9, 0.999, 1 / 3, 0.07])
def test_merge_counts_equals_merge_count_on_every_window_size(ratio):
    sizes = np.arange(0, 20_001)
    want = [merge_count(n, ratio) for n in sizes.tolist()]
    got = merge_counts(sizes, ratio)
    assert got.dtype == np.int64 and got.tolist() == want


def test_merge_counts_rounds_at_the_9th_decimal_like_round():
    """Ratios whose product with n lands just below or above an integer, around the 1e-9 rounding boundary."""
    offsets = (-1e-9, -6e-10, -5.001e-10, -4.999e-10, -4e-10, -1e-12, 0.0, 1e-12, 4e-10)
    sizes = np.arange(1, 200)
    for n in (3, 7, 64, 97, 128, 199):
        for k in range(1, n // 2 + 1, max(1, n // 16)):
            for delta in offsets:
                ratio = k / n + delta / n  # ratio * n is about k + delta
                assert merge_counts(sizes, ratio).tolist() == [merge_count(m, ratio) for m in sizes.tolist()], ratio
    assert merge_counts(np.array([100]), 0.29).item() == 29  # 28.999999999999996 in binary


def test_merge_count_caps_at_half_and_floors_exactly():
    assert merge_count(10, 0.9) == 5
    assert merge_count(9, 0.5) == 4
    assert merge_count(100, 0.29) == 29  # 0.29 * 100 is 28.999999999999996 in binary
    assert merge_count(7, 0.0) == 0


def test_hand_computed_matching_and_weighted_merge():
    # One image of 8 tokens on a 2 x 4 grid, one window: A = tokens 0,2,4,6 ; B = 1,3,5,7.
    e = torch.eye(4)
    toks = torch.stack([e[0], e[0] * 2, e[1], e[2] + 0.1 * e[1], e[3], e[3] * 0.5 + e[2], e[2], e[1]])
    hidden = torch.cat([torch.zeros(1, 4), toks]).unsqueeze(0)  # [1, 9, 4]: one text token, then the image
    xi = torch.tensor([[1.0, 1.0, 3.0, 2.0, 1.0, 1.0, 1.0, 4.0, 1.0]])
    spans = [[VisionSpan(1, 8, (2, 4))]]
    # Best matches (cosine): A0->B1 (1.0), A2->B7 (1.0), A4->B5 (0.447), A6->B3 (0.995)
    # r = min(floor(0.5 * 8), 4) = 4 at ratio 0.5; at 0.375 r = 3: A0, A2 and A6 merge, A4 survives.
    res = lightkv_merge(hidden, xi, spans, windows=1, ratio=0.375)
    assert res.kept.tolist() == [[0, 2, 4, 5, 6, 8]]  # text token, B1, B3, A4, B5, B7
    seq = 1 + torch.arange(8)  # token i of the image sits at sequence index 1 + i
    x = hidden[0]
    b1 = (xi[0, 2] * x[seq[1]] + xi[0, 1] * x[seq[0]]) / (xi[0, 2] + xi[0, 1])
    b3 = (xi[0, 4] * x[seq[3]] + xi[0, 7] * x[seq[6]]) / (xi[0, 4] + xi[0, 7])
    b7 = (xi[0, 8] * x[seq[7]] + xi[0, 3] * x[seq[2]]) / (xi[0, 8] + xi[0, 3])
    torch.testing.assert_close(res.hidden[0, 1], b1)
    torch.testing.assert_close(res.hidden[0, 2], b3)
    torch.testing.assert_close(res.hidden[0, 3], x[seq[4]])  # unmerged A, untouched
    torch.testing.assert_close(res.hidden[0, 4], x[seq[5]])  # B5 received nothing
    torch.testing.assert_close(res.hidden[0, 5], b7)
    assert res.spans == ((VisionSpan(1, 5, derive_grid((2, 4), 5)),),)


def test_many_to_one_merge_and_tie_rules():
    # Every A token is identical to B1, so all pick B1 (the lowest B on ties), and ranking ties
    # go to the lower A position.
    v = torch.tensor([1.0, 0.0])
    toks = torch.stack([v, v, v, v * 2, v, torch.tensor([0.0, 1.0]), v, torch.tensor([0.0, 1.0])])
    hidden = toks.unsqueeze(0)  # [1, 8, 2]
    xi = torch.ones(1, 8)
    res = lightkv_merge(hidden, xi, [[VisionSpan(0, 8, (2, 4))]], windows=1, ratio=0.25)
    assert res.kept.tolist() == [[1, 3, 4, 5, 6, 7]]  # A0 and A2 (lowest positions) merged into B1
    torch.testing.assert_close(res.hidden[0, 0], v)


@pytest.mark.parametrize(
    ("grid", "windows", "ratio"),
    [((12, 12), 2, 0.5), ((7, 11), 2, 0.5), ((9, 13), 3, 0.3), ((16, 10), 1, 0.5), ((8, 8), 2, 0.9)],
)
def test_matches_naive_single_image(grid, windows, ratio):
    n = grid[0] * grid[1]
    spans = [[VisionSpan(5, n, grid)]]
    hidden, guidance = random_case(n + windows, spans, n + 12)
    assert_matches_naive(hidden, guidance, spans, windows, ratio)


def test_matches_naive_official_grid():
    spans = [[VisionSpan(3, 77, (7, 11))]]  # pseudo-square 9 x 9, padded by 4
    hidden, guidance = random_case(1, spans, 90)
    assert_matches_naive(hidden, guidance, spans, 2, 0.5, grid_mode="official")


def test_batched_rows_with_several_images_of_different_sizes():
    spans = [
        [VisionSpan(2, 48, (6, 8)), VisionSpan(60, 35, (5, 7))],
        [VisionSpan(0, 100, (10, 10))],
        [
            VisionSpan(10, 36, (6, 6)),
            VisionSpan(50, 12, (3, 4)),
            VisionSpan(70, 40, (5, 8)),
        ],  # middle one skips
    ]
    hidden, guidance = random_case(7, spans, 120)
    res = assert_matches_naive(hidden, guidance, spans, 2, 0.5)
    assert res.skipped == ((False, False), (False,), (False, True, False))
    # Each row alone gives the same as the batch.
    for b in range(3):
        alone = lightkv_merge(hidden[b : b + 1], guidance[b : b + 1], [spans[b]], windows=2, ratio=0.5)
        n = int(res.lengths[b])
        assert alone.kept[0].tolist() == res.kept[b, :n].tolist()
        torch.testing.assert_close(alone.hidden[0], res.hidden[b, :n])


def test_padded_input_rows():
    spans = [[VisionSpan(1, 64, (8, 8))], [VisionSpan(1, 36, (6, 6))]]
    hidden, guidance = random_case(3, spans, 80)
    res = lightkv_merge(hidden, guidance, spans, windows=2, ratio=0.5, lengths=[80, 50])
    assert res.lengths.tolist() == [80 - 32, 50 - 16]  # 6x6 in 3x3 windows: 4 of 9 each
    assert int(res.kept[1].max()) == 49  # nothing from the padding survives


def test_output_length_depends_only_on_layout():
    spans = [[VisionSpan(4, 130, (10, 13))], [VisionSpan(0, 99, (9, 11)), VisionSpan(120, 64, (8, 8))]]
    lengths = []
    for seed in range(4):
        hidden, guidance = random_case(seed, spans, 200)
        if seed == 3:
            hidden = torch.zeros_like(hidden)  # degenerate data: every similarity ties
        lengths.append(lightkv_merge(hidden, guidance, spans, windows=3, ratio=0.5).lengths.tolist())
    plan = plan_stage(spans, 200, windows=3, ratio=0.5)
    assert all(ln == list(plan.out_lengths) for ln in lengths)
    # S' formula: per window n - min(floor(0.5 n), n // 2) tokens survive.
    expected = 200
    for span in spans[0]:
        _, sizes = window_layout(span.length, span.grid, 3)
        expected -= sum(merge_count(int(n), 0.5) for n in sizes)
    assert plan.out_lengths[0] == expected


def test_kept_is_ascending_and_survivors_keep_values():
    spans = [[VisionSpan(3, 64, (8, 8))]]
    hidden, guidance = random_case(5, spans, 70)
    res = lightkv_merge(hidden, guidance, spans, windows=2, ratio=0.25)
    kept = res.kept[0]
    assert (kept[1:] > kept[:-1]).all()
    text = [i for i, s in enumerate(kept.tolist()) if s < 3 or s >= 67]
    torch.testing.assert_close(res.hidden[0, text], hidden[0, kept[text]], rtol=0, atol=0)


def test_small_images_skip_the_stage():
    spans = [[VisionSpan(0, 31, (4, 8))]]  # 31 < 8 * 2^2
    hidden, guidance = random_case(0, spans, 40)
    res = lightkv_merge(hidden, guidance, spans, windows=2, ratio=0.5)
    assert res.skipped == ((True,),)
    assert res.kept[0].tolist() == list(range(40))
    torch.testing.assert_close(res.hidden, hidden)


def test_ratio_zero_is_identity():
    spans = [[VisionSpan(2, 64, (8, 8))]]
    hidden, guidance = random_case(0, spans, 70)
    res = lightkv_merge(hidden, guidance, spans, windows=2, ratio=0.0)
    assert torch.equal(res.hidden, hidden)
    assert res.kept[0].tolist() == list(range(70))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_hidden_matches_fp32_selection(dtype):
    spans = [[VisionSpan(1, 64, (8, 8))]]
    hidden, guidance = random_case(11, spans, 70, dtype=dtype)
    res = lightkv_merge(hidden, guidance, spans, windows=2, ratio=0.5)
    ref = lightkv_merge(hidden.float(), guidance, spans, windows=2, ratio=0.5)
    assert res.hidden.dtype == dtype
    assert torch.equal(res.kept, ref.kept)  # similarity is computed in fp32 from the same values
    torch.testing.assert_close(res.hidden.float(), ref.hidden.to(dtype).float(), rtol=0, atol=0)


def test_zero_guidance_falls_back_to_plain_mean():
    spans = [[VisionSpan(0, 8, (2, 4))]]
    hidden, _ = random_case(2, spans, 8)
    res = lightkv_merge(hidden, torch.zeros(1, 8), spans, windows=1, ratio=0.5)
    rows, _ = naive_merge(hidden, torch.ones(1, 8), spans, 1, 0.5)
    torch.testing.assert_close(res.hidden[0], rows[0])


@pytest.mark.parametrize(
    ("spans", "kwargs", "message"),
    [
        ([[VisionSpan(0, 16, (4, 4))]], {"ratio": 1.0}, "outside [0, 1)"),
        ([[VisionSpan(0, 16, (4, 4))]], {"ratio": -0.1}, "outside [0, 1)"),
        ([[VisionSpan(0, 16, (4, 4)), VisionSpan(10, 16, (4, 4))]], {}, "overlaps"),
        ([[VisionSpan(20, 16, (4, 4))]], {}, "outside the row"),
        ([[VisionSpan(0, 16, (5, 5))]], {}, "does not match"),
        ([[VisionSpan(0, 16, (3, 5))]], {}, "does not match"),
        ([[VisionSpan(0, 16, (4, 4))]], {"windows": 0}, "windows per side"),
        ([[VisionSpan(0, 16, (4, 4))]], {"grid_mode": "square"}, "grid mode"),
    ],
)
def test_bad_arguments_raise_clear_errors(spans, kwargs, message):
    hidden, guidance = random_case(0, spans, 32)
    args = {"windows": 1, "ratio": 0.5, **kwargs}
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace(")", r"\)")):
        lightkv_merge(hidden, guidance, spans, **args)


def test_next_stage_grid_keeps_aspect_and_holds_survivors():
    for grid, n_new in [((36, 36), 648), ((24, 40), 480), ((5, 7), 18), ((1, 50), 25)]:
        h, w = derive_grid(grid, n_new)
        assert (h - 1) * w < n_new <= h * w
    assert derive_grid((36, 36), 648) == (26, 25)
