"""LLaVA family (`llava`): a ViT tower (CLIP or SigLIP) + a 2-layer MLP projector + a decoder with 1-D RoPE (Llama,
Mistral or Qwen2), the parts read from each checkpoint's config.json (`check_parts` refuses the others).

Layout the method and the exporter see: `model.model.vision_tower` (CLIPVisionModel or SiglipVisionModel), `model.
model.multi_modal_projector`, `model.model.language_model` (LlamaModel, MistralModel or Qwen2Model), `model.lm_head`.
The processor sizes every image to one size (CLIP: resize + center crop; SigLIP: resize to a fixed square) and
expands each `<image>` into (size // patch)^2 placeholder tokens (CLIP's CLS dropped: vision_feature_select_strategy
"default"; SigLIP has none: "full"), so an image is always one contiguous run of rows x cols tokens in raster order
(odd sides included: SigLIP 384 px / patch 14 is 27 x 27), and positions are plain 1-D (token s at position s, no
decode offset). `vision_feature_layer` is one hidden state of the tower or a list of them, concatenated on the
channels as transformers' LlavaModel.get_image_features does.

`Llava` implements the family interface (models/family.py): 1-D RoPE positions ([B, S]), no spatial merge, the
host image side (`ClipImages`: the processor's resize and center crop in numpy and PIL, no torch), a vision graph
of the processed size (the towers' position embeddings are fixed; an image of any size is sized to it), and a
tiny preset of the real classes at toy size with a locally trained, deterministic Llama tokenizer (no download).

The module imports without torch or transformers (an engine's host reads `ClipImages` alone): they are imported
where a method needs them, and the vision graph's torch.nn.Module class is made on first use.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lightkv_export import contract
from lightkv_export.errors import InputError
from lightkv_export.images import (
    PROCESSOR_DEFAULTS,
    ImageFormat,
    PreparedImage,
    example_image,
    image_features,
    processor_rgb,
)
from lightkv_export.method.spans import ImageLayout, VisionSpan, spans_on_grids
from lightkv_export.models import tiny
from lightkv_export.models.base import (
    LoadedModel,
    ModelSpec,
    PrefillInputs,
    VisionExport,
    check_request,
    leading_ids,
    user_turn,
)
from lightkv_export.models.family import Family, register_family
from lightkv_export.models.positions import ROPE_1D

if TYPE_CHECKING:
    import torch

HF_ID = "llava-hf/llava-1.5-7b-hf"
HF_ID_13B = "llava-hf/llava-1.5-13b-hf"
# LLaVA-NeXT (vicuna) keeps LLaVA-1.5's decoders and CLIP tower; only the planner knows it (models/registry.py).
HF_ID_NEXT = "llava-hf/llava-v1.6-vicuna-7b-hf"
HF_ID_NEXT_13B = "llava-hf/llava-v1.6-vicuna-13b-hf"
NEXT_NOT_BUILT = (
    "LLaVA-NeXT's anyres vision front end (a base view plus high-resolution tiles with newline tokens) has no "
    "family module yet, so it is known to the planner (`plan`, the paper comparison) but cannot be built; "
    "build llava or llava-13b (LLaVA-1.5) instead"
)
IMAGE_TOKEN = "<image>"

# llava-1.5-{7b,13b}-hf config.json, for --random-weights without the checkpoint on disk. Vicuna decoders; the
# vocabulary is Llama's 32000 + <image> (32000) + <pad> (32001), padded to 32064.
REAL_TEXT_7B = {
    "model_type": "llama",
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 32001,
}
REAL_TEXT_13B = {
    **REAL_TEXT_7B,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
}
# CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336), the same tower for both sizes.
REAL_VISION = {
    "model_type": "clip_vision_model",
    "image_size": 336,
    "patch_size": 14,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "projection_dim": 768,
    "vocab_size": 32000,
}
REAL_MULTIMODAL = {
    "image_token_index": 32000,
    "image_seq_length": 576,  # (336 / 14)^2
    "vision_feature_layer": -2,  # the penultimate CLIP layer's output
    "vision_feature_select_strategy": "default",  # CLS dropped
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
}
REAL_CONFIG = {"text_config": REAL_TEXT_7B, "vision_config": REAL_VISION, **REAL_MULTIMODAL}
REAL_CONFIG_13B = {"text_config": REAL_TEXT_13B, "vision_config": REAL_VISION, **REAL_MULTIMODAL}
# NeXT's sizes as far as the planner needs them (its image_newline vector, 4096 or 5120 parameters, not counted).
REAL_CONFIGS = {
    HF_ID: REAL_CONFIG,
    HF_ID_13B: REAL_CONFIG_13B,
    HF_ID_NEXT: REAL_CONFIG,
    HF_ID_NEXT_13B: REAL_CONFIG_13B,
}
REAL_IMAGE_SIZE = 336

# The tiny preset: the tiny kit's decoder sizes (models/tiny.py) on a Llama, a 2-layer CLIP (features come from
# layer -2) at 224 px.
TINY_IMAGE_SIZE = 224  # 16 x 16 = 256 vision tokens per image
TINY_TEXT = {
    "model_type": "llama",
    **tiny.TINY_DECODER,  # hidden 64, MLP 128, 8 layers, 4 heads, 2 KV heads, 4096 positions
    "head_dim": 16,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
TINY_VISION = {
    "model_type": "clip_vision_model",
    "image_size": TINY_IMAGE_SIZE,
    "patch_size": 14,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
}

# The tiny tokenizer: Llama's layout (<unk> <s> </s>, 256 byte-fallback pieces, learned "▁"-BPE merges), then the
# added <pad> and <image> as in the llava-hf checkpoints. Trained on the tiny kit's corpus plus the chat words.
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
BYTE_PIECES = tuple(f"<0x{i:02X}>" for i in range(256))
TINY_BPE_VOCAB = 640
TINY_CORPUS = tiny.CORPUS + "USER: ASSISTANT: USER: What is shown here? ASSISTANT: A picture of an image.\n"

# LLaVA-1.5's conversation layout ("USER: <image>\n<prompt> ASSISTANT:"), images first, as the llava-hf
# checkpoints' template renders it. It writes no <s>: the tokenizer adds it (see `process`).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %} "
    "{% else %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }} {% else %}"
    "{% for part in message['content'] if part['type'] == 'image' or 'image' in part %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }} {% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vision_model(model: Any) -> Any:
    """The vision tower (the projector is `model.model.multi_modal_projector`)."""
    return model.model.vision_tower


# --- the parts a checkpoint may have ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tower:
    """A vision tower this family exports: its name in messages, whether it prepends a CLS token (then the
    processor's strategy must be "default", which drops it, so an image is exactly its patch grid), the layer norm
    it applies to the embeddings before the encoder (None: none), and the image processor its host implements."""

    name: str
    cls_token: bool
    pre_norm: str | None
    image_processor: str

    @property
    def strategy(self) -> str:
        """The vision_feature_select_strategy that leaves one token per patch."""
        return "default" if self.cls_token else "full"


TOWERS = {
    "clip_vision_model": Tower("CLIP", cls_token=True, pre_norm="pre_layrnorm", image_processor="CLIPImageProcessor"),
    "siglip_vision_model": Tower("SigLIP", cls_token=False, pre_norm=None, image_processor="SiglipImageProcessor"),
}
# Decoders with full causal attention, 1-D RoPE and the `model.layers[i].self_attn` layout the exporter runs
# (Qwen2's q/k/v biases included: `Family.arch` reads them off the model).
DECODERS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def supported_parts() -> str:
    """The towers and decoders a LLaVA checkpoint may have, for messages."""
    towers = ", ".join(f"{t.name} ({k})" for k, t in TOWERS.items())
    decoders = ", ".join(f"{name} ({k})" for k, name in DECODERS.items())
    return f"supported: vision towers {towers}; decoders {decoders}"


def tower_of(config: Any) -> Tower:
    """The config's vision tower, or an InputError naming it and what is supported."""
    vision = config.vision_config
    model_type = getattr(vision, "model_type", None)
    if model_type not in TOWERS:
        raise InputError(
            f"config.json vision_config model_type {model_type!r} ({type(vision).__name__}): this LLaVA "
            f"checkpoint's vision tower is not supported; {supported_parts()}."
        )
    return TOWERS[model_type]


def sliding_window(text: Any) -> int | None:
    """The decoder's attention window when it has one that a sequence can reach (Mistral's `sliding_window`, Qwen2's
    sliding layers), else None: the exported attention is full causal attention."""
    window = getattr(text, "sliding_window", None)
    if text.model_type == "qwen2":
        sliding = "sliding_attention" in (getattr(text, "layer_types", None) or ())
        return int(window) if sliding and window else None
    return int(window) if window else None


def check_parts(config: Any) -> Tower:
    """Refuse, when the checkpoint is loaded and before any export, a LLaVA config whose vision tower, decoder or
    feature settings this family does not export, naming them and listing what is supported. Returns the tower."""
    tower = tower_of(config)
    text = config.get_text_config()
    if text.model_type not in DECODERS:
        raise InputError(
            f"config.json text_config model_type {text.model_type!r} ({type(text).__name__}): this LLaVA "
            f"checkpoint's decoder is not supported; {supported_parts()}."
        )
    window = sliding_window(text)
    if window is not None:
        raise InputError(
            f"config.json text_config: the {DECODERS[text.model_type]} decoder attends through a sliding window of "
            f"{window} tokens, which the exported graphs do not implement (they attend to the whole sequence): "
            "only decoders with full attention are supported (sliding_window null, use_sliding_window false)."
        )
    strategy = config.vision_feature_select_strategy
    if strategy != tower.strategy:
        kept = "keeps CLS" if tower.cls_token else "drops a patch token (SigLIP has no CLS)"
        raise InputError(
            f"config.json vision_feature_select_strategy {strategy!r} with a {tower.name} tower {kept}, so an image "
            f"is not one token per patch: only {tower.strategy!r} is supported with {tower.name}."
        )
    feature_depths(config)  # an index outside the tower is refused here too
    return tower


# --- requests ---------------------------------------------------------------------------------------------------


def chat_text(processor: Any, num_images: int, prompt: str) -> str:
    """The chat-formatted prompt (no <s>), for display and layout checks only: tokenizing it would read control
    tokens typed in `prompt` as real ones; `process` tokenizes the user's text as plain text."""
    return processor.apply_chat_template(user_turn(num_images, prompt), add_generation_prompt=True, tokenize=False)


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer itself puts before a text (LLaVA: [<s>])."""
    return leading_ids(tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a", add_special_tokens=True))


def token_grid(processor: Any, height: int, width: int) -> tuple[int, int]:
    """The token grid of pixel_values [.., height, width]: one token per patch (the processor's own count)."""
    patch = int(processor.patch_size)
    return height // patch, width // patch


# --- the vision graph -------------------------------------------------------------------------------------------


def feature_depths(config: Any) -> list[int]:
    """The tower's hidden states that vision_feature_layer names, in its order: hidden state k of num_layers + 1
    (0 = the embeddings, k = after encoder layer k; negative counts from the end, as Python indexes the tuple)."""
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    total = int(config.vision_config.num_hidden_layers) + 1
    if not layers or any(not -total <= int(layer) < total for layer in layers):
        raise InputError(
            f"config.json vision_feature_layer {config.vision_feature_layer!r}: each must index the vision tower's "
            f"{total} hidden states (-{total} to {total - 1})."
        )
    return [int(layer) % total for layer in layers]


@functools.cache
def vision_graph_class() -> type:
    """The VisionGraph torch.nn.Module class, made on first use so that importing this module needs no torch."""
    import torch

    class VisionGraph(torch.nn.Module):
        """The tower up to its deepest feature layer, CLS dropped where it has one, the feature layers concatenated
        on the channels, projector: what `get_image_features` computes for one image, written out layer by layer so
        the graph holds no output-capturing hooks and skips the unused last layers (SigLIP's post_layernorm
        included: it only norms the last hidden state, which hidden_states does not return)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            config = model.config
            tower = check_parts(config)
            self.tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector
            self.pre_norm = getattr(self.tower, tower.pre_norm) if tower.pre_norm else torch.nn.Identity()
            self.depths = feature_depths(config)
            self.drop_cls = config.vision_feature_select_strategy == "default"
            self.train(False)  # an inference graph (dropout off), whatever mode the model was left in

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            hidden = self.pre_norm(self.tower.embeddings(pixel_values))  # [1, T, C], T = P (+ 1 CLS)
            selected = {0: hidden} if 0 in self.depths else {}
            for i, layer in enumerate(self.tower.encoder.layers[: max(self.depths)]):
                hidden = layer(hidden, None)  # [1, T, C]
                if i + 1 in self.depths:
                    selected[i + 1] = hidden
            features = [selected[d] for d in self.depths]
            if self.drop_cls:
                features = [f[:, 1:] for f in features]  # [1, P, C]
            return self.projector(torch.cat(features, dim=-1)).flatten(0, 1)  # [N_vis, D], D from L * C

    return VisionGraph


def vision_graph(model: Any) -> Any:
    """The vision graph (a torch.nn.Module) over `model`'s vision tower and projector."""
    return vision_graph_class()(model)


# --- the host image side (numpy + PIL, no torch) ----------------------------------------------------------------

# CLIPImageProcessorPil's class defaults (transformers 5): a saved processor_config.json leaves out what it does
# not change, and the processor then uses these.
CLIP_DEFAULTS: dict[str, Any] = {
    **PROCESSOR_DEFAULTS,
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_pad": False,
}
# SiglipImageProcessorPil's class defaults: a fixed square resize, no crop, mean and std 0.5.
SIGLIP_DEFAULTS: dict[str, Any] = {
    **PROCESSOR_DEFAULTS,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"height": 224, "width": 224},
    "do_center_crop": False,
    "crop_size": None,
    "do_pad": False,
}
# The image processors this host implements (their PIL classes' names start so), with their class defaults.
IMAGE_PROCESSORS = {"CLIPImageProcessor": CLIP_DEFAULTS, "SiglipImageProcessor": SIGLIP_DEFAULTS}


def size_setting(value: Any, name: str, *, square: bool) -> dict[str, int]:
    """A `size` / `crop_size` setting as the processor reads it: a bare number is the shortest edge (`size`, CLIP
    does not default to square) or a square (`crop_size`); dicts must be {"shortest_edge"} or {"height",
    "width"}, the forms this host implements (longest_edge, max_height / max_width are refused)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if square else {"shortest_edge": value}
    keys = set(value) if isinstance(value, dict) else set()
    if keys not in ({"shortest_edge"}, {"height", "width"}) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value.values()
    ):
        raise InputError(
            f"image processor {name} {value!r} is not supported for LLaVA: expected {{'shortest_edge': n}} or "
            "{'height': h, 'width': w} with positive integers."
        )
    return {k: int(v) for k, v in value.items()}


def shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to `edge`: the long side is edge * long / short truncated,
    as transformers' get_resize_output_image_size computes it (not rounded)."""
    if width <= height:
        return int(edge * height / width), edge
    return edge, int(edge * width / height)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[height, width, C] from [H, W, C] as the processor's center_crop: offset (H - height) // 2 (rounding the
    margin down on top / left); a side shorter than the crop is first zero-padded, the image placed at
    ceil(margin / 2), so the output is always the crop size."""
    h, w = pixels.shape[:2]
    ph, pw = max(h, height), max(w, width)
    if (ph, pw) != (h, w):
        top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)  # ceil
        canvas = np.zeros((ph, pw, *pixels.shape[2:]), pixels.dtype)  # [PH, PW, C]
        canvas[top : top + h, left : left + w] = pixels
        pixels = canvas
    top, left = (ph - height) // 2, (pw - width) // 2
    return pixels[top : top + height, left : left + width]  # [height, width, C]


@dataclass(frozen=True)
class ClipImages:
    """LLaVA's image processor on the host (images.ImageHost), CLIP's or SigLIP's: every image becomes one
    [1, 3, H, W] of the processed size, as CLIPImageProcessorPil (resize, center crop) or SiglipImageProcessorPil
    (resize to a fixed (h, w), no crop) makes it, and one grid of (H // patch) x (W // patch) `<image>` tokens (the
    tower's valid convolution drops the remainder: SigLIP 384 / 14 is 27). Build it with
    `Llava.image_host(processor_config)`.

    shortest_edge / resize_to: the resize (short side to n, the other as the processor computes it; or exactly
    (h, w)); None: no resize. crop: the center crop (h, w), None: none. processed: the one size every image
    becomes (the crop, else the fixed resize): the tower's position embeddings take no other.
    """

    fmt: ImageFormat
    shortest_edge: int | None
    resize_to: tuple[int, int] | None
    crop: tuple[int, int] | None
    resample: int  # PIL.Image.Resampling value
    convert_rgb: bool
    patch: int
    image_token: str = IMAGE_TOKEN
    min_side: int = 1  # any size is resized and center-cropped

    @property
    def processed(self) -> tuple[int, int]:
        size = self.crop or self.resize_to
        assert size is not None  # from_config refuses settings without one output size
        return size

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        return self.processed

    def layout(self, height: int, width: int) -> ImageLayout:
        h, w = self.processed
        return ImageLayout.single(h // self.patch, w // self.patch)

    def expand(self, layout: ImageLayout) -> str:
        """One `<image>` per vision token: the processor's expansion of the template's single `<image>`."""
        if layout.fixed_tokens or len(layout.grids) != 1:
            raise InputError(f"LLaVA lays an image out as one grid, not {layout.to_json()}.")
        return self.image_token * layout.vision_tokens

    def feed_shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return {contract.PIXEL_VALUES: (1, 3, *self.processed)}

    def pixel_range(self) -> tuple[int, int]:
        h, w = self.processed
        return h * w, h * w

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step, before the crop."""
        if self.shortest_edge is not None:
            return shortest_edge_size(height, width, self.shortest_edge)
        return self.resize_to or (height, width)

    def prepare(self, image: Any) -> PreparedImage:
        """Convert to RGB, resize (PIL, the processor's filter, on the 8-bit image as it resizes), center-crop on
        the 8-bit pixels (zero padding included), then rescale and normalize: the processor's order of steps."""
        image = processor_rgb(image, self.convert_rgb)
        height, width = image.height, image.width
        if self.shortest_edge is not None or self.resize_to is not None:
            h, w = self.resized(height, width)
            image = image.resize((w, h), resample=self.resample)
        pixels = np.asarray(image)  # [H, W, 3] uint8
        if self.crop is not None:
            pixels = center_crop(pixels, *self.crop)  # [h, w, 3]
        x = self.fmt.chw(pixels)[None]  # [1, 3, h, w] float32
        return PreparedImage(
            size=self.processed,
            layout=self.layout(height, width),
            feeds={contract.PIXEL_VALUES: np.ascontiguousarray(x)},
        )

    @classmethod
    def from_config(cls, processor_config: dict[str, Any], *, max_pixels: int | None = None) -> ClipImages:
        """Read processor_config.json (or a bare preprocessor_config.json); refuse what this host does not
        implement, naming it, rather than size images differently from the processor."""
        features = image_features(processor_config)
        kind = str(features.get("image_processor_type", "CLIPImageProcessor"))
        defaults = next((d for name, d in IMAGE_PROCESSORS.items() if kind.startswith(name)), None)
        if defaults is None:
            raise InputError(f"image processor {kind}: LLaVA's host implements {' and '.join(IMAGE_PROCESSORS)} only.")
        settings = defaults | features
        if settings["do_pad"]:
            raise InputError("image processor setting do_pad is not supported for LLaVA (CLIP and SigLIP do not pad).")
        resample = settings["resample"]
        if not isinstance(resample, int) or not 0 <= resample <= 5:
            raise InputError(f"image processor resample {resample!r} is not a PIL resampling filter (0-5).")
        size = size_setting(settings["size"], "size", square=False) if settings["do_resize"] else None
        crop = size_setting(settings["crop_size"], "crop_size", square=True) if settings["do_center_crop"] else None
        resize_to = (size["height"], size["width"]) if size and "height" in size else None
        crop_hw = (crop["height"], crop["width"]) if crop else None
        if crop_hw is None and resize_to is None:
            raise InputError(
                f"the image processor gives images of varying size (do_center_crop off, size {settings['size']!r}, "
                f"do_resize {settings['do_resize']}): LLaVA's vision tower takes one fixed size; set "
                "do_center_crop with crop_size, or size {'height': h, 'width': w}."
            )
        patch = int(processor_config.get("patch_size", PROCESSOR_SETTINGS["patch_size"]))
        host = cls(
            fmt=ImageFormat.from_config(settings),
            shortest_edge=size["shortest_edge"] if size and "shortest_edge" in size else None,
            resize_to=resize_to,
            crop=crop_hw,
            resample=resample,
            convert_rgb=bool(settings["do_convert_rgb"]),
            patch=patch,
            image_token=str(processor_config.get("image_token", IMAGE_TOKEN)),
        )
        check_token_count(processor_config, host.layout(1, 1).vision_tokens)
        h, w = host.processed
        if max_pixels is not None and max_pixels < h * w:
            raise InputError(
                f"--max-image-pixels {max_pixels} is below {w}x{h} = {h * w}: this model's processor crops every "
                "image to that fixed size (the cap cannot change it; any cap >= it has no effect)."
            )
        return host


def check_token_count(processor_config: dict[str, Any], grid_tokens: int) -> None:
    """LlavaProcessor writes (h / patch) * (w / patch) + num_additional_image_tokens placeholders, less one for
    vision_feature_select_strategy "default" (CLS dropped): this host lays out exactly the grid, so a CLS kept
    ("full") or other extra tokens are refused."""
    extra = int(processor_config.get("num_additional_image_tokens", PROCESSOR_SETTINGS["num_additional_image_tokens"]))
    strategy = processor_config.get(
        "vision_feature_select_strategy", PROCESSOR_SETTINGS["vision_feature_select_strategy"]
    )
    extra -= strategy == "default"
    if extra:
        raise InputError(
            f"processor_config.json: num_additional_image_tokens and vision_feature_select_strategy {strategy!r} "
            f"give {grid_tokens + extra} placeholders per image for a {grid_tokens}-token grid; only the grid "
            "(CLS dropped, 'default') is supported."
        )


# --- tiny preset ------------------------------------------------------------------------------------------------


def train_llama_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Llama-style BPE (vocab, merges) learned from TINY_CORPUS: <unk> <s> </s> at 0-2, byte pieces at 3-258 (the
    fallback for characters never seen), then "▁"-prefixed merges; deterministic for a fixed corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # LlamaTokenizer's Metaspace ("▁" for spaces, one in front), split into words only to learn within them.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        min_frequency=2,
        special_tokens=[*LLAMA_SPECIALS, *BYTE_PIECES],
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS.splitlines(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def build_tokenizer() -> Any:
    """transformers' LlamaTokenizer over the locally learned BPE, adding <s>, with <pad> and <image> appended."""
    from transformers import LlamaTokenizer

    vocab, merges = train_llama_bpe()
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The config fields that name special tokens, read from the tokenizer so the two always agree."""
    return {
        "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_image_processor(image_size: int = TINY_IMAGE_SIZE) -> Any:
    """CLIP's PIL image processor (no torchvision needed): short side to `image_size`, center crop to a square."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


# llava-interleave-qwen's conversation layout (ChatML, "<image>\n" before the text), for toy SigLIP + Qwen2
# checkpoints: no <s>, the Qwen tokenizer adds none.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' or 'image' in part %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tokenizer() -> Any:
    """A Qwen2Tokenizer over the tiny kit's locally learned byte-level BPE with ChatML's specials and <image> (the
    layout of llava-interleave-qwen's tokenizer), for toy LLaVA checkpoints with a Qwen2 decoder."""
    return tiny.build_tokenizer(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN), {"image_token": IMAGE_TOKEN}, QWEN_CHAT_TEMPLATE
    )


def build_siglip_image_processor(image_size: int) -> Any:
    """SigLIP's PIL image processor (no torchvision needed): every image resized to `image_size` square."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


# LLaVA-1.5's processor settings (llava-hf's processor_config.json): CLS is counted, and "default" drops it again,
# so an image is (size / 14)^2 placeholders.
PROCESSOR_SETTINGS = {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}


def build_processor(tokenizer: Any | None = None, image_size: int = TINY_IMAGE_SIZE) -> Any:
    """LlavaProcessor over a (locally built) tokenizer and the PIL CLIP image processor, LLaVA-1.5's settings."""
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    return llava_processor(None, tokenizer, build_image_processor(image_size), CHAT_TEMPLATE)


def config_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The processor settings a checkpoint's config.json implies (for a directory without processor_config.json):
    its tower's patch, its strategy, and one extra token where the tower has a CLS token."""
    vision = config.get("vision_config") or {}
    tower = TOWERS.get(vision.get("model_type", "clip_vision_model"))
    settings: dict[str, Any] = {}
    if "patch_size" in vision:
        settings["patch_size"] = int(vision["patch_size"])
    if tower is not None:
        settings["num_additional_image_tokens"] = int(tower.cls_token)
        settings["vision_feature_select_strategy"] = config.get("vision_feature_select_strategy", tower.strategy)
    return settings


def llava_processor(path: Any, tokenizer: Any, image_processor: Any, chat_template: str) -> Any:
    """LlavaProcessor over a checkpoint's (or an engine's) tokenizer and image processor, with the settings of its
    processor_config.json where it has one, else those its config.json implies, else LLaVA-1.5's."""
    from pathlib import Path

    from transformers import LlavaProcessor

    settings = dict(PROCESSOR_SETTINGS)
    directory = Path(path) if path is not None else None
    if directory is not None and (directory / "config.json").is_file():
        settings |= config_settings(json.loads((directory / "config.json").read_text()))
    saved = directory / "processor_config.json" if directory is not None else None
    if saved is not None and saved.is_file():
        settings |= {k: v for k, v in json.loads(saved.read_text()).items() if k in settings}
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **settings)


