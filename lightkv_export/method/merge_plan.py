"""The per-request merge plan: every stage's host-side plan and the index tensors an engine is fed.

Everything here depends only on the token layout (spans, grids, row lengths) and the schedule, never on
tensor values (DESIGN.md section 2). The runtime computes it before prefill; the transformed prefill graph takes
it as inputs named by `stage_input_names`. One stage's inputs:

* win_index [W, n_max] int64, win_r [W] int64, out_lengths [B] int64: the LightKVMerge plan (reference.StagePlan)
* text_index [B, T] int64, text_valid [B, T] bool: the non-vision tokens each row's guidance attends to
  (T = the most non-vision tokens of any row; padding entries point at 0 and are invalid)

A graph lowered to the TensorRT plugins (passes/lower_trt_plugin.py) takes one more input per stage, out_slots [S']
int64 = 0..S'-1 (`lowered_feeds`): S' = max(out_lengths) as an input dimension, so that TensorRT sizes every output
after the merge from plain input dimensions (no data-dependent size tensor). The ONNX function reads S' from
out_lengths itself, so ONNX Runtime graphs have no such input.

A graph built for grids with inline fixed tokens (insert_lightkv(..., reorder=True): LLaVA-NeXT's newlines) takes
one more input per stage, order [B, S] int64 (`plan_request(..., reorder=True)`): the permutation of the stage's
input it merges (layout.inline_order; 0..S-1 where nothing moves). Graphs built without it have no such input, and
plan_request refuses a layout that needs one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightkv_export.errors import InputError
from lightkv_export.method.layout import GridMode, StagePlan, inline_order, plan_stage
from lightkv_export.method.schedule import Schedule
from lightkv_export.method.spans import VisionSpan

STAGE_INPUTS = ("win_index", "win_r", "out_lengths", "text_index", "text_valid")
OUT_SLOTS = "out_slots"  # the extra stage input of graphs lowered to the TensorRT plugins
ORDER = "order"  # the extra stage input of graphs built for grids with inline fixed tokens


def stage_input_names(stage: int) -> dict[str, str]:
    """Graph input names of stage `stage` (0-based), keyed by role (OUT_SLOTS: TensorRT graphs only; ORDER: graphs
    built for inline fixed tokens only)."""
    return {role: f"lightkv.{stage}.{role}" for role in (*STAGE_INPUTS, OUT_SLOTS, ORDER)}


def takes_order(input_names: Sequence[str]) -> bool:
    """Whether a prefill graph with these inputs was built for inline fixed tokens (takes each stage's order)."""
    return stage_input_names(0)[ORDER] in set(input_names)


def stage_of(name: str) -> int | None:
    """The stage whose input or output `name` is (`lightkv.<k>.<role>`), else None."""
    found = re.fullmatch(r"lightkv\.(\d+)\.\w+", name)
    return int(found.group(1)) if found else None


def out_slots(out_lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """[S'] int64 0..S'-1, S' = max(out_lengths): a stage's output length as a tensor dimension."""
    return np.arange(int(np.max(out_lengths, initial=0)), dtype=np.int64)


def lowered_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs a graph lowered to the TensorRT plugins takes besides a plan's `feeds`: each stage's out_slots,
    from its out_lengths."""
    extra, k = {}, 0
    while (names := stage_input_names(k))["out_lengths"] in feeds:
        extra[names[OUT_SLOTS]] = out_slots(feeds[names["out_lengths"]])
        k += 1
    return extra


def stage_kept_name(stage: int) -> str:
    """Graph output: kept [B, S'] int64 of stage `stage`: source index (into the stage's input, as it was before any
    reordering) of each survivor."""
    return f"lightkv.{stage}.kept"


def stage_assign_name(stage: int) -> str:
    """Graph output: assign [W, na] int64 of stage `stage`: the B slot each merged A slot of each window went to, -1
    where it stays (reference.py). Engines built before it existed lack it."""
    return f"lightkv.{stage}.assign"


def merged_into(win_index: np.ndarray, assign: np.ndarray, lengths: Sequence[int], seq: int) -> np.ndarray:
    """[B, S] int64 row-local index of the survivor each input token ended in (its own if it stayed, -1 at
    padding), from a stage's window plan (win_index [W, n_max] as fed) and its assign output [W, na]: the form
    reference.MergeResult.merged_into has, whatever windows an engine was fed (e.g. plan_request's dummy window).
    An InputError if the output names a slot no window has (an engine's bug, reported as such by parity)."""
    out = np.full((len(lengths), seq), -1, dtype=np.int64)
    for b, n in enumerate(lengths):
        out[b, :n] = np.arange(n)
    win_index, assign = np.asarray(win_index), np.asarray(assign)
    w, i = np.nonzero(assign >= 0)
    cols = 2 * assign[w, i] + 1
    if assign.shape[0] > win_index.shape[0] or bool((cols >= win_index.shape[1]).any()):
        raise InputError(f"an assign output {assign.shape} names slots outside the windows {win_index.shape}.")
    a, dst = win_index[w, 2 * i], win_index[w, cols]
    if bool((a < 0).any()) or bool((dst < 0).any()):
        raise InputError("an assign output merges a padding slot of a window.")
    out[a // seq, a % seq] = dst % seq
    return out


@dataclass(frozen=True)
class RequestPlan:
    stages: tuple[StagePlan, ...]
    feeds: dict[str, np.ndarray]
    spans: tuple[tuple[VisionSpan, ...], ...]  # what the last layer group sees
    lengths: tuple[int, ...]  # valid tokens per row after the last stage


def layer_lengths(schedule: Schedule, plan: RequestPlan | None, lengths: Sequence[int]) -> np.ndarray:
    """[L, B] valid KV entries of each decoder layer and row: the input lengths up to the first merge layer, then
    each stage's out_lengths (no plan: nothing merged)."""
    valid = np.tile(np.asarray(lengths, dtype=np.int64), (schedule.num_layers, 1))  # [L, B]
    for k, stage in enumerate(schedule.stages if plan is not None else ()):
        valid[stage.layer :] = plan.stages[k].out_lengths  # layers after lambda_k (0-based index >= lambda_k)
    return valid


def text_positions(spans: Sequence[Sequence[VisionSpan]], lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(text_index [B, T] int64, text_valid [B, T] bool): non-vision, non-padding positions of each row."""
    rows = []
    for row, length in zip(spans, lengths, strict=True):
        vision = np.zeros(length, dtype=bool)
        for span in row:
            vision[span.vision_positions()] = True  # a grid's inline fixed tokens are not vision tokens
        rows.append(np.flatnonzero(~vision))
    width = max((len(r) for r in rows), default=0)
    index = np.zeros((len(rows), width), dtype=np.int64)
    valid = np.zeros((len(rows), width), dtype=bool)
    for b, r in enumerate(rows):
        index[b, : len(r)], valid[b, : len(r)] = r, True
    return index, valid


def plan_request(
    spans: Sequence[Sequence[VisionSpan]],
    lengths: Sequence[int],
    schedule: Schedule,
    *,
    grid_mode: GridMode = "true",
    reorder: bool = False,
) -> RequestPlan:
    """Plan every stage of `schedule` for a batch of rows (right-padded to max(lengths)).

    reorder: the engine takes each stage's order (built for inline fixed tokens): feed it at every stage. Without
    it, a layout whose inline tokens would have to move is an InputError."""
    cur_spans = tuple(tuple(row) for row in spans)
    cur_lengths = tuple(int(n) for n in lengths)
    seq = max(cur_lengths)
    plans, feeds = [], {}
    for k, stage in enumerate(schedule.stages):
        text_index, text_valid = text_positions(cur_spans, cur_lengths)
        kwargs = {"windows": stage.windows, "ratio": stage.ratio, "grid_mode": grid_mode}
        if not reorder and inline_order(cur_spans, seq, **kwargs)[0] is not None:
            raise InputError(
                "the images have grids with tokens that never merge inside them (a newline after every row), and "
                "this engine was built without the per-stage order input they need. Expected an engine built for "
                "its family's layout (insert_lightkv(..., reorder=True)); rebuild it."
            )
        plan = plan_stage(cur_spans, seq, lengths=cur_lengths, reorder=reorder, **kwargs)
        names = stage_input_names(k)
        if reorder:  # [B, S]: the identity where nothing moves, so the engine's inputs never change
            identity = np.tile(np.arange(seq, dtype=np.int64), (len(cur_spans), 1))
            feeds[names[ORDER]] = plan.order if plan.order is not None else identity
        if plan.win_r.size:
            feeds[names["win_index"]] = plan.win_index.astype(np.int64)
            feeds[names["win_r"]] = plan.win_r.astype(np.int64)
        else:  # nothing to merge: one empty window, so no engine ever sees a zero-sized dimension
            feeds[names["win_index"]] = np.full((1, 2), -1, dtype=np.int64)
            feeds[names["win_r"]] = np.zeros(1, dtype=np.int64)
        feeds[names["out_lengths"]] = np.asarray(plan.out_lengths, dtype=np.int64)
        feeds[names["text_index"]], feeds[names["text_valid"]] = text_index, text_valid
        plans.append(plan)
        cur_spans, cur_lengths, seq = plan.spans, plan.out_lengths, plan.out_seq_len
    return RequestPlan(tuple(plans), feeds, cur_spans, cur_lengths)
