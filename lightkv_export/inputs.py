"""Request inputs shared by parity, the report and the pipeline: deterministic images, the parity cases, and a
runtime Request as PyTorch PrefillInputs (the engine's own host-side preparation, fed to the reference)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lightkv_export.models.base import PrefillInputs
from lightkv_export.runtime import Request

__all__ = ["parity_cases", "parity_images", "torch_inputs"]


def parity_images(size: tuple[int, int], seed: int) -> Image.Image:
    """Deterministic natural-ish images: smooth gradients, blocks and a little noise, different per seed."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    freq = rng.uniform(2, 8, size=3)
    channels = [np.sin(freq[c] * (xx * (c + 1) + yy * (3 - c)) + rng.uniform(0, 6)) for c in range(3)]
    img = (np.stack(channels, -1) * 0.5 + 0.5) * 200 + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def parity_cases(image_size: tuple[int, int]) -> list[tuple[str, list[Image.Image], str]]:
    h, w = image_size
    return [
        ("one-image", [parity_images(image_size, 0)], "Describe this image."),
        ("other-prompt", [parity_images((h * 3 // 4, w), 1)], "What colours dominate the picture, and where?"),
        ("two-images", [parity_images(image_size, 2), parity_images(image_size, 3)], "Compare the two images."),
    ]


def torch_inputs(request: Request) -> PrefillInputs:
    return PrefillInputs(
        inputs_embeds=torch.from_numpy(request.inputs_embeds),
        position_ids=torch.from_numpy(request.position_ids),
        attention_mask=torch.ones(request.input_ids.shape, dtype=torch.long),
        input_ids=torch.from_numpy(request.input_ids),
        spans=request.spans,
        decode_offset=torch.tensor([[request.decode_offset]]),
    )
