"""Accounting: KV-cache bytes, Eq. 9 retention and FLOPs, vanilla vs LightKV, from shapes alone (no weights).

Conventions (every number this module produces follows them):
* FLOPs: one multiply-add = 2 FLOPs. Matmuls only (norms, RoPE, softmax, activations and residual adds are
  O(S * D) and left out). Language model only: the vision encoder is the same for both variants.
* Attention: QK^T and PV each cost 2 * S_q * S_k * head_dim per query head. `causal=False` (default) counts
  the full S x S product, as dense kernels compute it; `causal=True` counts only the S (S + 1) / 2 pairs a
  causal kernel needs.
* Per layer: Q/K/V/O projections 2 * S * D * (2 D + 2 Hkv d), gated MLP 3 matmuls 2 * S * 3 * D * I, at the
  sequence length that layer sees (after the stages merged before it).
* LightKV overheads per stage: guidance, the S x T logits of every query head against the T non-vision keys
  (2 * S * T * d per head), and the merge similarity, n_a x n_b x D per window (2 FLOPs each).
* LM head: `lm_head="last"` (default) counts only the last prefill position (what generation needs); "all"
  counts every position (HF without logits_to_keep), "none" leaves it out.
* Decode: N generated tokens, each a one-token pass over every layer attending to that layer's cache plus the
  tokens generated so far, and one LM-head row.
* KV bytes: K and V, [B, Hkv, S_l, d] each per layer, in the cache dtype. GB = 1e9 bytes, GiB = 2^30.

Pictures (matplotlib, Agg canvas, no pyplot state): vision tokens and KV bytes per layer, vanilla vs LightKV, from
an engine's manifest (`write_build_pictures`, at build time); and, from a PyTorch reference run on the engine's
own inputs for any image and prompt, the merge map and the text-guidance heatmap over the image:

    python -m lightkv_export.report ENGINE_DIR [--image photo.png] [--prompt "..."] [--out DIR]
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from lightkv_export.artifacts import write_text_atomic
from lightkv_export.errors import InputError, LightKVError
from lightkv_export.kv import kv_bytes_per_layer, kv_shapes
from lightkv_export.method.reference import GridMode, plan_stage
from lightkv_export.method.schedule import Schedule
from lightkv_export.models.base import VisionSpan
from lightkv_export.models.shapes import ArchShape, image_grids

DTYPE_BYTES: dict[str, int] = {
    "fp32": 4,
    "float32": 4,
    "fp16": 2,
    "float16": 2,
    "bf16": 2,
    "bfloat16": 2,
    "fp8": 1,
    "int8": 1,
}
GB = 10**9
GIB = 2**30
LmHead = Literal["none", "last", "all"]


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name.strip().lower()]
    except KeyError:
        raise InputError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_BYTES)}.") from None


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(b|kb|kib|mb|mib|gb|gib|g|tb|tib)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": GB, "g": GB, "gib": GIB}
_UNITS |= {"tb": 10**12, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'80GB' -> 80e9 bytes, '80GiB' -> 80 * 2^30; a bare number is GB."""
    m = _MEMORY.match(text)
    if not m:
        raise InputError(f"memory size {text!r} is not NUMBER[UNIT], e.g. '80GB', '79.6GiB' or '24000MiB'.")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "gb").lower()])


# ---------------------------------------------------------------------------------------------------------
# KV bytes
# ---------------------------------------------------------------------------------------------------------


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
    grids: tuple[tuple[int, int], ...], stages: tuple, num_layers: int, grid_mode: str
) -> tuple[tuple[int, ...], tuple[tuple[int, int, int, int], ...]]:
    """Vision tokens per layer and per stage (vision_out, skipped, pairs); text does not change the plan."""
    spans = list(TokenLayout(0, grids, 0).spans())
    seq = sum(h * w for h, w in grids)
    per_stage = []
    for stage in stages:
        if not spans:  # no image: nothing to plan or merge
            per_stage.append((0, 0, 0))
            continue
        plan = plan_stage([spans], seq, windows=stage.windows, ratio=stage.ratio, grid_mode=grid_mode)
        valid = plan.win_index >= 0  # [W, n_max]
        pairs = int((valid[:, 0::2].sum(1) * valid[:, 1::2].sum(1)).sum()) if plan.win_index.numel() else 0
        spans = list(plan.spans[0])
        seq = plan.out_lengths[0]
        per_stage.append((seq, sum(plan.skipped[0]), pairs))
    per_layer = []
    for layer in range(1, num_layers + 1):
        done = [s for s, st in zip(per_stage, stages, strict=True) if st.layer < layer]
        per_layer.append(done[-1][0] if done else sum(h * w for h, w in grids))
    return tuple(per_layer), tuple((st.layer, *s) for s, st in zip(per_stage, stages, strict=True))


def trace_schedule(schedule: Schedule | None, layout: TokenLayout, num_layers: int, grid_mode: GridMode = "true"):
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


# ---------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------


def attention_pairs(seq_q: int, seq_k: int, causal: bool) -> int:
    """Query-key pairs: all of them, or (causal, queries being the last seq_q of seq_k keys) the visible ones."""
    if not causal:
        return seq_q * seq_k
    past = seq_k - seq_q
    return seq_q * past + seq_q * (seq_q + 1) // 2


def layer_flops(shape: ArchShape, seq_q: int, seq_k: int | None = None, *, causal: bool = False) -> dict[str, int]:
    """One decoder layer: seq_q new tokens attending to seq_k keys (prefill: seq_k = seq_q)."""
    seq_k = seq_q if seq_k is None else seq_k
    d, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    return {
        "qkvo": 2 * seq_q * d * (2 * d + 2 * kv),
        "attention": 2 * 2 * attention_pairs(seq_q, seq_k, causal) * shape.heads * shape.head_dim,
        "mlp": 2 * seq_q * 3 * d * inter,
    }


def guidance_flops(shape: ArchShape, seq_len: int, text_tokens: int) -> int:
    """S x T logits per query head (post-RoPE q.k of every token against the non-vision keys)."""
    return 2 * seq_len * text_tokens * shape.heads * shape.head_dim


def merge_flops(shape: ArchShape, similarity_pairs: int) -> int:
    """Cosine similarity of every A token with every B token of its window, n_a x n_b x D per window."""
    return 2 * similarity_pairs * shape.hidden


