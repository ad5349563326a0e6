"""Qwen2-VL family, and the Qwen-VL glue shared with Qwen2.5-VL (models/qwen2_5_vl.py reuses these functions).

Both families have the same outer layout: `model.model.visual` (vision encoder + patch merger),
`model.model.language_model` (decoder stack with M-RoPE), `model.lm_head`, and a processor that expands one
<|image_pad|> per image into (h / merge) * (w / merge) placeholder tokens. Only the classes and the real
checkpoints' hyper-parameters differ.

`prepare` = `process` -> `vision_embeddings` -> `embed_and_position`; the exporter calls the three parts on
their own (the vision encoder and the language model are exported separately).
"""

from __future__ import annotations

from typing import Any

import torch

from lightkv_export.errors import InputError
from lightkv_export.models.base import LoadedModel, PrefillInputs, VisionSpan
from lightkv_export.models.positions import MROPE

FAMILY = "qwen2_vl"
MODEL_TYPE = "qwen2_vl"  # config.json model_type
HF_ID = "Qwen/Qwen2-VL-2B-Instruct"
POSITIONS = MROPE  # position_ids [3, B, S]

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


def model_class() -> type:
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration


def config_class() -> type:
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig


def real_config_dict() -> dict[str, Any]:
    """Keyword arguments of Qwen2VLConfig for the real checkpoint's architecture."""
    return {"text_config": dict(REAL_TEXT), "vision_config": dict(REAL_VISION), "tie_word_embeddings": True}


# --- shared Qwen-VL glue (also used by qwen2_5_vl) --------------------------------------------------------------


def text_model(model: Any) -> Any:
    """The decoder stack: .layers, .rotary_emb, .norm, .embed_tokens, .config."""
    return model.model.language_model


def lm_head(model: Any) -> Any:
    return model.lm_head


def vision_model(model: Any) -> Any:
    """The vision encoder with its patch merger: (pixel_values, grid_thw) -> [N_vis, D]."""
    return model.model.visual


def spatial_merge(model: Any) -> int:
    return int(model.config.vision_config.spatial_merge_size)


def chat_text(processor: Any, num_images: int, prompt: str) -> str:
    """The chat-formatted prompt: one user turn with the images first, then the text, and the assistant cue.

    For display and layout checks only: tokenizing this string would read control tokens typed in `prompt` as real
    ones; `process` tokenizes the user's text as plain text."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_inputs(processor: Any, images: list, prompt: str) -> None:
    """Reject what the processor would fail on obscurely (or silently mangle), with a message that says why."""
    from PIL import Image

    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; give a question or instruction about the image(s).")
    if not images:
        raise InputError("no image given; these are vision-language models and LightKV compresses vision tokens.")
    patch = int(getattr(processor.image_processor, "patch_size", 14))
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise InputError(f"image {i} is a {type(image).__name__}, expected a PIL.Image.Image.")
        w, h = image.size
        if min(w, h) < patch:
            raise InputError(
                f"image {i} is {w}x{h} pixels, smaller than one {patch}x{patch} patch of the vision encoder; "
                f"give an image at least {patch} pixels on each side."
            )
        if max(w, h) / min(w, h) > 200:
            raise InputError(f"image {i} is {w}x{h} pixels; the processor accepts aspect ratios up to 200.")


def process(loaded: LoadedModel, images: list, prompt: str) -> dict[str, torch.Tensor]:
    """Processor outputs for one request (CPU tensors; needs only `loaded.processor`, so engines without a torch
    model use it too): input_ids, attention_mask, mm_token_type_ids [1, S], pixel_values [N_patches, C*T*P*P] fp32,
    image_grid_thw [N_images, 3].

    The user's text is tokenized as plain text (transformers' `sanitize_control_tokens`: control tokens typed in the
    prompt, such as `<|im_end|>`, `<|im_start|>` or `<|image_pad|>`, become ordinary text tokens), so a prompt can
    neither open another chat turn nor add image placeholders; the template's own control tokens stay real. For a
    prompt without such text the token ids are exactly those of tokenizing `chat_text`."""
    processor = loaded.processor
    check_inputs(processor, images, prompt)
    # The layout of chat_text: one user turn, the images first, then the text.
    content = [{"type": "image", "image": im.convert("RGB")} for im in images] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
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
def vision_embeddings(loaded: LoadedModel, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Vision encoder + merger: [N_vis, D] LLM-width embeddings, images concatenated in order."""
    device = loaded.model.device
    out = loaded.model.model.get_image_features(pixel_values.to(device), image_grid_thw.to(device), return_dict=True)
    return torch.cat(out.pooler_output, dim=0)  # [N_vis, D]


