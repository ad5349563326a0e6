"""Host preprocessing of an engine's requests without PyTorch or transformers: prompt and images in, token ids,
pixel values and vision spans out, read from the engine's processor/ files.

The engine runtime and the Triton backend use this, so that a serving process holds ONNX Runtime, numpy and the
`tokenizers` library, not the 400 MiB that torch and transformers' processors add. It computes what the
checkpoint's Hugging Face processor computes (tests/unit/test_host.py holds it to that for every family, and
parity compares the engine's requests, made here, with the PyTorch model fed by the Hugging Face processor):

* the chat template (processor/chat_template.jinja) rendered with jinja2 as transformers renders it, for one user
  turn: the images first, then the text, and the assistant cue;
* the user's text tokenized as plain text: control tokens typed in the prompt (`<|im_end|>`, `<image>`, ...)
  become ordinary text, so a prompt can neither open another chat turn nor add image slots (transformers'
  `sanitize_control_tokens`); the template's own control tokens stay real;
* each image placeholder the template writes expanded to the engine's vision tokens per image;
* pixels: rescaled, normalized, and laid out as the vision graph takes them. Images arrive resized to the
  engine's profile (runtime.Engine.prepare), where the processors' own resize and crop change nothing.
  Qwen-VL: patches [N_patches, C * T * P * P] in the merge order; CLIP (LLaVA-1.5): [1, 3, H, W].
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from lightkv_export.errors import InputError
from lightkv_export.models.base import VisionSpan, check_request, leading_ids, spans_on_grids

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Private-use code points (never typed text) that fence a control token of the user's text through the template.
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


def _raise(message: str) -> None:
    raise InputError(f"the chat template refused the request: {message}")


def chat_environment():
    """A jinja2 environment as transformers renders chat templates in: trimmed blocks, loop controls, a sandbox
    (a template is checkpoint data, never trusted code), and the helpers templates call."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise
    return env


def compile_chat_template(source: Any, where: str):
    """The chat template `source` (read from `where`, named in the error) compiled, or an InputError that says
    what is wrong with it: a checkpoint's broken template is refused where it is read, not at the first request."""
    import jinja2

    if not isinstance(source, str):
        raise InputError(f"{where}: the chat template must be a string (Jinja source), got {type(source).__name__}.")
    try:
        return chat_environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(
            f"{where}: the chat template is not valid Jinja (line {e.lineno}: {e.message}). Fix the template, or "
            "copy the checkpoint's chat_template.jinja / chat_template.json again."
        ) from None


def check_chat_template(source: Any, where: str, special: dict[str, str] | None = None) -> None:
    """Compile the chat template and render it once for a sample turn (one image, a short text), as every request
    will: an InputError naming `where` if either fails, so that a build stops before its export, not after."""
    template = compile_chat_template(source, where)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    try:
        template.render(messages=messages, add_generation_prompt=True, **(special or {}))
    except Exception as e:  # any failure of a sample render (undefined calls, type errors): the template's fault
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise InputError(
            f"{where}: the chat template fails on a sample request (one image and a text: {type(e).__name__}: "
            f"{detail}). Fix the template, or copy the checkpoint's chat template again."
        ) from None


class ChatTokenizer:
    """tokenizer.json through the `tokenizers` library, and the chat template through jinja2."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config = _read_json(directory / "tokenizer_config.json")
        template = directory / CHAT_TEMPLATE_FILE
        source = template.read_text() if template.exists() else config.get("chat_template")
        if not isinstance(source, str):
            raise InputError(f"{directory} has no chat template ({CHAT_TEMPLATE_FILE}); build the engine again.")
        where = str(template if template.exists() else directory / "tokenizer_config.json")
        self.template = compile_chat_template(source, where)
        self.special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        added = [t.content for t in self.tokenizer.get_added_tokens_decoder().values()]
        longest_first = sorted(added, key=len, reverse=True)  # a token before the tokens it contains
        self.control = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self.marked = re.compile(f"{MARK_START}({self.control.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")
        self.newline = self.encode("\n")

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, its control tokens real, no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with no added token matched (a control token's text becomes its text's pieces)."""
        backend = self.tokenizer
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
        return [token.id for split in splits for token in backend.model.tokenize(split)]

    @cached_property
    def prefix(self) -> list[int]:
        """The ids the tokenizer itself puts before a text (LLaVA: [<s>]; Qwen: none)."""
        return leading_ids(self.encode("a"), self.tokenizer.encode("a", add_special_tokens=True).ids)

    def token_id(self, token: str) -> int:
        index = self.tokenizer.token_to_id(token)
        if index is None:
            raise InputError(f"the tokenizer has no token {token!r}; is this the engine's own processor/?")
        return int(index)

    def render(self, num_images: int, prompt: str) -> str:
        """The chat text of one user turn (the images first), the user's control tokens fenced by markers."""
        text = prompt.replace(MARK_START, "").replace(MARK_END, "")  # no forged fences
        text = self.control.sub(lambda m: f"{MARK_START}{m.group(0)}{MARK_END}", text)
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special)

    def encode_chat(self, chat: str, expand: dict[str, str]) -> list[int]:
        """Ids of a rendered chat: fenced tokens as plain text, the rest with its control tokens real, and each
        unfenced `expand` key replaced first by its value (an image placeholder by the image's tokens).

        Every piece after the first is encoded after a newline that is then dropped: SentencePiece tokenizers
        (LLaVA's) otherwise add the word-start space they add at the start of a string."""
        pieces = self.marked.split(chat)  # [text, fenced token or None, text, ...]
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if not piece:
                continue
            fenced = i % 2 == 1
            if not fenced:
                for key, value in expand.items():
                    piece = piece.replace(key, value)
            encode = self.encode_plain if fenced else self.encode
            if i == 0:
                ids += encode(piece)
                continue
            piece_ids = encode("\n" + piece)
            ids += piece_ids[len(self.newline) :] if piece_ids[: len(self.newline)] == self.newline else encode(piece)
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