def lm_head_flops(shape: ArchShape, rows: int) -> int:
    return 2 * rows * shape.hidden * shape.vocab


@dataclass(frozen=True)
class FlopConvention:
    causal: bool = False
    lm_head: LmHead = "last"
    decode_tokens: int = 0

    def describe(self) -> str:
        attn = "causal (S(S+1)/2 pairs)" if self.causal else "full S x S"
        return f"multiply-add = 2 FLOPs, attention {attn}, LM head {self.lm_head}, {self.decode_tokens} decode tokens"


def prefill_flops(shape: ArchShape, trace: SequenceTrace, convention: FlopConvention = FlopConvention()) -> dict:
    """FLOPs by component for the prefill of one traced request (LightKV overheads included when it has stages)."""
    total = {"qkvo": 0, "attention": 0, "mlp": 0}
    for seq in trace.seq_per_layer:
        for k, v in layer_flops(shape, seq, causal=convention.causal).items():
            total[k] += v
    rows = {"none": 0, "last": 1, "all": trace.seq_per_layer[-1]}[convention.lm_head]
    total["lm_head"] = lm_head_flops(shape, rows)
    total["guidance"] = sum(guidance_flops(shape, st.seq_in, trace.text) for st in trace.stages if st.ratio > 0)
    total["merge"] = sum(merge_flops(shape, st.similarity_pairs) for st in trace.stages)
    return total


