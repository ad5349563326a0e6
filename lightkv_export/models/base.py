"""What every model family provides to the method, the runtime and the exporter."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightkv_export.errors import InputError
from lightkv_export.method.spans import VisionSpan

if TYPE_CHECKING:
    import torch

    from lightkv_export.models.family import Family


# Parity tolerances (max abs error) per output. fp32 tiny models agree to rounding; real models run in fp16/bf16.
TINY_TOLERANCES = {"default": 1e-4, "vision": 1e-4, "hidden": 1e-3, "kv": 1e-4, "logits": 1e-3}
REAL_TOLERANCES = {"default": 2e-2, "vision": 2e-2, "hidden": 5e-2, "kv": 2e-2, "logits": 5e-2}


@dataclass(frozen=True)
class ModelSpec:
    """A model key: what it means and how it is built. Each family declares its own (`Family.presets`); the
    registry collects them."""

    key: str
    family: str  # a registered family's name (models/family.py)
    hf_id: str  # Hugging Face hub id of the real checkpoint (for tiny presets: the architecture it mirrors)
    tiny: bool  # built locally at toy size with random weights, no download
    default_windows: tuple[int, ...]  # windows per side for the schedule solver's stages
    default_image_size: tuple[int, int]  # (height, width) of the reference request's image (any size is served)
    # Parity tolerances per output name ("logits", "kv", "hidden", ...), with "default".
    tolerances: dict[str, float] = field(default_factory=lambda: {"default": 1e-4})
    plan_image_size: tuple[int, int] | None = None  # the planner's default request image (else default_image_size)
    vision: str | None = None  # the planner's token-count rule when it is not the family's (models/shapes.py)
    plan_only: str | None = None  # why it can be planned but not built (None: buildable)
    aliases: tuple[str, ...] = ()  # other names --model takes for it (lower case; hub ids too)

    @classmethod
    def real(cls, key: str, family: str, hf_id: str, windows: tuple[int, ...], image: tuple[int, int], **more: Any):
        """A real checkpoint's key: windows per stage, the reference image (height, width), real-size tolerances."""
        return cls(key, family, hf_id, False, windows, image, dict(REAL_TOLERANCES), **more)

    @classmethod
    def toy(cls, key: str, family: str, hf_id: str, windows: tuple[int, ...], image: tuple[int, int], **more: Any):
        """A tiny preset mirroring `hf_id`'s architecture at toy size, with fp32 tolerances."""
        return cls(key, family, hf_id, True, windows, image, dict(TINY_TOLERANCES), **more)

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
    processor: Any  # transformers processor: (images, text) -> the family's processor outputs
    family: Family  # the registered family (models/family.py): the only code that knows the model

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    def capped(self, max_image_pixels: int | None) -> LoadedModel:
        """This model with a processor that sizes no image above `max_image_pixels` (a copy: tiny presets are
        shared in-process); an engine's saved processor files then carry the cap to its host side."""
        if max_image_pixels is None:
            return self
        return dataclasses.replace(self, processor=self.family.cap_pixels(self.processor, max_image_pixels))

    def image_host(self, max_pixels: int | None = None) -> Any:
        """The family's host image side (images.ImageHost) over this processor's settings: the same dict its
        processor_config.json holds, so the engine's host reads what this returns."""
        return self.family.image_host(self.processor.to_dict(), max_pixels=max_pixels)


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
    """What a family hands the exporter for the vision graph.

    module:         forward(*example.values()) -> image embeddings [N_vis, D] (LLM width), traceable by torch.export
    example:        the graph's inputs by name, in forward's order (contract.PIXEL_VALUES first): the feeds of
                    one example image, as the family's ImageHost.prepare makes them
    dynamic_shapes: torch.export dynamic shapes of those inputs, in order (None: every shape fixed, as for a
                    processor that crops every image to one size)
    """

    module: Any
    example: dict[str, Any]
    dynamic_shapes: tuple | None = None


def head_dim(text_config: Any) -> int:
    """The attention head size: the config's own `head_dim` where it sets one (several families' differs from
    hidden_size / num_attention_heads), else that quotient. The one place it is computed from a config."""
    explicit = getattr(text_config, "head_dim", None)
    return int(explicit) if explicit else text_config.hidden_size // text_config.num_attention_heads


def leading_ids(plain: list[int], full: list[int]) -> list[int]:
    """The ids a tokenizer put before a text: `full` (with its special tokens) up to where `plain` (without) starts.
    Read from what it does, not from an `add_bos_token` flag (a saved and reloaded tokenizer reports False while
    still adding <s>)."""
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def scatter_vision(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, vision: torch.Tensor) -> torch.Tensor:
    """Text embeddings [B, S, D] with the vision embeddings [N_vis, D] written over the placeholder tokens."""
    placeholder = input_ids == token_id  # [B, S]
    if int(placeholder.sum()) != vision.shape[0]:
        raise InputError(f"{int(placeholder.sum())} image placeholder tokens but {vision.shape[0]} vision embeddings.")
    return embeds.masked_scatter(placeholder.unsqueeze(-1), vision.to(embeds.dtype))  # [B, S, D]


def check_request(images: list, prompt: str, *, min_side: int = 1) -> None:
    """What every family refuses before its processor sees a request (which would fail obscurely, or silently
    mangle it), with a message that says why. `min_side`: the vision encoder's patch, where a smaller image fails."""
    from PIL import Image

    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; give a question or instruction about the image(s).")
    if not images:
        raise InputError("no image given; these are vision-language models and LightKV compresses vision tokens.")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise InputError(f"image {i} is a {type(image).__name__}, expected a PIL.Image.Image.")
        w, h = image.size
        if min(w, h) < max(min_side, 1):
            raise InputError(
                f"image {i} is {w}x{h} pixels, smaller than one {min_side}x{min_side} patch of the vision encoder; "
                f"give an image at least {min_side} pixels on each side."
                if min_side > 1
                else f"image {i} is {w}x{h} pixels: it is empty."
            )
        if max(w, h) / min(w, h) > 200:  # the processors scale the short side up: extreme ratios blow up memory
            raise InputError(f"image {i} is {w}x{h} pixels; the processor accepts aspect ratios up to 200.")


def user_turn(images: list | int, prompt: str) -> list[dict]:
    """Chat messages of one user turn: the images first (PIL images, or a count of placeholders), then the text."""
    items = (
        [{"type": "image"} for _ in range(images)]
        if isinstance(images, int)
        else [{"type": "image", "image": im.convert("RGB")} for im in images]
    )
    return [{"role": "user", "content": [*items, {"type": "text", "text": prompt}]}]
