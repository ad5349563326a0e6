"""Qwen2-VL family (`Qwen2VL`), and the Qwen-VL glue Qwen2.5-VL inherits (models/qwen2_5_vl.py).

Both families have the same outer layout: `model.model.visual` (vision encoder + patch merger),
`model.model.language_model` (decoder stack with M-RoPE), `model.lm_head`, and a processor that expands one
<|image_pad|> per image into (h / merge) * (w / merge) placeholder tokens. Only the classes and the real
checkpoints' hyper-parameters differ.

`prepare` = `process` -> `vision_embeddings` -> `embed_and_position` (models/family.py); the exporter calls the
parts on their own (the vision encoder and the language model are exported separately).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import AttentionInterface

from lightkv_export.errors import InputError
from lightkv_export.models import tiny
from lightkv_export.models.base import (
    LoadedModel,
    PrefillInputs,
    VisionExport,
    VisionSpan,
    attention_implementation,
    check_request,
    spans_on_grids,
    user_turn,
)
from lightkv_export.models.family import Family, register_family
from lightkv_export.models.positions import MROPE

HF_ID = "Qwen/Qwen2-VL-2B-Instruct"

# Qwen2-VL-2B-Instruct's config.json, for --random-weights without the checkpoint on disk.
REAL_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
REAL_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "num_heads": 16,
    "mlp_ratio": 4,
    "hidden_size": 1536,  # the merger's output = the LLM width
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
# The real processors' pixel budget (preprocessor_config.json): 4 to 16384 LLM tokens per image.
REAL_MIN_PIXELS = 56 * 56
REAL_MAX_PIXELS = 28 * 28 * 16384


# --- Qwen-VL helpers (pure functions of a model, processor or tensors) ---------------------------------------


def vision_model(model: Any) -> Any:
    """The vision encoder with its patch merger: (pixel_values, grid_thw) -> [N_vis, D]."""
    return model.model.visual


def chat_text(processor: Any, num_images: int, prompt: str) -> str:
    """The chat-formatted prompt: one user turn with the images first, then the text, and the assistant cue.

    For display and layout checks only: tokenizing this string would read control tokens typed in `prompt` as real
    ones; `process` tokenizes the user's text as plain text."""
    return processor.apply_chat_template(user_turn(num_images, prompt), add_generation_prompt=True, tokenize=False)