def decode_flops(shape: ArchShape, trace: SequenceTrace, tokens: int, *, causal: bool = False) -> int:
    """`tokens` one-token steps; step t (0-based) attends to each layer's prefill cache plus t + 1 tokens.

    Closed form of summing `layer_flops(shape, 1, S_l + t + 1)` over steps and layers, plus one LM-head row per
    step (a single query sees every cached key, so causal or not makes no difference here).
    """
    del causal  # one query row: causal and full attention count the same pairs
    linear = sum(v for k, v in layer_flops(shape, 1, 1).items() if k != "attention")
    per_key = 2 * 2 * shape.heads * shape.head_dim  # QK^T and PV for one query-key pair
    keys = sum(tokens * seq + tokens * (tokens + 1) // 2 for seq in trace.seq_per_layer)
    return tokens * (len(trace.seq_per_layer) * linear + lm_head_flops(shape, 1)) + per_key * keys


def total_flops(shape: ArchShape, trace: SequenceTrace, convention: FlopConvention = FlopConvention()) -> int:
    pre = sum(prefill_flops(shape, trace, convention).values())
    return pre + decode_flops(shape, trace, convention.decode_tokens, causal=convention.causal)


# ---------------------------------------------------------------------------------------------------------
# The planner: one request, vanilla vs LightKV, and how many fit a memory budget
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantAccount:
    name: str
    trace: SequenceTrace
    kv_prefill_bytes: int
    kv_request_bytes: int  # after prefill + generated tokens: what a request holds at its end
    prefill_flops: dict
    prefill_total: int
    decode_total: int
    max_concurrent: int

    @property
    def retention(self) -> float:
        return self.trace.retention


@dataclass(frozen=True)
class PlanResult:
    shape: ArchShape
    schedule: Schedule
    layout: TokenLayout
    dtype_bytes: int
    gpu_memory: int
    gen_tokens: int
    convention: FlopConvention
    vanilla: VariantAccount
    lightkv: VariantAccount
    weight_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def account(
    name: str,
    shape: ArchShape,
    schedule: Schedule | None,
    layout: TokenLayout,
    *,
    dtype_bytes: int,
    gen_tokens: int,
    free_bytes: int,
    convention: FlopConvention,
    grid_mode: GridMode = "true",
) -> VariantAccount:
    trace = trace_schedule(schedule, layout, shape.num_layers, grid_mode)
    kv_prefill = sum(analytic_kv_bytes_per_layer(shape, trace, dtype_bytes))
    kv_request = sum(analytic_kv_bytes_per_layer(shape, trace, dtype_bytes, extra_tokens=gen_tokens))
    flops = prefill_flops(shape, trace, convention)
    return VariantAccount(
        name=name,
        trace=trace,
        kv_prefill_bytes=kv_prefill,
        kv_request_bytes=kv_request,
        prefill_flops=flops,
        prefill_total=sum(flops.values()),
        decode_total=decode_flops(shape, trace, gen_tokens, causal=convention.causal),
        max_concurrent=max(free_bytes, 0) // kv_request if kv_request else 0,
    )


def plan_request(
    shape: ArchShape,
    schedule: Schedule,
    layout: TokenLayout,
    *,
    dtype_bytes: int = 2,
    gpu_memory: int = 80 * GB,
    gen_tokens: int = 100,
    convention: FlopConvention | None = None,
    grid_mode: GridMode = "true",
) -> PlanResult:
    """Vanilla vs LightKV for one request; concurrency = (GPU memory - weights) // KV bytes per request.

    Only weights and KV are budgeted (activations, allocator slack and the vision encoder's workspace are not),
    so the request counts are upper bounds; their ratio is what LightKV changes.
    """
    convention = convention or FlopConvention(decode_tokens=gen_tokens)
    weights = shape.weight_bytes(dtype_bytes)
    if weights >= gpu_memory:
        raise InputError(
            f"{shape.key} weights take {weights / GB:.1f} GB in {dtype_bytes}-byte precision, more than the "
            f"{gpu_memory / GB:.1f} GB GPU memory given; pass a larger --gpu-memory."
        )
    common = dict(
        dtype_bytes=dtype_bytes, gen_tokens=gen_tokens, free_bytes=gpu_memory - weights, convention=convention
    )
    vanilla = account("vanilla", shape, None, layout, grid_mode=grid_mode, **common)
    light = account("lightkv", shape, schedule, layout, grid_mode=grid_mode, **common)
    notes = [
        f"{st.layer}:{st.windows}: {st.skipped} image(s) too small, skipped" for st in light.trace.stages if st.skipped
    ]
    return PlanResult(
        shape, schedule, layout, dtype_bytes, gpu_memory, gen_tokens, convention, vanilla, light, weights, notes
    )


# ---------------------------------------------------------------------------------------------------------
# A built engine: what LightKV bought on its reference request (report.md "## Accounting")
# ---------------------------------------------------------------------------------------------------------

ACCOUNTING_HEADING = "## Accounting"
# Decoder sizes the FLOPs need; pipeline.base_manifest writes them (older manifests lack the last three).
MANIFEST_SHAPE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_kv_heads",
    "head_dim",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


@dataclass(frozen=True)
class EngineAccount:
    """Vanilla vs this engine on the manifest's reference request, layer by layer (layers 1..L)."""

    dtype: str
    seq_len: int
    vision_tokens: int
    text_tokens: int
    kv_lengths: tuple[int, ...]  # tokens each layer caches after prefill
    vision_per_layer: tuple[int, ...]
    kv_bytes_vanilla: tuple[int, ...]
    kv_bytes: tuple[int, ...]
    retention: float  # Eq. 9 as the reference request achieved it
    nominal_retention: float  # the schedule's, from per-stage ratios (ignores per-window floors)
    flops_vanilla: dict
    flops: dict  # includes "guidance" and "merge" (0 for a vanilla engine)
    convention: FlopConvention
    plan_matches: bool  # the host-side plan traced here gives the manifest's kv_lengths

    @property
    def kv_total_vanilla(self) -> int:
        return sum(self.kv_bytes_vanilla)

    @property
    def kv_total(self) -> int:
        return sum(self.kv_bytes)

    @property
    def flops_total_vanilla(self) -> int:
        return sum(self.flops_vanilla.values())

    @property
    def flops_total(self) -> int:
        return sum(self.flops.values())


def manifest_shape(manifest: dict) -> ArchShape:
    """The decoder's sizes from an engine manifest, as an ArchShape (vision fields unused by the accounting)."""
    missing = [k for k in MANIFEST_SHAPE_KEYS if k not in manifest]
    if missing:
        raise InputError(
            f"the engine's manifest.json lacks {', '.join(missing)} (needed for the FLOPs accounting); it was "
            "written by an older build: rebuild the engine with build.py --force."
        )
    shape = ArchShape(
        key=str(manifest.get("model", "?")),
        hf_id=str(manifest.get("model_source", "")),
        vision="qwen",
        num_layers=int(manifest["num_layers"]),
        hidden=int(manifest["hidden_size"]),
        heads=int(manifest["num_attention_heads"]),
        kv_heads=int(manifest["num_kv_heads"]),
        intermediate=int(manifest["intermediate_size"]),
        vocab=int(manifest["vocab_size"]),
        tie_embeddings=False,
        qkv_bias=False,
        vision_params=0,
        default_windows=(),
        default_image_size=(0, 0),
    )
    if shape.head_dim != int(manifest["head_dim"]):
        raise InputError(
            f"manifest.json: head_dim {manifest['head_dim']} is not hidden_size / num_attention_heads "
            f"({shape.hidden} / {shape.heads}); the FLOPs accounting assumes it is."
        )
    return shape


def manifest_layout(manifest: dict, ref: dict) -> TokenLayout:
    """The reference request's layout: one image on its LLM token grid (vision_token_grid), then text."""
    grid = tuple(int(n) for n in manifest["vision_token_grid"])
    vision, seq = int(ref["vision_tokens"]), int(ref["seq_len"])
    if grid[0] * grid[1] != vision:
        raise InputError(
            f"manifest.json: vision_token_grid {list(grid)} gives {grid[0] * grid[1]} vision tokens, the reference "
            f"request has {vision}; rebuild the engine with build.py --force."
        )
    return TokenLayout(0, (grid,), seq - vision)


def engine_account(manifest: dict, convention: FlopConvention = FlopConvention()) -> EngineAccount:
    """KV bytes, Eq. 9 retention and prefill FLOPs of an engine's reference request, vanilla vs the engine.

    KV bytes come from the per-layer cache shapes [1, Hkv, S_l, d] the manifest records (kv_lengths, checked by
    parity against the engine), in the engine's dtype. FLOPs are counted at those same lengths; the guidance and
    merge overheads come from the host-side merge plan of the schedule on the request's grid.
    """
    from lightkv_export.method.schedule import parse_schedule

    ref = _reference_request(manifest)
    shape = manifest_shape(manifest)
    layout = manifest_layout(manifest, ref)
    lengths = tuple(int(n) for n in ref.get("kv_lengths", ()))
    vision = tuple(int(n) for n in ref["vision_tokens_per_layer"])
    if len(lengths) != shape.num_layers or len(vision) != shape.num_layers:
        raise InputError(
            f"manifest.json: reference_request has {len(lengths)} kv_lengths and {len(vision)} vision counts for "
            f"{shape.num_layers} layers; rebuild the engine with build.py --force."
        )
    lightkv = not manifest.get("vanilla") and bool(manifest.get("schedule"))
    schedule = parse_schedule(str(manifest["schedule"]), shape.num_layers) if lightkv else None
    planned = trace_schedule(schedule, layout, shape.num_layers, manifest.get("grid_mode", "true"))
    measured = SequenceTrace(lengths, vision, planned.stages, layout.vision, layout.text)
    vanilla = trace_schedule(None, layout, shape.num_layers)
    nbytes = dtype_bytes(str(manifest["dtype"]))

    def kv(trace: SequenceTrace) -> tuple[int, ...]:
        return tuple(analytic_kv_bytes_per_layer(shape, trace, nbytes))

    return EngineAccount(
        dtype=str(manifest["dtype"]),
        seq_len=layout.seq_len,
        vision_tokens=layout.vision,
        text_tokens=layout.text,
        kv_lengths=lengths,
        vision_per_layer=vision,
        kv_bytes_vanilla=kv(vanilla),
        kv_bytes=kv(measured),
        retention=measured.retention,
        nominal_retention=schedule.retention if schedule is not None else 1.0,
        flops_vanilla=prefill_flops(shape, vanilla, convention),
        flops=prefill_flops(shape, measured, convention),
        convention=convention,
        plan_matches=planned.seq_per_layer == lengths,
    )


def _pct(a: float, b: float) -> str:
    return f"{(b / a - 1) * 100:+.1f}%" if a else "-"


def accounting_markdown(acc: EngineAccount, engine_label: str = "LightKV") -> str:
    """The "## Accounting" section: totals, then per layer, then FLOPs by component."""
    overhead = acc.flops.get("guidance", 0) + acc.flops.get("merge", 0)
    lines = [
        ACCOUNTING_HEADING,
        "",
        f"Reference request: {acc.seq_len} tokens ({acc.vision_tokens} vision, {acc.text_tokens} text), "
        f"KV cache in {acc.dtype}, measured after prefill. FLOPs: language-model prefill, {acc.convention.describe()}.",
        "",
        f"| | vanilla | {engine_label} | change |",
        "|---|---:|---:|---:|",
        f"| KV cache after prefill, bytes | {acc.kv_total_vanilla:,} | {acc.kv_total:,} | "
        f"{_pct(acc.kv_total_vanilla, acc.kv_total)} |",
        f"| vision-token KV kept (Eq. 9, achieved) | 100.0% | {acc.retention:.2%} | "
        f"schedule's nominal {acc.nominal_retention:.2%} |",
        f"| prefill GFLOPs | {acc.flops_total_vanilla / 1e9:.4g} | {acc.flops_total / 1e9:.4g} | "
        f"{_pct(acc.flops_total_vanilla, acc.flops_total)} |",
        f"| of which guidance + merge, GFLOPs | 0 | {overhead / 1e9:.4g} | |",
        "",
        f"| layer | tokens cached, vanilla | {engine_label} | vision tokens | KV bytes, vanilla | {engine_label} |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (n, v, kv_v, kv_l) in enumerate(
        zip(acc.kv_lengths, acc.vision_per_layer, acc.kv_bytes_vanilla, acc.kv_bytes, strict=True), 1
    ):
        lines.append(f"| {i} | {acc.seq_len} | {n} | {v} / {acc.vision_tokens} | {kv_v:,} | {kv_l:,} |")
    lines += ["", f"| prefill FLOPs | vanilla | {engine_label} |", "|---|---:|---:|"]
    for part in acc.flops:
        lines.append(f"| {part} | {acc.flops_vanilla.get(part, 0):,} | {acc.flops[part]:,} |")
    if not acc.plan_matches:
        lines += ["", "Note: the schedule's host-side plan traced here does not give the manifest's kv_lengths."]
    return "\n".join(lines) + "\n"


def upsert_section(text: str, heading: str, body: str, before: str | None = None) -> str:
    """`text` with the section `heading` (up to the next "## " heading) replaced by `body`, else inserted
    before the `before` heading when present, else appended: writing twice gives the same report."""
    lines = text.rstrip("\n").split("\n")
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    elif before is not None and before in lines:
        start = end = lines.index(before)
    else:
        start = end = len(lines)
    head = "\n".join(lines[:start]).rstrip("\n")
    rest = "\n".join(lines[end:]).strip("\n")
    parts = [head, body.strip("\n"), rest]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_accounting(engine_dir: Path) -> EngineAccount:
    """The "## Accounting" section of ENGINE_DIR/report.md (replaced if present, kept before the pictures)."""
    from lightkv_export.artifacts import read_manifest

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    acc = engine_account(manifest)
    report = engine_dir / REPORT_FILE
    text = report.read_text() if report.is_file() else f"# Report: {engine_dir}\n"
    label = "this engine (vanilla)" if manifest.get("vanilla") else "LightKV"
    write_text_atomic(
        report, upsert_section(text, ACCOUNTING_HEADING, accounting_markdown(acc, label), PICTURES_HEADING)
    )
    return acc


def write_build_report(engine_dir: Path) -> list[Path]:
    """What a build adds to report.md after parity: the accounting section, then the layer pictures."""
    write_accounting(engine_dir)
    return write_build_pictures(engine_dir)


# ---------------------------------------------------------------------------------------------------------
# The paper's reported figures, recomputed
# ---------------------------------------------------------------------------------------------------------

# The paper's LLaVA schedule is 12-18-24 for 32 layers. The 13B models have 40: the KV figures below pin the
# retention to 0.569-0.575 (see `paper_comparison`), and the evenly spaced schedule in that band is 16-24-32.
PAPER_SCHEDULES: dict[int, str] = {32: "12:4:0.5,18:2:0.5,24:1:0.5", 40: "16:4:0.5,24:2:0.5,32:1:0.5"}
PAPER_DECODE_TOKENS = 100  # the paper's FLOPs include 100 generated tokens
PAPER_CONVENTION = FlopConvention(causal=False, lm_head="last", decode_tokens=PAPER_DECODE_TOKENS)


@dataclass(frozen=True)
class PaperFigure:
    metric: Literal["kv_gib", "tflops"]
    model: str
    vanilla: float
    lightkv: float
    decimals: int  # the precision the paper prints


PAPER_FIGURES: tuple[PaperFigure, ...] = (
    PaperFigure("kv_gib", "llava-next-13b", 1.75, 1.05, 2),
    PaperFigure("kv_gib", "llava-13b", 0.55, 0.37, 2),
    PaperFigure("tflops", "llava-next-13b", 65.0, 37.3, 1),
    PaperFigure("tflops", "llava-next", 34.8, 22.3, 1),
)


def paper_metric(
    fig: PaperFigure, schedule: Schedule, text_tokens: int, convention: FlopConvention = PAPER_CONVENTION
) -> tuple[float, float]:
    """(vanilla, lightkv) in the figure's unit at the model's default image and `text_tokens` text tokens.

    KV: fp16, GiB, every text token in the cache (prompt and generated alike). FLOPs: `convention`, in 1e12.
    """
    from lightkv_export.models.shapes import get_shape  # local: shapes imports nothing from here, keep it so

    shape = get_shape(fig.model)
    layout = request_layout(shape, *shape.default_image_size, text_tokens)
    out = []
    for sched in (None, schedule):
        trace = trace_schedule(sched, layout, shape.num_layers)
        if fig.metric == "kv_gib":
            out.append(sum(analytic_kv_bytes_per_layer(shape, trace, DTYPE_BYTES["fp16"])) / GIB)
        else:
            out.append(total_flops(shape, trace, convention) / 1e12)
    return out[0], out[1]


def fit_text_tokens(
    fig: PaperFigure, schedule: Schedule, convention: FlopConvention = PAPER_CONVENTION, search: range = range(1000)
) -> list[int]:
    """Text-token counts whose vanilla figure rounds to the paper's (the one free assumption the paper leaves)."""
    return [t for t in search if round(paper_metric(fig, schedule, t, convention)[0], fig.decimals) == fig.vanilla]


def paper_comparison(convention: FlopConvention = PAPER_CONVENTION, *, search_schedules: bool = False) -> list[dict]:
    """Each paper figure next to ours: the prompt length is fitted to the vanilla figure, then LightKV follows.

    search_schedules: for a figure not reproduced, also list the evenly spaced schedules that would (some
    tens of seconds: one trace per candidate schedule).
    """
    from lightkv_export.method.schedule import parse_schedule
    from lightkv_export.models.shapes import get_shape

    rows = []
    for fig in PAPER_FIGURES:
        shape = get_shape(fig.model)
        schedule = parse_schedule(PAPER_SCHEDULES[shape.num_layers], shape.num_layers)
        fits = fit_text_tokens(fig, schedule, convention)
        lightkv_fits = [
            t for t in fits if round(paper_metric(fig, schedule, t, convention)[1], fig.decimals) == fig.lightkv
        ]
        chosen = lightkv_fits or fits
        text = chosen[len(chosen) // 2] if chosen else 0
        vanilla, light = paper_metric(fig, schedule, text, convention)
        rows.append(
            {
                "metric": fig.metric,
                "model": fig.model,
                "schedule": str(schedule),
                "retention": trace_schedule(
                    schedule, request_layout(shape, *shape.default_image_size, text), shape.num_layers
                ).retention,
                "vision_tokens": request_layout(shape, *shape.default_image_size, 0).vision,
                "text_tokens": text,
                "text_tokens_fitting_vanilla": [fits[0], fits[-1]] if fits else [],
                "paper": [fig.vanilla, fig.lightkv],
                "ours": [round(vanilla, fig.decimals + 1), round(light, fig.decimals + 1)],
                "paper_change": fig.lightkv / fig.vanilla - 1,
                "ours_change": light / vanilla - 1,
                "reproduced": bool(lightkv_fits),
                "text_tokens_reproducing_both": lightkv_fits,
                "evenly_spaced_schedules_reproducing": (
                    _evenly_spaced_fits(fig, text, convention) if search_schedules and not lightkv_fits else []
                ),
                "assumptions": (
                    "fp16 K+V, GiB, every text token cached" if fig.metric == "kv_gib" else convention.describe()
                ),
            }
        )
    return rows


def _evenly_spaced_fits(fig: PaperFigure, text_tokens: int, convention: FlopConvention) -> list[str]:
    """Schedules a, a+g, a+2g (windows 4-2-1, 0.5 each) whose LightKV figure rounds to the paper's."""
    from lightkv_export.method.schedule import Stage
    from lightkv_export.models.shapes import get_shape

    depth = get_shape(fig.model).num_layers
    out = []
    for first in range(1, depth):
        for gap in range(1, (depth - 1 - first) // 2 + 1):
            stages = tuple(Stage(first + k * gap, w, 0.5) for k, w in enumerate((4, 2, 1)))
            schedule = Schedule(depth, stages)
            if round(paper_metric(fig, schedule, text_tokens, convention)[1], fig.decimals) == fig.lightkv:
                out.append(str(schedule))
    return out


# ---------------------------------------------------------------------------------------------------------
# Pictures: what a build keeps per layer (from the manifest) and what one request's merges did (torch run)
# ---------------------------------------------------------------------------------------------------------

PICTURES_DIR = "pictures"
PICTURES_HEADING = "## Pictures"
REPORT_FILE = "report.md"
DEFAULT_PROMPT = "Describe this image."
VISION_PNG, KV_PNG, MERGE_PNG, GUIDANCE_PNG = "vision_tokens.png", "kv_bytes.png", "merge_map.png", "guidance.png"
VANILLA_COLOR, LIGHTKV_COLOR, MEASURED_COLOR = "#b8b8b8", "#1f77b4", "#d62728"


@dataclass(frozen=True)
class LayerPicture:
    """Pictures 1 and 2: one value per decoder layer (1-based), vanilla vs LightKV, as plotted."""

    path: Path
    quantity: str  # "vision tokens" | "KV bytes"
    layers: tuple[int, ...]
    vanilla: tuple[int, ...]
    lightkv: tuple[int, ...]
    stage_layers: tuple[int, ...]  # merges happen right after these layers
    measured: tuple[int, ...] | None = None  # from a run (picture 2, when given)


@dataclass(frozen=True)
class MergeStage:
    """Where every vision token of one image is after a stage.

    groups [h, w] int64 on the image's original token grid: the survivor (0..n_out-1, in sequence order) whose
    hidden state now carries that token; -1 on grid cells past the image's tokens.
    survivors [n_out] int64: the original grid offset (row * w + col) of each survivor's own token.
    """

    layer: int
    windows: int
    ratio: float
    skipped: bool
    tokens_in: int
    groups: np.ndarray
    survivors: np.ndarray

    @property
    def tokens_out(self) -> int:
        return len(self.survivors)


@dataclass(frozen=True)
class MergeMapPicture:
    path: Path
    grid: tuple[int, int]  # (h, w) LLM-token grid of the image
    cell: tuple[float, float]  # pixels per token (height, width) in the engine's profile
    stages: tuple[MergeStage, ...]


@dataclass(frozen=True)
class GuidancePicture:
    path: Path
    layer: int  # the first stage's layer: xi comes from its attention logits
    grid: tuple[int, int]
    values: np.ndarray  # [h, w] fp32 xi of the image's vision tokens, NaN past the image's tokens
    prompt: str


def _reference_request(manifest: dict) -> dict:
    ref = manifest.get("reference_request")
    keys = ("vision_tokens", "vision_tokens_per_layer", "kv_bytes_per_layer", "kv_bytes_vanilla_per_layer")
    if not isinstance(ref, dict) or any(k not in ref for k in keys):
        raise InputError(
            "the engine's manifest.json has no complete reference_request (vision tokens and KV bytes per layer); "
            "it was written by an older build: rebuild the engine with build.py --force."
        )
    return ref


def stage_layers(manifest: dict) -> tuple[int, ...]:
    """Layers after which a stage merges, from the manifest's schedule string LAYER:WINDOWS:RATIO,..."""
    if manifest.get("vanilla") or not manifest.get("schedule"):
        return ()
    return tuple(int(part.split(":")[0]) for part in str(manifest["schedule"]).split(","))


def _subtitle(manifest: dict) -> str:
    h, w = manifest.get("image_size", ("?", "?"))
    variant = "vanilla" if manifest.get("vanilla") else f"schedule {manifest.get('schedule')}"
    prompt = manifest.get("reference_request", {}).get("prompt", DEFAULT_PROMPT)
    return (
        f"{manifest.get('model', '?')} ({manifest.get('target', '?')}), {variant}\n"
        f"reference request: {h}x{w} image, {prompt!r}"
    )


def vision_picture_data(manifest: dict, path: Path) -> LayerPicture:
    ref = _reference_request(manifest)
    light = tuple(int(n) for n in ref["vision_tokens_per_layer"])
    return LayerPicture(
        path=path,
        quantity="vision tokens",
        layers=tuple(range(1, len(light) + 1)),
        vanilla=(int(ref["vision_tokens"]),) * len(light),
        lightkv=light,
        stage_layers=stage_layers(manifest),
    )


def kv_picture_data(manifest: dict, path: Path, measured: Sequence[int] | None = None) -> LayerPicture:
    ref = _reference_request(manifest)
    light = tuple(int(n) for n in ref["kv_bytes_per_layer"])
    if measured is not None and len(measured) != len(light):
        raise InputError(f"measured KV bytes cover {len(measured)} layers, the engine has {len(light)}.")
    return LayerPicture(
        path=path,
        quantity="KV bytes",
        layers=tuple(range(1, len(light) + 1)),
        vanilla=tuple(int(n) for n in ref["kv_bytes_vanilla_per_layer"]),
        lightkv=light,
        stage_layers=stage_layers(manifest),
        measured=tuple(int(n) for n in measured) if measured is not None else None,
    )


def _byte_unit(largest: float) -> tuple[str, int]:
    for name, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return name, size
    return "bytes", 1


def _new_figure(width: float, height: float):
    """A figure not registered with pyplot: no global state, no GUI backend (Agg canvas on save)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def draw_layer_picture(
    data: LayerPicture, subtitle: str, nominal_retention: float | None = None, engine_label: str = "LightKV (manifest)"
) -> Path:
    """Bars per layer, vanilla behind LightKV, the stages as dotted lines between layers."""
    kv = data.quantity == "KV bytes"
    unit, scale = _byte_unit(max(data.vanilla + data.lightkv)) if kv else ("tokens", 1)
    fig = _new_figure(max(6.5, 0.3 * len(data.layers) + 3.5), 4.6)
    ax = fig.add_subplot()
    x = np.asarray(data.layers)
    ax.bar(x, np.asarray(data.vanilla) / scale, width=0.8, color=VANILLA_COLOR, label="vanilla")
    ax.bar(x, np.asarray(data.lightkv) / scale, width=0.55, color=LIGHTKV_COLOR, label=engine_label)
    if data.measured is not None:
        ax.plot(
            x,
            np.asarray(data.measured) / scale,
            "_",
            color=MEASURED_COLOR,
            ms=18,
            mew=2.5,
            label="LightKV, measured (PyTorch run)",
        )
    for k, layer in enumerate(data.stage_layers):
        ax.axvline(layer + 0.5, color="black", ls=":", lw=1, label="merge (after layer)" if k == 0 else None)
    if len(data.layers) <= 16:  # values inside the bars while they stay legible
        for xi, v in zip(x, data.lightkv, strict=True):
            ax.annotate(f"{v / scale:.3g}", (xi, 0), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7, color="white")  # fmt: skip
    total_v, total_l = sum(data.vanilla), sum(data.lightkv)
    share = total_l / total_v if total_v else 1.0
    if kv:
        head = f"KV cache per layer (K + V): {total_l:,} of {total_v:,} bytes ({share:.1%})"
    else:
        head = f"Vision tokens each layer sees and caches: {share:.1%} kept, averaged over layers"
        if nominal_retention is not None:
            head += f" (schedule's nominal {nominal_retention:.1%})"
    ax.set_title(f"{head}\n{subtitle}", fontsize=9)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"KV {unit}" if kv else "vision tokens")
    ax.set_xticks(x if len(x) <= 32 else x[::4])
    ax.set_xlim(0.4, len(x) + 0.6)
    fig.legend(loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return _save(fig, data.path)


def write_layer_pictures(
    manifest: dict, out: Path, measured_kv: Sequence[int] | None = None
) -> tuple[LayerPicture, LayerPicture]:
    """Pictures 1 and 2 into `out`, from the manifest's reference request (plus measured KV bytes, if given)."""
    vision = vision_picture_data(manifest, Path(out) / VISION_PNG)
    kv = kv_picture_data(manifest, Path(out) / KV_PNG, measured_kv)
    subtitle = _subtitle(manifest)
    vanilla = bool(manifest.get("vanilla"))
    label = "this engine: vanilla (manifest)" if vanilla else "LightKV (manifest)"
    draw_layer_picture(vision, subtitle, None if vanilla else manifest.get("retention"), label)
    draw_layer_picture(kv, subtitle, engine_label=label)
    return vision, kv


def write_build_pictures(engine_dir: Path) -> list[Path]:
    """Pictures 1 and 2 into ENGINE_DIR/pictures (manifest.json only) and a "## Pictures" section in report.md."""
    from lightkv_export.artifacts import read_manifest

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    pictures = write_layer_pictures(manifest, engine_dir / PICTURES_DIR)
    report = engine_dir / REPORT_FILE
    text = report.read_text() if report.is_file() else f"# Report: {engine_dir}\n"
    if PICTURES_HEADING not in text.splitlines():
        links = [f"![{p.quantity} per layer, vanilla vs LightKV]({PICTURES_DIR}/{p.path.name})" for p in pictures]
        text = text.rstrip("\n") + "\n\n" + "\n\n".join([PICTURES_HEADING, *links]) + "\n"
        write_text_atomic(report, text)
    return [p.path for p in pictures]


def merge_stages(stages: Sequence, image_span: VisionSpan, schedule: Schedule, image: int = 0) -> list[MergeStage]:
    """Follow one image's vision tokens through the torch run's stages (StageRecords with merged_into, B = 1).

    After stage k a token sits in survivor inv_k[merged_into_k[where it sat before]], inv_k mapping the stage's
    input index to its output index (kept_k inverted); composing the stages gives each token's final survivor.
    """
    n = image_span.length
    where = np.arange(image_span.start, image_span.end)  # [n] each token's index in the current sequence
    origin = None  # [S] original sequence index of every token of the current sequence
    out = []
    for record, stage in zip(stages, schedule.stages, strict=True):
        if record.merged_into is None:
            raise InputError("the stage records carry no merged_into (a torch_runtime older than this report).")
        merged_into = record.merged_into[0].cpu().numpy()  # [S_in]
        kept = record.kept[0].cpu().numpy()  # [S_out]
        kept = kept[kept >= 0]
        origin = np.arange(len(merged_into)) if origin is None else origin
        inv = np.full(len(merged_into), -1, dtype=np.int64)
        inv[kept] = np.arange(len(kept))
        tokens_in = len(np.unique(where))
        where = inv[merged_into[where]]  # [n]
        if (where < 0).any():  # a token merged into something that did not survive: the op broke its contract
            raise AssertionError(f"stage at layer {record.layer}: tokens merged into non-survivors")
        origin = origin[kept]  # [S_out]
        span = record.spans[0][image]
        survivors = origin[span.start : span.end] - image_span.start  # [n_out] grid offsets
        groups = np.full(image_span.grid[0] * image_span.grid[1], -1, dtype=np.int64)
        groups[:n] = where - span.start
        out.append(
            MergeStage(
                layer=record.layer,
                windows=stage.windows,
                ratio=stage.ratio,
                skipped=bool(record.skipped[0][image]),
                tokens_in=tokens_in,
                groups=groups.reshape(image_span.grid),
                survivors=survivors,
            )
        )
    return out


def guidance_values(record, image_span: VisionSpan) -> np.ndarray:
    """xi of the image's vision tokens at a stage's input, laid on the image's grid: [h, w], NaN past the tokens."""
    h, w = image_span.grid
    xi = record.guidance[0, image_span.start : image_span.end].float().cpu().numpy()  # [n]
    values = np.full(h * w, np.nan, dtype=np.float32)
    values[: len(xi)] = xi
    return values.reshape(h, w)


def colour_groups(groups: np.ndarray, palette: int) -> np.ndarray:
    """Greedy colouring so that groups touching on the grid (4-neighbours) get different colours: [n] indices."""
    n = int(groups.max()) + 1 if groups.size else 0
    touching: list[set[int]] = [set() for _ in range(n)]
    for a, b in ((groups[:, :-1], groups[:, 1:]), (groups[:-1, :], groups[1:, :])):
        diff = (a != b) & (a >= 0) & (b >= 0)
        for u, v in zip(a[diff].tolist(), b[diff].tolist(), strict=True):
            touching[u].add(v)
            touching[v].add(u)
    colour = np.full(n, -1, dtype=np.int64)
    for g in range(n):
        used = {int(colour[o]) for o in touching[g] if colour[o] >= 0}
        colour[g] = next(c for c in range(n + 1) if c not in used) % palette
    return colour


def _boundaries(groups: np.ndarray, cell: tuple[float, float]) -> list[list[tuple[float, float]]]:
    """Line segments (pixel coordinates) between grid cells that belong to different groups."""
    ch, cw = cell
    segs = []
    rows, cols = np.nonzero(groups[:, :-1] != groups[:, 1:])
    segs += [[((c + 1) * cw, r * ch), ((c + 1) * cw, (r + 1) * ch)] for r, c in zip(rows, cols, strict=True)]
    rows, cols = np.nonzero(groups[:-1, :] != groups[1:, :])
    segs += [[(c * cw, (r + 1) * ch), ((c + 1) * cw, (r + 1) * ch)] for r, c in zip(rows, cols, strict=True)]
    return segs


def _show_image(ax, pixels: np.ndarray, grid: tuple[int, int], *, grey: bool) -> None:
    """The engine's input image in pixel coordinates; grey under colour overlays so only the overlay has hue."""
    height, width = pixels.shape[:2]
    if grey:
        ax.imshow(pixels.astype(np.float32).mean(-1), cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0))
    else:
        ax.imshow(pixels, extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks(np.linspace(0, width, grid[1] + 1), labels=[])
    ax.set_yticks(np.linspace(0, height, grid[0] + 1), labels=[])
    ax.tick_params(length=0)


def _input_panel(ax, pixels: np.ndarray, grid: tuple[int, int]) -> None:
    _show_image(ax, pixels, grid, grey=False)
    ax.grid(color="white", lw=0.4, alpha=0.6)
    height, width = pixels.shape[:2]
    ax.set_title(f"input, resized to the engine's {height}x{width}\n{grid[0]}x{grid[1]} LLM tokens", fontsize=8)


def draw_merge_map(data: MergeMapPicture, image, title: str) -> Path:
    """The input, then one panel per stage: each token cell coloured by its survivor, group borders, survivors."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection

    h, w = data.grid
    ch, cw = data.cell
    pixels = np.asarray(image.convert("RGB"))
    panels = 1 + len(data.stages)
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig = _new_figure(3.6 * cols, 3.6 * rows * pixels.shape[0] / pixels.shape[1] + 1.1)
    palette = np.asarray(colormaps["tab20"].colors)  # [20, 3]
    _input_panel(fig.add_subplot(rows, cols, 1), pixels, data.grid)
    for k, stage in enumerate(data.stages):
        ax = fig.add_subplot(rows, cols, k + 2)
        _show_image(ax, pixels, data.grid, grey=True)
        colour = colour_groups(stage.groups, len(palette))
        rgba = np.zeros((h, w, 4))  # [h, w, RGBA]
        valid = stage.groups >= 0
        rgba[valid, :3] = palette[colour[stage.groups[valid]]]
        rgba[valid, 3] = 0.6
        ax.imshow(rgba, extent=(0, w * cw, h * ch, 0), interpolation="nearest")
        ax.add_collection(LineCollection(_boundaries(stage.groups, data.cell), colors="black", linewidths=1.0))
        sr, sc = np.divmod(stage.survivors, w)
        ax.plot((sc + 0.5) * cw, (sr + 0.5) * ch, "o", ms=2.5, mfc="white", mec="black", mew=0.5)
        note = " (image too small: skipped)" if stage.skipped else ""
        ax.set_title(
            f"after layer {stage.layer}: {stage.tokens_in} -> {stage.tokens_out} tokens\n"
            f"{stage.windows}x{stage.windows} windows, ratio {stage.ratio:g}{note}",
            fontsize=8,
        )
    fig.suptitle(
        f"{title}\ncolour and borders: the survivor each {ch:g}x{cw:g}-pixel token was merged into "
        "(merges compound over stages); dot: the survivor's own token",
        fontsize=9,
    )
    return _save(fig, data.path)


def draw_guidance(data: GuidancePicture, image, title: str) -> Path:
    """The input next to the xi heatmap over it (grey underneath, so the colour is xi alone)."""
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    fig = _new_figure(9.0, 4.0 * height / width + 1.3)
    _input_panel(fig.add_subplot(1, 2, 1), pixels, data.grid)
    ax = fig.add_subplot(1, 2, 2)
    _show_image(ax, pixels, data.grid, grey=True)
    heat = ax.imshow(data.values, extent=(0, width, height, 0), cmap="inferno", alpha=0.75, interpolation="nearest")
    fig.colorbar(heat, ax=ax, shrink=0.85, label="xi (merge weight)")
    ax.set_title(f"text guidance xi after layer {data.layer}\n(the first stage's merge weights)", fontsize=8)
    prompt = data.prompt if len(data.prompt) <= 70 else data.prompt[:67] + "..."
    fig.suptitle(f"{title}\nprompt: {prompt!r}", fontsize=9)
    return _save(fig, data.path)


@dataclass(frozen=True)
class RequestPictures:
    """Everything `python -m lightkv_export.report` drew for one image and prompt; None where not applicable."""

    vision: LayerPicture
    kv: LayerPicture
    merge_map: MergeMapPicture | None
    guidance: GuidancePicture | None
    notes: tuple[str, ...] = ()

    def paths(self) -> list[Path]:
        pics = (self.vision, self.kv, self.merge_map, self.guidance)
        return [p.path for p in pics if p is not None]


def load_image(path: str | Path):
    """An image file as RGB; anything unreadable is an InputError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {str(path)!r}: {exc}. Expected a PNG or JPEG file.") from None


def request_pictures(
    engine_dir: Path, out: Path, image=None, prompt: str = DEFAULT_PROMPT, *, loaded=None
) -> RequestPictures:
    """Run the PyTorch reference on the engine's exact inputs for (image, prompt) and draw pictures 1-4 in `out`.

    `loaded`: the engine's model, already loaded (tests); default load_model(manifest["model_source"]).
    """
    from lightkv_export import torch_runtime
    from lightkv_export.artifacts import read_manifest
    from lightkv_export.inputs import parity_images, torch_inputs
    from lightkv_export.runtime import Engine

    engine_dir, out = Path(engine_dir), Path(out)
    manifest = read_manifest(engine_dir)
    _reference_request(manifest)  # fail early, before loading anything, on an engine without the accounting
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write pictures to {out}: {exc}. Choose another --out.") from None
    if manifest.get("vanilla"):
        vision, kv = write_layer_pictures(manifest, out)
        note = "vanilla engine: no merge stages, so there is no merge map and no guidance to draw."
        return RequestPictures(vision, kv, None, None, (note,))

    size = tuple(int(n) for n in manifest["image_size"])
    image = parity_images(size, 0) if image is None else image
    engine = Engine.load(engine_dir)
    request = engine.prepare([image], prompt)
    if loaded is None:
        from lightkv_export.models.registry import load_model

        loaded = load_model(manifest["model_source"], random_weights=bool(manifest.get("random_weights")))
    run = torch_runtime.prefill(
        loaded, torch_inputs(request), engine.schedule, positions=manifest["positions"], grid_mode=manifest["grid_mode"]
    )
    shapes = [tuple(layer.keys.shape) for layer in run.cache.layers]  # [1, Hkv, S_l, d] each
    vision, kv = write_layer_pictures(manifest, out, kv_bytes_per_layer(shapes, dtype_bytes(manifest["dtype"])))

    span = request.spans[0][0]
    h, w = span.grid
    underlay = image.convert("RGB").resize((size[1], size[0]))  # what the engine saw
    cell = (size[0] / h, size[1] / w)
    title = f"{manifest['model']} ({manifest['target']}), schedule {manifest['schedule']}"
    if manifest["grid_mode"] != "true":  # windows were cut on another grid than the one drawn
        title += f", {manifest['grid_mode']} grid mode (windows on the pseudo-square grid)"
    stages = tuple(merge_stages(run.stages, span, engine.schedule))
    merge_map = MergeMapPicture(out / MERGE_PNG, (h, w), cell, stages)
    draw_merge_map(merge_map, underlay, f"{title}: merge map for {prompt!r}")
    guidance = GuidancePicture(
        out / GUIDANCE_PNG, run.stages[0].layer, (h, w), guidance_values(run.stages[0], span), prompt
    )
    draw_guidance(guidance, underlay, title)
    notes = (f"{len(engine.schedule.stages)} stages: " + ", ".join(f"{s.tokens_in}->{s.tokens_out}" for s in stages),)
    return RequestPictures(vision, kv, merge_map, guidance, notes)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lightkv_export.report ENGINE_DIR`: draw what an engine keeps and what it merged for one request."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lightkv_export.report",
        description="Pictures of an engine: vision tokens and KV bytes per layer (vanilla vs LightKV), and, from "
        "the PyTorch reference run on the engine's exact inputs, the merge map and the text-guidance heatmap "
        "over the image.",
    )
    parser.add_argument("engine_dir", type=Path, help="an engine directory written by build.py")
    parser.add_argument("--image", type=Path, help="RGB image file (default: the engine's reference image)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the question (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--out", type=Path, help=f"output directory (default: ENGINE_DIR/{PICTURES_DIR})")
    args = parser.parse_args(argv)
    try:
        from lightkv_export.artifacts import read_manifest

        read_manifest(args.engine_dir)  # first: "not an engine directory" before any other complaint
        image = load_image(args.image) if args.image is not None else None
        out = args.out if args.out is not None else args.engine_dir / PICTURES_DIR
        pictures = request_pictures(args.engine_dir, out, image, args.prompt)
    except LightKVError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    for note in pictures.notes:
        print(note, file=sys.stderr)
    for path in pictures.paths():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
