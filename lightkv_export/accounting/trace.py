"""A request's token layout and what a schedule does to it: the tokens each decoder layer sees and caches.

Only the host-side merge plan runs (no tensors of data), the same plan the runtime feeds an engine
(method.merge_plan), so the lengths per layer here are the engine's, per-window floors and skipped images included.
KV bytes of a traced request are counted by lightkv_export.kv.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from lightkv_export.errors import InputError
from lightkv_export.kv import kv_bytes_per_layer, kv_shapes
from lightkv_export.method import merge_plan
from lightkv_export.method.layout import GridMode
from lightkv_export.method.schedule import Schedule, Stage
from lightkv_export.method.spans import VisionSpan
from lightkv_export.models.shapes import ArchShape, image_grids


@dataclass(frozen=True)
class TokenLayout:
    """One request's prefill sequence: text before the images, the images' vision grids back to back, text after."""

    text_before: int
    grids: tuple[tuple[int, int], ...]
    text_after: int

    @property
    def vision(self) -> int:
        return sum(h * w for h, w in self.grids)

    @property
    def text(self) -> int:
        return self.text_before + self.text_after

    @property
    def seq_len(self) -> int:
        return self.text + self.vision

    def spans(self) -> tuple[VisionSpan, ...]:
        out, start = [], self.text_before
        for h, w in self.grids:
            out.append(VisionSpan(start, h * w, (h, w)))
            start += h * w
        return tuple(out)


def request_layout(shape: ArchShape, height: int, width: int, prompt_tokens: int, images: int = 1) -> TokenLayout:
    """`images` images of height x width followed by `prompt_tokens` text tokens (template and question)."""
    if prompt_tokens < 0 or images < 1:
        raise InputError(f"a request needs prompt tokens >= 0 and images >= 1, got {prompt_tokens} and {images}.")
    return TokenLayout(0, tuple(image_grids(shape, height, width) * images), prompt_tokens)


@dataclass(frozen=True)
class StageTrace:
    """What one stage did to the sequence, from the host-side plan (exact per-window floors and skips)."""

    layer: int
    windows: int
    ratio: float
    seq_in: int
    seq_out: int
    vision_in: int
    vision_out: int
    skipped: int  # images (spans) that were too small for this stage's windows
    similarity_pairs: int  # sum over windows of n_a * n_b


@dataclass(frozen=True)
class SequenceTrace:
    """Tokens each decoder layer sees and caches (layers 1..L), all and vision only."""

    seq_per_layer: tuple[int, ...]
    vision_per_layer: tuple[int, ...]
    stages: tuple[StageTrace, ...]
    vision: int
    text: int

    @property
    def retention(self) -> float:
        """Eq. 9 as achieved: the layer-averaged fraction of vision-token KV entries kept."""
        if not self.vision:
            return 1.0
        return sum(self.vision_per_layer) / (len(self.vision_per_layer) * self.vision)


@lru_cache(maxsize=256)
def _trace_vision(
    grids: tuple[tuple[int, int], ...], stages: tuple[Stage, ...], num_layers: int, grid_mode: GridMode
) -> tuple[tuple[int, ...], tuple[tuple[int, int, int, int], ...]]:
    """Vision tokens per layer and per stage (layer, vision_out, skipped, pairs); text does not change the plan.

    The plan is made for the images alone (one row of only vision tokens): where text sits shifts the spans but
    changes no window, so every text length shares one cached plan.
    """
    spans = TokenLayout(0, grids, 0).spans()
    seq = sum(h * w for h, w in grids)
    schedule = Schedule(num_layers, stages)
    plan = merge_plan.plan_request([spans], [seq], schedule, grid_mode=grid_mode) if spans else None
    per_stage = []
    for k, stage in enumerate(stages):
        if plan is None:  # no image: nothing to plan or merge
            per_stage.append((stage.layer, 0, 0, 0))
            continue
        st = plan.stages[k]
        valid = st.win_index >= 0  # [W, n_max]
        pairs = int((valid[:, 0::2].sum(1) * valid[:, 1::2].sum(1)).sum()) if st.win_index.size else 0
        per_stage.append((stage.layer, st.out_lengths[0], sum(st.skipped[0]), pairs))
    per_layer = tuple(int(n) for n in merge_plan.layer_lengths(schedule, plan, [seq])[:, 0])  # [L] of row 0
    return per_layer, tuple(per_stage)


def trace_schedule(
    schedule: Schedule | None, layout: TokenLayout, num_layers: int, grid_mode: GridMode = "true"
) -> SequenceTrace:
    """Run every stage's host-side plan on the layout (no tensors of data): exact sequence lengths per layer."""
    stages = tuple(schedule.stages) if schedule is not None else ()
    if schedule is not None and schedule.num_layers != num_layers:
        raise InputError(f"schedule is for {schedule.num_layers} layers, the model has {num_layers}.")
    vision_per_layer, per_stage = _trace_vision(layout.grids, stages, num_layers, grid_mode)
    traces, vision_in = [], layout.vision
    for st, (_, v_out, skipped, pairs) in zip(stages, per_stage, strict=True):
        traces.append(
            StageTrace(
                st.layer,
                st.windows,
                st.ratio,
                layout.text + vision_in,
                layout.text + v_out,
                vision_in,
                v_out,
                skipped,
                pairs,
            )
        )
        vision_in = v_out
    return SequenceTrace(
        seq_per_layer=tuple(v + layout.text for v in vision_per_layer),
        vision_per_layer=vision_per_layer,
        stages=tuple(traces),
        vision=layout.vision,
        text=layout.text,
    )


def analytic_kv_bytes_per_layer(
    shape: ArchShape, trace: SequenceTrace, dtype_bytes: int, *, extra_tokens: int = 0, batch: int = 1
) -> list[int]:
    """K + V bytes per layer for a traced request, plus `extra_tokens` generated ones in every layer."""
    lengths = [s + extra_tokens for s in trace.seq_per_layer]
    return kv_bytes_per_layer(kv_shapes(lengths, shape.kv_heads, shape.head_dim, batch), dtype_bytes)
