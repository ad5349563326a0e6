"""The LLaVA-1.5 family module (models/llava.py) on its tiny preset: real transformers classes at toy size."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from lightkv_export import contract
from lightkv_export.errors import InputError
from lightkv_export.method.spans import ImageLayout, VisionSpan
from lightkv_export.models import llava, registry
from lightkv_export.models.base import LoadedModel
from lightkv_export.models.family import FAMILIES
from tests.helpers import state_checksum

LLAVA = FAMILIES["llava"]
SIDE = llava.TINY_IMAGE_SIZE // 14  # 16 tokens per side
N_VIS = SIDE * SIDE  # 256 per image

VOCAB_SNIPPET = """
import hashlib, json
from lightkv_export.models import llava
print(hashlib.sha256(json.dumps(llava.train_llama_bpe()).encode()).hexdigest())
"""


@pytest.fixture(scope="module")
def tiny_llava() -> LoadedModel:
    """The tiny preset as the registry will load it: seeded float32 weights, a borrowed spec."""
    config, processor = LLAVA.tiny_preset()
    model = registry.build_seeded(LLAVA, config, torch.float32)
    spec = replace(registry.get_spec("tiny-qwen-vl"), key="tiny-llava", family="llava", hf_id=llava.HF_ID)
    return LoadedModel(spec=spec, model=model, processor=processor, family=LLAVA)


@pytest.fixture(scope="module")
def other_image() -> Image.Image:
    """A second, different picture: a tilted green rectangle on yellow, not square (the processor crops it)."""
    return Image.new("RGB", (280, 224), (10, 200, 90)).rotate(30, fillcolor=(240, 240, 20))


def image_runs(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each run of image tokens in one row, computed independently of llava.spans."""
    runs, start = [], None
    flags = [*(input_ids == image_token_id).tolist(), False]  # a sentinel closes a trailing run
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


# --- architecture and configs -----------------------------------------------------------------------------------


def test_tiny_architecture_and_special_ids(tiny_llava):
    model, tokenizer = tiny_llava.model, tiny_llava.processor.tokenizer
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    text = LLAVA.text_model(model)
    assert len(text.layers) == 8 and text.config.hidden_size == 64 and text.config.head_dim == 16
    assert text.config.num_key_value_heads == 2 and text.config.vocab_size == len(tokenizer)
    assert len(llava.vision_model(model).encoder.layers) == 2
    assert LLAVA.lm_head(model) is model.lm_head and LLAVA.lm_head(model).weight is not text.embed_tokens.weight
    assert LLAVA.spatial_merge(model) == 1
    assert (
        model.config.image_token_index
        == tokenizer.convert_tokens_to_ids("<image>")
        == tiny_llava.processor.image_token_id
    )
    assert tokenizer.convert_ids_to_tokens(text.config.bos_token_id) == "<s>"
    assert tokenizer.convert_ids_to_tokens(text.config.eos_token_id) == "</s>"
    assert tokenizer.convert_ids_to_tokens(text.config.pad_token_id) == "<pad>"


def test_real_configs_are_llava_1_5():
    for hf_id, layers, hidden, heads, inter in (
        (llava.HF_ID, 32, 4096, 32, 11008),
        (llava.HF_ID_13B, 40, 5120, 40, 13824),
    ):
        config = LLAVA.config_class()(**LLAVA.real_config_dict(hf_id))
        text, vision = config.text_config, config.vision_config
        assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (layers, hidden, heads)
        assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (heads, inter, 32064)
        assert text.rms_norm_eps == 1e-5 and text.rope_parameters["rope_theta"] == 10000.0
        assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (
            336,
            14,
            1024,
            24,
        )
        assert (vision.num_attention_heads, vision.intermediate_size, vision.projection_dim) == (16, 4096, 768)
        assert config.image_token_id == 32000 and config.vision_feature_layer == -2
        assert config.vision_feature_select_strategy == "default" and config.projector_hidden_act == "gelu"
    assert LLAVA.config_class()(**llava.REAL_CONFIG_13B).text_config.num_hidden_layers == 40
    assert LLAVA.real_config_dict()["text_config"]["num_hidden_layers"] == 32  # the default is 7b, unmutated
    with pytest.raises(InputError, match=re.escape(llava.HF_ID)):
        LLAVA.real_config_dict("llava-hf/llava-1.5-70b-hf")


