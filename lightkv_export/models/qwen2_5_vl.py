"""Qwen2.5-VL family: the Qwen2-VL glue (models/qwen2_vl.py) with Qwen2.5-VL's classes and real hyper-parameters.

The differences that matter here live inside transformers' modeling code (a windowed-attention vision encoder
with RMSNorm and SwiGLU, a separate `out_hidden_size`); the layout the method and the exporter see is the same.
The windows are the one thing the host adds (`QwenWindowImages`): the encoder reorders the merged tokens window by
window and attends within each, and that order and the window bounds depend only on the grid, so they are vision
graph inputs computed on the host. The window size is the encoder's (config.json vision_config.window_size), which
preprocessor_config.json lacks: the family's processors carry it as the image processor's `window_size`, saved with
it, so an engine's processor files hold all its host needs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lightkv_export.errors import InputError
from lightkv_export.images import image_features
from lightkv_export.models import tiny
from lightkv_export.models.base import ModelSpec
from lightkv_export.models.family import register_family
from lightkv_export.models.qwen2_vl import (
    SEGMENT_CAPACITY,
    UNREAD_MAX_SEQLEN,
    Qwen2VL,
    QwenImages,
    vision_graph_class,
)

if TYPE_CHECKING:
    import torch

HF_ID = "Qwen/Qwen2.5-VL-7B-Instruct"

# Qwen2.5-VL-7B-Instruct's config.json, for --random-weights without the checkpoint on disk.
REAL_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
REAL_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}

# The window inputs of the vision graph (besides those of models/qwen2_vl.py).
WINDOW_INDEX = "vision.window_index"  # [N_vis] int64: the merged tokens in window order (windows in raster order)
CU_WINDOW_SEQLENS = "vision.cu_window_seqlens"  # [windows + 1] int32: window bounds, in patches
WINDOW_SETTING = "window_size"  # the image processor's key for the encoder's window (pixels per side)


def window_layout(rows: int, cols: int, window: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """The windowed blocks' layout of one image of rows x cols merged tokens, windows of window x window tokens,
    as transformers' get_vision_window_index: window_index [rows * cols] int64 (each window's tokens in raster
    order, windows in raster order; the last row / column of windows may be cut short) and cu_window_seqlens
    [windows + 1] int32 (window bounds in patches: merge^2 per token)."""
    down, across = -(-rows // window), -(-cols // window)  # windows per column / row, the last ones partial
    padded = np.full((down * window, across * window), -1, dtype=np.int64)  # -1: outside the image
    padded[:rows, :cols] = np.arange(rows * cols).reshape(rows, cols)
    windows = padded.reshape(down, window, across, window).transpose(0, 2, 1, 3).reshape(down * across, -1)
    inside = windows >= 0  # [windows, window^2]
    bounds = np.concatenate([[0], np.cumsum(inside.sum(axis=1)) * merge * merge])  # [windows + 1]
    return windows[inside], bounds.astype(np.int32)


def setting(config: Any, name: str) -> Any:
    """A setting of a config object or dict (None where it has none)."""
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


@dataclass(frozen=True)
class QwenWindowImages(QwenImages):
    """Qwen2.5-VL's host image side: Qwen2-VL's (models/qwen2_vl.py QwenImages) plus the windowed attention's
    layout. window_size: the encoder's window in pixels per side (config.json vision_config.window_size); None where
    the processor settings lack it, which sizes and lays out images (no window needed) but cannot prepare them."""

    window_size: int | None = None

    @property
    def window(self) -> int:
        """Merged tokens per window side."""
        if self.window_size is None:
            raise InputError(
                f"the processor settings have no {WINDOW_SETTING!r} (Qwen2.5-VL's vision attention window, "
                "config.json vision_config.window_size): build the engine again, or load the checkpoint directory "
                "with its config.json."
            )
        return self.window_size // self.merge // self.patch  # transformers' rounding

    def grid_feeds(self, rows: int, cols: int) -> dict[str, np.ndarray]:
        index, bounds = window_layout(rows // self.merge, cols // self.merge, self.window, self.merge)
        return {**super().grid_feeds(rows, cols), WINDOW_INDEX: index, CU_WINDOW_SEQLENS: bounds}

    def grid_shapes(self, rows: int, cols: int) -> dict[str, tuple[int, ...]]:
        tokens_down, tokens_across = rows // self.merge, cols // self.merge
        windows = -(-tokens_down // self.window) * -(-tokens_across // self.window)
        shapes = {WINDOW_INDEX: (tokens_down * tokens_across,), CU_WINDOW_SEQLENS: (windows + 1,)}
        return {**super().grid_shapes(rows, cols), **shapes}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {**super().dynamic_axes(), WINDOW_INDEX: {0: "tokens"}, CU_WINDOW_SEQLENS: {0: "window_bounds"}}

    @classmethod
    def from_config(cls, processor_config: dict[str, Any], *, max_pixels: int | None = None) -> QwenWindowImages:
        settings = cls.settings(processor_config, max_pixels)
        window = image_features(processor_config).get(WINDOW_SETTING)
        factor = settings["patch"] * settings["merge"]
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < factor):
            raise InputError(
                f"image processor {WINDOW_SETTING} {window!r}: expected the vision encoder's window in pixels, an "
                f"integer of at least {factor} (patch x merge)."
            )
        return cls(**settings, window_size=window)


@functools.cache
def windowed_graph_class() -> type:
    """Qwen2-VL's VisionGraph with the window inputs, made on first use (this module imports without torch)."""

    class WindowedVisionGraph(vision_graph_class()):
        """Vision encoder + merger of Qwen2.5-VL for one image of any patch grid, windows given as inputs."""

        def forward(
            self,
            pixel_values: torch.Tensor,
            position_ids: torch.Tensor,
            cu_seqlens: torch.Tensor,
            window_index: torch.Tensor,
            cu_window_seqlens: torch.Tensor,
        ) -> torch.Tensor:
            return self.encode(
                pixel_values,
                position_ids=position_ids,
                cu_seqlens=cu_seqlens,
                window_index=window_index,
                cu_window_seqlens=cu_window_seqlens,
                max_window_seqlen=UNREAD_MAX_SEQLEN,
                **{SEGMENT_CAPACITY: ((cu_window_seqlens, self.window_patches),)},
            )  # [N_vis, D]

        @property
        def window_patches(self) -> int:
            """Most patches in one window (a static size: windows are padded to it, not to the image's N)."""
            config = self.visual.config
            side = config.window_size // config.spatial_merge_size // config.patch_size  # tokens, as transformers
            return side * side * config.spatial_merge_size**2

    return WindowedVisionGraph


