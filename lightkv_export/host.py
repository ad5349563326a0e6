"""Host preprocessing of an engine's requests without PyTorch or transformers: prompt and images in, token ids,
pixel values and vision spans out, read from the engine's processor/ files.

The engine runtime and the Triton backend use this, so that a serving process holds ONNX Runtime, numpy and the
`tokenizers` library, not the 400 MiB that torch and transformers' processors add. It computes what the
checkpoint's Hugging Face processor computes (tests/families/test_conformance.py holds it to that for every family, and
parity compares the engine's requests, made here, with the PyTorch model fed by the Hugging Face processor):

* the chat template (processor/chat_template.jinja) rendered with jinja2 as transformers renders it, for one user
  turn: the images first, then the text, and the assistant cue;
* the user's text tokenized as plain text: control tokens typed in the prompt (`<|im_end|>`, `<image>`, ...)
  become ordinary text, so a prompt can neither open another chat turn nor add image slots (transformers'
  `sanitize_control_tokens`); the template's own control tokens stay real;
* each image placeholder the template writes replaced by that image's tokens (its ImageLayout: images of
  different sizes have different counts);
* pixels: the family's image side (`Family.image_host`, images.ImageHost) resizes each image exactly as the
  checkpoint's processor does (Qwen-VL's smart resize within min/max pixels, LLaVA's resize and center crop) and
  lays it out as the vision graph takes it, with the graph's grid-only inputs. Nothing is resized to a profile.
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
from lightkv_export.images import ImageHost, PreparedImage
from lightkv_export.method.spans import ImageLayout, VisionSpan, spans_on_grids
from lightkv_export.models.base import check_request, leading_ids

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

    def encode_chat(self, chat: str, expand: dict[str, list[str]]) -> list[int]:
        """Ids of a rendered chat: fenced tokens as plain text, the rest with its control tokens real, and the
        n-th unfenced occurrence of each `expand` key replaced first by its n-th value (the n-th image's
        placeholder by that image's tokens).

        Every piece after the first is encoded after a newline that is then dropped: SentencePiece tokenizers
        (LLaVA's) otherwise add the word-start space they add at the start of a string."""
        pieces = self.marked.split(chat)  # [text, fenced token or None, text, ...]
        pending = {key: list(values) for key, values in expand.items()}
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if not piece:
                continue
            fenced = i % 2 == 1
            if not fenced:
                for key, values in pending.items():
                    piece = _replace_each(piece, key, values)
            encode = self.encode_plain if fenced else self.encode
            if i == 0:
                ids += encode(piece)
                continue
            piece_ids = encode("\n" + piece)
            ids += piece_ids[len(self.newline) :] if piece_ids[: len(self.newline)] == self.newline else encode(piece)
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


@dataclass
class HostInputs:
    input_ids: np.ndarray  # [1, S] int64
    images: list[PreparedImage]  # per image: its size as the model takes it, layout and vision-graph feeds
    spans: list[list[VisionSpan]]  # [row][grid], every image's grids in order

    @property
    def layouts(self) -> list[ImageLayout]:
        return [im.layout for im in self.images]


class HostProcessor:
    """An engine's host preprocessing: the chat template and tokenizer (processor/), and the family's image side
    (`Family.image_host`, images.ImageHost), which sizes each image as the checkpoint's processor does."""

    def __init__(self, directory: Path, images: ImageHost) -> None:
        self.tokenizer = ChatTokenizer(directory)
        self.images = images
        self.image_token_id = self.tokenizer.token_id(images.image_token)
        # What the chat template writes once per image (Qwen-VL, LLaVA: the image token itself; a family whose
        # template writes another placeholder, e.g. InternVL's <image>, names it).
        self.placeholder = getattr(images, "template_placeholder", images.image_token)

    def check(self, images: list, prompt: str) -> None:
        """Refuse what the checkpoint's processor would refuse (or silently mangle), with a message that says why:
        called on the images as the user gave them."""
        check_request(images, prompt, min_side=self.images.min_side)

    def layouts(self, sizes: list[tuple[int, int]]) -> list[ImageLayout]:
        """Each image's tokens from its (width, height) as sent (PIL's .size order): no pixel is touched."""
        return [self.images.layout(int(h), int(w)) for w, h in sizes]

    def prompt_ids(self, layouts: list[ImageLayout], prompt: str) -> list[int]:
        """The request's token ids: the tokenizer's prefix, the chat with each image's placeholder replaced by that
        image's tokens (in order: images of different sizes have different counts)."""
        chat = self.tokenizer.render(len(layouts), prompt)
        expansions = [self.images.expand(layout) for layout in layouts]
        return self._with_prefix(self.tokenizer.encode_chat(chat, {self.placeholder: expansions}))

    def _with_prefix(self, ids: list[int]) -> list[int]:
        prefix = self.tokenizer.prefix
        return ids if not prefix or ids[: len(prefix)] == prefix else prefix + ids  # a template may write <s>

    def process(self, images: list, prompt: str) -> HostInputs:
        """Token ids, each image prepared for the vision graph, and one span per grid."""
        prepared = [self.images.prepare(im) for im in images]
        layouts = [p.layout for p in prepared]
        ids = np.asarray([self.prompt_ids(layouts, prompt)], dtype=np.int64)  # [1, S]
        grids = [g for layout in layouts for g in layout.grid_parts]  # with any inline fixed tokens
        hint = "does the chat template write one placeholder per image?"
        spans = spans_on_grids(ids, self.image_token_id, grids, hint)
        return HostInputs(ids, prepared, spans)

    def template_tokens(self, num_images: int) -> int:
        """Tokens of the chat around an empty prompt with `num_images` images, one placeholder token each."""
        expand = {self.placeholder: [self.placeholder] * num_images}
        return len(self._with_prefix(self.tokenizer.encode_chat(self.tokenizer.render(num_images, ""), expand)))

    @cached_property
    def template_shape(self) -> tuple[int, int]:
        """(tokens of the chat around an empty prompt, tokens it puts around each image's placeholder): rendered
        once, not per request."""
        empty = self.template_tokens(0)
        return empty, self.template_tokens(1) - empty - 1

    def sequence_tokens(self, layouts: list[ImageLayout], prompt_tokens: int) -> tuple[int, str]:
        """The request's prompt sequence from its images' layouts and its prompt's token count, before anything is
        tokenized or a pixel is touched (as the limits and KV reservations need it), and how it adds up."""
        empty, wrapper = self.template_shape
        images = [wrapper + layout.tokens for layout in layouts]
        parts = f"{empty} template + images {' + '.join(map(str, images)) or '0'} + {prompt_tokens} prompt"
        return empty + prompt_tokens + sum(images), parts

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of the user's text alone, tokenized as the request tokenizes it (plain text)."""
        return len(self.tokenizer.encode_plain(prompt)) if prompt else 0


def read_processor_config(directory: Path) -> dict[str, Any]:
    """processor_config.json of an engine's (or a checkpoint's) processor files: the family's image settings."""
    return _read_json(directory / "processor_config.json")


def _replace_each(text: str, key: str, values: list[str]) -> str:
    """`text` with each occurrence of `key` replaced by the next of `values` (consumed from the front); more
    occurrences than values is an InputError (the template wrote more image placeholders than there are images)."""
    parts = text.split(key)
    if len(parts) - 1 > len(values):
        raise InputError(f"the chat template wrote more {key!r} placeholders than the request has images.")
    out = [parts[0]]
    for part in parts[1:]:
        out += [values.pop(0), part]
    return "".join(out)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is missing; the engine's processor/ is incomplete: build the engine again.") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); build the engine again.") from None
