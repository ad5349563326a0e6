"""Request decoding and response encoding for the served engines (no Triton import: unit-testable).

Wire format (config.pbtxt written by `triton_repo.py`):
  inputs   prompt [1] BYTES (UTF-8), image [-1] BYTES (encoded PNG or JPEG, one element per image),
           max_new_tokens [1] INT32 (optional)
  outputs  text [1] BYTES, token_ids [-1] INT64, vision_tokens_in [1] INT64, vision_tokens_per_group [-1] INT64,
           kv_bytes [1] INT64, prefill_ms [1] FP32, decode_ms [1] FP32
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lightkv_export.errors import InputError

IMAGE_FORMATS = ("PNG", "JPEG")
OUTPUT_DTYPES = {
    "text": np.object_,
    "token_ids": np.int64,
    "vision_tokens_in": np.int64,
    "vision_tokens_per_group": np.int64,
    "kv_bytes": np.int64,
    "prefill_ms": np.float32,
    "decode_ms": np.float32,
}


def decode_prompt(values: np.ndarray) -> str:
    """The prompt tensor ([1] of bytes) as text."""
    flat = values.reshape(-1)
    if flat.size != 1:
        raise InputError(f"prompt: expected exactly one string, got {flat.size}")
    raw = flat[0]
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as e:
        raise InputError(f"prompt: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def decode_images(values: np.ndarray) -> list[Image.Image]:
    """The image tensor ([N] of encoded bytes) as RGB PIL images; corrupt or unsupported bytes are an InputError."""
    images = []
    for i, blob in enumerate(values.reshape(-1)):
        data = bytes(blob)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                if fmt not in IMAGE_FORMATS:
                    raise InputError(f"image {i}: {fmt} is not supported (send PNG or JPEG bytes)")
                images.append(img.convert("RGB"))  # load() happens here: truncated data fails now, not later
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise InputError(f"image {i}: not a readable PNG or JPEG image ({len(data)} bytes: {e})") from None
    return images


def decode_max_new_tokens(values: np.ndarray | None, default: int) -> int:
    """The optional max_new_tokens tensor ([1] INT32); absent means `default`."""
    if values is None:
        return default
    flat = values.reshape(-1)
    if flat.size != 1:
        raise InputError(f"max_new_tokens: expected one value, got {flat.size}")
    return int(flat[0])


def encode_generation(gen: Any) -> dict[str, np.ndarray]:
    """A runtime.Generation as output arrays, named and typed as in config.pbtxt."""
    return {
        "text": np.array([gen.text.encode("utf-8")], dtype=np.object_),  # [1]
        "token_ids": np.asarray(gen.token_ids, dtype=np.int64).reshape(-1),  # [T]
        "vision_tokens_in": np.array([gen.vision_tokens_in], dtype=np.int64),  # [1]
        "vision_tokens_per_group": np.asarray(gen.vision_tokens_per_group, dtype=np.int64).reshape(-1),  # [G]
        "kv_bytes": np.array([gen.kv_bytes], dtype=np.int64),  # [1]
        "prefill_ms": np.array([gen.prefill_ms], dtype=np.float32),  # [1]
        "decode_ms": np.array([gen.decode_ms], dtype=np.float32),  # [1]
    }


def encode_images(images: Sequence[Image.Image | bytes], fmt: str = "PNG") -> np.ndarray:
    """Client side: PIL images (or already encoded bytes) as the image tensor [N] of bytes."""
    blobs = []
    for img in images:
        if isinstance(img, bytes):
            blobs.append(img)
            continue
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        blobs.append(buf.getvalue())
    return np.array(blobs, dtype=np.object_)  # [N]
