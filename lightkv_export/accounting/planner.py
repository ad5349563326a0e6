"""The planner: one request, vanilla vs LightKV, and how many such requests fit a memory budget."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightkv_export.accounting.flops import FlopConvention, decode_flops, prefill_flops
from lightkv_export.accounting.trace import SequenceTrace, TokenLayout, analytic_kv_bytes_per_layer, trace_schedule
from lightkv_export.accounting.units import GB
from lightkv_export.errors import InputError
from lightkv_export.method.layout import GridMode
from lightkv_export.method.schedule import Schedule
from lightkv_export.models.shapes import ArchShape


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


def plan_budget(
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
