"""LLaVA checkpoints read their parts from config.json (issue 30): a SigLIP tower with a Qwen2 decoder, the layout of
llava-hf/llava-interleave-qwen-0.5b-hf, at toy size, written here from public transformers classes. Before, its
build stopped in the exporter with a traceback ('SiglipVisionModel' object has no attribute 'pre_layrnorm'); a
checkpoint whose tower or decoder no family supports must be one message, exit 2, before any export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightkv_export import contract
from lightkv_export.config import BuildConfig
from lightkv_export.errors import InputError
from lightkv_export.models import llava, tiny
from lightkv_export.models.registry import build_seeded, get_family, load_local

ROOT = Path(__file__).resolve().parents[2]
LLAVA = get_family("llava")
# 100 px / patch 14: a 7 x 7 grid with 2 px the valid convolution drops, as SigLIP's 384 / 14 = 27 drops 6.
IMAGE_SIZE, SIDE = 100, 7
FEATURE_LAYERS = [-1, 1]  # two of the tower's 3 + 1 hidden states, concatenated: the projector takes 2 x 32


def siglip_qwen2_config(tokenizer) -> object:
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        vision_use_head=False,
    )
    text = Qwen2Config(
        **tiny.TINY_DECODER,  # the tiny presets' decoder sizes: the checkpoint takes tiny-llava's tolerances
        head_dim=16,
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=FEATURE_LAYERS,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token
        image_token_index=tokenizer.convert_tokens_to_ids(llava.IMAGE_TOKEN),
        image_seq_length=SIDE * SIDE,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A toy llava-interleave-qwen: config, seeded safetensors weights, tokenizer, processor and chat template."""
    from transformers import LlavaProcessor

    directory = tmp_path_factory.mktemp("siglip-qwen2")
    tokenizer = llava.build_qwen_tokenizer()
    config = siglip_qwen2_config(tokenizer)
    build_seeded(LLAVA, config, None).save_pretrained(directory)
    LlavaProcessor(
        image_processor=llava.build_siglip_image_processor(IMAGE_SIZE),
        tokenizer=tokenizer,
        chat_template=llava.QWEN_CHAT_TEMPLATE,
        patch_size=14,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_local(checkpoint)


def noise(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_parts_come_from_the_config(loaded):
    model = loaded.model
    assert type(llava.vision_model(model)).__name__ == "SiglipVisionModel"
    assert type(LLAVA.text_model(model)).__name__ == "Qwen2Model"
    assert type(loaded.processor.image_processor).__name__ == "SiglipImageProcessorPil"
    arch = LLAVA.arch(model.config)
    assert arch.qkv_bias  # Qwen2's q/k/v biases, read off the model (LLaVA-1.5's Llama has none)
    assert not LLAVA.arch(LLAVA.tiny_preset()[0]).qkv_bias
    assert model.model.multi_modal_projector.linear_1.in_features == 2 * 32  # two feature layers concatenated


def test_host_pixels_equal_the_processor_and_the_graph_equals_the_model(loaded, checkpoint):
    """The engine's image side (numpy + PIL) against the checkpoint's own SigLIP processor, bit for bit; the vision
    graph (no CLS dropped, layers -1 and 1 concatenated, SigLIP's post_layernorm not applied) against
    get_image_features."""
    host = LLAVA.image_host(json.loads((checkpoint / "processor_config.json").read_text()))
    graph = llava.vision_graph(loaded.model)
    for i, (width, height) in enumerate([(100, 100), (137, 61), (40, 300), (1001, 999)]):
        image = noise(width, height, seed=i)
        processed = LLAVA.process(loaded.processor, [image], "Describe.")
        prepared = host.prepare(image)
        np.testing.assert_array_equal(prepared.feeds[contract.PIXEL_VALUES], processed["pixel_values"].numpy())
        assert prepared.layout.grids == ((SIDE, SIDE),) and prepared.size == (IMAGE_SIZE, IMAGE_SIZE)
        (span,) = LLAVA.spans(loaded.processor, processed, int(loaded.model.config.image_token_index))[0]
        assert (span.grid, span.length) == ((SIDE, SIDE), SIDE * SIDE)
        with torch.no_grad():
            got = graph(processed["pixel_values"])  # [49, 64]
        want = LLAVA.vision_embeddings(loaded, processed)
        assert got.shape == want.shape == (SIDE * SIDE, 64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_siglip_qwen2_checkpoint_builds_and_passes_parity(checkpoint, tmp_path):
    from lightkv_export import pipeline

    result = pipeline.run(BuildConfig(model=str(checkpoint), ratio=0.55, out=tmp_path / "engines"))
    (engine_dir,) = result.engine_dirs.values()
    parity = json.loads((engine_dir / "parity.json").read_text())
    assert parity["passed"]
    levels = {check["level"] for check in parity["checks"]}
    assert levels == {"op", "model", "identity"}
    # The identity level holds the engine's merge-nothing prefill and the vanilla export to the Hugging Face model's
    # logits, on every case.
    identity = {check["output"] for check in parity["checks"] if check["level"] == "identity"}
    assert {"merge-nothing-logits", "vanilla-export-logits"} <= identity and parity["identity_cases"]
    assert all(check["passed"] for check in parity["checks"])
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["reference_request"]["image_layouts"] == [[[SIDE, SIDE]]]
    assert manifest["family"] == "llava"


def unsupported_checkpoint(directory: Path, part: str) -> Path:
    """A LLaVA config.json (no weights: the refusal must come first) whose tower is Pixtral or decoder Gemma."""
    from transformers import CLIPVisionConfig, GemmaConfig, LlamaConfig, LlavaConfig, PixtralVisionConfig

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    if part == "tower":
        config = LlavaConfig(vision_config=PixtralVisionConfig(**small), text_config=LlamaConfig(**small))
    else:
        config = LlavaConfig(vision_config=CLIPVisionConfig(**small), text_config=GemmaConfig(**small))
    config.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_an_unsupported_tower_is_one_message_exit_2(tmp_path):
    directory = unsupported_checkpoint(tmp_path / "pixtral", "tower")
    out = subprocess.run(
        [sys.executable, str(ROOT / "build.py"), "--model", str(directory), "--out", str(tmp_path / "engines")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "vision_config model_type 'pixtral' (PixtralVisionConfig)" in out.stderr
    assert "SigLIP (siglip_vision_model)" in out.stderr and "Qwen2 (qwen2)" in out.stderr  # what is supported
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())  # nothing exported


def test_an_unsupported_decoder_is_refused_as_the_checkpoint_loads(tmp_path):
    directory = unsupported_checkpoint(tmp_path / "gemma", "decoder")
    with pytest.raises(InputError, match=r"text_config model_type 'gemma' \(GemmaConfig\).*decoders Llama"):
        load_local(directory)  # config.json alone: refused before the missing weights are looked for


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"vision_feature_select_strategy": "default"}, "drops a patch token"),  # SigLIP has no CLS to drop
        ({"vision_feature_layer": [-1, 4]}, r"vision_feature_layer \[-1, 4\]: each must index"),
        ({"text_config": {"use_sliding_window": True, "sliding_window": 64}}, "sliding window of 64 tokens"),
    ],
)
def test_settings_that_are_not_one_token_per_patch_are_refused(change, match):
    tokenizer = llava.build_qwen_tokenizer()
    config = siglip_qwen2_config(tokenizer)
    for name, value in change.items():
        if name == "text_config":
            for key, v in value.items():
                setattr(config.text_config, key, v)
            config.text_config.layer_types = ["sliding_attention"] * config.text_config.num_hidden_layers
        else:
            setattr(config, name, value)
    with pytest.raises(InputError, match=match):
        llava.check_parts(config)
