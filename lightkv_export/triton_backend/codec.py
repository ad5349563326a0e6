"""Request decoding, server limits and response encoding for the served engines (no Triton import: unit-testable).

Wire format (config.pbtxt written by `triton_repo.py`; the same names are the JSON fields of Triton's generate
endpoints):
  inputs   prompt [1] BYTES (UTF-8), image [-1] BYTES (PNG or JPEG, one element per image: the encoded bytes, or
           their base64 text, which is how JSON carries them), max_new_tokens [1] INT32 (optional),
           stream [1] BOOL (optional: one response per token, the last one with the statistics)
  outputs  text [1] BYTES, token_ids [-1] INT64, vision_tokens_in [1] INT64, vision_tokens_per_group [-1] INT64,
           kv_bytes [1] INT64, prefill_ms [1] FP32, decode_ms [1] FP32, kv_bytes_reserved [1] INT64,
           queue_ms [1] FP32, time_to_first_token_ms [1] FP32, decode_batch_mean [1] FP32, decode_batch_max [1] INT64
           (the running batch of the decode steps the request took part in)
  A streamed response carries text (the new piece) and token_ids (its token); the last one adds the rest.

Limits (`Limits`, read from config.pbtxt `parameters`) are checked before any work, cheapest first: the number of
images and the prompt's characters from the tensors' sizes, then the prompt's tokens, then each image's size from
its PNG/JPEG header (PIL's lazy open reads only the header), then the total sequence length (the template, each
image's own tokens from its size as the checkpoint's processor lays it out, the prompt and max_new_tokens), and only
then are the pixels decoded. A refusal is an
InputError (INVALID_ARG on the wire) naming the limit, the value and the config.pbtxt parameter that raises it.

The same `Limits` (and the same checks below) hold for the Python API: runtime.Engine.generate / generate_batch and
scheduler.Scheduler.submit refuse a request over them before any graph runs (Engine.load(..., limits=Limits(...))
overrides the defaults), and the engine's own context (the model's max_position_embeddings, from its manifest) caps
the sequence whatever the limits say.

max_new_tokens arrives as an INT32 tensor. Triton's HTTP front converts a JSON number to INT32 with a plain C cast
(http_server.cc ReadDataFromJsonHelper: `(int32_t)si`), so 2**32 + 5 reaches the model as 5: nothing here can see
the wrap. A front that parses the JSON body first calls `check_max_new_tokens` (or `check_generate_body`) on the
value as sent.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lightkv_export.contract import INT32_MAX
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
    "kv_bytes_reserved": np.int64,
    "queue_ms": np.float32,
    "time_to_first_token_ms": np.float32,
    "decode_batch_mean": np.float32,
    "decode_batch_max": np.int64,
}
STATS = (
    "kv_bytes_reserved",
    "queue_ms",
    "time_to_first_token_ms",
    "decode_batch_mean",
    "decode_batch_max",
)  # from the scheduler, not the generation
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a served engine; each field is a config.pbtxt parameter of the same name.

    The defaults keep a request well under 1 GB of working memory on the tiny presets (ONNX Runtime's attention holds
    S x S scores per head): a 10,000-character prompt or 60 images in one request are refused.
    """

    max_prompt_chars: int = 8192  # characters of the prompt, checked before it is tokenized
    max_prompt_tokens: int = 2048  # tokens of the prompt (as plain text), before the template and images
    max_images: int = 8  # images in one request
    max_image_pixels: int = 4096 * 4096  # width x height of each image as sent (read from the header)
    # Vision tokens of one image as the checkpoint's processor lays it out (Qwen-VL: up to 16,384). The vision
    # graph attends per window and, in its full-attention blocks, one head's N x N scores at a time (N = 4 patches
    # per token: 1 GiB at 4,096 tokens, 16 GiB at 16,384): measured, a run adds about 0.18 MiB per patch plus 1.6
    # such N x N tensors, so Qwen2.5-VL-7B's tower needs about 8 GiB at 4,096 tokens and 15 GiB at 8,192. The
    # prefill's S x S scores per head bind first (max_sequence_length 4096): raise both together.
    max_image_tokens: int = 4096
    max_sequence_length: int = 4096  # template + prompt + vision tokens + max_new_tokens

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> Limits:
        """The limits among config.pbtxt's parameters (string values); the rest keep their defaults."""
        values = {}
        for f in fields(cls):
            if f.name not in params:
                continue
            raw = str(params[f.name]).strip()
            try:
                value = int(raw)
            except ValueError:
                value = 0
            if value < 1:
                raise InputError(f"config.pbtxt parameter {f.name}: expected a positive integer, got {raw!r}")
            values[f.name] = value
        return cls(**values)

    def parameters(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check(self, name: str, value: int, what: str) -> None:
        """InputError when `value` (what was asked, e.g. "prompt: 9000 characters") exceeds the limit `name`. The
        message says how to raise it served (config.pbtxt) and in Python (Engine.load's `limits`): one definition."""
        limit = getattr(self, name)
        if value > limit:
            raise InputError(
                f"{what} is over the server's limit of {limit} (config.pbtxt parameter {name}; "
                f"raise it in the model's config.pbtxt to allow more, or in Python with "
                f"Engine.load(..., limits=Limits({name}=...)))"
            )


@dataclass(frozen=True)
class Batching:
    """How the served model's scheduler batches (config.pbtxt parameters of the same names; see scheduler.py)."""

    kv_budget: str = "1GiB"  # K and V bytes the running requests may reserve together, or a share: "40%"
    max_batch: int = 16  # requests decoded together
    max_queue: int = 64  # requests waiting for room; one more is refused (retry later)
    max_queue_s: float = 60.0  # seconds a request may wait for room before it is refused

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> Batching:
        from lightkv_export.accounting.units import parse_budget

        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in params:
                continue
            raw = str(params[f.name]).strip()
            if f.name == "kv_budget":
                parse_budget(raw, available=1)  # the form only: the share is resolved where the engine runs
                values[f.name] = raw
                continue
            try:
                value = float(raw) if f.type == "float" else int(raw)
            except ValueError:
                value = 0
            if value <= 0:
                raise InputError(f"config.pbtxt parameter {f.name}: expected a positive number, got {raw!r}")
            values[f.name] = value
        return cls(**values)

    def parameters(self) -> dict[str, str]:
        return {f.name: f"{getattr(self, f.name):g}" if f.type == "float" else str(getattr(self, f.name))
                for f in fields(self)}  # fmt: skip


def require(values: np.ndarray | None, name: str) -> np.ndarray:
    """A required input's array, or an InputError naming the input that is missing."""
    if values is None:
        raise InputError(f"missing input {name!r}: every request needs 'prompt' (one string) and 'image' (PNG/JPEG)")
    return values


def decode_prompt(values: np.ndarray, limits: Limits | None = None) -> str:
    """The prompt tensor ([1] of bytes) as text; its length is checked against the limits before decoding."""
    flat = values.reshape(-1)
    if flat.size != 1:
        raise InputError(f"prompt: expected exactly one string, got {flat.size}")
    raw = flat[0]
    if limits is not None:
        # UTF-8 bytes >= characters: a byte count under the limit needs no decoding to pass.
        size = len(raw) if isinstance(raw, (bytes, str)) else 0
        if size > limits.max_prompt_chars and isinstance(raw, bytes):
            size = len(raw.decode("utf-8", errors="replace"))
        limits.check("max_prompt_chars", size, f"the prompt has {size} characters, which")
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as e:
        raise InputError(f"prompt: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def check_image_count(values: np.ndarray | Sequence[Any], limits: Limits) -> int:
    """The number of images (the image tensor's elements, or a list of images), checked before any is opened."""
    n = int(values.size) if isinstance(values, np.ndarray) else len(values)
    limits.check("max_images", n, f"the request has {n} images, which")
    return n


def check_image_size(i: int, width: int, height: int, limits: Limits) -> None:
    """Image `i`'s size (as sent: its header, or a PIL image's size) against max_image_pixels."""
    pixels = int(width) * int(height)
    limits.check("max_image_pixels", pixels, f"image {i} is {width}x{height} = {pixels} pixels, which")


def check_prompt_text(prompt: Any, limits: Limits) -> str:
    """The prompt as the Python API and a JSON front receive it (a str): its characters against the limit, then
    whether it is text at all. A lone surrogate ("\\ud800", which JSON's \\u escapes and Python strings can hold)
    is no character: no tokenizer can take it, and no UTF-8 can carry it."""
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be a string (text), got {type(prompt).__name__}.")
    limits.check("max_prompt_chars", len(prompt), f"the prompt has {len(prompt)} characters, which")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"the prompt is not valid text: {e.reason} ({prompt[e.start]!r} at character {e.start}, a lone UTF-16 "
            "surrogate); send the text as proper Unicode (UTF-8), e.g. without a broken \\uD8xx escape."
        ) from None
    return prompt


def check_max_new_tokens(value: Any, limit: int = INT32_MAX) -> int:
    """`value` as a max_new_tokens: an integer (Python or numpy; not bool, float or str, not even 2.0: a float
    is refused rather than rounded) from 1 to `limit` (the engine's max_new_tokens_limit; never more than INT32_MAX,
    what the INT32 input carries). Pure: a JSON front calls it on the parsed value before Triton casts it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."  # a message, not an echo
        raise InputError(f"max_new_tokens must be a positive integer, got {shown} ({type(value).__name__}); e.g. 32.")
    n, top = int(value), min(int(limit), INT32_MAX)
    if not 1 <= n <= top:
        why = "this engine's max_new_tokens_limit, set when it was built" if top < INT32_MAX else "an INT32 input"
        raise InputError(f"max_new_tokens must be from 1 to {top} ({why}), got {n}.")
    return n


def check_generate_body(body: Any, limits: Limits, max_new_tokens_limit: int = INT32_MAX) -> None:
    """A generate request's parsed JSON body ({"prompt", "image", "max_new_tokens"?, "stream"?}), checked as sent,
    before Triton converts it to tensors (its conversion wraps integers and takes any JSON type): the types, the
    prompt's characters, the image count, and max_new_tokens. Token, sequence and pixel limits need the engine
    and the decoded images: the model checks those. Pure, no I/O: for a validating HTTP front."""
    if not isinstance(body, Mapping):
        raise InputError(f"the request body must be a JSON object, got {type(body).__name__}.")
    if "prompt" not in body or "image" not in body:
        raise InputError("every request needs 'prompt' (one string) and 'image' (PNG/JPEG, base64 text)")
    check_prompt_text(body["prompt"], limits)
    images = body["image"]
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise InputError("'image' must be a base64 string or a list of them (PNG or JPEG, one per image).")
    check_image_count(images, limits)
    if "max_new_tokens" in body:
        check_max_new_tokens(body["max_new_tokens"], max_new_tokens_limit)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InputError(f"'stream' must be true or false, got {body['stream']!r}.")


def check_sequence(limits: Limits, prompt_sequence: int, new: int, context: int | None = None, parts: str = "") -> int:
    """The request's longest sequence (its prompt sequence, from the images' layouts and the prompt's tokens, plus
    `new` tokens) against max_sequence_length, and against the engine's `context` (the model's
    max_position_embeddings: positions past it were never trained), which no config.pbtxt parameter raises.
    `parts`: how the prompt sequence adds up, for the message."""
    total = prompt_sequence + new
    what = f"the request needs a sequence of {total} tokens ({parts or f'{prompt_sequence} prompt'} + {new} new tokens)"
    limits.check("max_sequence_length", total, f"{what}, which")
    if context is not None and total > context:
        raise InputError(
            f"{what} is over the engine's context of {context} tokens (the model's max_position_embeddings); "
            "shorten the prompt, send fewer or smaller images, or ask for fewer new tokens."
        )
    return total


def _open(data: bytes, i: int, limits: Limits | None) -> Image.Image:
    """PIL's lazy open (header only). PIL's own decompression-bomb guard becomes the limit's InputError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit decides, not PIL's warning
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            m = _BOMB_PIXELS.search(str(e))
            pixels = int(m.group(1)) if m else None
            limit = limits.max_image_pixels if limits is not None else Image.MAX_IMAGE_PIXELS
            size = f"{pixels} pixels" if pixels else f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
            raise InputError(
                f"image {i} has {size}, which is over the server's limit of {limit} (config.pbtxt parameter "
                "max_image_pixels; raise it in the model's config.pbtxt to allow more)"
            ) from None


