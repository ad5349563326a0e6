"""Request inputs shared by parity, the report and the pipeline: deterministic images, the parity cases, and a
runtime Request as PyTorch PrefillInputs (the engine's own host-side preparation, fed to the reference)."""

from __future__ import annotations

import math

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


# The largest image parity feeds (pixels; its max-image case becomes 868x1148 on Qwen-VL: 1,271 LLM tokens, 5,084
# patches). It binds only where a processor allows more: the tiny presets' maximum (200,704) is below it, so their
# max-image case is at the processor's maximum. A real Qwen-VL processor allows 12,845,056 (16,384 tokens, 65,536
# patches), which served engines refuse by default (Limits.max_image_tokens, 4,096). Parity runs the case's vision
# tower three times (engine graph, PyTorch encoder, Hugging Face forward): at 65,536 patches the exported graph's
# attention scores alone are over 250 GB per layer. At the cap the case costs Qwen2-VL-2B about 50 TFLOP (model
# level and identity), some 6 minutes on 2 cores (the ~140 GFLOP/s of the image_sizes benchmark), Qwen2.5-VL-7B
# about twice that. `--max-image-pixels` below the cap makes the case that engine's true maximum.
PARITY_MAX_PIXELS = 1024 * 1024


def parity_cases(image_size: tuple[int, int], pixel_range: tuple[int, int]) -> list[tuple[str, list[Image.Image], str]]:
    """The requests parity runs, images as a user sends them (each processor sizes them itself): the reference
    image, two images of different sizes and aspect ratios in one request, a tall page (about 1:3), and images at
    the processor's minimum and near its maximum (`pixel_range`, processed pixels; capped at PARITY_MAX_PIXELS for
    real checkpoints' cost, see there)."""
    h, w = image_size
    low, high = pixel_range
    side_min = max(1, math.isqrt(low))
    top = min(high, PARITY_MAX_PIXELS)
    big = (math.isqrt(top * 3 // 4), math.isqrt(top * 4 // 3))  # 3:4 (h:w), a little under the top
    page = max(1, math.isqrt(h * w // 3))
    return [
        ("one-image", [parity_images(image_size, 0)], "Describe this image."),
        (
            "two-sizes",
            [parity_images((h * 2 // 3, w), 2), parity_images((w, max(1, h // 2)), 3)],
            "Compare the two images.",
        ),
        ("tall-page", [parity_images((3 * page, page), 6)], "Read the page."),
        ("other-prompt", [parity_images((h * 3 // 4, w), 1)], "What colours dominate the picture, and where?"),
        ("min-image", [parity_images((side_min, side_min), 7)], "What is this?"),
        ("max-image", [parity_images((big[0] * 97 // 100, big[1] * 97 // 100), 8)], "Describe the details."),
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
