"""What a family's host side does with one image, without PyTorch: the interface the engine runtime, the Triton
backend, the accounting and the TensorRT profiles use, and the pieces every family shares.

A family's `image_host(processor_config)` (models/family.py) returns an `ImageHost` read from the checkpoint's (or
the engine's) processor settings. It sizes each image as the model's own processor does (Qwen-VL's smart resize
within min_pixels / max_pixels, LLaVA's resize and center crop, tiles, ...): nothing is resized to an engine
profile. From an image's size alone it gives the image's `ImageLayout` (method/spans.py), so token counts, KV
reservations and limits are known before a pixel is touched; from the image it gives the vision graph's feeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from lightkv_export.method.spans import ImageLayout


@dataclass(frozen=True)
class PreparedImage:
    """One image as the vision graph takes it.

    size:   (height, width) in pixels after the processor's resize / crop
    layout: its tokens in the sequence (grids and fixed runs)
    feeds:  the vision graph's inputs for this image, by graph input name (contract.PIXEL_VALUES first; the rest
            depend only on the grid: rotary positions, window order, segment lengths)
    """

    size: tuple[int, int]
    layout: ImageLayout
    feeds: dict[str, np.ndarray]


class ImageHost(Protocol):
    """A family's host image side (torch-free). A family whose chat template writes another placeholder than
    `image_token` (InternVL's `<image>`, expanded to fenced context tokens) also sets `template_placeholder`: the
    host replaces each occurrence of it with `expand(layout)` of the next image."""

    image_token: str  # the placeholder token a grid's tokens are written as
    min_side: int  # the smallest side the processor takes (smaller: refused, as it would fail)

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor turns an image of this size into."""
        ...

    def layout(self, height: int, width: int) -> ImageLayout:
        """The tokens an image of this size (as sent) becomes: no pixels needed."""
        ...

    def prepare(self, image: Any) -> PreparedImage:
        """A PIL image as sent -> resized as the processor does, laid out as the vision graph takes it."""
        ...

    def expand(self, layout: ImageLayout) -> str:
        """The text that replaces the chat template's placeholder for one image: each grid as that many
        `image_token`s, each fixed run as the family's tokens."""
        ...

    def feed_shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """The vision graph's input shapes for an image of this size (as sent): TensorRT profiles."""
        ...

    def pixel_range(self) -> tuple[int, int]:
        """(min, max) pixels of a processed image: the range TensorRT profiles and the accounting cover."""
        ...


# What transformers 5's image processors of these families default to when a saved config leaves a key out (their
# class defaults); each family adds its own (sizes, patches).
PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "resample": 3,  # PIL.Image.Resampling.BICUBIC
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],  # OPENAI_CLIP_MEAN
    "image_std": [0.26862954, 0.26130258, 0.27577711],  # OPENAI_CLIP_STD
    "do_convert_rgb": True,
}


@dataclass(frozen=True)
class ImageFormat:
    """Rescale and normalization of an image processor (its processor_config.json / preprocessor_config.json)."""

    scale: float
    mean: np.ndarray  # [C]
    std: np.ndarray  # [C]

    @classmethod
    def from_config(cls, config: dict) -> ImageFormat:
        scale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
        normalize = config.get("do_normalize", True)
        mean = np.asarray(config["image_mean"] if normalize else [0.0, 0.0, 0.0], np.float32)
        std = np.asarray(config["image_std"] if normalize else [1.0, 1.0, 1.0], np.float32)
        return cls(scale, mean, std)

    @cached_property
    def levels(self) -> np.ndarray:
        """[C, 256] float32: each 8-bit level of each channel rescaled and normalized as transformers computes it
        (the rescale in float64, then float32; the normalization in float32), so a lookup gives its values bit for
        bit."""
        rescaled = (np.arange(256, dtype=np.float64) * self.scale).astype(np.float32)  # [256]
        return (rescaled[None, :] - self.mean[:, None]) / self.std[:, None]  # [C, 256]

    def chw(self, pixels: np.ndarray) -> np.ndarray:
        """[C, H, W] float32 of [H, W, C] uint8 RGB pixels, rescaled and normalized."""
        return np.stack([self.levels[c][pixels[..., c]] for c in range(pixels.shape[-1])])  # [C, H, W]


def image_features(config: dict) -> dict:
    """The image processor's settings inside a processor_config.json (or a bare preprocessor_config.json)."""
    return config.get("image_processor", config)


def to_rgb(image: Any) -> Any:
    """An RGB PIL image as the processor's convert_to_rgb makes it: transparency composited onto white (a plain
    convert("RGB") would drop alpha and show what lies under transparent pixels)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def processor_rgb(image: Any, convert: bool) -> Any:
    """The PIL image a processor works on: converted as its convert_to_rgb does (`convert`: do_convert_rgb), or
    refused when it is not RGB and the processor would not convert it."""
    from lightkv_export.errors import InputError

    if not hasattr(image, "getbands"):
        raise InputError(f"an image must be a PIL.Image, got {type(image).__name__}.")
    if convert:
        return to_rgb(image)
    if image.mode != "RGB":
        raise InputError(
            f"image mode {image.mode}: this processor does not convert images to RGB (do_convert_rgb off)."
        )
    return image


def example_image(height: int, width: int) -> Any:
    """A deterministic noise picture of (height, width) pixels (the export's example: any content will do)."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)  # [H, W, 3]
    return Image.fromarray(pixels, mode="RGB")
