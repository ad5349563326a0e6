"""Qwen2.5-VL family: the Qwen2-VL glue (models/qwen2_vl.py) with Qwen2.5-VL's classes and real hyper-parameters.

The differences that matter here live inside transformers' modeling code (a windowed-attention vision encoder
with RMSNorm and SwiGLU, a separate `out_hidden_size`); the layout the method and the exporter see is the same.
"""

from __future__ import annotations

from typing import Any

from lightkv_export.models.qwen2_vl import (
    POSITIONS,
    align_token_ids,
    check_image_size,
    check_inputs,
    embed_and_position,
    lm_head,
    prepare,
    process,
    processor_from_of,
    random_processor_of,
    spans,
    spatial_merge,
    text_model,
    tiny_preset_of,
    vision_embeddings,
    vision_export,
    vision_model,
    vision_spans,
)

__all__ = [
    "POSITIONS",
    "align_token_ids",
    "check_image_size",
    "check_inputs",
    "embed_and_position",
    "lm_head",
    "prepare",
    "process",
    "spans",
    "spatial_merge",
    "text_model",
    "vision_embeddings",
    "vision_export",
    "vision_model",
    "vision_spans",
]

FAMILY = "qwen2_5_vl"
MODEL_TYPE = "qwen2_5_vl"
HF_ID = "Qwen/Qwen2.5-VL-7B-Instruct"

# Qwen2.5-VL-7B-Instruct's config.json, for --random-weights without the checkpoint on disk.
REAL_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
REAL_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}
REAL_MIN_PIXELS = 56 * 56
REAL_MAX_PIXELS = 28 * 28 * 16384


def model_class() -> type:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


def config_class() -> type:
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig


def real_config_dict(hf_id: str = HF_ID) -> dict[str, Any]:
    """Keyword arguments of Qwen2_5_VLConfig for the real checkpoint's architecture."""
    return {"text_config": dict(REAL_TEXT), "vision_config": dict(REAL_VISION), "tie_word_embeddings": False}


def tiny_preset() -> tuple[Any, Any]:
    return tiny_preset_of(FAMILY, config_class())


def random_processor() -> Any:
    return random_processor_of(FAMILY, REAL_MIN_PIXELS, REAL_MAX_PIXELS)


def processor_from(path: Any, tokenizer: Any, image_processor: Any, chat_template: str) -> Any:
    return processor_from_of(FAMILY, tokenizer, image_processor, chat_template)
