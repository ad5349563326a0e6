"""LightKV in PyTorch: the decoder-layer loop driven here, with the reference op between layers.

Transformers' modeling files are not edited. The runtime calls each decoder layer itself and, at a scheduled
layer, captures that layer's post-RoPE queries and keys through a registered attention function (a thin
wrapper around SDPA, so the layer's own attention stays causal and fused). Guidance and the merge then run on
the layer's output, and later layers see, and cache, the shorter sequence.

The KV cache therefore holds per-layer lengths: layers 1..lambda_1 the full prompt, each later layer group
fewer vision tokens. Decode continues from the uncompressed length, so a token's position is the same as in the
vanilla model whatever the schedule.

Grids with tokens that never merge inside them (LLaVA-NeXT's newline after every row): at the stage that first
merges such a grid, the layer's output and its guidance are gathered by the plan's order (method/layout.py
`inline_order`: the grid's vision tokens, then its inline tokens) before the op, and the op's `kept` is mapped back
through it, so `kept` and the positions gathered with it stay in the stage's input order, as the engines report them.

Batches: one request per call (B = 1). The op itself is batched; batching requests is the engines' job.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lightkv_export.errors import InputError, LightKVError
from lightkv_export.method.guidance import SoftmaxAxis, text_guidance
from lightkv_export.method.layout import GridMode, StagePlan, inline_order
from lightkv_export.method.merge_plan import plan_request, stage_input_names
from lightkv_export.method.reference import MergeResult, VisionSpan, lightkv_merge
from lightkv_export.method.schedule import Schedule
from lightkv_export.models.base import LoadedModel, PrefillInputs

PositionMode = Literal["preserve", "official"]
POSITION_MODES = ("preserve", "official")
MergeImpl = Literal["reference", "triton"]
MERGE_IMPLS = ("reference", "triton")
CAPTURE_ATTENTION = "lightkv_capture_sdpa"


def capturing_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA that also hands the layer's post-RoPE query and key to the runtime when asked to."""
    capture = kwargs.pop("lightkv_capture", None)
    if capture is not None:
        capture["query"], capture["key"] = query, key  # [B, Hq, S, d], [B, Hkv, S, d]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_ATTENTION, capturing_sdpa)


@contextlib.contextmanager
def capture_attention(config) -> Iterator[None]:
    """Route the text model's attention through `capturing_sdpa` for the duration of a run."""
    previous = config._attn_implementation
    config._attn_implementation = CAPTURE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


@dataclass(frozen=True)
class StageRecord:
    """What one stage did: kept [B, S'] source indices into the stage's input, the new spans, skips.
    merged_into and shortfall are in the op's input order: the stage's input gathered by its order (the plan's
    win_index order), where a grid with inline fixed tokens was reordered."""

    layer: int
    kept: torch.Tensor
    spans: tuple[tuple[VisionSpan, ...], ...]
    skipped: tuple[tuple[bool, ...], ...]
    guidance: torch.Tensor  # [B, S] xi at the stage's input positions
    merged_into: torch.Tensor | None = None  # [B, S] input index of the survivor each input token ended in
    shortfall: torch.Tensor | None = None  # [B, S] similarity a replayed assignment gives up (reference.MergeResult)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [B, V] last position
    cache: DynamicCache
    stages: list[StageRecord]
    next_position: torch.Tensor  # [*lead, B, 1] position ids of the first generated token
    spans: tuple[tuple[VisionSpan, ...], ...]  # vision spans seen by the last layer group

    def kv_lengths(self) -> list[int]:
        return [layer.keys.shape[-2] for layer in self.cache.layers]


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    kv_lengths: list[int]  # per decoder layer, after prefill
    kv_bytes: int  # K and V of every layer, after prefill
    vision_tokens_in: int
    vision_tokens_per_group: list[tuple[tuple[int, int], int]]  # ((first, last layer), vision tokens)
    stages: list[StageRecord] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0