def allow_pil_pixels(limits: Limits) -> None:
    """Raise PIL's process-wide decompression-bomb threshold so it never refuses what max_image_pixels allows."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < limits.max_image_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels


def decode_images(values: np.ndarray, limits: Limits | None = None) -> list[Image.Image]:
    """The image tensor ([N] of encoded bytes) as RGB PIL images; corrupt or unsupported bytes are an InputError.

    With `limits`, the count is checked before any image is opened and each image's size before its pixels are
    decoded (`open_images`, then `load_images`: a caller can check more between the two from the sizes alone)."""
    opened = open_images(values, limits)
    try:
        return load_images(opened)
    finally:
        for img, _ in opened:
            img.close()


def open_images(values: np.ndarray, limits: Limits | None = None) -> list[tuple[Image.Image, bytes]]:
    """Each image opened lazily (its header read: format and size, no pixels), with its bytes; the count and each
    size checked against `limits`. The caller closes them (`load_images` copies the pixels out)."""
    flat = values.reshape(-1)
    if limits is not None:
        check_image_count(flat, limits)
    opened: list[tuple[Image.Image, bytes]] = []
    try:
        for i, blob in enumerate(flat):
            data = image_bytes(blob, i)
            try:
                img = _open(data, i, limits)
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                raise InputError(f"image {i}: not a readable PNG or JPEG image ({len(data)} bytes: {e})") from None
            opened.append((img, data))
            if img.format not in IMAGE_FORMATS:
                raise InputError(f"image {i}: {img.format} is not supported (send PNG or JPEG bytes)")
            if limits is not None:
                check_image_size(i, *img.size, limits)
    except BaseException:
        for img, _ in opened:
            img.close()
        raise
    return opened


def load_images(opened: list[tuple[Image.Image, bytes]]) -> list[Image.Image]:
    """The pixels of `open_images`' images, as RGB the way the processors convert (transparency on white)."""
    from lightkv_export.images import to_rgb

    images = []
    for i, (img, data) in enumerate(opened):
        try:
            images.append(to_rgb(img))  # load() happens here: truncated data fails now, not later
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"image {i}: not a readable PNG or JPEG image ({len(data)} bytes: {e})") from None
    return images