def vision_spans(
    input_ids: torch.Tensor, image_token_id: int, image_grid_thw: torch.Tensor, merge: int
) -> list[list[VisionSpan]]:
    """Per row, each run of image placeholder tokens as a VisionSpan with its LLM token grid (h, w)."""
    if any(int(t) != 1 for t, _, _ in image_grid_thw.tolist()):
        raise InputError("a video (temporal patches > 1) was given; these engines take images only.")
    grids = [(int(h) // merge, int(w) // merge) for _, h, w in image_grid_thw.tolist()]
    return spans_on_grids(input_ids, image_token_id, grids, "is <|image_pad|> typed in the prompt?")


# --- the vision graph ---------------------------------------------------------------------------------------------

VISION_ATTENTION = "lightkv_flash_varlen_export"  # "flash" in the name: transformers then passes cu_seqlens


def varlen_attention(module, query, key, value, attention_mask, *, scaling=None, cu_seq_lens_q=None, **_kwargs):
    """Attention within each packed segment of the vision sequence, as one masked SDPA.

    The vision encoders attend inside windows / images given by cumulative lengths. Transformers' SDPA path
    splits the sequence with `.tolist()` (untraceable); its flash path hands the attention function
    `cu_seq_lens_q` instead, which this turns into a block-diagonal mask with tensor ops only.
    query / key / value [1, H, N, d]; returns [1, N, H, d] as a flash implementation does.
    """
    n = query.shape[2]
    segment = (torch.arange(n)[:, None] >= cu_seq_lens_q[None, 1:]).sum(-1)  # [N] segment of each token
    mask = segment[:, None] == segment[None, :]  # [N, N]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register(VISION_ATTENTION, varlen_attention)


def vision_layout(visual: torch.nn.Module, grid_thw: torch.Tensor) -> dict[str, Any]:
    """The encoder's data-dependent layout tensors for one grid, computed eagerly so the graph holds constants
    (transformers' vision encoders pop these precomputed values from their kwargs)."""
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

    cfg = visual.config
    layout: dict[str, Any] = {"position_ids": get_vision_position_ids(grid_thw, visual.spatial_merge_size)}
    layout["cu_seqlens"], _ = get_vision_attention_seqlens(grid_thw, cfg)
    layout["max_seqlen"] = int((layout["cu_seqlens"][1:] - layout["cu_seqlens"][:-1]).max())
    if hasattr(visual, "window_size"):  # Qwen2.5-VL's windowed blocks
        from transformers.vision_utils import get_vision_window_index

        layout["window_index"], layout["cu_window_seqlens"] = get_vision_window_index(
            grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        lengths = layout["cu_window_seqlens"][1:] - layout["cu_window_seqlens"][:-1]
        layout["max_window_seqlen"] = int(lengths.max())
    return layout


class VisionGraph(torch.nn.Module):
    """Vision encoder + merger for one image of a fixed patch grid (the engine's image-size profile)."""

    def __init__(self, loaded: LoadedModel, grid_thw: tuple[int, int, int]) -> None:
        super().__init__()
        self.loaded = loaded
        self.visual = vision_model(loaded.model)  # registers the weights as this module's parameters
        self.grid = torch.tensor([grid_thw], dtype=torch.long)
        self.layout = vision_layout(self.visual, self.grid)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with attention_implementation(self.visual.config, VISION_ATTENTION):  # traced: the graph has the mask
            out = self.loaded.model.model.get_image_features(
                pixel_values, self.grid, return_dict=True, **dict(self.layout)
            )
        return torch.cat(out.pooler_output, dim=0)  # [N_vis, D]


def patch_grid(processor: Any, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """(t, h, w) patch grid of one image of exactly `image_size` pixels (height, width).

    The engine's vision graph is built for one grid, so the processor must keep the profile's size as it is:
    each side a multiple of patch * merge (28 for Qwen-VL), the pixel count within the processor's budget, the
    aspect ratio at most 200. Anything else is refused before any work, with a size that would be served.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    features = processor.image_processor
    factor = features.patch_size * features.merge_size
    size = features.size
    low, high = int(size["shortest_edge"]), int(size["longest_edge"])  # the processor's min / max pixels
    h, w = image_size
    problem = None
    if h < 1 or w < 1 or max(h, w) / min(h, w) > 200:
        problem = "its aspect ratio is above 200 (the processor's limit)" if min(h, w) >= 1 else "it is empty"
    elif h % factor or w % factor:
        problem = (
            f"a side is not a positive multiple of {factor} (patch {features.patch_size} x merge {features.merge_size})"
        )
    elif not low <= h * w <= high:
        problem = f"{h * w:,} pixels are outside the processor's {low:,} to {high:,}"
    if problem is None:
        return 1, h // features.patch_size, w // features.patch_size
    hint = ""
    if min(h, w) >= 1 and max(h, w) / min(h, w) <= 200:
        sh, sw = smart_resize(h, w, factor=factor, min_pixels=low, max_pixels=high)
        hint = f" The nearest size this model serves is {sw}x{sh}."
    raise InputError(
        f"image size {w}x{h} (width x height) cannot be an engine profile: {problem}. Use a WIDTHxHEIGHT with "
        f"both sides multiples of {factor} and {low:,} to {high:,} pixels in all.{hint}"
    )


# --- the family -----------------------------------------------------------------------------------------------


@register_family("qwen2_vl", model_types=("qwen2_vl",))
class Qwen2VL(Family):
    """Qwen2-VL, and the Qwen-VL glue Qwen2.5-VL inherits (models/qwen2_5_vl.py changes classes and sizes)."""

    hf_id = HF_ID
    positions = MROPE  # position_ids [3, B, S]
    vision = "qwen"
    qkv_bias = True
    real_text: ClassVar[dict[str, Any]] = REAL_TEXT
    real_vision: ClassVar[dict[str, Any]] = REAL_VISION
    tie_word_embeddings = True
    # The real processors' pixel budget (preprocessor_config.json): 4 to 16384 LLM tokens per image.
    real_min_pixels, real_max_pixels = REAL_MIN_PIXELS, REAL_MAX_PIXELS

    def model_class(self) -> type:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def config_class(self) -> type:
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig

    def real_config_dict(self, hf_id: str | None = None) -> dict[str, Any]:
        """Keyword arguments of the config class for the real checkpoint's architecture (one size per family)."""
        return {
            "text_config": dict(self.real_text),
            "vision_config": dict(self.real_vision),
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    def tiny_preset(self) -> tuple[Any, Any]:
        """(config, processor) of the tiny preset (models/tiny.py); the registry seeds the weights."""
        tokenizer = tiny.build_tokenizer()
        config = self.config_class()(**tiny.tiny_config_dict(self.name, tokenizer))
        return config, tiny.build_processor(self.name, tokenizer)

    def random_processor(self) -> Any:
        image_processor = tiny.build_image_processor(self.real_min_pixels, self.real_max_pixels)
        return tiny.build_processor(self.name, tiny.build_tokenizer(), image_processor)

    def processor_from(self, path: Any, tokenizer: Any, image_processor: Any, chat_template: str) -> Any:
        """The processor over a checkpoint's tokenizer and PIL image processor (no video processor: that needs
        torchvision, and only images are fed)."""
        processor_class = tiny.image_only_processor(self.name)
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)

    def align_token_ids(self, config: Any, tokenizer: Any) -> None:
        ids = tiny.special_token_ids(tokenizer)
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            setattr(config, name, ids[name])
        text = config.get_text_config()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(text, name, ids[name])

    def spatial_merge(self, model: Any) -> int:
        return int(model.config.vision_config.spatial_merge_size)

    # --- the vision graph -----------------------------------------------------------------------------------

    def check_image_size(self, processor: Any, image_size: tuple[int, int]) -> None:
        """Refuse an image-size profile the processor would resize (see patch_grid), before any work."""
        patch_grid(processor, image_size)

    def vision_export(self, loaded: LoadedModel, image_size: tuple[int, int], dtype: torch.dtype) -> VisionExport:
        """The vision graph for one image of exactly `image_size` (height, width): pixel_values
        [N_patches, C*T*P*P]."""
        t, h, w = patch_grid(loaded.processor, image_size)
        features = loaded.processor.image_processor
        width = 3 * features.temporal_patch_size * features.patch_size**2
        pixels = torch.randn(t * h * w, width, dtype=dtype)  # [N_patches, F]
        merge = int(features.merge_size)
        return VisionExport(VisionGraph(loaded, (t, h, w)), pixels, (h // merge, w // merge))

    # --- requests -------------------------------------------------------------------------------------------

    def check_inputs(self, processor: Any, images: list, prompt: str) -> None:
        """Reject what the processor would fail on obscurely (or silently mangle), with a message that says why."""
        check_request(images, prompt, min_side=int(getattr(processor.image_processor, "patch_size", 14)))

    def process(self, processor: Any, images: list, prompt: str) -> dict[str, torch.Tensor]:
        """Processor outputs for one request (CPU tensors; needs only the processor, so engines without a
        torch model use it too): input_ids, attention_mask, mm_token_type_ids [1, S], pixel_values
        [N_patches, C*T*P*P] fp32, image_grid_thw [N_images, 3].

        The user's text is tokenized as plain text (transformers' `sanitize_control_tokens`: control tokens typed
        in the prompt, such as `<|im_end|>`, `<|im_start|>` or `<|image_pad|>`, become ordinary text tokens), so a
        prompt can neither open another chat turn nor add image placeholders; the template's own control tokens
        stay real. For a prompt without such text the token ids are exactly those of tokenizing `chat_text`."""
        self.check_inputs(processor, images, prompt)
        messages = user_turn(images, prompt)  # the layout of chat_text: one user turn, the images first
        try:
            out = processor.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                sanitize_control_tokens=True,
            )
        except ValueError as exc:
            raise InputError(f"the processor rejected the request: {exc}") from None
        keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
        return {k: out[k] for k in keys}

    @torch.no_grad()
    def vision_embeddings(self, loaded: LoadedModel, processed: dict[str, torch.Tensor]) -> torch.Tensor:
        """Vision encoder + merger on `process`'s pixels: [N_vis, D] LLM-width embeddings, images in order."""
        device = loaded.model.device
        pixels, grid_thw = processed["pixel_values"].to(device), processed["image_grid_thw"].to(device)
        out = loaded.model.model.get_image_features(pixels, grid_thw, return_dict=True)
        return torch.cat(out.pooler_output, dim=0)  # [N_vis, D]

    def spans(self, processor: Any, processed: dict[str, torch.Tensor], image_token_id: int) -> list[list[VisionSpan]]:
        """The vision spans of `process`'s output, each image on its LLM token grid (patch grid / merge)."""
        merge = int(processor.image_processor.merge_size)
        return vision_spans(processed["input_ids"], image_token_id, processed["image_grid_thw"], merge)

    @torch.no_grad()
    def embed_and_position(
        self, loaded: LoadedModel, processed: dict[str, torch.Tensor], vision_embeds: torch.Tensor
    ) -> PrefillInputs:
        """Text embeddings with the vision embeddings scattered into the placeholders, and M-RoPE positions."""
        model = loaded.model
        processed, embeds = self.embed(loaded, processed, vision_embeds)  # [B, S, D]
        input_ids = processed["input_ids"]  # [B, S]
        image_token_id = int(model.config.image_token_id)
        position_ids, rope_deltas = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=processed["mm_token_type_ids"],
            image_grid_thw=processed["image_grid_thw"],
            attention_mask=processed["attention_mask"],
        )  # [3, B, S], [B, 1]
        spans = vision_spans(input_ids, image_token_id, processed["image_grid_thw"], self.spatial_merge(model))
        return PrefillInputs(
            inputs_embeds=embeds,
            position_ids=position_ids,
            attention_mask=processed["attention_mask"],
            input_ids=input_ids,
            spans=spans,
            decode_offset=rope_deltas.view(-1, 1),
        )