@register_family("qwen2_5_vl", model_types=("qwen2_5_vl",))
class Qwen25VL(Qwen2VL):
    hf_id = HF_ID
    presets = (  # the paper's windows for Qwen2.5-VL; images as for Qwen2-VL
        ModelSpec.real("qwen-vl", "qwen2_5_vl", HF_ID, (6, 4, 2), (672, 672), plan_image_size=(768, 1024),
                       aliases=("qwen2.5-vl", "qwen2.5-vl-7b", "qwen2.5-vl-7b-instruct", HF_ID.lower())),
        ModelSpec.toy("tiny-qwen-vl", "qwen2_5_vl", HF_ID, (2, 2, 1), (336, 448), aliases=("tiny-qwen2.5-vl",)),
    )  # fmt: skip
    real_text: ClassVar[dict[str, Any]] = REAL_TEXT
    real_vision: ClassVar[dict[str, Any]] = REAL_VISION
    tie_word_embeddings = False
    # The tiny vision encoder: 2 x 2 LLM tokens per attention window (so window attention is exercised), the second
    # block full attention; out_hidden_size is the LLM width.
    tiny_vision: ClassVar[dict[str, Any]] = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }

    def model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def config_class(self) -> type:
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig

    def processor_class(self) -> type:
        from transformers import Qwen2_5_VLProcessor

        return tiny.image_only_processor(Qwen2_5_VLProcessor)

    def with_vision_settings(self, processor: Any, vision_config: Any) -> Any:
        """The encoder's attention window on the image processor (saved in its settings as `window_size`)."""
        window = setting(vision_config, "window_size")
        if window is not None:
            setattr(processor.image_processor, WINDOW_SETTING, int(window))
        return processor

    def image_host(self, processor_config: dict[str, Any], *, max_pixels: int | None = None) -> QwenWindowImages:
        return QwenWindowImages.from_config(processor_config, max_pixels=max_pixels)

    def check_vision_settings(self, host: QwenImages, vision_config: Any) -> None:
        super().check_vision_settings(host, vision_config)
        window = int(vision_config.window_size)
        if getattr(host, "window_size", None) != window:
            raise InputError(
                f"the image processor's {WINDOW_SETTING} {getattr(host, 'window_size', None)} is not the vision "
                f"encoder's window {window} (config.json vision_config.window_size): load the processor with its "
                "checkpoint (Qwen25VL.processor_from)."
            )

    def vision_graph(self, model: Any) -> Any:
        return windowed_graph_class()(model)
