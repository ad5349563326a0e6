"""One request's pictures from a PyTorch reference run on an engine's own inputs (any image and prompt).

The run takes the engine's `prepare` (the image as its processor sizes it, the same tokens and positions) and its
schedule; the merge map follows every vision token through the stages' `merged_into`, the guidance picture shows
the first stage's xi, and the KV picture marks the bytes the run really held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lightkv_export.accounting.units import dtype_bytes
from lightkv_export.errors import InputError
from lightkv_export.kv import kv_bytes_per_layer
from lightkv_export.method.schedule import Schedule
from lightkv_export.method.spans import VisionSpan
from lightkv_export.report.pictures import (
    DEFAULT_PROMPT,
    GUIDANCE_PNG,
    MERGE_PNG,
    GuidancePicture,
    LayerPicture,
    MergeMapPicture,
    MergeStage,
    draw_guidance,
    draw_merge_map,
    write_layer_pictures,
)

if TYPE_CHECKING:
    from PIL import Image


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


def load_image(path: str | Path) -> Image.Image:
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

    `loaded`: the engine's model, already loaded (tests); default load_model(manifest.model_source).
    """
    from lightkv_export import torch_runtime
    from lightkv_export.artifacts import read_manifest
    from lightkv_export.inputs import parity_images, torch_inputs
    from lightkv_export.runtime import Engine

    engine_dir, out = Path(engine_dir), Path(out)
    manifest = read_manifest(engine_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write pictures to {out}: {exc}. Choose another --out.") from None
    if manifest.vanilla:
        vision, kv = write_layer_pictures(manifest, out)
        note = "vanilla engine: no merge stages, so there is no merge map and no guidance to draw."
        return RequestPictures(vision, kv, None, None, (note,))

    size = tuple(manifest.image_size)
    image = parity_images(size, 0) if image is None else image
    engine = Engine.load(engine_dir)
    request = engine.prepare([image], prompt)
    if loaded is None:
        from lightkv_export.models.registry import load_model

        loaded = load_model(manifest.model_source, random_weights=manifest.random_weights)
    run = torch_runtime.prefill(
        loaded, torch_inputs(request), engine.schedule, positions=manifest.positions, grid_mode=manifest.grid_mode
    )
    shapes = [tuple(layer.keys.shape) for layer in run.cache.layers]  # [1, Hkv, S_l, d] each
    vision, kv = write_layer_pictures(manifest, out, kv_bytes_per_layer(shapes, dtype_bytes(manifest.dtype)))

    span = request.spans[0][0]
    h, w = span.grid
    ph, pw = engine.processor.images.processed_size(image.height, image.width)
    underlay = image.convert("RGB").resize((pw, ph))  # what the engine saw: the image as its processor sizes it
    cell = (ph / h, pw / w)
    title = f"{manifest.model} ({manifest.target}), schedule {manifest.schedule}"
    if manifest.grid_mode != "true":  # windows were cut on another grid than the one drawn
        title += f", {manifest.grid_mode} grid mode (windows on the pseudo-square grid)"
    stages = tuple(merge_stages(run.stages, span, engine.schedule))
    merge_map = MergeMapPicture(out / MERGE_PNG, (h, w), cell, stages)
    draw_merge_map(merge_map, underlay, f"{title}: merge map for {prompt!r}")
    guidance = GuidancePicture(
        out / GUIDANCE_PNG, run.stages[0].layer, (h, w), guidance_values(run.stages[0], span), prompt
    )
    draw_guidance(guidance, underlay, title)
    notes = (f"{len(engine.schedule.stages)} stages: " + ", ".join(f"{s.tokens_in}->{s.tokens_out}" for s in stages),)
    return RequestPictures(vision, kv, merge_map, guidance, notes)
