"""The real models as the planner sees them: sizes (read by each family from the published config.json, in
models/registry.py's one table of keys and aliases) and vision tokens per image. No weights, no download.

Enough to account for KV-cache bytes, prefill FLOPs and the memory budget without building anything.

Vision tokens per image come from each family's own host image side (`Family.image_host` over the real
processor's settings: Qwen-VL's smart resize, LLaVA-1.5's resize and crop), the code the engines run. The one
exception is LLaVA-NeXT, which the planner knows but no family builds yet (issue 30): its "anyres" rule is here.
A base view (24 x 24 = 576) is followed by a high-resolution view. The high-resolution
canvas is the grid pinpoint with the largest effective resolution (ties: least waste) among 336x672, 672x336,
672x672, 1008x336, 336x1008 (h x w); its tiles give (h / 14) x (w / 14) patches, the padding rows (or columns)
added to keep the aspect ratio are removed ("unpadding") and one newline token ends every remaining row.
So a 720 x 480 (w x h) image: canvas 672 x 672 -> 48 x 48 patches -> 32 x 48 after unpadding -> 32 rows of
48 + 1 newline = 1568 tokens, plus 576 base = 2144 (the paper's "about 2,144"). As LightKV spans this is two
grids: the base view on its 24 x 24 grid and the high-resolution view on a rows x (cols + 1) grid whose last
column holds the newline tokens (they sit in raster order at the end of each row).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from lightkv_export.errors import InputError
from lightkv_export.models.family import ArchShape
from lightkv_export.models.registry import ALIASES, SPECS, get_family, get_spec

CLIP_PATCH = 14
CLIP_SIDE = 336
LLAVA_BASE_GRID = (CLIP_SIDE // CLIP_PATCH, CLIP_SIDE // CLIP_PATCH)  # (24, 24)
ANYRES_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # (h, w)


def planner_keys() -> list[str]:
    """The models the planner accounts for: every real registry entry (tiny presets' processors differ)."""
    return [key for key, spec in SPECS.items() if not spec.tiny]


@functools.cache
def get_shape(key: str) -> ArchShape:
    """A real model key or alias -> its ArchShape: the family reads the sizes from the checkpoint's published config
    (`Family.arch`), the registry entry adds the windows and the planner's default image."""
    name = key.strip().lower()
    if ALIASES.get(name, name) not in SPECS:
        aliases = ", ".join(f"{a} -> {k}" for a, k in ALIASES.items() if not SPECS[k].tiny)
        raise InputError(f"unknown model {key!r}; known models: {', '.join(planner_keys())} (aliases: {aliases}).")
    spec = get_spec(key)
    if spec.tiny:
        raise InputError(
            f"{spec.key} is a tiny preset: the planner accounts for real models ({', '.join(planner_keys())}); "
            f"for a tiny engine's figures read its report.md."
        )
    family = get_family(spec.family)
    arch = family.arch(family.config_class()(**family.real_config_dict(spec.hf_id)))
    return replace(
        arch,
        key=spec.key,
        hf_id=spec.hf_id,
        vision=spec.vision or "",
        default_windows=spec.default_windows,
        default_image_size=spec.plan_image_size or spec.default_image_size,
    )


# ---------------------------------------------------------------------------------------------------------
# Vision tokens per image
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def planner_images(key: str) -> Any:
    """The family's host image side (images.ImageHost) over the real checkpoint's processor settings (the
    family's `random_processor`: real image sizes, a local tokenizer), so the planner counts what engines run."""
    family = get_family(get_spec(key).family)
    return family.image_host(family.random_processor().to_dict())


def anyres_canvas(height: int, width: int) -> tuple[int, int]:
    """The grid pinpoint (h, w) with the largest effective resolution, ties to the least wasted area."""
    best, best_key = ANYRES_PINPOINTS[0], (-1, 0)
    for ch, cw in ANYRES_PINPOINTS:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(ch * cw - effective))
        if key > best_key:
            best, best_key = (ch, cw), key
    return best


def anyres_highres_grid(height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the high-resolution view after unpadding, newline column not included."""
    ch, cw = anyres_canvas(height, width)
    rows, cols = ch // CLIP_PATCH, cw // CLIP_PATCH
    if width / height > cols / rows:  # wider than the canvas: padding rows were added top and bottom
        used = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - used) // 2)
    else:
        used = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - used) // 2)
    return rows, cols


def image_grids(shape: ArchShape, height: int, width: int) -> list[tuple[int, int]]:
    """The (h, w) token grids one image contributes, in sequence order (LLaVA-NeXT: base view, then high-res)."""
    if height < 1 or width < 1:
        raise InputError(f"image size {width}x{height} must be positive.")
    if shape.vision == "llava-next":
        rows, cols = anyres_highres_grid(height, width)
        return [LLAVA_BASE_GRID, (rows, cols + 1)]  # + 1: the newline token closing each row
    return list(planner_images(shape.key).layout(height, width).grids)


def vision_tokens(shape: ArchShape, height: int, width: int) -> int:
    return sum(h * w for h, w in image_grids(shape, height, width))