def vision_spans(
    input_ids: torch.Tensor, image_token_id: int, image_grid_thw: torch.Tensor, merge: int
) -> list[list[VisionSpan]]:
    """Per row, each run of image placeholder tokens as a VisionSpan with its LLM token grid (h, w)."""
    grids = [(int(h) // merge, int(w) // merge, int(t)) for t, h, w in image_grid_thw.tolist()]
    spans: list[list[VisionSpan]] = []
    image = 0
    for row in input_ids:
        is_image = (row == image_token_id).tolist()
        row_spans, s = [], 0
        while s < len(is_image):
            if not is_image[s]:
                s += 1
                continue
            e = s
            while e < len(is_image) and is_image[e]:
                e += 1
            if image >= len(grids):
                raise InputError("more image placeholder runs than images; is <|image_pad|> typed in the prompt?")
            h, w, t = grids[image]
            if t != 1 or e - s != h * w:
                raise InputError(
                    f"image {image}: {e - s} placeholder tokens but its grid is {t}x{h}x{w}; "
                    "is <|image_pad|> typed in the prompt?"
                )
            row_spans.append(VisionSpan(start=s, length=e - s, grid=(h, w)))
            image += 1
            s = e
        spans.append(row_spans)
    if image != len(grids):
        raise InputError(f"{len(grids)} images but {image} placeholder runs in the prompt.")
    return spans


@torch.no_grad()
def embed_and_position(
    loaded: LoadedModel, processed: dict[str, torch.Tensor], vision_embeds: torch.Tensor
) -> PrefillInputs:
    """Text embeddings with the vision embeddings scattered into the placeholders, and M-RoPE positions."""
    model = loaded.model
    processed = {k: v.to(model.device) for k, v in processed.items()}
    input_ids = processed["input_ids"]  # [B, S]
    image_token_id = int(model.config.image_token_id)
    embeds = text_model(model).embed_tokens(input_ids)  # [B, S, D]
    placeholder = input_ids == image_token_id  # [B, S]
    if int(placeholder.sum()) != vision_embeds.shape[0]:
        raise InputError(
            f"{int(placeholder.sum())} image placeholder tokens but {vision_embeds.shape[0]} vision embeddings."
        )
    embeds = embeds.masked_scatter(placeholder.unsqueeze(-1), vision_embeds.to(embeds.dtype))  # [B, S, D]
    position_ids, rope_deltas = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=processed["mm_token_type_ids"],
        image_grid_thw=processed["image_grid_thw"],
        attention_mask=processed["attention_mask"],
    )  # [3, B, S], [B, 1]
    spans = vision_spans(input_ids, image_token_id, processed["image_grid_thw"], spatial_merge(model))
    return PrefillInputs(
        inputs_embeds=embeds,
        position_ids=position_ids,
        attention_mask=processed["attention_mask"],
        input_ids=input_ids,
        spans=spans,
        decode_offset=rope_deltas.view(-1, 1),
    )


def prepare(loaded: LoadedModel, images: list, prompt: str) -> PrefillInputs:
    """One request (images + prompt) -> everything the language-model prefill needs."""
    processed = process(loaded, images, prompt)
    vision = vision_embeddings(loaded, processed["pixel_values"], processed["image_grid_thw"])  # [N_vis, D]
    return embed_and_position(loaded, processed, vision)
