"""Analytic architecture shapes of the real models: sizes, vision-token counts, parameter bytes. No weights.

These are the published configurations (config.json of each Hugging Face checkpoint), enough to account for
KV-cache bytes, prefill FLOPs and the memory budget without building or downloading anything.

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

import math
from dataclasses import dataclass

from lightkv_export.errors import InputError
from lightkv_export.kv import kv_bytes

QWEN_FACTOR = 28  # patch 14 x spatial merge 2
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 12845056  # 16384 tokens of 28 x 28
CLIP_PATCH = 14
CLIP_SIDE = 336
LLAVA_BASE_GRID = (CLIP_SIDE // CLIP_PATCH, CLIP_SIDE // CLIP_PATCH)  # (24, 24)
ANYRES_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # (h, w)
# Vision tower + projector parameters (not derived here: from the checkpoints' published parameter counts).
CLIP_L_336_PARAMS = 303_507_456
QWEN25_VL_7B_VISION_PARAMS = 676_550_144  # 8.292B total - 7.616B language model
QWEN2_VL_2B_VISION_PARAMS = 665_271_296  # 2.209B total - 1.544B language model


@dataclass(frozen=True)
class ArchShape:
    """One real model's decoder and vision front end, as far as accounting needs them."""

    key: str
    hf_id: str
    vision: str  # "qwen" | "llava" | "llava-next": how an image becomes vision tokens
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int  # gated MLP (gate, up, down)
    vocab: int
    tie_embeddings: bool
    qkv_bias: bool
    vision_params: int  # vision encoder + projector
    default_windows: tuple[int, ...]  # windows per side of the paper's stages
    default_image_size: tuple[int, int]  # (height, width) pixels

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        d, kv = self.hidden, self.kv_dim
        attn = d * d + 2 * d * kv + d * d + ((d + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * d * self.intermediate + 2 * d  # + two RMSNorm weights

    def language_params(self) -> int:
        embed = self.vocab * self.hidden
        head = 0 if self.tie_embeddings else embed
        return embed + head + self.num_layers * self.layer_params() + self.hidden

    def params(self) -> int:
        return self.language_params() + self.vision_params

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token in one layer."""
        return kv_bytes([1], self.kv_heads, self.head_dim, dtype_bytes)[0]


def _llava_projector(hidden: int) -> int:
    """mlp2x_gelu: 1024 -> hidden -> hidden, with biases."""
    return 1024 * hidden + hidden + hidden * hidden + hidden


_LLAMA_7B = dict(num_layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008)
_LLAMA_13B = dict(num_layers=40, hidden=5120, heads=40, kv_heads=40, intermediate=13824)
_LLAVA_COMMON = dict(vocab=32064, tie_embeddings=False, qkv_bias=False, default_windows=(4, 2, 1))

SHAPES: dict[str, ArchShape] = {
    "qwen-vl": ArchShape(
        "qwen-vl",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "qwen",
        num_layers=28,
        hidden=3584,
        heads=28,
        kv_heads=4,
        intermediate=18944,
        vocab=152064,
        tie_embeddings=False,
        qkv_bias=True,
        vision_params=QWEN25_VL_7B_VISION_PARAMS,
        default_windows=(6, 4, 2),
        default_image_size=(768, 1024),
    ),
    "qwen2-vl": ArchShape(
        "qwen2-vl",
        "Qwen/Qwen2-VL-2B-Instruct",
        "qwen",
        num_layers=28,
        hidden=1536,
        heads=12,
        kv_heads=2,
        intermediate=8960,
        vocab=151936,
        tie_embeddings=True,
        qkv_bias=True,
        vision_params=QWEN2_VL_2B_VISION_PARAMS,
        default_windows=(6, 4, 2),
        default_image_size=(768, 1024),
    ),
    "llava": ArchShape(
        "llava",
        "llava-hf/llava-1.5-7b-hf",
        "llava",
        **_LLAMA_7B,
        **_LLAVA_COMMON,
        vision_params=CLIP_L_336_PARAMS + _llava_projector(4096),
        default_image_size=(336, 336),
    ),
    "llava-13b": ArchShape(
        "llava-13b",
        "llava-hf/llava-1.5-13b-hf",
        "llava",
        **_LLAMA_13B,
        **_LLAVA_COMMON,
        vision_params=CLIP_L_336_PARAMS + _llava_projector(5120),
        default_image_size=(336, 336),
    ),
    "llava-next": ArchShape(
        "llava-next",
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-next",
        **_LLAMA_7B,
        **_LLAVA_COMMON,
        vision_params=CLIP_L_336_PARAMS + _llava_projector(4096),
        default_image_size=(480, 720),
    ),
    "llava-next-13b": ArchShape(
        "llava-next-13b",
        "llava-hf/llava-v1.6-vicuna-13b-hf",
        "llava-next",
        **_LLAMA_13B,
        **_LLAVA_COMMON,
        vision_params=CLIP_L_336_PARAMS + _llava_projector(5120),
        default_image_size=(480, 720),
    ),
}

ALIASES: dict[str, str] = {
    "qwen2.5-vl": "qwen-vl",
    "qwen2.5-vl-7b": "qwen-vl",
    "qwen2-vl-2b": "qwen2-vl",
    "llava-1.5": "llava",
    "llava-7b": "llava",
    "llava-1.5-7b": "llava",
    "llava-1.5-13b": "llava-13b",
    "llava-next-7b": "llava-next",
    "llava-1.6": "llava-next",
    "llava-1.6-13b": "llava-next-13b",
}


def get_shape(key: str) -> ArchShape:
    name = ALIASES.get(key.strip().lower(), key.strip().lower())
    if name not in SHAPES:
        known = ", ".join(SHAPES)
        raise InputError(f"unknown model {key!r}; known models: {known} (aliases: {', '.join(ALIASES)}).")
    return SHAPES[name]


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
