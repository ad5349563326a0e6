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
* Assignment (an output, for parity): `assign` [W, na] holds, for A slot i of window w (token win_index[w, 2i]),
  the B slot j (token win_index[w, 2j + 1]) it merged into, or -1 where it stays or is padding.

Near-ties. Two implementations that differ in the last bits of the hidden state may pick different partners (or,
below ratio 0.5, a different top-r) where two similarities are closer than that noise. Both answers are then
correct, so parity (parity.py) compares assignments tie-aware: `apply_plan(..., merged_into=...)` replays an
engine's assignment and `shortfall` says, per A token, how much similarity that assignment gives up against the
op's own choice (0 for the op's own choice, exactly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_export.errors import InputError
from lightkv_export.method.layout import GridMode, StagePlan, plan_stage
from lightkv_export.method.spans import VisionSpan

COS_EPS = 1e-8


@dataclass(frozen=True)
class MergeResult:
    """hidden [B, S', D]; kept [B, S'] int64 (source index of each survivor, -1 padding); lengths [B].

    merged_into [B, S] int64: for each input position, the input index of the survivor it was merged into (its
    own index if it survived, -1 at padding). Bookkeeping for reports and parity; the op's outputs do not depend
    on it. assign [W, na] int64: the same assignment in the op's window layout (module docstring).
    shortfall [B, S] fp32: per A token, the similarity the assignment gives up against the op's own choice (the
    best partner's similarity minus the chosen one's, and the top-r margin it crossed); 0 elsewhere. All zero
    unless an assignment was forced.
    """

    hidden: torch.Tensor
    kept: torch.Tensor
    lengths: torch.Tensor
    spans: tuple[tuple[VisionSpan, ...], ...]
    skipped: tuple[tuple[bool, ...], ...]
    merged_into: torch.Tensor | None = None
    assign: torch.Tensor | None = None
    shortfall: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------
# Data side: matching, merge, compaction
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matching:
    """One stage's matching. src / dst [M]: flat index of each merged A token and of its B partner.
    assign [W, na] int64: B slot of each merged A slot, -1 where it stays. shortfall [W, na] fp32: see MergeResult."""

    src: torch.Tensor
    dst: torch.Tensor
    assign: torch.Tensor
    shortfall: torch.Tensor


