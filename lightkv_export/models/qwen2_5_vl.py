"""Qwen2.5-VL family: the Qwen2-VL glue (models/qwen2_vl.py) with Qwen2.5-VL's classes and real hyper-parameters.

The differences that matter here live inside transformers' modeling code (a windowed-attention vision encoder
with RMSNorm and SwiGLU, a separate `out_hidden_size`); the layout the method and the exporter see is the same.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lightkv_export.models.family import register_family
from lightkv_export.models.qwen2_vl import Qwen2VL

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


@register_family("qwen2_5_vl", model_types=("qwen2_5_vl",))
class Qwen25VL(Qwen2VL):
    hf_id = HF_ID
    real_text: ClassVar[dict[str, Any]] = REAL_TEXT
    real_vision: ClassVar[dict[str, Any]] = REAL_VISION
    tie_word_embeddings = False

    def model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def config_class(self) -> type:
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig
