"""A built engine's accounting: what LightKV bought on its reference request, from manifest.json alone.

KV bytes come from the per-layer cache lengths the manifest records (checked by parity against the engine); FLOPs
are counted at those same lengths (report.md "## Accounting" shows the result).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightkv_export.accounting.flops import DEFAULT_CONVENTION, FlopConvention, prefill_flops
from lightkv_export.accounting.trace import SequenceTrace, TokenLayout, analytic_kv_bytes_per_layer, trace_schedule
from lightkv_export.accounting.units import dtype_bytes
from lightkv_export.artifacts import Manifest
from lightkv_export.errors import InputError
from lightkv_export.models.family import ArchShape


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
    weight_bytes: int = 0  # weights the engine holds at run time (manifest.weight_bytes; 0: not recorded)

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


def manifest_shape(manifest: Manifest) -> ArchShape:
    """The decoder's sizes from an engine manifest, as an ArchShape (parameter counts unused by the accounting)."""
    return ArchShape(
        key=manifest.model,
        hf_id=manifest.model_source,
        vision="",
        num_layers=manifest.num_layers,
        hidden=manifest.hidden_size,
        heads=manifest.num_attention_heads,
        kv_heads=manifest.num_kv_heads,
        head_dim=manifest.head_dim,
        intermediate=manifest.intermediate_size,
        vocab=manifest.vocab_size,
        tie_embeddings=False,
        qkv_bias=False,
        language_params=0,
        vision_params=0,
    )


def manifest_layout(manifest: Manifest) -> TokenLayout:
    """The reference request's layout: its images' grids (reference_request.image_layouts), then text (the
    template, the prompt, and tokens that never merge)."""
    from lightkv_export.method.spans import ImageLayout

    ref = manifest.reference_request
    layouts = [ImageLayout.from_json(v) for v in ref.image_layouts]
    grids = tuple(g for layout in layouts for g in layout.grids)
    vision = sum(layout.vision_tokens for layout in layouts)
    if vision != ref.vision_tokens:
        raise InputError(
            f"manifest.json: reference_request.image_layouts hold {vision} vision tokens, the reference request "
            f"has {ref.vision_tokens}; rebuild the engine with build.py --force."
        )
    return TokenLayout(0, grids, ref.seq_len - ref.vision_tokens)


def engine_account(manifest: Manifest, convention: FlopConvention = DEFAULT_CONVENTION) -> EngineAccount:
    """KV bytes, Eq. 9 retention and prefill FLOPs of an engine's reference request, vanilla vs the engine.

    KV bytes come from the per-layer cache shapes [1, Hkv, S_l, d] the manifest records (kv_lengths, checked by
    parity against the engine), in the engine's dtype. FLOPs are counted at those same lengths; the guidance and
    merge overheads come from the host-side merge plan of the schedule on the request's grid.
    """
    from lightkv_export.method.schedule import parse_schedule

    ref = manifest.reference_request
    shape = manifest_shape(manifest)
    layout = manifest_layout(manifest)
    lengths = tuple(ref.kv_lengths)
    vision = tuple(ref.vision_tokens_per_layer)
    if len(lengths) != shape.num_layers or len(vision) != shape.num_layers:
        raise InputError(
            f"manifest.json: reference_request has {len(lengths)} kv_lengths and {len(vision)} vision counts for "
            f"{shape.num_layers} layers; rebuild the engine with build.py --force."
        )
    lightkv = not manifest.vanilla and bool(manifest.schedule)
    schedule = parse_schedule(manifest.schedule, shape.num_layers) if lightkv else None
    planned = trace_schedule(schedule, layout, shape.num_layers, manifest.grid_mode)
    measured = SequenceTrace(lengths, vision, planned.stages, layout.vision, layout.text)
    vanilla = trace_schedule(None, layout, shape.num_layers)
    nbytes = dtype_bytes(manifest.dtype)

    def kv(trace: SequenceTrace) -> tuple[int, ...]:
        return tuple(analytic_kv_bytes_per_layer(shape, trace, nbytes))

    return EngineAccount(
        dtype=manifest.dtype,
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
        weight_bytes=manifest.weight_bytes,
    )