@dataclass(frozen=True)
class ImageFormat:
    """Rescale and normalization of the image processor (processor_config.json)."""

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

    def chw(self, image) -> np.ndarray:
        """[C, H, W] float32 of an RGB PIL image."""
        x = np.asarray(image.convert("RGB"), dtype=np.float32) * np.float32(self.scale)  # [H, W, C]
        return ((x - self.mean) / self.std).transpose(2, 0, 1)  # [C, H, W]


@dataclass(frozen=True)
class QwenPatches:
    """Qwen2-VL / Qwen2.5-VL: each image as patches in the merger's order, the frame repeated over the temporal
    patch (an image is one frame)."""

    fmt: ImageFormat
    patch: int
    merge: int
    temporal: int
    image_token: str = "<|image_pad|>"

    @property
    def min_side(self) -> int:
        return self.patch  # the processor fails on a smaller image

    def pixels(self, image) -> np.ndarray:
        x = self.fmt.chw(image)  # [C, H, W]
        c, h, w = x.shape
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # [gh/m, gw/m, m, m, C, T, P, P]
        return np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p)  # [N_patches, C*T*P*P]


@dataclass(frozen=True)
class ClipPixels:
    """LLaVA-1.5's CLIP processor: the image as one [1, 3, H, W] tensor."""

    fmt: ImageFormat
    patch: int
    image_token: str = "<image>"
    min_side: int = 1  # any size is resized and center-cropped

    def pixels(self, image) -> np.ndarray:
        return self.fmt.chw(image)[None]  # [1, 3, H, W]


def image_layout(config: dict) -> QwenPatches | ClipPixels:
    """The image side of processor_config.json, by the image processor's type (as AutoProcessor dispatches)."""
    features = config.get("image_processor", config)
    kind = str(features.get("image_processor_type", ""))
    fmt = ImageFormat.from_config(features)
    if kind.startswith("Qwen2VLImageProcessor"):
        patch, merge, temporal = (int(features[k]) for k in ("patch_size", "merge_size", "temporal_patch_size"))
        return QwenPatches(fmt, patch, merge, temporal)
    if kind.startswith("CLIPImageProcessor"):
        return ClipPixels(fmt, int(config.get("patch_size", 14)), str(config.get("image_token", "<image>")))
    raise InputError(f"image processor {kind or '(none)'} has no host preprocessing here; build the engine again.")


@dataclass
class HostInputs:
    input_ids: np.ndarray  # [1, S] int64
    pixels: list[np.ndarray]  # per image, as the vision graph takes it
    spans: list[list[VisionSpan]]  # [row][image]


class HostProcessor:
    """An engine's host preprocessing: `process(images, prompt)` for images already at the engine's profile."""

    def __init__(self, directory: Path, vision_grid: tuple[int, int]) -> None:
        self.tokenizer = ChatTokenizer(directory)
        self.layout = image_layout(_read_json(directory / "processor_config.json"))
        self.vision_grid = (int(vision_grid[0]), int(vision_grid[1]))  # the LLM's token grid of one image
        self.image_token_id = self.tokenizer.token_id(self.layout.image_token)

    def check(self, images: list, prompt: str) -> None:
        """Refuse what the checkpoint's processor would refuse (or silently mangle), with a message that says why:
        called on the images as the user gave them, before they are resized to the profile."""
        check_request(images, prompt, min_side=self.layout.min_side)

    def prompt_ids(self, num_images: int, prompt: str) -> list[int]:
        """The request's token ids: the tokenizer's prefix, the chat with each image's vision tokens."""
        token = self.layout.image_token
        n = self.vision_grid[0] * self.vision_grid[1]
        return self._with_prefix(
            self.tokenizer.encode_chat(self.tokenizer.render(num_images, prompt), {token: token * n})
        )

    def _with_prefix(self, ids: list[int]) -> list[int]:
        prefix = self.tokenizer.prefix
        return ids if not prefix or ids[: len(prefix)] == prefix else prefix + ids  # a template may write <s>

    def process(self, images: list, prompt: str) -> HostInputs:
        """Token ids, pixels and spans of one request whose images are at the engine's profile."""
        ids = np.asarray([self.prompt_ids(len(images), prompt)], dtype=np.int64)  # [1, S]
        hint = "does the chat template write one placeholder per image?"
        spans = spans_on_grids(ids, self.image_token_id, [self.vision_grid] * len(images), hint)
        return HostInputs(ids, [self.layout.pixels(im) for im in images], spans)

    def template_tokens(self, num_images: int) -> int:
        """Tokens of the chat around an empty prompt with `num_images` images, one placeholder token each."""
        return len(self._with_prefix(self.tokenizer.encode_chat(self.tokenizer.render(num_images, ""), {})))

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of the user's text alone, tokenized as the request tokenizes it (plain text)."""
        return len(self.tokenizer.encode_plain(prompt)) if prompt else 0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is missing; the engine's processor/ is incomplete: build the engine again.") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); build the engine again.") from None