def tiny_config_dict(tokenizer: Any) -> dict[str, Any]:
    """Keyword arguments of LlavaConfig for the tiny preset."""
    ids = special_token_ids(tokenizer)
    side = TINY_VISION["image_size"] // TINY_VISION["patch_size"]
    text = {
        **TINY_TEXT,
        "vocab_size": len(tokenizer),
        **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    }
    return {
        **REAL_MULTIMODAL,
        "text_config": text,
        "vision_config": dict(TINY_VISION),
        "image_token_index": ids["image_token_index"],
        "image_seq_length": side * side,
    }


# --- the family -------------------------------------------------------------------------------------------------


@register_family("llava", model_types=("llava",))
class Llava(Family):
    """LLaVA-1.5 (7b, 13b and the tiny preset), and any LLaVA checkpoint with a tower and a decoder of
    `supported_parts()` (llava-hf/llava-interleave-qwen-0.5b-hf: SigLIP + Qwen2)."""

    hf_id = HF_ID
    positions = ROPE_1D  # position_ids [B, S]
    # The paper's LLaVA-1.5 windows (layers 12, 18, 24 of 32); 336 x 336 is 24 x 24 = 576 tokens, the tiny 224 x 224
    # 16 x 16 = 256, then ~128, ~64. LLaVA-NeXT: LLaVA-1.5's decoders behind the anyres front end, which has no
    # family module yet (issue 30): the planner counts its tokens (models/shapes.py, the paper's ~2,144 for
    # 720 x 480), builds are refused.
    presets = (
        ModelSpec.real("llava", "llava", HF_ID, (4, 2, 1), (REAL_IMAGE_SIZE,) * 2,
                       aliases=("llava-1.5", "llava-1.5-7b", "llava-7b", HF_ID.lower())),
        ModelSpec.real("llava-13b", "llava", HF_ID_13B, (4, 2, 1), (REAL_IMAGE_SIZE,) * 2,
                       aliases=("llava-1.5-13b", HF_ID_13B.lower())),
        ModelSpec.toy("tiny-llava", "llava", HF_ID, (2, 2, 1), (TINY_IMAGE_SIZE,) * 2, aliases=("tiny-llava-1.5",)),
        ModelSpec.real("llava-next", "llava", HF_ID_NEXT, (4, 2, 1), (REAL_IMAGE_SIZE,) * 2,
                       plan_image_size=(480, 720), vision="llava-next", plan_only=NEXT_NOT_BUILT,
                       aliases=("llava-next-7b", "llava-1.6", HF_ID_NEXT.lower())),
        ModelSpec.real("llava-next-13b", "llava", HF_ID_NEXT_13B, (4, 2, 1), (REAL_IMAGE_SIZE,) * 2,
                       plan_image_size=(480, 720), vision="llava-next", plan_only=NEXT_NOT_BUILT,
                       aliases=("llava-1.6-13b", HF_ID_NEXT_13B.lower())),
    )  # fmt: skip
    tiny_text: ClassVar[dict[str, Any]] = TINY_TEXT

    def model_class(self) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def config_class(self) -> type:
        from transformers import LlavaConfig

        return LlavaConfig

    def real_config_dict(self, hf_id: str = HF_ID) -> dict[str, Any]:
        """Keyword arguments of LlavaConfig for a real checkpoint's architecture (7b by default)."""
        if hf_id not in REAL_CONFIGS:
            raise InputError(f"no known LLaVA-1.5 architecture for {hf_id!r}; known: {', '.join(REAL_CONFIGS)}.")
        return copy.deepcopy(REAL_CONFIGS[hf_id])

    def tiny_preset(self) -> tuple[Any, Any]:
        """(LlavaConfig, LlavaProcessor) of the tiny preset "tiny-llava"; weights come from registry.build_seeded."""
        tokenizer = build_tokenizer()
        return self.config_class()(**tiny_config_dict(tokenizer)), build_processor(tokenizer)

    def random_processor(self) -> Any:
        """The local tokenizer at the real image size."""
        return build_processor(image_size=REAL_IMAGE_SIZE)

    def processor_from(self, path: Any, tokenizer: Any, image_processor: Any, chat_template: str) -> Any:
        return llava_processor(path, tokenizer, image_processor, chat_template)

    def check_config(self, config: Any) -> None:
        """A tower, decoder and feature settings this family exports (`check_parts`), or one InputError."""
        check_parts(config)

    def align_token_ids(self, config: Any, tokenizer: Any) -> None:
        ids = special_token_ids(tokenizer)
        config.image_token_index = ids["image_token_index"]
        text = config.get_text_config()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(text, name, ids[name])

    def spatial_merge(self, model: Any) -> int:
        return 1  # one LLM token per tower patch

    # --- images -------------------------------------------------------------------------------------------

    def image_host(self, processor_config: dict[str, Any], *, max_pixels: int | None = None) -> ClipImages:
        """The CLIP / SigLIP processor's resize (and CLIP's center crop) on the host. `max_pixels` has no effect:
        every image is sized to one fixed size; a cap below it is refused (it cannot shrink)."""
        return ClipImages.from_config(processor_config, max_pixels=max_pixels)

    # --- the vision graph -----------------------------------------------------------------------------------

    def cap_pixels(self, processor: Any, max_pixels: int) -> Any:
        """Every image is cropped to one size: a cap at or above it changes nothing (the processor is returned as it
        is), one below it is refused (ClipImages.from_config says why)."""
        self.image_host(processor.to_dict(), max_pixels=max_pixels)
        return processor

    def vision_export(self, loaded: LoadedModel, image_size: tuple[int, int], dtype: torch.dtype) -> VisionExport:
        """The vision graph at the processor's size, all shapes fixed (the towers' position embeddings are): its
        example is an image of `image_size` (height, width, as sent; any size) as `image_host(...).prepare` makes
        it, i.e. always the processed size, which must be the vision tower's image_size."""
        import torch

        host = self.image_host(loaded.processor.to_dict())
        h, w = (int(x) for x in image_size)
        crop = host.processed_size(h, w)
        vision = loaded.model.config.vision_config
        tower = (int(vision.image_size), int(vision.image_size))
        if crop != tower:
            raise InputError(
                f"the processor (processor_config.json / preprocessor_config.json) makes images {crop[1]}x{crop[0]} "
                f"but the vision tower (config.json vision_config.image_size) takes {tower[1]}x{tower[0]}: the two "
                "files are from different checkpoints."
            )
        check_parts(loaded.model.config)  # a strategy that leaves other than one token per patch is refused
        pixels = host.prepare(example_image(h, w)).feeds[contract.PIXEL_VALUES]  # [1, 3, crop_h, crop_w]
        example = {contract.PIXEL_VALUES: torch.from_numpy(pixels).to(dtype)}
        return VisionExport(module=vision_graph(loaded.model), example=example, dynamic_shapes=None)

    # --- requests -------------------------------------------------------------------------------------------

    def check_inputs(self, processor: Any, images: list, prompt: str) -> None:
        """Reject what the processor would fail on obscurely, with a message that says why (any size is resized
        and center-cropped)."""
        check_request(images, prompt)

    def process(self, processor: Any, images: list, prompt: str) -> dict[str, torch.Tensor]:
        """Processor outputs for one request (CPU tensors; needs only the processor): input_ids,
        attention_mask [1, S], pixel_values [N_images, 3, H, W] float32.

        The user's text is tokenized as plain text (transformers' `sanitize_control_tokens`): a typed `<image>`,
        `<s>` or `</s>` becomes ordinary text tokens, so a prompt can add no image slot nor end the sequence.
        transformers refuses that mode while the tokenizer itself adds <s> (LLaVA's templates do not write it), so
        the template is tokenized without special tokens and <s> is put in front here, as the tokenizer would: for
        a prompt without control tokens the ids are exactly those of `processor(text=chat_text(...), images=...)`.
        """
        import torch

        self.check_inputs(processor, images, prompt)
        messages = user_turn(images, prompt)
        try:
            out = processor.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                sanitize_control_tokens=True,
                processor_kwargs={"add_special_tokens": False},
            )
        except ValueError as exc:
            raise InputError(f"the processor rejected the request: {exc}") from None
        input_ids, attention_mask = out["input_ids"], out["attention_mask"]  # [1, S]
        prefix = special_prefix(processor.tokenizer)
        if prefix and input_ids[0, : len(prefix)].tolist() != prefix:  # a template that writes <s> keeps its own
            lead = torch.tensor([prefix], dtype=input_ids.dtype)  # [1, P]
            input_ids = torch.cat([lead, input_ids], dim=1)  # [1, S]
            attention_mask = torch.cat([torch.ones_like(lead, dtype=attention_mask.dtype), attention_mask], dim=1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": out["pixel_values"].float()}

    def vision_embeddings(self, loaded: LoadedModel, processed: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tower at vision_feature_layer (CLS dropped where it has one) through the projector: [N_vis, D], images
        in order."""
        import torch

        model = loaded.model
        pixel_values = processed["pixel_values"].to(model.device, model.dtype)  # [N_images, 3, H, W]
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)  # [N_vis, D]

    def spans(self, processor: Any, processed: dict[str, torch.Tensor], image_token_id: int) -> list[list[VisionSpan]]:
        """Per batch row, each image's run of placeholder tokens as a VisionSpan with its grid (every image is
        cropped to one size, so one grid for all)."""
        height, width = processed["pixel_values"].shape[-2:]
        grid = token_grid(processor, int(height), int(width))
        n_images = processed["pixel_values"].shape[0]
        hint = "does vision_feature_select_strategy leave one token per patch (CLIP 'default', SigLIP 'full')?"
        return spans_on_grids(processed["input_ids"], image_token_id, [grid] * n_images, hint)

    def embed_and_position(
        self, loaded: LoadedModel, processed: dict[str, torch.Tensor], vision_embeds: torch.Tensor
    ) -> PrefillInputs:
        """Text embeddings with the vision embeddings scattered into the placeholders, and 1-D RoPE positions."""
        import torch

        model = loaded.model
        with torch.no_grad():
            processed, embeds = self.embed(loaded, processed, vision_embeds)  # [B, S, D]
        input_ids = processed["input_ids"]  # [B, S]
        row_spans = self.spans(loaded.processor, processed, int(model.config.image_token_index))
        mask = processed["attention_mask"]  # [B, S]
        lengths = mask.sum(dim=1)  # [B] real tokens per row
        if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None] < lengths[:, None]):
            raise InputError("attention_mask must be right-padded (real tokens first): positions count from 0 there.")
        hosts = [self.positions.host(int(n), row) for n, row in zip(lengths.tolist(), row_spans, strict=True)]
        position_ids = torch.from_numpy(self.positions.batch([ids for ids, _ in hosts], input_ids.shape[1]))
        decode_offset = torch.tensor([[delta] for _, delta in hosts], dtype=torch.long)  # [B, 1], all 0
        return PrefillInputs(
            inputs_embeds=embeds,
            position_ids=position_ids.to(model.device),  # [B, S]
            attention_mask=processed["attention_mask"],
            input_ids=input_ids,
            spans=row_spans,
            decode_offset=decode_offset.to(model.device),
        )
