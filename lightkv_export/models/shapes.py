"""The real models as the planner sees them: sizes (read by each family from the published config.json, in
models/registry.py's one table of keys and aliases) and vision tokens per image. No weights, no download.

Enough to account for KV-cache bytes, prefill FLOPs and the memory budget without building anything.

Vision tokens per image, as each processor counts them:
* Qwen2-VL / Qwen2.5-VL: the image is resized to multiples of 28 (patch 14 x spatial merge 2) by `smart_resize`
  (round each side to the nearest multiple of 28; if that exceeds max_pixels, scale down and floor; if below
  min_pixels, scale up and ceil). An H x W resize gives (H / 28) x (W / 28) tokens on that grid.
  max_pixels = 12845056 and min_pixels = 3136, as in the checkpoints' preprocessor_config.json.
* LLaVA-1.5: every image is resized to 336 x 336, CLIP ViT-L/14 gives 24 x 24 = 576 tokens (CLS dropped).
* LLaVA-NeXT ("anyres"): a base view (24 x 24 = 576) followed by a high-resolution view. The high-resolution
  canvas is the grid pinpoint with the largest effective resolution (ties: least waste) among 336x672, 672x336,
  672x672, 1008x336, 336x1008 (h x w); its tiles give (h / 14) x (w / 14) patches, the padding rows (or columns)
  added to keep the aspect ratio are removed ("unpadding") and one newline token ends every remaining row.
  So a 720 x 480 (w x h) image: canvas 672 x 672 -> 48 x 48 patches -> 32 x 48 after unpadding -> 32 rows of
  48 + 1 newline = 1568 tokens, plus 576 base = 2144 (the paper's "about 2,144"). As LightKV spans this is two
  images: the base view on its 24 x 24 grid and the high-resolution view on a rows x (cols + 1) grid whose last
  column holds the newline tokens (they sit in raster order at the end of each row).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

from lightkv_export.errors import InputError
from lightkv_export.models.family import ArchShape
from lightkv_export.models.registry import ALIASES, SPECS, get_family, get_spec

QWEN_FACTOR = 28  # patch 14 x spatial merge 2
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 12845056  # 16384 tokens of 28 x 28
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
        vision=spec.vision or arch.vision,
        default_windows=spec.default_windows,
        default_image_size=spec.plan_image_size or spec.default_image_size,
    )


# ---------------------------------------------------------------------------------------------------------
# Vision tokens per image
# ---------------------------------------------------------------------------------------------------------


def qwen_smart_resize(
    height: int, width: int, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS
) -> tuple[int, int]:
    """Qwen's resize to multiples of 28 (Python's round: halves go to even), kept within the pixel budget."""
    if min(height, width) < 1 or max(height, width) / min(height, width) > 200:
        raise InputError(f"image {width}x{height}: sides must be >= 1 with an aspect ratio of at most 200.")
    f = QWEN_FACTOR
    h_bar, w_bar = round(height / f) * f, round(width / f) * f
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h_bar, w_bar


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
    if shape.vision == "qwen":
        h, w = qwen_smart_resize(height, width)
        return [(h // QWEN_FACTOR, w // QWEN_FACTOR)]
    if shape.vision == "llava":
        return [LLAVA_BASE_GRID]
    rows, cols = anyres_highres_grid(height, width)
    return [LLAVA_BASE_GRID, (rows, cols + 1)]  # + 1: the newline token closing each row


def vision_tokens(shape: ArchShape, height: int, width: int) -> int:
    return sum(h * w for h, w in image_grids(shape, height, width))
