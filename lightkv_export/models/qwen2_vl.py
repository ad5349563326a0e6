"""Qwen2-VL family (`Qwen2VL`), and the Qwen-VL glue Qwen2.5-VL inherits (models/qwen2_5_vl.py).

Both families have the same outer layout: `model.model.visual` (vision encoder + patch merger),
`model.model.language_model` (decoder stack with M-RoPE), `model.lm_head`, and a processor that expands one
<|image_pad|> per image into (h / merge) * (w / merge) placeholder tokens. Only the classes and the real
checkpoints' hyper-parameters differ (and Qwen2.5-VL's windowed vision attention, whose layout its host adds).

`prepare` = `process` -> `vision_embeddings` -> `embed_and_position` (models/family.py); the exporter calls the
parts on their own (the vision encoder and the language model are exported separately).

The host image side (`QwenImages`, images.ImageHost) sizes each image as Qwen2VLImageProcessor does (`smart_resize`
within the processor's min / max pixels), lays its patches out in the merger's order and computes what depends only
on the patch grid (rotary position ids, attention segments): the vision graph takes those as inputs, so one graph
serves every image size. The module imports without torch or transformers (an engine's host reads `QwenImages`
alone): they are imported where a method needs them, and the vision graph's torch.nn.Module class is made on first
use.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lightkv_export.contract import PIXEL_VALUES
from lightkv_export.errors import InputError

# The processors' RGB conversion and a noise picture, shared with LLaVA's host (one copy of each).
from lightkv_export.images import (
    PROCESSOR_DEFAULTS,
    ImageFormat,
    PreparedImage,
    example_image,
    image_features,
    processor_rgb,
)
from lightkv_export.method.spans import ImageLayout, VisionSpan, spans_on_grids
from lightkv_export.models import tiny
from lightkv_export.models.base import (
    LoadedModel,
    ModelSpec,
    PrefillInputs,
    VisionExport,
    attention_implementation,
    check_request,
    user_turn,
)
from lightkv_export.models.family import Family, register_family
from lightkv_export.models.positions import MROPE

if TYPE_CHECKING:
    import torch

HF_ID = "Qwen/Qwen2-VL-2B-Instruct"

# Qwen2-VL-2B-Instruct's config.json, for --random-weights without the checkpoint on disk.
REAL_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
REAL_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "num_heads": 16,
    "mlp_ratio": 4,
    "hidden_size": 1536,  # the merger's output = the LLM width
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
# The real processors' pixel budget (preprocessor_config.json): 4 to 16384 LLM tokens per image.
REAL_MIN_PIXELS = 56 * 56
REAL_MAX_PIXELS = 28 * 28 * 16384

# The vision graph's inputs besides contract.PIXEL_VALUES: what depends only on an image's patch grid, computed on
# the host (transformers' vision encoders take them precomputed, under the kwargs named in VisionGraph.forward).
POSITION_IDS = "vision.position_ids"  # [N_patches, 2] int64: each patch's (row, column), the rotary positions
CU_SEQLENS = "vision.cu_seqlens"  # [2] int32: [0, N_patches], the one image's attention segment

IMAGE_TOKEN = "<|image_pad|>"
MAX_ASPECT = 200  # smart_resize refuses a longer side more than 200 times the shorter
MIN_SIDE = 1  # the processor takes any image with pixels (smart_resize scales small ones up to min_pixels)
# Qwen2VLImageProcessor's class defaults (transformers 5): a saved processor config leaves out what it does not
# change, and the processor then uses these.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
QWEN_DEFAULTS: dict[str, Any] = {
    **PROCESSOR_DEFAULTS,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


# --- Qwen-VL helpers (pure functions of a model, processor or tensors) ---------------------------------------


def vision_model(model: Any) -> Any:
    """The vision encoder with its patch merger: (pixel_values, grid_thw) -> [N_vis, D]."""
    return model.model.visual


def chat_text(processor: Any, num_images: int, prompt: str) -> str:
    """The chat-formatted prompt: one user turn with the images first, then the text, and the assistant cue.

    For display and layout checks only: tokenizing this string would read control tokens typed in `prompt` as real
    ones; `process` tokenizes the user's text as plain text."""
    return processor.apply_chat_template(user_turn(num_images, prompt), add_generation_prompt=True, tokenize=False)