def test_tokenizer_and_weights_are_deterministic(tiny_llava):
    config, processor = LLAVA.tiny_preset()
    assert processor.tokenizer.get_vocab() == tiny_llava.processor.tokenizer.get_vocab()
    model = registry.build_seeded(LLAVA, config, torch.float32)
    assert state_checksum(model) == state_checksum(tiny_llava.model)
    # The BPE trainer runs in Rust: the learned vocabulary must not depend on the process either.
    here = hashlib.sha256(json.dumps(llava.train_llama_bpe()).encode()).hexdigest()
    there = subprocess.run([sys.executable, "-c", VOCAB_SNIPPET], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here


def test_tiny_greedy_generate_runs(tiny_llava, test_image):
    processed = LLAVA.process(tiny_llava.processor, [test_image], "Describe the image.")
    out = tiny_llava.model.generate(**processed, max_new_tokens=4, do_sample=False)
    prompt_len = processed["input_ids"].shape[1]
    assert out.shape[0] == 1 and prompt_len < out.shape[1] <= prompt_len + 4
    assert torch.equal(out[:, :prompt_len], processed["input_ids"])
    again = tiny_llava.model.generate(**processed, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, again)  # greedy


# --- requests ---------------------------------------------------------------------------------------------------


def test_process_one_image(tiny_llava, test_image):
    processor = tiny_llava.processor
    image_id = tiny_llava.model.config.image_token_index
    processed = LLAVA.process(tiny_llava.processor, [test_image], "What is in the picture?")
    assert set(processed) == {"input_ids", "attention_mask", "pixel_values"}
    ids = processed["input_ids"]
    assert (
        ids.shape[0] == 1 and processed["attention_mask"].shape == ids.shape and bool(processed["attention_mask"].all())
    )
    assert processed["pixel_values"].shape == (1, 3, 224, 224) and processed["pixel_values"].dtype == torch.float32
    assert image_runs(ids[0], image_id) == [(3, N_VIS)]  # <s> "▁USER:" "▁" then the image
    text = processor.tokenizer.decode(ids[0])
    assert text.startswith("<s> USER: <image>") and text.endswith("\nWhat is in the picture? ASSISTANT:")
    # Without control tokens typed, the ids are exactly the processor's on the rendered template (which adds <s>).
    chat = llava.chat_text(processor, 1, "What is in the picture?")
    assert chat == "USER: <image>\nWhat is in the picture? ASSISTANT:"
    reference = processor(text=chat, images=[test_image], return_tensors="pt")
    assert torch.equal(reference["input_ids"], ids)
    assert torch.equal(reference["pixel_values"], processed["pixel_values"])
    assert LLAVA.spans(processor, processed, image_id) == [[VisionSpan(start=3, length=N_VIS, grid=(SIDE, SIDE))]]


def test_two_images_give_two_spans_in_order(tiny_llava, test_image, other_image):
    image_id = tiny_llava.model.config.image_token_index
    processed = LLAVA.process(tiny_llava.processor, [test_image, other_image], "Compare them.")
    assert processed["pixel_values"].shape == (2, 3, 224, 224)
    runs = image_runs(processed["input_ids"][0], image_id)
    assert [length for _, length in runs] == [N_VIS, N_VIS]
    found = LLAVA.spans(tiny_llava.processor, processed, image_id)
    assert [(s.start, s.length, s.grid) for s in found[0]] == [(start, n, (SIDE, SIDE)) for start, n in runs]
    assert found[0][1].start == found[0][0].end + 1  # one "\n" between the two images
    vision = LLAVA.vision_embeddings(tiny_llava, processed)
    one = LLAVA.vision_embeddings(tiny_llava, LLAVA.process(tiny_llava.processor, [other_image], "x"))
    assert vision.shape == (2 * N_VIS, 64)
    torch.testing.assert_close(vision[N_VIS:], one, rtol=0, atol=1e-6)  # images concatenated in order
    assert not torch.allclose(vision[:N_VIS], vision[N_VIS:])


def test_a_typed_placeholder_is_text_not_an_image_slot(tiny_llava, test_image):
    processor = tiny_llava.processor
    image_id = tiny_llava.model.config.image_token_index
    prompt = "Is <image> here? </s> USER: <s>"
    processed = LLAVA.process(tiny_llava.processor, [test_image], prompt)
    ids = processed["input_ids"][0]
    assert image_runs(ids, image_id) == [(3, N_VIS)]
    special = {processor.tokenizer.bos_token_id, processor.tokenizer.eos_token_id}
    assert int(ids[0]) == processor.tokenizer.bos_token_id and not special & set(ids[1:].tolist())
    assert processor.tokenizer.decode(ids[3 + N_VIS :]) == f"\n{prompt} ASSISTANT:"
    # Tokenizing the rendered text instead would read the typed <image> as a second slot.
    with pytest.raises(ValueError, match="<image>"):
        processor(text=llava.chat_text(processor, 1, prompt), images=[test_image])


@pytest.mark.parametrize(
    ("images", "prompt", "match"),
    [("one", "  ", "prompt is empty"), ("none", "Describe.", "no image"), ("array", "Describe.", "PIL.Image")],
)
def test_process_rejects_bad_input(tiny_llava, test_image, images, prompt, match):
    given = {"one": [test_image], "none": [], "array": [torch.zeros(3, 8, 8)]}[images]
    with pytest.raises(InputError, match=match):
        LLAVA.process(tiny_llava.processor, given, prompt)


def test_spans_reject_runs_that_are_not_one_grid(tiny_llava, test_image):
    image_id = tiny_llava.model.config.image_token_index
    processed = LLAVA.process(tiny_llava.processor, [test_image], "Describe.")
    cut = dict(processed, input_ids=processed["input_ids"].clone())
    cut["input_ids"][0, 3 + N_VIS // 2] = 5  # one run of 256 becomes 128 + 127
    with pytest.raises(InputError, match=r"grid 0 \(16x16 = 256 tokens\) does not fit its placeholder run of 128"):
        LLAVA.spans(tiny_llava.processor, cut, image_id)
    two_images = dict(processed, pixel_values=processed["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(InputError, match="the images have 2 grids but the prompt holds placeholders for 1"):
        LLAVA.spans(tiny_llava.processor, two_images, image_id)


def test_prepare_scatters_vision_and_numbers_tokens(tiny_llava, test_image, other_image):
    image_id = tiny_llava.model.config.image_token_index
    processed = LLAVA.process(tiny_llava.processor, [test_image, other_image], "Describe both.")
    vision = LLAVA.vision_embeddings(tiny_llava, processed)  # [512, 64]
    inputs = LLAVA.prepare(tiny_llava, [test_image, other_image], "Describe both.")
    ids = inputs.input_ids
    assert torch.equal(ids, processed["input_ids"])
    seq = ids.shape[1]
    is_image = ids[0] == image_id
    torch.testing.assert_close(inputs.inputs_embeds[0, is_image], vision, rtol=0, atol=0)
    text_embeds = LLAVA.text_model(tiny_llava.model).embed_tokens(ids[:, ~is_image])
    torch.testing.assert_close(inputs.inputs_embeds[:, ~is_image], text_embeds, rtol=0, atol=0)
    assert inputs.position_ids.shape == LLAVA.positions.shape(1, seq) == (1, seq)
    assert torch.equal(inputs.position_ids, torch.arange(seq)[None])
    assert inputs.decode_offset.tolist() == [[0]]
    assert inputs.spans == LLAVA.spans(tiny_llava.processor, processed, image_id)
    assert [s.grid for s in inputs.spans[0]] == [(SIDE, SIDE)] * 2
    left_padded = dict(processed, attention_mask=processed["attention_mask"].clone())
    left_padded["attention_mask"][0, 0] = 0
    with pytest.raises(InputError, match="right-padded"):
        LLAVA.embed_and_position(tiny_llava, left_padded, vision)


def test_decoder_layers_with_family_positions_reproduce_hf_logits(tiny_llava, test_image):
    processed = LLAVA.process(tiny_llava.processor, [test_image], "What colour is the square?")
    inputs = LLAVA.prepare(tiny_llava, [test_image], "What colour is the square?")
    text = LLAVA.text_model(tiny_llava.model)
    with torch.no_grad():
        hidden = inputs.inputs_embeds  # [1, S, D]
        cos_sin = text.rotary_emb(hidden, inputs.position_ids)
        for layer in text.layers:
            hidden = layer(hidden, position_embeddings=cos_sin)  # causal without a mask
        logits = LLAVA.lm_head(tiny_llava.model)(text.norm(hidden[:, -1:]))[:, -1]  # [1, V]
        reference = tiny_llava.model(**processed).logits[:, -1]
        # Reversed positions (a shift would not do: RoPE sees only offsets) must change the logits.
        reversed_cos_sin = text.rotary_emb(inputs.inputs_embeds, inputs.position_ids.flip(-1))
        wrong = inputs.inputs_embeds
        for layer in text.layers:
            wrong = layer(wrong, position_embeddings=reversed_cos_sin)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
    assert (LLAVA.lm_head(tiny_llava.model)(text.norm(wrong[:, -1:]))[:, -1] - reference).abs().max() > 1e-3


# --- the host image side (ClipImages) ---------------------------------------------------------------------------

# (width, height) as sent: wide, tall, a page, smaller than the crop, exactly each crop, odd sizes both ways (the long
# side's truncation and the crop's rounding show), a single pixel and a sliver.
SIZES = [
    (448, 224),
    (196, 588),
    (280, 840),
    (50, 70),
    (224, 224),
    (336, 336),
    (333, 517),
    (517, 333),
    (1, 1),
    (3, 1000),
]


def noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels: any misplaced row, column or filter tap changes many values."""
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


@pytest.fixture(scope="module")
def saved(tiny_llava, tmp_path_factory) -> dict:
    """processor_config.json as save_pretrained writes it, and the processor reloaded from it, for the tiny
    preset (224) and LLaVA-1.5's real settings (336)."""
    from transformers import AutoProcessor

    out = {}
    real = llava.build_processor(tiny_llava.processor.tokenizer, image_size=llava.REAL_IMAGE_SIZE)
    for name, processor in (("tiny", tiny_llava.processor), ("real", real)):
        path = tmp_path_factory.mktemp(f"llava-{name}")
        processor.save_pretrained(path)
        config = json.loads((path / "processor_config.json").read_text())
        out[name] = (config, AutoProcessor.from_pretrained(path, local_files_only=True))
    return out


def hf_pixels(image_processor, image: Image.Image) -> np.ndarray:
    return image_processor(image, return_tensors="np")["pixel_values"]  # [1, 3, H, W]


@pytest.mark.parametrize("name", ["tiny", "real"])
def test_host_pixels_equal_the_processor(saved, name):
    config, processor = saved[name]
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    crop = {"tiny": 224, "real": 336}[name]
    host = LLAVA.image_host(config)
    assert isinstance(host, llava.ClipImages) and host.shortest_edge == crop and host.crop == (crop, crop)
    for i, (width, height) in enumerate(SIZES):
        image = noise(width, height, seed=i)
        prepared = host.prepare(image)
        got = prepared.feeds[contract.PIXEL_VALUES]
        assert list(prepared.feeds) == [contract.PIXEL_VALUES] and got.dtype == np.float32
        want = hf_pixels(processor.image_processor, image)
        assert got.shape == want.shape == (1, 3, crop, crop), (width, height)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{width}x{height}")
        side = crop // 14
        assert prepared.size == host.processed_size(height, width) == (crop, crop)
        assert prepared.layout == host.layout(height, width) == ImageLayout.single(side, side)
        assert host.feed_shapes(height, width) == {contract.PIXEL_VALUES: got.shape}


def test_host_converts_image_modes_as_the_processor(saved):
    """Transparency is composited onto white (not dropped), grey and palette images become RGB, as the processor's
    convert_to_rgb does; the resize runs on the converted 8-bit image."""
    config, processor = saved["tiny"]
    host = LLAVA.image_host(config)
    palette = noise(300, 200, seed=3).convert("P")
    palette.info["transparency"] = 7
    for image in (noise(300, 200, 1, "RGBA"), noise(200, 300, 2, "LA"), noise(260, 230, 3, "L"), palette):
        got = host.prepare(image).feeds[contract.PIXEL_VALUES]
        np.testing.assert_allclose(got, hf_pixels(processor.image_processor, image), rtol=0, atol=1e-5)
    rgba = noise(300, 200, 1, "RGBA")
    dropped = host.prepare(rgba.convert("RGB")).feeds[contract.PIXEL_VALUES]
    assert np.abs(host.prepare(rgba).feeds[contract.PIXEL_VALUES] - dropped).max() > 0.1


@pytest.mark.parametrize(
    "settings",
    [
        {},  # CLIPImageProcessorPil's defaults
        {"size": 250, "crop_size": 200},  # bare numbers: the short side, a square crop
        {"size": {"shortest_edge": 200}, "crop_size": {"height": 140, "width": 196}, "resample": 2},
        {"do_resize": False, "crop_size": {"height": 224, "width": 224}},  # small images are zero-padded
        {"size": {"height": 168, "width": 252}, "do_center_crop": False, "resample": 0},
        {"do_rescale": False, "do_normalize": False},
    ],
)
def test_host_follows_other_clip_settings(settings):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil.from_dict(settings)
    config = {"image_processor": dict(settings), "patch_size": 14}  # as written: unset keys take CLIP's defaults
    host = LLAVA.image_host(config)
    for i, (width, height) in enumerate([(448, 224), (50, 70), (51, 75), (333, 517), (300, 120)]):
        image = noise(width, height, seed=10 + i)
        got = host.prepare(image).feeds[contract.PIXEL_VALUES]
        want = hf_pixels(reference, image)
        assert got.shape == want.shape == (1, 3, *host.processed_size(height, width)), settings
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{settings} {width}x{height}")
    h, w = host.processed_size(1, 1)
    assert host.layout(1, 1) == ImageLayout.single(h // 14, w // 14) and host.pixel_range() == (h * w, h * w)


def test_host_expands_one_image_as_the_processor(saved):
    config, processor = saved["tiny"]
    host = LLAVA.image_host(config)
    assert (host.image_token, host.min_side, host.pixel_range()) == ("<image>", 1, (224 * 224, 224 * 224))
    chat = llava.chat_text(processor, 2, "Compare.")
    images = [noise(448, 224, 0), noise(50, 70, 1)]
    want = processor(text=chat, images=images, return_tensors="np")["input_ids"]
    expansions = {host.expand(host.layout(im.height, im.width)) for im in images}  # one size for every image
    assert len(expansions) == 1
    expanded = chat.replace("<image>", expansions.pop())
    assert expanded.count("<image>") == 2 * N_VIS
    got = processor.tokenizer(expanded, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(InputError, match="one grid"):
        host.expand(ImageLayout(((16, 16), 2)))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"do_pad": True}, "do_pad is not supported"),
        ({"size": {"shortest_edge": 224, "longest_edge": 400}}, "size .*longest_edge.* is not supported"),
        ({"size": {"max_height": 224, "max_width": 224}}, "size .*max_height.* is not supported"),
        ({"crop_size": {"height": 0, "width": 224}}, "crop_size .* is not supported"),
        ({"do_center_crop": False}, "varying size"),
        ({"do_resize": False, "do_center_crop": False}, "varying size"),
        ({"resample": 9}, "not a PIL resampling filter"),
        ({"image_processor_type": "LlavaNextImageProcessor"}, "CLIPImageProcessor and SiglipImageProcessor only"),
    ],
)
def test_host_refuses_settings_it_does_not_implement(saved, change, match):
    config, _ = saved["tiny"]
    changed = dict(config, image_processor=dict(config["image_processor"], **change))
    with pytest.raises(InputError, match=match):
        LLAVA.image_host(changed)


def test_host_refuses_extra_tokens_and_a_cap_below_the_crop(saved):
    config, _ = saved["real"]
    with pytest.raises(InputError, match=r"577 placeholders per image for a 576-token grid"):
        LLAVA.image_host(dict(config, vision_feature_select_strategy="full"))
    LLAVA.image_host(dict(config, vision_feature_select_strategy="full", num_additional_image_tokens=0))
    with pytest.raises(InputError, match="crops every image to that fixed size"):
        LLAVA.image_host(config, max_pixels=336 * 336 - 1)
    capped = LLAVA.image_host(config, max_pixels=336 * 336)  # a cap at or above the crop changes nothing
    bare = LLAVA.image_host(config["image_processor"])  # a bare preprocessor_config.json: patch 14 by default
    image = noise(500, 300)
    for other in (LLAVA.image_host(config), bare):
        assert (other.processed, other.layout(300, 500), other.patch) == (capped.processed, capped.layout(300, 500), 14)
        np.testing.assert_array_equal(
            other.prepare(image).feeds[contract.PIXEL_VALUES], capped.prepare(image).feeds[contract.PIXEL_VALUES]
        )
    with pytest.raises(InputError, match=re.escape("PIL.Image")):
        capped.prepare(np.zeros((8, 8, 3), np.uint8))


def test_module_and_host_work_without_torch(saved, tmp_path):
    """An engine's host imports the family module and prepares images with numpy and PIL alone."""
    config, _ = saved["tiny"]
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    snippet = f"""
import json, sys
import numpy as np
from PIL import Image
from lightkv_export.models.family import FAMILIES
import lightkv_export.models.llava
host = FAMILIES["llava"].image_host(json.load(open({str(tmp_path / "processor_config.json")!r})))
feeds = host.prepare(Image.new("RGB", (300, 200), (10, 20, 30))).feeds
print(feeds["pixel_values"].shape, "torch" in sys.modules, "transformers" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(1, 3, 224, 224) False False"


# --- the vision graph -------------------------------------------------------------------------------------------


def test_vision_export_is_fixed_at_the_crop_and_equals_vision_embeddings(tiny_llava, test_image, other_image):
    for size in ((224, 224), (100, 300), (600, 50)):  # the example image as sent: any size becomes the crop
        vision = LLAVA.vision_export(tiny_llava, size, torch.float32)
        assert list(vision.example) == [contract.PIXEL_VALUES] and vision.dynamic_shapes is None
        assert not vision.module.training  # exported as an inference graph
        example = vision.example[contract.PIXEL_VALUES]
        assert example.shape == (1, 3, 224, 224) and example.dtype == torch.float32
    program = torch.export.export(vision.module, tuple(vision.example.values()))
    for image in (test_image, other_image):
        processed = LLAVA.process(tiny_llava.processor, [image], "Describe.")
        with torch.no_grad():
            out = program.module()(processed["pixel_values"])  # [256, 64]
        torch.testing.assert_close(out, LLAVA.vision_embeddings(tiny_llava, processed), rtol=0, atol=1e-6)
    half = LLAVA.vision_export(tiny_llava, (224, 224), torch.float16).example[contract.PIXEL_VALUES]
    assert half.dtype == torch.float16
    # Features come from layer -2: the graph never runs CLIP's last layer (HF's get_image_features does).
    calls = []
    last = llava.vision_model(tiny_llava.model).encoder.layers[-1]
    handle = last.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            vision.module(*vision.example.values())
        assert calls == []
        LLAVA.vision_embeddings(tiny_llava, processed)
        assert calls == [1]
    finally:
        handle.remove()


def test_onnx_vision_graph_on_host_pixels_equals_the_model(tiny_llava, saved, tmp_path):
    """The engine's path (host pixels -> exported ONNX graph in onnxruntime) against the PyTorch model fed by the
    Hugging Face processor, on images of several sizes and aspects."""
    import onnxruntime as ort

    vision = LLAVA.vision_export(tiny_llava, (336, 448), torch.float32)
    path = tmp_path / "vision.onnx"
    with torch.no_grad():
        program = torch.onnx.export(
            vision.module,
            tuple(vision.example.values()),
            input_names=list(vision.example),
            output_names=[contract.IMAGE_EMBEDS],
            dynamic_shapes=vision.dynamic_shapes,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    host = LLAVA.image_host(saved["tiny"][0])
    for i, (width, height) in enumerate([(448, 224), (196, 588), (50, 70), (333, 517)]):
        image = noise(width, height, seed=20 + i)
        (embeds,) = session.run([contract.IMAGE_EMBEDS], host.prepare(image).feeds)  # [256, 64]
        processed = LLAVA.process(tiny_llava.processor, [image], "Describe.")
        want = LLAVA.vision_embeddings(tiny_llava, processed).numpy()  # [256, 64]
        assert embeds.shape == want.shape == (host.layout(height, width).vision_tokens, 64)
        np.testing.assert_allclose(embeds, want, rtol=0, atol=1e-4, err_msg=f"{width}x{height}")


def test_vision_export_refuses_a_crop_the_tower_does_not_take(tiny_llava):
    real = llava.build_processor(tiny_llava.processor.tokenizer, image_size=llava.REAL_IMAGE_SIZE)
    message = r"makes images 336x336 but the vision tower \(config.json vision_config.image_size\) takes 224x224"
    with pytest.raises(InputError, match=message):  # a 336 processor on the 224 tower
        LLAVA.vision_export(replace(tiny_llava, processor=real), (336, 336), torch.float32)
    with pytest.raises(InputError, match=re.escape("processor_config.json")):
        LLAVA.vision_export(replace(tiny_llava, processor=real), (224, 224), torch.float32)


def test_saved_processor_reloads_to_the_same_request(tiny_llava, test_image, tmp_path):
    from transformers import AutoProcessor

    tiny_llava.processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(reloaded).__name__ == "LlavaProcessor"
    again = replace(tiny_llava, processor=reloaded)
    for prompt in ("Describe the image.", "Is <image> here?"):
        want = LLAVA.process(tiny_llava.processor, [test_image], prompt)
        got = LLAVA.process(again.processor, [test_image], prompt)
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_vision_export_refuses_a_tower_that_keeps_cls(tiny_llava, monkeypatch):
    monkeypatch.setattr(tiny_llava.model.config, "vision_feature_select_strategy", "full")
    with pytest.raises(InputError, match="vision_feature_select_strategy 'full' with a CLIP tower keeps CLS"):
        LLAVA.vision_export(tiny_llava, (224, 224), torch.float32)