def image_bytes(blob: Any, i: int) -> bytes:
    """An image element as encoded bytes: sent as they are, or as base64 text (a data: URL too), as JSON has it."""
    data = bytes(blob) if not isinstance(blob, str) else blob.encode("ascii", errors="replace")
    if data.startswith(_IMAGE_MAGIC):
        return data
    text = data.strip()
    if text.startswith(b"data:") and b"," in text:
        text = text.split(b",", 1)[1]
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return data  # neither: the image check names it as unreadable
    return decoded if decoded.startswith(_IMAGE_MAGIC) else data


def decode_stream(values: np.ndarray | None) -> bool:
    """The optional stream tensor ([1] BOOL); absent means one response with the whole answer."""
    if values is None:
        return False
    flat = values.reshape(-1)
    if flat.size != 1:
        raise InputError(f"stream: expected one value, got {flat.size}")
    return bool(flat[0])


def decode_max_new_tokens(values: np.ndarray | None, default: int) -> int:
    """The optional max_new_tokens tensor ([1] INT32); absent means `default`. A value below 1 is refused here; the
    engine's own limit by the scheduler. (A JSON number past INT32 was already cast by Triton: see the module
    docstring.)"""
    if values is None:
        return default
    flat = values.reshape(-1)
    if flat.size != 1:
        raise InputError(f"max_new_tokens: expected one value, got {flat.size}")
    if not np.issubdtype(flat.dtype, np.integer):
        raise InputError(f"max_new_tokens must be an integer (INT32), got a {flat.dtype} tensor.")
    return check_max_new_tokens(flat[0])


