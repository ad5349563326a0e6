"""What every model family provides to the method, the runtime and the exporter."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class VisionSpan:
    """One image's vision tokens inside a language-model sequence.

    start:  index of the first vision token in the sequence
    length: number of vision tokens (contiguous)
    grid:   (h, w) token grid as the LLM sees it (after the vision encoder's spatial merge),
            raster order, h * w >= length (a partial last row only for grids derived after a merge).
    """

    start: int
    length: int
    grid: tuple[int, int]

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: what a model key means and how it is built."""

    key: str
    family: str  # "qwen2_vl" | "qwen2_5_vl"
    hf_id: str  # Hugging Face hub id of the real checkpoint (for tiny presets: the architecture it mirrors)
    tiny: bool  # built locally at toy size with random weights, no download
    default_windows: tuple[int, ...]  # windows per side for the schedule solver's stages
    default_image_size: tuple[int, int]  # (height, width) in pixels
    # Parity tolerances per output name ("logits", "kv", "hidden", ...), with "default".
    tolerances: dict[str, float] = field(default_factory=lambda: {"default": 1e-4})

    @property
    def dir_name(self) -> str:
        """One safe path component for engine and cache directories: a key may be a hub id ("Org/Name") or a
        checkpoint path, which joined under --out would nest, or escape it when absolute. A checkpoint directory
        is its name plus a short hash of its path: /a/ckpt and /b/ckpt are two models, never one engine."""
        if "/" not in self.key and "\\" not in self.key:
            return self.key
        parts = [p for p in self.key.replace("\\", "/").split("/") if p not in ("", ".", "..")]
        if self.key.startswith(("/", ".", "~")) or len(parts) != 2:  # a directory: its name and where it is
            digest = hashlib.sha256(self.key.rstrip("/").encode()).hexdigest()[:8]
            return f"{parts[-1] if parts else 'model'}-{digest}"
        return "--".join(parts)  # a hub id, spelled as the HF cache does


@dataclass
class PrefillInputs:
    """Everything the language-model prefill needs, produced by the family's `prepare`.

    inputs_embeds: [B, S, D] text embeddings with the vision encoder's outputs scattered in
    position_ids:  [*lead, B, S] the family's position ids (models/positions.py; [3, B, S] for M-RoPE)
    attention_mask:[B, S] 1 for real tokens, 0 for padding
    input_ids:     [B, S]
    spans:         per batch row, the images' vision spans in sequence order
    decode_offset: [B, 1] so that decode step t (0-based) sits at position S_row + t + decode_offset
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    spans: list[list[VisionSpan]]
    decode_offset: torch.Tensor


@dataclass
class LoadedModel:
    """A model ready to run: HF module, processor and the family's glue."""

    spec: ModelSpec
    model: Any  # transformers *ForConditionalGeneration, eval mode
    processor: Any  # transformers processor: (images, text) -> input_ids, pixel_values, image_grid_thw, ...
    family: Any  # the family module (models/qwen2_vl.py or models/qwen2_5_vl.py)

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()


@contextlib.contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Run a transformers module under another registered attention function (for the export only)."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@dataclass
class VisionExport:
    """What a family hands the exporter for the vision graph of one image-size profile.

    module:     forward(pixel_values) -> image embeddings [N_vis, D] (LLM width), traceable by torch.export
    example:    pixel_values of one image of the profile (the graph's only input; its shape is fixed)
    token_grid: (h, w) LLM tokens of one image, raster order: the windows LightKV merges in
    """

    module: Any
    example: Any
    token_grid: tuple[int, int]


def head_dim(text_config: Any) -> int:
    """The attention head size: the config's own `head_dim` where it sets one (several families' differs from
    hidden_size / num_attention_heads), else that quotient. The one place it is computed from a config."""
    explicit = getattr(text_config, "head_dim", None)
    return int(explicit) if explicit else text_config.hidden_size // text_config.num_attention_heads