def match_windows(x: torch.Tensor, win_index: torch.Tensor, win_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite matching in every window at once.

    x: [N, D] fp32 flat tokens. Returns (src, dst): flat indices [M] of each merged A token and its B partner.
    """
    found = match(x, win_index, win_r)
    return found.src, found.dst


def match(
    x: torch.Tensor, win_index: torch.Tensor, win_r: torch.Tensor, forced: torch.Tensor | None = None
) -> Matching:
    """The op's matching, or (`forced` [W, na], B slot or -1 per A slot) a given assignment replayed, with the
    similarity it gives up against the op's own choice."""
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
    shortfall = torch.zeros_like(best)  # [W, na]
    if forced is not None:
        merged, partner, shortfall = replay(forced, sim, best, a_idx, b_idx, win_r)
    assign = torch.where(merged, partner, torch.full_like(partner, -1))  # [W, na]
    return Matching(a_idx[merged], b_idx.gather(1, partner)[merged], assign, shortfall)


def replay(
    forced: torch.Tensor,
    sim: torch.Tensor,
    best: torch.Tensor,
    a_idx: torch.Tensor,
    b_idx: torch.Tensor,
    win_r: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(merged [W, na], partner [W, na], shortfall [W, na]) of a given assignment, checked against the plan.

    The shortfall of an A slot is the larger of: its best similarity minus its partner's (merged slots), and how
    far it is on the wrong side of the top-r cut (a merged slot below the best slot that stays, or a staying slot
    above the worst slot that merged). The op's own choice has none: partners are argmaxes, the top r are sorted.
    """
    if tuple(forced.shape) != tuple(a_idx.shape):
        raise InputError(f"a forced assignment is {tuple(forced.shape)}, the plan's A slots are {tuple(a_idx.shape)}.")
    forced = forced.to(device=a_idx.device, dtype=torch.int64)
    merged = forced >= 0  # [W, na]
    nb = b_idx.shape[1]
    if bool((merged & (a_idx < 0)).any()) or bool((forced >= nb).any()):
        raise InputError("a forced assignment merges a padding A slot or names a B slot outside its window.")
    partner = forced.clamp(min=0)  # [W, na]
    if bool((merged & (b_idx.gather(1, partner) < 0)).any()):
        raise InputError("a forced assignment merges into a padding B slot.")
    counts = merged.sum(dim=1)  # [W]
    if not torch.equal(counts, win_r.to(counts.dtype)):
        bad = int((counts != win_r).nonzero()[0, 0])
        raise InputError(
            f"a forced assignment merges {int(counts[bad])} tokens in window {bad}, the plan {int(win_r[bad])}."
        )
    chosen = sim.gather(-1, partner.unsqueeze(-1)).squeeze(-1)  # [W, na]
    partner_gap = torch.where(merged, best - chosen, torch.zeros_like(best))
    inf = torch.full_like(best, math.inf)
    stays = (~merged) & (a_idx >= 0)
    top_stay = torch.where(stays, best, -inf).amax(dim=1, keepdim=True)  # [W, 1] best slot that stays
    low_merged = torch.where(merged, best, inf).amin(dim=1, keepdim=True)  # [W, 1] worst slot that merged
    rank_gap = torch.where(merged, top_stay - best, torch.where(stays, best - low_merged, -inf)).clamp(min=0)
    return merged, partner, torch.maximum(partner_gap, rank_gap)


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


def apply_plan(
    hidden: torch.Tensor, guidance: torch.Tensor, plan: StagePlan, merged_into: torch.Tensor | None = None
) -> MergeResult:
    """Run one planned stage: hidden [B, S, D] any float dtype, guidance [B, S] (xi, fp32).

    merged_into [B, S] (optional): replay this assignment (another implementation's, in MergeResult.merged_into's
    form) instead of matching; an InputError if it is not one the plan allows (wrong counts, outside a window)."""
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
    own_index = torch.where(keep, positions, -1).reshape(-1)  # [N] row-local index, -1 at padding
    out_flat, result_into = flat, own_index
    win_index = torch.as_tensor(plan.win_index, device=device)  # [W, n_max], (0, 0) when nothing merges
    assign = torch.full((win_index.shape[0], (win_index.shape[1] + 1) // 2), -1, dtype=torch.int64, device=device)
    shortfall = torch.zeros(bsz * seq, device=device)  # [N]
    if merged_into is not None and tuple(merged_into.shape) != (bsz, seq):
        raise InputError(f"a forced assignment is {tuple(merged_into.shape)}, the stage's input ({bsz}, {seq}).")
    replaying = merged_into is not None and plan.win_index.size > 0
    forced = assignment_of(merged_into.to(device), win_index, seq) if replaying else None
    if plan.win_index.size:
        x = flat.float()  # [N, D]
        win_r = torch.as_tensor(plan.win_r, device=device)
        found = match(x, win_index, win_r, forced)
        src, dst, assign = found.src, found.dst, found.assign
        a_idx = win_index[:, 0::2]
        shortfall[a_idx[a_idx >= 0]] = found.shortfall[a_idx >= 0]
        if src.numel():
            touched, merged = weighted_merge(x, guidance.reshape(-1).float(), src, dst)
            out_flat = flat.clone()
            out_flat[touched] = merged.to(hidden.dtype)
            keep = keep.reshape(-1).index_fill(0, src, False).reshape(bsz, seq)
            result_into = own_index.index_copy(0, src, dst % seq)  # A -> its B partner (B never merges)
    if merged_into is not None and not torch.equal(result_into.reshape(bsz, seq), merged_into.to(device)):
        raise InputError("a forced assignment moves tokens that are not A tokens of a window, or pads differently.")
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
        merged_into=result_into.reshape(bsz, seq),
        assign=assign,
        shortfall=shortfall.reshape(bsz, seq),
    )


def assignment_of(merged_into: torch.Tensor, win_index: torch.Tensor, seq: int) -> torch.Tensor:
    """[W, na] B slot (or -1) of each A slot, from merged_into [B, S] (row-local survivor index per token).

    An A token that moved to a token outside its window's B slots gets slot nb (out of range): `replay` refuses it.
    """
    a_idx, b_idx = win_index[:, 0::2], win_index[:, 1::2]  # [W, na], [W, nb]
    flat_into = merged_into.reshape(-1)  # [N]
    a_safe = a_idx.clamp(min=0)
    target = (a_safe // seq) * seq + flat_into[a_safe]  # [W, na] flat index the A token went to
    moved = (a_idx >= 0) & (target != a_idx)  # [W, na]
    hit = (b_idx.unsqueeze(1) == target.unsqueeze(2)) & (b_idx >= 0).unsqueeze(1)  # [W, na, nb]
    slot = torch.where(hit.any(dim=2), hit.int().argmax(dim=2), torch.full_like(a_idx, b_idx.shape[1]))
    return torch.where(moved, slot, torch.full_like(a_idx, -1))


def lightkv_merge(
    hidden: torch.Tensor,
    guidance: torch.Tensor,
    spans: Sequence[Sequence[VisionSpan]],
    *,
    windows: int,
    ratio: float,
    grid_mode: GridMode = "true",
    lengths: Sequence[int] | None = None,
    merged_into: torch.Tensor | None = None,
) -> MergeResult:
    """One LightKV stage: plan from the layout, then merge the data. See the module docstring for the rules.
    `merged_into`: replay a given assignment (apply_plan)."""
    if hidden.dim() != 3 or guidance.dim() != 2:
        raise InputError(
            f"expected hidden [B, S, D] and guidance [B, S], got {tuple(hidden.shape)} and {tuple(guidance.shape)}."
        )
    plan = plan_stage(spans, hidden.shape[1], windows=windows, ratio=ratio, grid_mode=grid_mode, lengths=lengths)
    return apply_plan(hidden, guidance, plan, merged_into)