def vision_spans(
    input_ids: torch.Tensor, image_token_id: int, image_grid_thw: torch.Tensor, merge: int
) -> list[list[VisionSpan]]:
    """Per row, each run of image placeholder tokens as a VisionSpan with its LLM token grid (h, w)."""
    if any(int(t) != 1 for t, _, _ in image_grid_thw.tolist()):
        raise InputError("a video (temporal patches > 1) was given; these engines take images only.")
    grids = [(int(h) // merge, int(w) // merge) for _, h, w in image_grid_thw.tolist()]
    return spans_on_grids(input_ids, image_token_id, grids, "is <|image_pad|> typed in the prompt?")


def no_grad(method: Callable) -> Callable:
    """torch.no_grad() around `method`, imported when called (this module imports without torch)."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return method(*args, **kwargs)

    return run


# --- the host image side (numpy + PIL, no torch) ----------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) Qwen2VLImageProcessor resizes an image to: each side rounded to a multiple of `factor`
    (patch x merge; Python's round, halves to even), then, if the pixel count leaves [min_pixels, max_pixels],
    both sides scaled by one factor to meet it (floored when shrinking, ceiled when growing, never under `factor`).

    The one copy of transformers' `smart_resize` (the runtime has no transformers; tests hold the two equal): the
    float expressions are written in the same order so that the roundings agree. An empty image, or one whose
    aspect ratio is above 200 (the processor's refusal), is an InputError."""
    if min(height, width) < MIN_SIDE:
        raise InputError(f"image {width}x{height} (width x height) is empty: both sides must be at least 1 pixel.")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        ratio = max(height, width) / min(height, width)
        raise InputError(
            f"image {width}x{height} (width x height) has an aspect ratio of {ratio:.1f}; the processor accepts at "
            f"most {MAX_ASPECT} (crop or pad the image)."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_budget(features: dict[str, Any]) -> tuple[int, int]:
    """(min_pixels, max_pixels) of an image processor's settings: transformers 5 saves them as size
    {"shortest_edge", "longest_edge"}, older files as min_pixels / max_pixels (which, as in the processor, win)."""
    size = features.get("size") or {}
    low = features.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", DEFAULT_MIN_PIXELS)))
    high = features.get("max_pixels", size.get("longest_edge", size.get("max_pixels", DEFAULT_MAX_PIXELS)))
    for name, value in (("min_pixels", low), ("max_pixels", high)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"image processor {name} {value!r} must be a positive integer (pixels).")
    return low, high


def rotary_position_ids(rows: int, cols: int, merge: int) -> np.ndarray:
    """[rows * cols, 2] int64: each patch's (row, column) in the patch grid, patches in the merger's order (each
    merge x merge block together, blocks in raster order), as transformers' get_vision_position_ids."""

    def blocks(index: np.ndarray) -> np.ndarray:  # [rows, cols] -> [rows * cols], block-major
        return index.reshape(rows // merge, merge, cols // merge, merge).transpose(0, 2, 1, 3).reshape(-1)

    row, col = np.indices((rows, cols))  # [rows, cols] each
    return np.stack([blocks(row), blocks(col)], axis=-1).astype(np.int64)  # [rows * cols, 2]


@dataclass(frozen=True)
class QwenImages:
    """Qwen2VLImageProcessor on the host (images.ImageHost): each image resized by `smart_resize` (PIL, the
    processor's filter, on the 8-bit image), rescaled and normalized, cut into patch x patch patches laid out in the
    merger's order ([N_patches, C * T * P * P], the frame repeated over the temporal patch), with the grid-only
    vision-graph inputs. One grid of (H / factor) x (W / factor) <|image_pad|> tokens per image. Build it with
    `Qwen2VL.image_host(processor_config)`."""

    fmt: ImageFormat
    patch: int
    merge: int
    temporal: int
    min_pixels: int
    max_pixels: int
    resample: int  # PIL.Image.Resampling value
    convert_rgb: bool
    image_token: str = IMAGE_TOKEN
    min_side: int = MIN_SIDE

    @property
    def factor(self) -> int:
        """Pixels per LLM token along a side: patch x merge (28 for the real checkpoints)."""
        return self.patch * self.merge

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of vision-encoder patches of an image of this size (as sent): image_grid_thw's h, w."""
        h, w = self.processed_size(height, width)
        return h // self.patch, w // self.patch

    def layout(self, height: int, width: int) -> ImageLayout:
        h, w = self.processed_size(height, width)
        return ImageLayout.single(h // self.factor, w // self.factor)

    def expand(self, layout: ImageLayout) -> str:
        """One <|image_pad|> per vision token: the processor's expansion of the template's single <|image_pad|>."""
        if layout.fixed_tokens or len(layout.grids) != 1:
            raise InputError(f"Qwen-VL lays an image out as one grid, not {layout.to_json()}.")
        return self.image_token * layout.vision_tokens

    def grid_feeds(self, rows: int, cols: int) -> dict[str, np.ndarray]:
        """The vision graph's inputs that depend only on the patch grid (rows, cols)."""
        return {
            POSITION_IDS: rotary_position_ids(rows, cols, self.merge),  # [N, 2]
            CU_SEQLENS: np.asarray([0, rows * cols], dtype=np.int32),  # [2]
        }

    def grid_shapes(self, rows: int, cols: int) -> dict[str, tuple[int, ...]]:
        """The shapes of grid_feeds(rows, cols), without computing them."""
        return {POSITION_IDS: (rows * cols, 2), CU_SEQLENS: (2,)}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Per graph input, its axes that vary with the image, named by what they count ("patches" is merge^2
        "tokens"): the vision export's dynamic shapes."""
        return {PIXEL_VALUES: {0: "patches"}, POSITION_IDS: {0: "patches"}, CU_SEQLENS: {}}

    def feed_shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        rows, cols = self.patch_grid(height, width)
        width_ = 3 * self.temporal * self.patch * self.patch
        return {PIXEL_VALUES: (rows * cols, width_), **self.grid_shapes(rows, cols)}

    def pixel_range(self) -> tuple[int, int]:
        """(min, max) pixels of a processed image. smart_resize stays within [min_pixels, max_pixels] but at its
        edges: growing, it rounds both sides up (past max_pixels when the two are close); shrinking, it rounds both
        down (under min_pixels likewise) and keeps each side at least one factor (past max_pixels for aspect
        ratios near 200 when max_pixels < 200 factor^2). The bounds below cover those, the lower one loosely; for
        the real checkpoints' settings they are exactly (min_pixels, max_pixels)."""
        f, low, high = self.factor, self.min_pixels, self.max_pixels
        token = f * f  # a processed image is whole tokens: a multiple of f^2 pixels
        # Scaled exactly, an image of aspect a <= 200 and p pixels has sides sqrt(p / a) and sqrt(p * a); each
        # rounding moves a side by less than f.
        grown = low + f * (math.sqrt(low * MAX_ASPECT) + math.sqrt(low / MAX_ASPECT)) + token
        shrunk = high - f * (math.sqrt(high * MAX_ASPECT) + math.sqrt(high / MAX_ASPECT)) + token
        clamped = f * math.floor(math.sqrt(high * MAX_ASPECT) / f) * f if math.sqrt(high / MAX_ASPECT) < f else 0
        smallest = max(token, math.ceil(shrunk / token) * token)
        largest = max(math.floor(grown / token) * token, clamped)
        return min(low, smallest), max(high, largest)

    def patches(self, pixels: np.ndarray) -> np.ndarray:
        """[H, W, C] uint8 (sides multiples of patch x merge) -> [N_patches, C*T*P*P] float32, in the merger's
        order: each merge x merge block of patches together, blocks in raster order."""
        h, w, c = pixels.shape
        x = self.fmt.chw(pixels)  # [C, H, W] float32
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # [gh/m, gw/m, m, m, C, T, P, P]
        return x.reshape(gh * gw, c * t * p * p)  # [N_patches, C*T*P*P] (a copy: the broadcast is not contiguous)

    def prepare(self, image: Any) -> PreparedImage:
        """Convert to RGB, resize to smart_resize's size (PIL, the processor's filter, on the 8-bit image, as the
        processor resizes), rescale and normalize, lay out the patches: the processor's steps and order."""
        image = processor_rgb(image, self.convert_rgb)
        height, width = image.height, image.width
        h, w = self.processed_size(height, width)
        pixels = np.asarray(image.resize((w, h), resample=self.resample))  # [h, w, 3] uint8
        feeds = {PIXEL_VALUES: self.patches(pixels), **self.grid_feeds(h // self.patch, w // self.patch)}
        return PreparedImage(size=(h, w), layout=self.layout(height, width), feeds=feeds)

    @classmethod
    def settings(cls, processor_config: dict[str, Any], max_pixels: int | None) -> dict[str, Any]:
        """The constructor's arguments from processor_config.json (or a bare preprocessor_config.json), with a
        user cap on the processed pixels; what this host does not implement is refused, named, rather than images
        sized differently from the processor."""
        features = QWEN_DEFAULTS | image_features(processor_config)
        kind = str(features.get("image_processor_type", "Qwen2VLImageProcessor"))
        if not kind.startswith("Qwen2VLImageProcessor"):
            raise InputError(f"image processor {kind}: the Qwen-VL host implements Qwen2VLImageProcessor only.")
        if not features["do_resize"]:
            raise InputError("image processor setting do_resize off is not supported for Qwen-VL (smart_resize).")
        patch, merge, temporal = (int(features[k]) for k in ("patch_size", "merge_size", "temporal_patch_size"))
        low, high = pixel_budget(features)
        factor = patch * merge
        if high < factor * factor or low > high:
            raise InputError(
                f"image processor min_pixels {low} / max_pixels {high}: expected min_pixels <= max_pixels and "
                f"max_pixels at least one token's {factor}x{factor} pixels."
            )
        if max_pixels is not None:
            if max_pixels < low:
                raise InputError(
                    f"--max-image-pixels {max_pixels} is below the processor's min_pixels {low}: every image is "
                    f"scaled up to at least {low} pixels; give a cap of at least {low}."
                )
            high = min(high, int(max_pixels))
        resample = features["resample"]
        if not isinstance(resample, int) or not 0 <= resample <= 5:
            raise InputError(f"image processor resample {resample!r} is not a PIL resampling filter (0-5).")
        return {
            "fmt": ImageFormat.from_config(features),
            "patch": patch,
            "merge": merge,
            "temporal": temporal,
            "min_pixels": low,
            "max_pixels": high,
            "resample": int(resample),
            "convert_rgb": bool(features["do_convert_rgb"]),
        }

    @classmethod
    def from_config(cls, processor_config: dict[str, Any], *, max_pixels: int | None = None) -> QwenImages:
        return cls(**cls.settings(processor_config, max_pixels))


# --- the vision graph -------------------------------------------------------------------------------------------

VISION_ATTENTION = "lightkv_flash_varlen_export"  # "flash" in the name: transformers then passes cu_seqlens
# The kwarg the vision graph hands the attention function through transformers' encoder (which passes unknown
# kwargs down to each attention call): ((bounds tensor, most patches in one of its segments), ...). A layer whose
# cu_seq_lens_q is one of these tensors (Qwen2.5-VL's windows) attends in segments padded to that static length.
SEGMENT_CAPACITY = "lightkv_segment_capacity"
# Heads per score tensor where every patch attends every other (one image's full-attention layers): the graph
# holds at most HEAD_GROUP x N x N scores at a time, not heads x N x N (a Python loop: it unrolls in the trace,
# and ONNX Runtime frees each group's scores before the next group's are made).
HEAD_GROUP = 1


def varlen_attention(module, query, key, value, attention_mask, *, scaling=None, cu_seq_lens_q=None, **kwargs):
    """Attention within each packed segment of the vision sequence (images, or Qwen2.5-VL's windows), with no
    heads x N x N tensor.

    Transformers' SDPA path splits the sequence with `.tolist()` (untraceable); its flash path hands the attention
    function `cu_seq_lens_q` instead, which this reads with tensor ops only (the bounds stay graph inputs: any
    number of patches). Segments of a known greatest length (windows: SEGMENT_CAPACITY) are gathered into a padded
    [segments, H, capacity, d] batch: N x capacity scores per head. One segment (the traced graph's one image:
    cu_seqlens has the static shape [2]) is plain attention, HEAD_GROUP heads at a time. Several images in one
    eager call (tests, never traced) are padded to the longest. query / key / value [1, H, N, d]; returns
    [1, N, H, d] as a flash implementation does."""
    bounds = cu_seq_lens_q
    capacity = next((c for t, c in kwargs.get(SEGMENT_CAPACITY, ()) if t is bounds), None)
    if capacity is None and bounds.shape[0] == 2:
        out = grouped_attention(query, key, value, scaling, HEAD_GROUP)  # [1, H, N, d]
    else:
        if capacity is None:  # eager only: .max() of a tensor is a Python number here
            capacity = int((bounds[1:] - bounds[:-1]).max())
        out = segment_attention(query, key, value, bounds, capacity, scaling)  # [1, H, N, d]
    return out.transpose(1, 2), None


def grouped_attention(query, key, value, scaling, group: int):
    """[1, H, N, d] attention of every token to every token, `group` heads per SDPA call."""
    import torch

    sdpa = torch.nn.functional.scaled_dot_product_attention
    heads = query.shape[1]  # static: the model's head count
    parts = [
        sdpa(query[:, h : h + group], key[:, h : h + group], value[:, h : h + group], scale=scaling)
        for h in range(0, heads, group)
    ]  # each [1, group, N, d]
    return torch.cat(parts, dim=1)  # [1, H, N, d]


def segment_attention(query, key, value, bounds, capacity: int, scaling):
    """[1, H, N, d] attention within the segments [bounds[i], bounds[i + 1]) (contiguous, in order, none empty),
    each gathered into `capacity` slots (padding keys masked): segments x H x capacity^2 scores in all."""
    import torch

    n = query.shape[2]
    starts, ends = bounds[:-1].long(), bounds[1:].long()  # [S] each
    slots = starts[:, None] + torch.arange(capacity, device=query.device)[None, :]  # [S, L] token of each slot
    filled = slots < ends[:, None]  # [S, L] slots holding a token of the segment
    slots = torch.where(filled, slots, torch.zeros_like(slots))  # [S, L] padding reads token 0, then is masked

    def gather(x: torch.Tensor) -> torch.Tensor:  # [1, H, N, d] -> [S, H, L, d]
        return x[0][:, slots].transpose(0, 1)

    mask = filled[:, None, None, :]  # [S, 1, 1, L] keys of the segment only
    out = torch.nn.functional.scaled_dot_product_attention(
        gather(query), gather(key), gather(value), attn_mask=mask, scale=scaling
    )  # [S, H, L, d]
    heads, dim = out.shape[1], out.shape[3]
    # Back to token order: token t is slot t - starts[s] of its segment s, s counted by a cumulative sum of marks
    # where segments start (distinct, no segment being empty: a plain scatter, no reduction).
    marks = torch.zeros(n, dtype=torch.long, device=query.device).index_put((ends[:-1],), torch.ones_like(ends[:-1]))
    segment = marks.cumsum(0)  # [N] segment of each token
    flat = segment * capacity + torch.arange(n, device=query.device) - starts[segment]  # [N] its padded slot
    out = out.transpose(0, 1).reshape(heads, -1, dim)  # [H, S * L, d]
    return out[:, flat][None]  # [1, H, N, d]


@functools.cache
def register_vision_attention() -> None:
    """Register varlen_attention with transformers (once, when a graph is first made)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VISION_ATTENTION, varlen_attention)


# transformers reads a maximum segment length only to size flash kernels; varlen_attention never reads it (a
# data-dependent length would not trace). Given, it stops transformers computing it with .item() (untraceable).
UNREAD_MAX_SEQLEN = 0


@functools.cache
def vision_graph_class() -> type:
    """The VisionGraph torch.nn.Module class, made on first use so that importing this module needs no torch."""
    import torch

    register_vision_attention()

    class VisionGraph(torch.nn.Module):
        """Vision encoder + merger for one image of any patch grid: the grid-only layout (rotary positions,
        attention segments) comes in as inputs, so nothing in the graph depends on the example's grid."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.visual = vision_model(model)  # registers the weights as this module's parameters

        def encode(self, pixel_values: torch.Tensor, **layout: Any) -> torch.Tensor:
            """[N_patches, F] float32 pixels + the layout kwargs transformers' encoder pops -> [N_vis, D]."""
            pixels = pixel_values.to(self.visual.dtype)  # the host's float32 feeds, in the encoder's dtype
            with attention_implementation(self.visual.config, VISION_ATTENTION):  # traced: the graph has the mask
                # grid_thw None: every use of it in the encoder is replaced by the precomputed layout (a use
                # left would fail the trace rather than bake in the example's grid).
                out = self.visual(pixels, grid_thw=None, max_seqlen=UNREAD_MAX_SEQLEN, **layout)
            return out.pooler_output  # [N_vis, D]

        def forward(
            self, pixel_values: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor
        ) -> torch.Tensor:
            return self.encode(pixel_values, position_ids=position_ids, cu_seqlens=cu_seqlens)  # [N_vis, D]

    return VisionGraph


# --- the family -----------------------------------------------------------------------------------------------


@register_family("qwen2_vl", model_types=("qwen2_vl",))
class Qwen2VL(Family):
    """Qwen2-VL, and the Qwen-VL glue Qwen2.5-VL inherits (models/qwen2_5_vl.py changes classes and sizes)."""

    hf_id = HF_ID
    positions = MROPE  # position_ids [3, B, S]
    # 672 x 672: 24 x 24 = 576 vision tokens, every stage >= 8 tokens per window; the planner's default request is
    # a 4:3 photo (27 x 37 = 999 tokens). Tiny: 12 x 16 = 192 tokens, then ~96, ~48.
    presets = (
        ModelSpec.real("qwen2-vl", "qwen2_vl", HF_ID, (6, 4, 2), (672, 672), plan_image_size=(768, 1024),
                       aliases=("qwen2-vl-2b", "qwen2-vl-2b-instruct", HF_ID.lower())),
        ModelSpec.toy("tiny-qwen2-vl", "qwen2_vl", HF_ID, (2, 2, 1), (336, 448)),
    )  # fmt: skip
    real_text: ClassVar[dict[str, Any]] = REAL_TEXT
    real_vision: ClassVar[dict[str, Any]] = REAL_VISION
    tie_word_embeddings = True
    # The tiny preset: the kit's decoder sizes (models/tiny.py) with M-RoPE (mrope_section sums to head_dim / 2 = 8)
    # and a 2-block vision encoder whose merger's output (hidden_size, in Qwen2-VL) is the LLM width.
    tiny_text: ClassVar[dict[str, Any]] = {
        **tiny.TINY_DECODER,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    }
    tiny_vision: ClassVar[dict[str, Any]] = {
        "depth": 2,
        "embed_dim": 32,
        "num_heads": 2,
        "mlp_ratio": 4,
        "hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    # The real processors' pixel budget (preprocessor_config.json): 4 to 16384 LLM tokens per image.
    real_min_pixels, real_max_pixels = REAL_MIN_PIXELS, REAL_MAX_PIXELS

    def model_class(self) -> type:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def config_class(self) -> type:
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig

    def real_config_dict(self, hf_id: str | None = None) -> dict[str, Any]:
        """Keyword arguments of the config class for the real checkpoint's architecture (one size per family)."""
        return {
            "text_config": dict(self.real_text),
            "vision_config": dict(self.real_vision),
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    def processor_class(self) -> type:
        """The transformers processor class, image-only (models/tiny.py image_only_processor: no video processor,
        which needs torchvision)."""
        from transformers import Qwen2VLProcessor

        return tiny.image_only_processor(Qwen2VLProcessor)

    def tiny_config_dict(self, tokenizer: Any) -> dict[str, Any]:
        """Keyword arguments of the config class for the tiny preset, its token ids read from `tokenizer`."""
        ids = tiny.special_token_ids(tokenizer)
        text = {
            **self.tiny_text,
            "vocab_size": len(tokenizer),
            **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        }
        return {
            "text_config": text,
            "vision_config": dict(self.tiny_vision),
            **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")},
            "tie_word_embeddings": False,
        }

    def tiny_processor(self, tokenizer: Any | None = None, image_processor: Any | None = None) -> Any:
        """The family's processor over the kit's tokenizer and image processor (or the ones given), without the
        vision encoder's settings (`with_vision_settings` adds them)."""
        return tiny.build_processor(self.processor_class(), tokenizer, image_processor)

    def tiny_preset(self) -> tuple[Any, Any]:
        """(config, processor) of the tiny preset (models/tiny.py); the registry seeds the weights."""
        tokenizer = tiny.build_tokenizer()
        config = self.config_class()(**self.tiny_config_dict(tokenizer))
        return config, self.with_vision_settings(self.tiny_processor(tokenizer), config.vision_config)

    def random_processor(self) -> Any:
        image_processor = tiny.build_image_processor(self.real_min_pixels, self.real_max_pixels)
        processor = self.tiny_processor(tiny.build_tokenizer(), image_processor)
        return self.with_vision_settings(processor, self.real_vision)

    def processor_from(self, path: Any, tokenizer: Any, image_processor: Any, chat_template: str) -> Any:
        """The processor over a checkpoint's tokenizer and PIL image processor (no video processor: that needs
        torchvision, and only images are fed), with the vision settings its host needs from config.json."""
        processor_class = self.processor_class()
        processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
        return self.with_vision_settings(processor, read_vision_config(path))

    def with_vision_settings(self, processor: Any, vision_config: Any) -> Any:
        """`processor`, its image processor given the vision encoder's settings that the host image side needs and
        preprocessor_config.json lacks (saved with it, so an engine's processor files carry them). None for
        Qwen2-VL; Qwen2.5-VL adds its attention window."""
        return processor

    def align_token_ids(self, config: Any, tokenizer: Any) -> None:
        ids = tiny.special_token_ids(tokenizer)
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            setattr(config, name, ids[name])
        text = config.get_text_config()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(text, name, ids[name])

    def spatial_merge(self, model: Any) -> int:
        return int(model.config.vision_config.spatial_merge_size)

    # --- images ---------------------------------------------------------------------------------------------

    def image_host(self, processor_config: dict[str, Any], *, max_pixels: int | None = None) -> QwenImages:
        return QwenImages.from_config(processor_config, max_pixels=max_pixels)

    def cap_pixels(self, processor: Any, max_pixels: int) -> Any:
        """A copy of `processor` whose image processor's max_pixels is `max_pixels` (when below its own): the
        Hugging Face processor, its saved files and so the engine's host all size images within the cap."""
        import copy

        self.image_host(processor.to_dict(), max_pixels=max_pixels)  # refuses a cap below min_pixels
        features = processor.image_processor
        _, high = pixel_budget(features.to_dict())
        if max_pixels >= high:
            return processor
        capped = copy.deepcopy(processor)
        features = capped.image_processor
        features.size = {**dict(features.size or {}), "longest_edge": int(max_pixels)}
        if getattr(features, "max_pixels", None) is not None:
            features.max_pixels = int(max_pixels)
        return capped

    # --- the vision graph -----------------------------------------------------------------------------------

    def check_vision_settings(self, host: QwenImages, vision_config: Any) -> None:
        """The processor's patch, merge and temporal patch must be the vision encoder's: the host lays pixels out
        by the first, the encoder reads them by the second."""
        pairs = (
            ("patch_size", host.patch, vision_config.patch_size),
            ("merge_size / spatial_merge_size", host.merge, vision_config.spatial_merge_size),
            ("temporal_patch_size", host.temporal, vision_config.temporal_patch_size),
        )
        wrong = [f"{name} {a} vs {b}" for name, a, b in pairs if int(a) != int(b)]
        if wrong:
            raise InputError(
                f"the image processor and the vision encoder (config.json vision_config) disagree: "
                f"{', '.join(wrong)}; preprocessor_config.json and config.json are from different checkpoints."
            )

    def vision_graph(self, model: Any) -> Any:
        """The vision graph (a torch.nn.Module) over `model`'s encoder and merger; its inputs are the host's feeds."""
        return vision_graph_class()(model)

    def vision_export(self, loaded: LoadedModel, image_size: tuple[int, int], dtype: torch.dtype) -> VisionExport:
        """The vision graph, dynamic in the number of patches: traced on an example image of `image_size` (height,
        width, as sent) as `image_host(...).prepare` makes it. pixel_values stays float32 whatever `dtype` (the
        host's feeds; the graph casts to the encoder's dtype), so the host feeds every engine alike."""
        import torch

        host = self.image_host(loaded.processor.to_dict())
        self.check_vision_settings(host, loaded.model.config.vision_config)
        prepared = host.prepare(example_image(*(int(x) for x in image_size)))
        example = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in prepared.feeds.items()}
        return VisionExport(
            module=self.vision_graph(loaded.model),
            example=example,
            dynamic_shapes=vision_dynamic_shapes(host, list(example)),
        )

    # --- requests -------------------------------------------------------------------------------------------

    def check_inputs(self, processor: Any, images: list, prompt: str) -> None:
        """Reject what the processor would fail on obscurely (or silently mangle), with a message that says why."""
        check_request(images, prompt, min_side=MIN_SIDE)

    def process(self, processor: Any, images: list, prompt: str) -> dict[str, torch.Tensor]:
        """Processor outputs for one request (CPU tensors; needs only the processor, so engines without a
        torch model use it too): input_ids, attention_mask, mm_token_type_ids [1, S], pixel_values
        [N_patches, C*T*P*P] fp32, image_grid_thw [N_images, 3].

        The user's text is tokenized as plain text (transformers' `sanitize_control_tokens`: control tokens typed
        in the prompt, such as `<|im_end|>`, `<|im_start|>` or `<|image_pad|>`, become ordinary text tokens), so a
        prompt can neither open another chat turn nor add image placeholders; the template's own control tokens
        stay real. For a prompt without such text the token ids are exactly those of tokenizing `chat_text`."""
        self.check_inputs(processor, images, prompt)
        messages = user_turn(images, prompt)  # the layout of chat_text: one user turn, the images first
        try:
            out = processor.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                sanitize_control_tokens=True,
            )
        except ValueError as exc:
            raise InputError(f"the processor rejected the request: {exc}") from None
        keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
        return {k: out[k] for k in keys}

    @no_grad
    def vision_embeddings(self, loaded: LoadedModel, processed: dict[str, torch.Tensor]) -> torch.Tensor:
        """Vision encoder + merger on `process`'s pixels: [N_vis, D] LLM-width embeddings, images in order."""
        import torch

        device = loaded.model.device
        pixels, grid_thw = processed["pixel_values"].to(device), processed["image_grid_thw"].to(device)
        out = loaded.model.model.get_image_features(pixels, grid_thw, return_dict=True)
        return torch.cat(out.pooler_output, dim=0)  # [N_vis, D]

    def spans(self, processor: Any, processed: dict[str, torch.Tensor], image_token_id: int) -> list[list[VisionSpan]]:
        """The vision spans of `process`'s output, each image on its LLM token grid (patch grid / merge)."""
        merge = int(processor.image_processor.merge_size)
        return vision_spans(processed["input_ids"], image_token_id, processed["image_grid_thw"], merge)

    @no_grad
    def embed_and_position(
        self, loaded: LoadedModel, processed: dict[str, torch.Tensor], vision_embeds: torch.Tensor
    ) -> PrefillInputs:
        """Text embeddings with the vision embeddings scattered into the placeholders, and M-RoPE positions."""
        model = loaded.model
        processed, embeds = self.embed(loaded, processed, vision_embeds)  # [B, S, D]
        input_ids = processed["input_ids"]  # [B, S]
        image_token_id = int(model.config.image_token_id)
        position_ids, rope_deltas = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=processed["mm_token_type_ids"],
            image_grid_thw=processed["image_grid_thw"],
            attention_mask=processed["attention_mask"],
        )  # [3, B, S], [B, 1]
        spans = vision_spans(input_ids, image_token_id, processed["image_grid_thw"], self.spatial_merge(model))
        return PrefillInputs(
            inputs_embeds=embeds,
            position_ids=position_ids,
            attention_mask=processed["attention_mask"],
            input_ids=input_ids,
            spans=spans,
            decode_offset=rope_deltas.view(-1, 1),
        )


# --- vision-graph helpers (torch imported inside) ----------------------------------------------------------------


def read_vision_config(path: Any) -> dict[str, Any]:
    """config.json's vision_config of a checkpoint directory ({} without one: the processor is used alone)."""
    file = Path(path) / "config.json" if path is not None else None
    if file is None or not file.is_file():
        return {}
    try:
        return dict(json.loads(file.read_text()).get("vision_config") or {})
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{file} cannot be read ({exc}); copy the checkpoint's config.json again.") from None


def vision_dynamic_shapes(host: QwenImages, names: list[str]) -> tuple:
    """torch.export dynamic shapes of the vision graph's inputs `names`, in order, from the host's description of
    which axes vary (QwenImages.dynamic_axes): one Dim for the vision tokens, the patches merge^2 times it (so the
    export knows the merger's reshape divides), one per other count."""
    from torch.export import Dim

    tokens = Dim("vision_tokens")
    dims = {"tokens": tokens, "patches": tokens * (host.merge * host.merge)}
    axes = host.dynamic_axes()

    def dim(count: str) -> Any:
        return dims.setdefault(count, Dim(f"vision_{count}"))

    return tuple({axis: dim(count) for axis, count in axes[name].items()} or None for name in names)