def encode_generation(gen: Any, stats: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """A runtime.Generation (and the scheduler's statistics of its request) as output arrays, named and typed as
    in config.pbtxt."""
    extra = {name: np.array([stats[name]], dtype=OUTPUT_DTYPES[name]) for name in STATS if stats and name in stats}
    return {
        "text": np.array([gen.text.encode("utf-8")], dtype=np.object_),  # [1]
        "token_ids": np.asarray(gen.token_ids, dtype=np.int64).reshape(-1),  # [T]
        "vision_tokens_in": np.array([gen.vision_tokens_in], dtype=np.int64),  # [1]
        "vision_tokens_per_group": np.asarray(gen.vision_tokens_per_group, dtype=np.int64).reshape(-1),  # [G]
        "kv_bytes": np.array([gen.kv_bytes], dtype=np.int64),  # [1]
        "prefill_ms": np.array([gen.prefill_ms], dtype=np.float32),  # [1]
        "decode_ms": np.array([gen.decode_ms], dtype=np.float32),  # [1]
    } | extra


def encode_piece(text: str, token: int) -> dict[str, np.ndarray]:
    """A streamed response: the new text and its token."""
    return {
        "text": np.array([text.encode("utf-8")], dtype=np.object_),  # [1]
        "token_ids": np.array([token], dtype=np.int64),  # [1]
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
