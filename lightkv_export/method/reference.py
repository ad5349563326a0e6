"""LightKVMerge, one stage: the PyTorch reference and the ground truth for every other implementation.

The op is split the way every backend runs it (DESIGN.md section 2):

* `plan_stage` works on the host from spans and grids alone: window membership, A/B roles, r per window,
  output lengths and the next stage's spans and grids. Nothing in it looks at tensor values, so S' is a
  pure function of the layout and an engine can size its buffers before the data arrives.
* `apply_plan` does the data-dependent part: cosine similarity, best match, top-r selection, guidance-weighted
  merge and order-preserving compaction. Similarity and weights are computed in fp32 whatever the hidden dtype.

Rules (the paper and the released code, with the choices this project made where they are silent):

* Windows: the image's (h, w) grid is cut into p x p windows. A side of length L is split into p bands of
  L // p tokens, the first L % p bands one token longer (as the released code does). Grids may have a partial
  last row (h * w > n): those cells are simply absent. Window order is band-row major; inside a window, tokens
  stay in raster order.
* Bipartite split inside each window: even positions are set A, odd positions set B.
* Matching: each A token's partner is its most cosine-similar B token, sim = a.b / (|a||b| + 1e-8).
  Ties: the lowest B position wins. The r = min(floor(rho * n), n // 2) A tokens with the highest best-match
  similarity merge; ties in that ranking go to the lower A position (a stable descending sort).
  floor(rho * n) is taken after rounding rho * n to 1e-9, so 0.29 * 100 gives 29, not 28.
* Merge: B' = (xi_b * x_b + sum_a xi_a * x_a) / (xi_b + sum_a xi_a) over the A tokens merged into b.
  If that denominator is not positive (no guidance at all), the plain mean is used instead.
* Survivors (unmerged A, every B, every non-vision token) keep their original order.
* Skips: an image with fewer than 8 * p^2 tokens skips the stage (per image; the released code skipped the
  whole stage when any image was small) and `skipped` says so.
* Grid modes: `true` uses the image's real (h, w) grid. `official` ignores it and lays the span on the released
  code's pseudo-square: side = ceil(sqrt(n)), padded at the end.
* Next stage's grid: survivors, still in raster order, are laid row-major on a grid of the same aspect ratio,
  w' = round(w * sqrt(n' / (h * w))), h' = ceil(n' / w'). Both depend only on the layout.
* Batches: rows may have different valid lengths (`lengths`, right padding). Outputs are right-padded to the
  longest row; padded `kept` entries are -1 and padded hidden rows are zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lightkv_export.errors import InputError
from lightkv_export.models.base import VisionSpan

# The op's identity, shared by the ONNX node, the ONNX Runtime function and the TensorRT plugin.
OP_DOMAIN = "lightkv"
OP_NAME = "LightKVMerge"
OP_VERSION = 1

GridMode = Literal["true", "official"]
GRID_MODES: tuple[str, ...] = ("true", "official")
MIN_TOKENS_PER_WINDOW = 8  # an image needs at least 8 * p^2 tokens for a stage with p windows per side
COS_EPS = 1e-8


@dataclass(frozen=True)
class StagePlan:
    """The data-independent half of one stage: what to compare, how many to merge, the output layout.

    win_index: [W, n_max] int64, flat index (b * S + s) of each window's tokens in raster order, -1 padding
    win_r:     [W] int64, tokens to merge away in each window
    """

    batch: int
    seq_len: int
    lengths: tuple[int, ...]
    out_lengths: tuple[int, ...]
    win_index: torch.Tensor
    win_r: torch.Tensor
    spans: tuple[tuple[VisionSpan, ...], ...]
    skipped: tuple[tuple[bool, ...], ...]

    @property
    def out_seq_len(self) -> int:
        return max(self.out_lengths) if self.out_lengths else 0


@dataclass(frozen=True)
class MergeResult:
    """hidden [B, S', D]; kept [B, S'] int64 (source index of each survivor, -1 padding); lengths [B].

    merged_into [B, S] int64: for each input position, the input index of the survivor it was merged into (its
    own index if it survived, -1 at padding). Bookkeeping for reports; the op's outputs do not depend on it.
    """

    hidden: torch.Tensor
    kept: torch.Tensor
    lengths: torch.Tensor
    spans: tuple[tuple[VisionSpan, ...], ...]
    skipped: tuple[tuple[bool, ...], ...]
    merged_into: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------
# Host side: the plan
# ---------------------------------------------------------------------------------------------------------


def merge_count(n: int, ratio: float) -> int:
    """r = min(floor(ratio * n), n // 2): tokens one window of n merges away."""
    return min(math.floor(round(ratio * n, 9)), n // 2)


# floor(round(p, 9)) is floor(p) + 1 exactly when p's fractional part exceeds the decimal 0.9999999995 (round()
# is correctly rounded). The nearest double to that decimal lies just below it with no double in between, so a
# strict `>` against it gives round()'s answer bit for bit.
ROUND_UP_FRACTION = 0.9999999995


def merge_counts(sizes: torch.Tensor, ratio: float) -> torch.Tensor:
    """merge_count over a tensor of window sizes [W] -> r [W] int64, with identical results."""
    n = sizes.to(torch.int64)
    p = n.to(torch.float64) * ratio  # the same IEEE product as ratio * n in Python
    whole = torch.floor(p)
    r = whole.to(torch.int64) + ((p - whole) > ROUND_UP_FRACTION).to(torch.int64)  # p - floor(p) is exact
    return torch.minimum(r, n // 2)


def band_sizes(side: int, parts: int) -> list[int]:
    """Split `side` cells into `parts` bands, the first `side % parts` one cell longer."""
    base, rem = divmod(side, parts)
    return [base + 1 if k < rem else base for k in range(parts)]


def pseudo_square(n: int) -> tuple[int, int]:
    """The released code's grid: the smallest square holding n tokens, padded at the end."""
    side = math.isqrt(n)
    if side * side < n:
        side += 1
    return side, side


def derive_grid(grid: tuple[int, int], n_new: int) -> tuple[int, int]:
    """Grid for n_new survivors of a (h, w) image: same aspect ratio, row-major, partial last row."""
    h, w = grid
    w_new = max(1, min(n_new, round(w * math.sqrt(n_new / (h * w)))))
    return math.ceil(n_new / w_new), w_new


def window_layout(n: int, grid: tuple[int, int], windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of one image: (members [p*p, n_max] token offsets in raster order, -1 padded; sizes [p*p])."""
    h, w = grid
    offsets = torch.arange(n)  # [n]
    row_band = torch.repeat_interleave(torch.arange(windows), torch.tensor(band_sizes(h, windows)))  # [h]
    col_band = torch.repeat_interleave(torch.arange(windows), torch.tensor(band_sizes(w, windows)))  # [w]
    label = row_band[offsets // w] * windows + col_band[offsets % w]  # [n] window of each token
    order = torch.argsort(label * n + offsets)  # [n] by window, then raster order
    sizes = torch.bincount(label, minlength=windows * windows)  # [p*p]
    starts = torch.cumsum(sizes, 0) - sizes  # [p*p]
    sorted_label = label[order]
    slot = torch.arange(n) - starts[sorted_label]  # [n] position inside its window
    members = torch.full((windows * windows, int(sizes.max())), -1, dtype=torch.long)
    members[sorted_label, slot] = order
    return members, sizes


def validate_layout(spans: Sequence[Sequence[VisionSpan]], lengths: Sequence[int]) -> None:
    """Spans must be in order, non-overlapping, inside the row, with a grid that holds them."""
    if len(spans) != len(lengths):
        raise InputError(f"spans describe {len(spans)} batch rows but the hidden states have {len(lengths)}.")
    for b, (row, length) in enumerate(zip(spans, lengths, strict=True)):
        prev_end = 0
        for i, span in enumerate(row):
            where = f"batch row {b}, image {i} (start={span.start}, length={span.length}, grid={span.grid})"
            if span.length < 1 or span.start < 0 or span.end > length:
                raise InputError(
                    f"{where}: the span is empty or outside the row's {length} valid tokens. "
                    "Expected 0 <= start and start + length <= row length."
                )
            if span.start < prev_end:
                raise InputError(
                    f"{where}: overlaps or precedes the previous image (which ends at {prev_end}). "
                    "Expected spans sorted by start and non-overlapping."
                )
            h, w = span.grid
            if h < 1 or w < 1 or h * w < span.length or (h - 1) * w >= span.length:
                raise InputError(
                    f"{where}: grid {h}x{w} does not match {span.length} tokens. Expected "
                    "(h - 1) * w < length <= h * w (a full grid, or a partial last row after a merge)."
                )
            prev_end = span.end


def plan_stage(
    spans: Sequence[Sequence[VisionSpan]],
    seq_len: int,
    *,
    windows: int,
    ratio: float,
    grid_mode: GridMode = "true",
    lengths: Sequence[int] | None = None,
) -> StagePlan:
    """Everything about one stage that depends only on the layout (no tensor values)."""
    if not 0.0 <= ratio < 1.0:
        raise InputError(f"stage ratio {ratio} is outside [0, 1): it is the fraction of each window merged away.")
    if windows < 1:
        raise InputError(f"windows per side must be >= 1, got {windows}.")
    if grid_mode not in GRID_MODES:
        raise InputError(f"grid mode {grid_mode!r} is unknown; expected one of {', '.join(GRID_MODES)}.")
    lengths = tuple(int(n) for n in (lengths if lengths is not None else [seq_len] * len(spans)))
    if any(n > seq_len or n < 0 for n in lengths):
        raise InputError(f"row lengths {lengths} must lie in [0, {seq_len}] (the sequence length).")
    validate_layout(spans, lengths)

    blocks: list[torch.Tensor] = []
    rs: list[torch.Tensor] = []
    out_lengths, new_spans, skipped = [], [], []
    for b, row in enumerate(spans):
        removed = 0
        row_spans, row_skipped = [], []
        for span in row:
            skip = span.length < MIN_TOKENS_PER_WINDOW * windows * windows
            row_skipped.append(skip)
            if skip or ratio == 0.0:
                row_spans.append(VisionSpan(span.start - removed, span.length, span.grid))
                continue
            grid = span.grid if grid_mode == "true" else pseudo_square(span.length)
            members, sizes = window_layout(span.length, grid, windows)
            r = merge_counts(sizes, ratio)  # [p*p]
            base = b * seq_len + span.start
            blocks.append(torch.where(members >= 0, members + base, members))
            rs.append(r)
            n_new = span.length - int(r.sum())
            row_spans.append(VisionSpan(span.start - removed, n_new, derive_grid(span.grid, n_new)))
            removed += span.length - n_new
        out_lengths.append(lengths[b] - removed)
        new_spans.append(tuple(row_spans))
        skipped.append(tuple(row_skipped))

    n_max = max((blk.shape[1] for blk in blocks), default=0)
    win_index = (
        torch.cat([torch.nn.functional.pad(blk, (0, n_max - blk.shape[1]), value=-1) for blk in blocks])
        if blocks
        else torch.empty(0, 0, dtype=torch.long)
    )
    win_r = torch.cat(rs) if rs else torch.empty(0, dtype=torch.long)
    return StagePlan(
        batch=len(spans),
        seq_len=seq_len,
        lengths=lengths,
        out_lengths=tuple(out_lengths),
        win_index=win_index,
        win_r=win_r,
        spans=tuple(new_spans),
        skipped=tuple(skipped),
    )


# ---------------------------------------------------------------------------------------------------------
# Data side: matching, merge, compaction
# ---------------------------------------------------------------------------------------------------------


def match_windows(x: torch.Tensor, win_index: torch.Tensor, win_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite matching in every window at once.

    x: [N, D] fp32 flat tokens. Returns (src, dst): flat indices [M] of each merged A token and its B partner.
    """
    a_idx, b_idx = win_index[:, 0::2], win_index[:, 1::2]  # [W, na], [W, nb]
    xa, xb = x[a_idx.clamp(min=0)], x[b_idx.clamp(min=0)]  # [W, na, D], [W, nb, D]
    dots = torch.bmm(xa, xb.transpose(1, 2))  # [W, na, nb]
    norms = xa.norm(dim=-1).unsqueeze(2) * xb.norm(dim=-1).unsqueeze(1)  # [W, na, nb]
    sim = dots / (norms + COS_EPS)
    valid = (a_idx >= 0).unsqueeze(2) & (b_idx >= 0).unsqueeze(1)  # [W, na, nb]
    sim = sim.masked_fill(~valid, -math.inf)
    partner = sim.argmax(dim=-1)  # [W, na] first maximum: lowest B position on ties
    best = sim.gather(-1, partner.unsqueeze(-1)).squeeze(-1).masked_fill(a_idx < 0, -math.inf)  # [W, na]
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # [W, na]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    merged = rank < win_r.unsqueeze(1)  # [W, na]
    return a_idx[merged], b_idx.gather(1, partner)[merged]


def weighted_merge(
    x: torch.Tensor, xi: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guidance-weighted mean of every B token with the A tokens merged into it.

    x: [N, D] fp32, xi: [N] fp32. Returns (touched [K] flat indices, merged values [K, D] fp32).
    """
    num = torch.zeros_like(x).index_add_(0, dst, xi[src].unsqueeze(1) * x[src])  # [N, D]
    den = torch.zeros_like(xi).index_add_(0, dst, xi[src])  # [N]
    cnt = torch.zeros_like(xi).index_add_(0, dst, torch.ones_like(xi[src]))  # [N]
    sum_x = torch.zeros_like(x).index_add_(0, dst, x[src])  # [N, D]
    touched = torch.unique(dst)  # [K] sorted
    wsum = xi[touched] + den[touched]  # [K]
    weighted = (xi[touched].unsqueeze(1) * x[touched] + num[touched]) / wsum.clamp_min(1e-30).unsqueeze(1)
    plain = (x[touched] + sum_x[touched]) / (1 + cnt[touched]).unsqueeze(1)
    return touched, torch.where((wsum > 0).unsqueeze(1), weighted, plain)


def compact(keep: torch.Tensor, out_len: int) -> torch.Tensor:
    """kept [B, out_len]: ascending indices of the True entries of keep [B, S] per row, -1 padded."""
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :out_len]  # [B, S']
    valid = torch.arange(out_len).unsqueeze(0) < keep.sum(dim=1, keepdim=True)  # [B, S']
    return torch.where(valid, order, torch.full_like(order, -1))


def apply_plan(hidden: torch.Tensor, guidance: torch.Tensor, plan: StagePlan) -> MergeResult:
    """Run one planned stage: hidden [B, S, D] any float dtype, guidance [B, S] (xi, fp32)."""
    bsz, seq, dim = hidden.shape
    if (bsz, seq) != (plan.batch, plan.seq_len) or guidance.shape != (bsz, seq):
        raise InputError(
            f"hidden {tuple(hidden.shape)} / guidance {tuple(guidance.shape)} do not match the plan "
            f"(batch {plan.batch}, sequence {plan.seq_len})."
        )
    device = hidden.device
    flat = hidden.reshape(bsz * seq, dim)  # [N, D]
    positions = torch.arange(seq, device=device).unsqueeze(0)  # [1, S]
    keep = positions < torch.tensor(plan.lengths, device=device).unsqueeze(1)  # [B, S]
    merged_into = torch.where(keep, positions, -1).reshape(-1)  # [N] row-local index, -1 at padding
    out_flat = flat
    if plan.win_index.numel():
        x = flat.float()  # [N, D]
        win_index, win_r = plan.win_index.to(device), plan.win_r.to(device)
        src, dst = match_windows(x, win_index, win_r)
        if src.numel():
            touched, merged = weighted_merge(x, guidance.reshape(-1).float(), src, dst)
            out_flat = flat.clone()
            out_flat[touched] = merged.to(hidden.dtype)
            keep = keep.reshape(-1).index_fill(0, src, False).reshape(bsz, seq)
            merged_into = merged_into.index_copy(0, src, dst % seq)  # A -> its B partner (B never merges)
    out_len = plan.out_seq_len
    kept = compact(keep, out_len)  # [B, S']
    lengths = keep.sum(dim=1)  # [B]
    if lengths.tolist() != list(plan.out_lengths):  # would mean the plan and the data disagree: a bug
        raise AssertionError(f"merge kept {lengths.tolist()} tokens, the plan expected {plan.out_lengths}")
    gathered = out_flat.reshape(bsz, seq, dim).gather(1, kept.clamp(min=0).unsqueeze(-1).expand(-1, -1, dim))
    out = gathered.masked_fill((kept < 0).unsqueeze(-1), 0)  # [B, S', D]
    return MergeResult(
        hidden=out,
        kept=kept,
        lengths=lengths,
        spans=plan.spans,
        skipped=plan.skipped,
        merged_into=merged_into.reshape(bsz, seq),
    )


def lightkv_merge(
    hidden: torch.Tensor,
    guidance: torch.Tensor,
    spans: Sequence[Sequence[VisionSpan]],
    *,
    windows: int,
    ratio: float,
    grid_mode: GridMode = "true",
    lengths: Sequence[int] | None = None,
) -> MergeResult:
    """One LightKV stage: plan from the layout, then merge the data. See the module docstring for the rules."""
    if hidden.dim() != 3 or guidance.dim() != 2:
        raise InputError(
            f"expected hidden [B, S, D] and guidance [B, S], got {tuple(hidden.shape)} and {tuple(guidance.shape)}."
        )
    plan = plan_stage(spans, hidden.shape[1], windows=windows, ratio=ratio, grid_mode=grid_mode, lengths=lengths)
    return apply_plan(hidden, guidance, plan)
