"""LightKVMerge, one stage: the PyTorch reference and the ground truth for every other implementation.

The op is split the way every backend runs it (DESIGN.md section 2):

* `plan_stage` (method/layout.py, numpy) works on the host from spans and grids alone: window membership,
  A/B roles, r per window, output lengths and the next stage's spans and grids. Nothing in it looks at tensor
  values, so S' is a pure function of the layout and an engine can size its buffers before the data arrives.
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

import torch

from lightkv_export.errors import InputError
from lightkv_export.method.layout import GridMode, StagePlan, plan_stage
from lightkv_export.models.base import VisionSpan

COS_EPS = 1e-8


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
    slots = torch.arange(order.shape[1], device=order.device).expand_as(order)  # [W, na]
    rank = torch.empty_like(order).scatter_(1, order, slots)
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
    valid = torch.arange(out_len, device=keep.device).unsqueeze(0) < keep.sum(dim=1, keepdim=True)  # [B, S']
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
    if plan.win_index.size:
        x = flat.float()  # [N, D]
        win_index, win_r = torch.as_tensor(plan.win_index, device=device), torch.as_tensor(plan.win_r, device=device)
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