def vision_mask(
    spans: tuple[tuple[VisionSpan, ...], ...] | list, seq_len: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """[B, S] True at vision tokens."""
    mask = torch.zeros(len(spans), seq_len, dtype=torch.bool, device=device)
    for b, row in enumerate(spans):
        for span in row:
            if span.trailing:  # a grid's inline fixed tokens are not vision tokens
                mask[b, span.start : span.end].view(span.grid[0], -1)[:, : span.grid[1]] = True  # [h, w + n]
            else:
                mask[b, span.start : span.end] = True
    return mask


def gather_order(
    order: torch.Tensor, hidden: torch.Tensor, guidance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, S, D] and guidance [B, S] in the stage's reordered input order, order [B, S]."""
    index = order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [B, S, D]
    return hidden.gather(1, index), guidance.gather(1, order)


def kept_in_input_order(kept: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """kept [B, S'] of a reordered stage as indices into its input before the reordering (-1 stays -1)."""
    return torch.where(kept >= 0, order.gather(1, kept.clamp(min=0)), kept)  # [B, S']


@dataclass(frozen=True)
class StagedPlan:
    """One stage's host plan and its tensors on the device, made before the first layer runs: copying them then
    (or gathering text positions on the device) mid-prefill would make the host wait for every queued layer."""

    plan: StagePlan
    tensors: Any  # plugins.lightkv.launch.PlanTensors
    out_lengths: torch.Tensor  # [B] int64
    order: torch.Tensor | None  # [B, S] int64: the stage's input reordering (None: nothing moves)
    text_positions: tuple[torch.Tensor, torch.Tensor]  # text_index [B, T] int64, text_valid [B, T] bool


def stage_plans(spans, seq_len: int, schedule: Schedule, grid_mode: GridMode, device) -> list[StagedPlan]:
    """Every stage's plan from the layout alone (as the reference op plans it), on `device`."""
    from plugins.lightkv.launch import plan_tensors

    planned = plan_request(spans, [seq_len] * len(spans), schedule, grid_mode=grid_mode, reorder=True)
    staged = []
    for k, plan in enumerate(planned.stages):
        names = stage_input_names(k)
        text = tuple(torch.as_tensor(planned.feeds[names[n]], device=device) for n in ("text_index", "text_valid"))
        lengths = torch.as_tensor(plan.out_lengths, dtype=torch.int64, device=device)  # [B]
        order = torch.as_tensor(plan.order, device=device) if plan.order is not None else None  # [B, S]
        staged.append(StagedPlan(plan, plan_tensors(plan, device), lengths, order, text))
    return staged


def merge_with_kernels(hidden: torch.Tensor, guidance: torch.Tensor, staged: StagedPlan) -> MergeResult:
    """One planned stage through the LightKVMerge Triton kernels (no host sync). `merged_into` is left out (the
    kernels do not report it)."""
    from plugins.lightkv.launch import launch_kernels

    plan = staged.plan
    if tuple(hidden.shape[:2]) != (plan.batch, plan.seq_len):  # the layout and the data disagree: a bug
        raise LightKVError(f"hidden {tuple(hidden.shape)} does not match the stage's plan ({plan.batch}, "
                           f"{plan.seq_len})")  # fmt: skip
    out, kept = launch_kernels(hidden, guidance.float(), staged.tensors)  # [B, S', D], [B, S']
    return MergeResult(out, kept, staged.out_lengths, plan.spans, plan.skipped)


def cache_kwarg(layer: torch.nn.Module) -> str:
    """The decoder layer's keyword for the KV cache: `cache` in transformers 5.24 (the pin), `past_key_values`
    before (the lent GPU machine has 5.17); a wrong name would be swallowed by **kwargs and fill no cache."""
    return _cache_kwarg(type(layer))


@functools.cache
def _cache_kwarg(layer_class: type) -> str:  # once per class: decode_step asks on every token
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


def kv_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def prefill(
    loaded: LoadedModel,
    inputs: PrefillInputs,
    schedule: Schedule,
    *,
    positions: PositionMode = "preserve",
    grid_mode: GridMode = "true",
    softmax_over: SoftmaxAxis = "query",
    merge: MergeImpl = "reference",
    assignments: Sequence[torch.Tensor | None] | None = None,
) -> PrefillResult:
    """Prefill with LightKV: merge after each scheduled layer; returns last logits and the per-layer cache.

    Rows of a batch must be unpadded and of one length (equal layouts merge to equal lengths). `merge`: the
    reference op (method/reference.py, the truth) or the LightKVMerge Triton kernels (plugins/lightkv: natively on
    CUDA, interpreted on the CPU under TRITON_INTERPRET=1). `assignments`: per stage, a merged_into [B, S] to
    replay instead of matching (None: match), e.g. an engine's at a near-tie; each stage's record then says what
    similarity it gave up (`shortfall`)."""
    if positions not in POSITION_MODES:
        raise InputError(f"positions must be one of {POSITION_MODES}, got {positions!r}.")
    if merge not in MERGE_IMPLS:
        raise InputError(f"merge must be one of {MERGE_IMPLS}, got {merge!r}.")
    if assignments is not None and (merge != "reference" or len(assignments) != len(schedule.stages)):
        raise InputError("replayed assignments need the reference merge and one entry per stage.")
    hidden = inputs.inputs_embeds  # [B, S, D]
    if not bool(inputs.attention_mask.all()):
        raise InputError("the PyTorch runtime runs unpadded rows of one length; run shorter requests on their own.")
    text = loaded.family.text_model(loaded.model)
    if schedule.num_layers != len(text.layers):
        raise InputError(f"schedule is for {schedule.num_layers} layers, the model has {len(text.layers)}.")
    stage_at = {s.layer: s for s in schedule.stages}
    scheme = loaded.family.positions
    pos = inputs.position_ids  # [*lead, 1, S]
    spans = tuple(tuple(row) for row in inputs.spans)
    full_len = hidden.shape[1]
    cache = DynamicCache(config=loaded.text_config)
    records: list[StageRecord] = []
    staged = stage_plans(spans, full_len, schedule, grid_mode, hidden.device) if merge == "triton" else []

    cache_kw = cache_kwarg(text.layers[0])
    with capture_attention(text.config):
        for idx, layer in enumerate(text.layers):
            stage = stage_at.get(idx + 1)
            capture: dict[str, torch.Tensor] | None = {} if stage else None
            cos_sin = text.rotary_emb(hidden, pos)
            hidden = layer(
                hidden, position_embeddings=cos_sin, use_cache=True, lightkv_capture=capture, **{cache_kw: cache}
            )  # [1, S, D]
            if stage is None:
                continue
            seq = hidden.shape[1]
            planned = staged[len(records)] if staged else None
            xi = text_guidance(
                capture["query"],
                capture["key"],
                vision_mask(spans, seq, hidden.device),
                softmax_over=softmax_over,
                text_positions=planned.text_positions if planned else None,
            )  # [1, S]
            if planned is not None:
                order = planned.order
                res = merge_with_kernels(*(gather_order(order, hidden, xi) if order is not None else (hidden, xi)),
                                         planned)  # fmt: skip
            else:
                forced = assignments[len(records)] if assignments is not None else None
                kwargs = {"windows": stage.windows, "ratio": stage.ratio, "grid_mode": grid_mode}
                order_np, op_spans = inline_order(spans, seq, **kwargs)
                order = torch.from_numpy(order_np).to(hidden.device) if order_np is not None else None  # [B, S]
                op_in = gather_order(order, hidden, xi) if order is not None else (hidden, xi)
                res = lightkv_merge(*op_in, op_spans, merged_into=forced, **kwargs)
            if order is not None:
                res = dataclasses.replace(res, kept=kept_in_input_order(res.kept, order))
            records.append(StageRecord(idx + 1, res.kept, res.spans, res.skipped, xi, res.merged_into, res.shortfall))
            hidden, spans = res.hidden, res.spans
            pos = scheme.after_merge(pos, res.kept, positions)  # [*lead, 1, S']

    last = text.norm(hidden[:, -1:])  # [1, 1, D]
    logits = loaded.family.lm_head(loaded.model)(last)[:, -1].float()  # [1, V]
    next_pos = scheme.decode_torch((full_len + inputs.decode_offset).view(-1))  # [*lead, 1, 1]
    return PrefillResult(logits, cache, records, next_pos, spans)


@torch.no_grad()
def decode_step(loaded: LoadedModel, token: torch.Tensor, cache: DynamicCache, position: torch.Tensor) -> torch.Tensor:
    """One token [1, 1] at position ids [*lead, 1, 1] over the per-layer cache; returns logits [1, V]."""
    model = loaded.model
    text = loaded.family.text_model(model)
    hidden = text.embed_tokens(token)  # [1, 1, D]
    cos_sin = text.rotary_emb(hidden, position)
    cache_kw = cache_kwarg(text.layers[0])
    for layer in text.layers:
        hidden = layer(hidden, position_embeddings=cos_sin, use_cache=True, **{cache_kw: cache})
    return loaded.family.lm_head(model)(text.norm(hidden))[:, -1].float()  # [1, V]


def eos_ids(loaded: LoadedModel) -> set[int]:
    ids = loaded.model.generation_config.eos_token_id
    if ids is None:
        ids = loaded.model.config.get_text_config().eos_token_id
    return set(ids if isinstance(ids, list) else [ids] if ids is not None else [])


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    inputs: PrefillInputs,
    schedule: Schedule,
    *,
    max_new_tokens: int = 16,
    stop_at_eos: bool = True,
    positions: PositionMode = "preserve",
    grid_mode: GridMode = "true",
    softmax_over: SoftmaxAxis = "query",
    assignments: Sequence[torch.Tensor | None] | None = None,
) -> GenerationResult:
    """Greedy generation with the compressed cache (`assignments`: see prefill)."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    t0 = time.perf_counter()
    pre = prefill(
        loaded, inputs, schedule, positions=positions, grid_mode=grid_mode, softmax_over=softmax_over,
        assignments=assignments,
    )  # fmt: skip
    t1 = time.perf_counter()
    kv_lengths, held = pre.kv_lengths(), kv_bytes(pre.cache)
    stops = eos_ids(loaded) if stop_at_eos else set()
    tokens: list[int] = []
    logits, position = pre.logits, pre.next_position
    for _ in range(max_new_tokens):
        token = int(logits.argmax(-1))
        tokens.append(token)
        if token in stops or len(tokens) == max_new_tokens:
            break
        logits = decode_step(loaded, torch.tensor([[token]], device=position.device), pre.cache, position)
        position = position + 1
    t2 = time.perf_counter()
    vision_in = sum(s.length for s in inputs.spans[0])
    groups = []
    for first, last in schedule.layer_groups():
        groups.append(((first, last), vision_in - (kv_lengths[0] - kv_lengths[first - 1])))
    return GenerationResult(
        tokens=tokens,
        text=loaded.processor.tokenizer.decode(tokens, skip_special_tokens=True),
        kv_lengths=kv_lengths,
        kv_bytes=held,
        vision_tokens_in=vision_in,
        vision_tokens_per_group=groups,
        stages=pre.stages,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m lightkv_export.torch_runtime`: generate with LightKV in PyTorch and show what it kept."""
    from rich.console import Console
    from rich.table import Table

    from lightkv_export.method.schedule import resolve
    from lightkv_export.models.registry import load_model

    parser = argparse.ArgumentParser(
        prog="python -m lightkv_export.torch_runtime",
        description="Run an LVLM with LightKV in PyTorch (the reference runtime): one image and a prompt in, "
        "greedy text out, with the per-layer KV cache it held.",
    )
    parser.add_argument("--model", default="tiny-qwen-vl", help="model key (e.g. qwen-vl, tiny-qwen-vl) or local dir")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=float, help="fraction of vision-token KV kept, layer-averaged (default 0.55)")
    group.add_argument("--schedule", help="explicit stages LAYER:WINDOWS:RATIO,... e.g. 12:6:0.5,17:4:0.5,22:2:0.5")
    parser.add_argument("--image", help="RGB image file (default: a generated test pattern)")
    parser.add_argument("--prompt", default="Describe this image.")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--positions", choices=POSITION_MODES, default="preserve")
    parser.add_argument(
        "--compat",
        choices=["none", "official"],
        default="none",
        help="official: the released code's pseudo-square grid and position reset",
    )
    parser.add_argument("--random-weights", action="store_true", help="real architecture, random weights")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    try:
        from PIL import Image

        loaded = load_model(args.model, random_weights=args.random_weights)
        spec = loaded.spec
        layers = len(loaded.family.text_model(loaded.model).layers)
        ratio = 0.55 if args.ratio is None and args.schedule is None else args.ratio
        schedule = resolve(layers, ratio=ratio, schedule=args.schedule, windows=spec.default_windows)
        if args.image:
            try:
                image = Image.open(args.image).convert("RGB")
            except OSError as exc:
                raise InputError(f"cannot read image {args.image!r}: {exc}. Expected a PNG or JPEG file.") from None
        else:
            image = test_pattern(spec.default_image_size)
        inputs = loaded.family.prepare(loaded, [image], args.prompt)
        positions = "official" if args.compat == "official" else args.positions
        grid_mode = "official" if args.compat == "official" else "true"
        result = generate(
            loaded,
            inputs,
            schedule,
            max_new_tokens=args.max_new_tokens,
            positions=positions,
            grid_mode=grid_mode,
        )
        vanilla = generate(loaded, inputs, Schedule(layers, ()), max_new_tokens=1)
    except LightKVError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return exc.exit_code

    table = Table(title=f"LightKV on {spec.key}: schedule {schedule.describe()}")
    table.add_column("layers")
    table.add_column("vision tokens", justify="right")
    table.add_column("KV entries / layer", justify="right")
    for (first, last), n in result.vision_tokens_per_group:
        table.add_row(f"{first}-{last}", f"{n} / {result.vision_tokens_in}", str(result.kv_lengths[first - 1]))
    console.print(table)
    console.print(
        f"KV cache held: {result.kv_bytes:,} bytes (vanilla {vanilla.kv_bytes:,}, "
        f"{result.kv_bytes / vanilla.kv_bytes:.1%}); prefill {result.prefill_s * 1e3:.1f} ms, "
        f"decode {result.decode_s * 1e3:.1f} ms"
    )
    print(f"tokens: {result.tokens}\ntext: {result.text!r}")
    return 0


def test_pattern(size: tuple[int, int]):
    """A deterministic RGB image: smooth gradients plus blocks, so neighbouring patches are similar."""
    import numpy as np
    from PIL import Image

    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), ((xx // 16 + yy // 16) % 2) * 255], -1)
    return Image.fromarray(img.astype(np.uint8), "RGB")


if __name__ == "__main__":
    sys.exit(main())
