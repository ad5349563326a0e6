"""The tiny presets' kit: a Qwen-style tokenizer, its chat template, a small image processor and the decoder
sizes and seed every tiny preset shares, built locally with no download. No family is named here: each family
module builds its own tiny preset from these pieces with its own classes and vision settings
(`Family.tiny_preset`).

Everything here is a pure function of the code: the tokenizer is a byte-level BPE trained on a built-in corpus
(the `tokenizers` trainer is deterministic for a fixed corpus), the weights come from a fixed seed, and the
image processor keeps images small. Two builds, in any process on any machine, are bit-identical.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

# The Qwen special tokens, in the real checkpoints' order (their ids follow the learned vocabulary here).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
BPE_VOCAB = 512  # byte alphabet (256) + learned merges

CORPUS = """\
You are a helpful assistant. Describe this image. What is in the picture? Describe the image in detail.
The image shows a red square, a blue circle and a green triangle on a white background.
There is a cat sitting on a wooden table next to a cup of coffee. A dog runs across the grass in the park.
How many objects are there? What colour is the car? Where is the person standing? Is it day or night?
The photo was taken in a city street with tall buildings, cars, trees and people walking on the sidewalk.
A chart with bars and lines: the values increase from left to right, and the title is at the top.
Read the text in the image. The sign says: open from 9 to 5, Monday to Friday. Numbers 0 1 2 3 4 5 6 7 8 9.
The answer is yes. The answer is no. There are two apples, three oranges and one banana in the bowl.
Gradient patterns, stripes, checkerboards, edges and corners help a vision model see structure.
"""

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Image processor: patch 14, merge 2, so one LLM token covers 28 x 28 pixels. At most 256 LLM tokens per image
# (the default 336 x 448 image gives a 12 x 16 grid = 192), at least 2 x 2.
TOKEN_PIXELS = 28 * 28
MIN_PIXELS = TOKEN_PIXELS * 4
MAX_PIXELS = TOKEN_PIXELS * 256

# The decoder sizes of every tiny preset (each family adds its own positional and vision settings).
TINY_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
}
SEED = 1234


def train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE (vocab, merges) learned from CORPUS; deterministic for a fixed corpus."""
    # Qwen2Tokenizer's own split, so the learned merges apply to the same pieces at encode time.
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


QWEN_MEDIA_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}


def build_tokenizer(
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
    media_tokens: dict[str, str] | None = None,
    chat_template: str = CHAT_TEMPLATE,
) -> Any:
    """transformers' Qwen2Tokenizer over the locally learned BPE, with `special_tokens` appended in order and the
    tokenizer's named media tokens (default: the Qwen-VL special tokens, image and video pads, ChatML template)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe()
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(QWEN_MEDIA_TOKENS if media_tokens is None else media_tokens),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.chat_template = chat_template
    return tokenizer


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The config fields that name special tokens, read from the tokenizer so the two always agree."""
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def build_image_processor(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Any:
    """Qwen2-VL's PIL image processor (no torchvision needed), patch 14, merge 2."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )


def build_processor(processor_class: type, tokenizer: Any | None = None, image_processor: Any | None = None) -> Any:
    """A transformers `processor_class` (a family's, made image-only by `image_only_processor`) over a (locally
    built) tokenizer and the PIL image processor."""
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    image_processor = build_image_processor() if image_processor is None else image_processor
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


@functools.cache
def image_only_processor(parent: type) -> type:
    """`parent` (a transformers processor class) accepting no video processor.

    transformers' Qwen-VL processors require a video processor, which needs torchvision (not installed here,
    and images are all this project feeds). The subclass keeps the parent's name, so saved processor files
    name the real class and load with AutoProcessor wherever torchvision is present.
    """

    @classmethod
    def get_attributes(cls) -> list[str]:
        return [name for name in parent.get_attributes() if name != "video_processor"]

    return type(parent.__name__, (parent,), {"get_attributes": get_attributes})
