"""The host half of LightKVMerge: one stage's plan from the token layout alone (numpy, no torch).

Everything here depends only on spans, grids, row lengths and the stage's windows and ratio, never on tensor
values (DESIGN.md section 2), so S' is known before any compute and an engine can size its buffers from it. The
runtime plans every request with it; the PyTorch reference (method/reference.py, which states the rules) and
every kernel execute the plans it makes.

Tokens that never merge inside a grid (a span's `trailing` tokens after every row, LLaVA-NeXT's newlines) would
make the survivors per row, and so their place after a merge, depend on the data. At the first stage that merges
such a grid the plan therefore reorders the stage's input (`inline_order`): the grid's vision tokens first, raster
order, then its inline tokens in order, everything else in place. The stage merges the reordered sequence and
reports `kept` in the original positions, and the grid leaves it as a plain grid followed by a fixed run, so every
later stage is an ordinary one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lightkv_export.errors import InputError
from lightkv_export.method.spans import VisionSpan

# The op's identity, shared by the ONNX node, the ONNX Runtime function and the TensorRT plugin.
OP_DOMAIN = "lightkv"
OP_NAME = "LightKVMerge"
OP_VERSION = 1

GridMode = Literal["true", "official"]
GRID_MODES: tuple[str, ...] = ("true", "official")
MIN_TOKENS_PER_WINDOW = 8  # an image needs at least 8 * p^2 tokens for a stage with p windows per side


@dataclass(frozen=True)
class StagePlan:
    """The data-independent half of one stage: what to compare, how many to merge, the output layout.

    win_index: [W, n_max] int64, flat index (b * S + s) of each window's tokens in raster order, -1 padding
    win_r:     [W] int64, tokens to merge away in each window
    order:     [B, S] int64 or None: the stage's input reordering (`inline_order`): the op runs on the input
               gathered by it, its win_index and kept index the reordered sequence. None: nothing moves.
    """

    batch: int
    seq_len: int
    lengths: tuple[int, ...]
    out_lengths: tuple[int, ...]
    win_index: np.ndarray
    win_r: np.ndarray
    spans: tuple[tuple[VisionSpan, ...], ...]
    skipped: tuple[tuple[bool, ...], ...]
    order: np.ndarray | None = None

    @property
    def out_seq_len(self) -> int:
        return max(self.out_lengths) if self.out_lengths else 0


def merge_count(n: int, ratio: float) -> int:
    """r = min(floor(ratio * n), n // 2): tokens one window of n merges away."""
    return min(math.floor(round(ratio * n, 9)), n // 2)


# floor(round(p, 9)) is floor(p) + 1 exactly when p's fractional part exceeds the decimal 0.9999999995 (round()
# is correctly rounded). The nearest double to that decimal lies just below it with no double in between, so a
# strict `>` against it gives round()'s answer bit for bit.
ROUND_UP_FRACTION = 0.9999999995


def merge_counts(sizes: np.ndarray, ratio: float) -> np.ndarray:
    """merge_count over window sizes [W] -> r [W] int64, with identical results."""
    n = np.asarray(sizes, dtype=np.int64)
    p = n.astype(np.float64) * ratio  # the same IEEE product as ratio * n in Python
    whole = np.floor(p)
    r = whole.astype(np.int64) + ((p - whole) > ROUND_UP_FRACTION).astype(np.int64)  # p - floor(p) is exact
    return np.minimum(r, n // 2)


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


def window_layout(n: int, grid: tuple[int, int], windows: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of one image: (members [p*p, n_max] token offsets in raster order, -1 padded; sizes [p*p])."""
    h, w = grid
    offsets = np.arange(n, dtype=np.int64)  # [n]
    row_band = np.repeat(np.arange(windows, dtype=np.int64), band_sizes(h, windows))  # [h]
    col_band = np.repeat(np.arange(windows, dtype=np.int64), band_sizes(w, windows))  # [w]
    label = row_band[offsets // w] * windows + col_band[offsets % w]  # [n] window of each token
    order = np.argsort(label * n + offsets, kind="stable")  # [n] by window, then raster order (keys distinct)
    sizes = np.bincount(label, minlength=windows * windows).astype(np.int64)  # [p*p]
    starts = np.cumsum(sizes) - sizes  # [p*p]
    sorted_label = label[order]
    slot = np.arange(n) - starts[sorted_label]  # [n] position inside its window
    members = np.full((windows * windows, int(sizes.max())), -1, dtype=np.int64)
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
            if span.trailing < 0 or (span.trailing and span.length != h * w):
                raise InputError(
                    f"{where}: {span.trailing} inline fixed tokens per row need a full {h}x{w} grid of vision "
                    "tokens. Expected trailing >= 0, and length = h * w where trailing > 0."
                )
            if h < 1 or w < 1 or h * w < span.length or (h - 1) * w >= span.length:
                raise InputError(
                    f"{where}: grid {h}x{w} does not match {span.length} tokens. Expected "
                    "(h - 1) * w < length <= h * w (a full grid, or a partial last row after a merge)."
                )
            prev_end = span.end


def skips(span: VisionSpan, windows: int) -> bool:
    """Too small for the stage's windows: the span passes the stage unmerged."""
    return span.length < MIN_TOKENS_PER_WINDOW * windows * windows


def merges(span: VisionSpan, windows: int, ratio: float, grid_mode: GridMode) -> bool:
    """Whether the stage merges at least one of the span's tokens."""
    if ratio == 0.0 or skips(span, windows):
        return False
    grid = span.grid if grid_mode == "true" else pseudo_square(span.length)
    return int(merge_counts(window_layout(span.length, grid, windows)[1], ratio).sum()) > 0


def inline_order(
    spans: Sequence[Sequence[VisionSpan]],
    seq_len: int,
    *,
    windows: int,
    ratio: float,
    grid_mode: GridMode = "true",
) -> tuple[np.ndarray | None, tuple[tuple[VisionSpan, ...], ...]]:
    """(order [B, S] int64 or None, the spans in the reordered sequence): each span with inline fixed tokens that
    this stage merges gets its vision tokens first (raster order), then its inline tokens in order, within its own
    positions; everything else stays. None when nothing moves (no inline tokens, or none of their grids merges
    here: a model's own order until its first merge, so ratio 0 is the model itself)."""
    if not any(span.trailing for row in spans for span in row):  # every family without inline tokens
        return None, tuple(tuple(row) for row in spans)
    order = np.tile(np.arange(seq_len, dtype=np.int64), (len(spans), 1))  # [B, S]
    moved, out = False, []
    for b, row in enumerate(spans):
        row_out = []
        for span in row:
            if span.trailing and merges(span, windows, ratio, grid_mode):
                order[b, span.start : span.end] = np.concatenate([span.vision_positions(), span.inline_positions()])
                span, moved = VisionSpan(span.start, span.length, span.grid), True
            row_out.append(span)
        out.append(tuple(row_out))
    return (order if moved else None), tuple(out)


def plan_stage(
    spans: Sequence[Sequence[VisionSpan]],
    seq_len: int,
    *,
    windows: int,
    ratio: float,
    grid_mode: GridMode = "true",
    lengths: Sequence[int] | None = None,
    reorder: bool = False,
) -> StagePlan:
    """Everything about one stage that depends only on the layout (no tensor values).

    reorder: plan grids with inline fixed tokens on the reordered input (`inline_order`, the plan's `order`);
    without it such a grid that merges here is an InputError (a caller that would run the op on the input as it
    is, as reference.lightkv_merge does, would merge the wrong tokens)."""
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
    order, spans = inline_order(spans, seq_len, windows=windows, ratio=ratio, grid_mode=grid_mode)
    if order is not None and not reorder:
        raise InputError(
            "a grid with tokens that never merge inside it (a newline after every row) merges at this stage, and "
            "this caller runs the stage on the input as it is. Expected plan_stage(..., reorder=True) with the "
            "input gathered by the plan's order (merge_plan.plan_request and torch_runtime.prefill do this)."
        )

    blocks: list[np.ndarray] = []
    rs: list[np.ndarray] = []
    out_lengths, new_spans, skipped = [], [], []
    for b, row in enumerate(spans):
        removed = 0
        row_spans, row_skipped = [], []
        for span in row:
            skip = skips(span, windows)
            row_skipped.append(skip)
            if skip or ratio == 0.0 or span.trailing:  # a grid with inline tokens here merges nothing
                row_spans.append(VisionSpan(span.start - removed, span.length, span.grid, span.trailing))
                continue
            grid = span.grid if grid_mode == "true" else pseudo_square(span.length)
            members, sizes = window_layout(span.length, grid, windows)
            r = merge_counts(sizes, ratio)  # [p*p]
            base = b * seq_len + span.start
            blocks.append(np.where(members >= 0, members + base, members))
            rs.append(r)
            n_new = span.length - int(r.sum())
            row_spans.append(VisionSpan(span.start - removed, n_new, derive_grid(span.grid, n_new)))
            removed += span.length - n_new
        out_lengths.append(lengths[b] - removed)
        new_spans.append(tuple(row_spans))
        skipped.append(tuple(row_skipped))

    n_max = max((blk.shape[1] for blk in blocks), default=0)
    win_index = (
        np.concatenate([np.pad(blk, ((0, 0), (0, n_max - blk.shape[1])), constant_values=-1) for blk in blocks])
        if blocks
        else np.empty((0, 0), dtype=np.int64)
    )
    win_r = np.concatenate(rs) if rs else np.empty(0, dtype=np.int64)
    return StagePlan(
        batch=len(spans),
        seq_len=seq_len,
        lengths=lengths,
        out_lengths=tuple(out_lengths),
        win_index=win_index,
        win_r=win_r,
        spans=tuple(new_spans),
        skipped=tuple(skipped),
        order=order,
    )
