"""Model registry, tiny presets, the families' prepare() and the checkpoint loader."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightkv_export.errors import InputError, ModelNotFoundError
from lightkv_export.models import qwen2_5_vl, qwen2_vl, registry, tiny
from lightkv_export.models.family import FAMILIES
from lightkv_export.models.registry import get_spec, load_model
from tests.helpers import state_checksum

QWEN2_VL, QWEN25_VL = FAMILIES["qwen2_vl"], FAMILIES["qwen2_5_vl"]

CHECKSUM_SNIPPET = """
import hashlib, sys
import torch
from lightkv_export.models.registry import _load_tiny
h = hashlib.sha256()
for name, t in _load_tiny.__wrapped__(sys.argv[1], torch.float32).model.state_dict().items():
    h.update(name.encode()); h.update(t.contiguous().numpy().tobytes())
print(h.hexdigest())
"""


# --- registry ---------------------------------------------------------------------------------------------------


def test_specs_and_aliases():
    assert get_spec("qwen-vl").hf_id == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert get_spec("qwen-vl").family == "qwen2_5_vl"
    assert get_spec("qwen-vl").default_windows == (6, 4, 2)
    assert get_spec("qwen2-vl").hf_id == "Qwen/Qwen2-VL-2B-Instruct"
    assert get_spec("qwen2-vl").family == "qwen2_vl"
    assert get_spec("Qwen/Qwen2.5-VL-7B-Instruct").key == "qwen-vl"
    assert get_spec(" QWEN2.5-VL ").key == "qwen-vl"
    assert get_spec("tiny-qwen-vl").tiny and get_spec("tiny-qwen-vl").family == "qwen2_5_vl"
    assert get_spec("tiny-qwen2-vl").tiny and get_spec("tiny-qwen2-vl").family == "qwen2_vl"
    for spec in registry.SPECS.values():
        assert "default" in spec.tolerances


def test_unknown_key_lists_keys_and_aliases():
    with pytest.raises(InputError) as err:
        get_spec("llama-vl")
    msg = str(err.value)
    assert "'llama-vl'" in msg
    for key in ("qwen-vl", "qwen2-vl", "tiny-qwen-vl", "tiny-qwen2-vl", "qwen2.5-vl"):
        assert key in msg


def test_tiny_windows_fit_default_image():
    """Every stage of the tiny schedule has >= 8 tokens per window on the default image's 12 x 16 grid."""
    for key in ("tiny-qwen-vl", "tiny-qwen2-vl"):
        spec = get_spec(key)
        h, w = (side // 28 for side in spec.default_image_size)
        tokens = h * w
        for windows in spec.default_windows:
            assert tokens >= 8 * windows**2, (key, tokens, windows)
            tokens -= tokens // 2  # at most half merged away per stage


@pytest.mark.parametrize("family", [QWEN2_VL, QWEN25_VL], ids=str)
def test_real_hyperparameters_are_coherent(family):
    """The hard-coded real configs build (config only) and their M-RoPE sections cover half the head dim."""
    config = family.config_class()(**family.real_config_dict())
    text = config.get_text_config()
    assert text.num_hidden_layers == 28
    assert sum(text.rope_parameters["mrope_section"]) == family.arch(config).head_dim // 2
    assert config.vision_config.depth == 32
    out_width = getattr(config.vision_config, "out_hidden_size", config.vision_config.hidden_size)
    assert out_width == text.hidden_size  # vision embeddings land in the LLM's width


def test_real_hyperparameters_match_the_checkpoints():
    t25, v25 = qwen2_5_vl.REAL_TEXT, qwen2_5_vl.REAL_VISION
    assert (t25["hidden_size"], t25["num_attention_heads"], t25["num_key_value_heads"]) == (3584, 28, 4)
    assert (t25["intermediate_size"], v25["depth"], v25["hidden_size"]) == (18944, 32, 1280)
    t2, v2 = qwen2_vl.REAL_TEXT, qwen2_vl.REAL_VISION
    assert (t2["hidden_size"], t2["num_attention_heads"], t2["num_key_value_heads"]) == (1536, 12, 2)
    assert (t2["intermediate_size"], v2["depth"], v2["embed_dim"]) == (8960, 32, 1280)


# --- tiny presets -----------------------------------------------------------------------------------------------


def test_tiny_architecture(tiny_model):
    text = tiny_model.family.text_model(tiny_model.model)
    cfg = text.config
    assert len(text.layers) == 8
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 2)
    assert sum(cfg.rope_parameters["mrope_section"]) == cfg.hidden_size // cfg.num_attention_heads // 2
    assert not tiny_model.model.training
    assert tiny_model.family.spatial_merge(tiny_model.model) == 2
    assert tiny_model.family.lm_head(tiny_model.model).out_features == cfg.vocab_size


def test_tiny_build_is_deterministic_in_process_and_across_processes(tiny_qwen_vl):
    fresh = registry._load_tiny.__wrapped__("tiny-qwen-vl", torch.float32)
    assert fresh.model is not tiny_qwen_vl.model
    assert state_checksum(fresh.model) == state_checksum(tiny_qwen_vl.model)
    out = subprocess.run(
        [sys.executable, "-c", CHECKSUM_SNIPPET, "tiny-qwen-vl"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == state_checksum(tiny_qwen_vl.model)


def test_tiny_families_differ(tiny_qwen_vl, tiny_qwen2_vl):
    assert type(tiny_qwen_vl.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(tiny_qwen2_vl.model).__name__ == "Qwen2VLForConditionalGeneration"


def test_tiny_weights_are_not_degenerate(tiny_qwen_vl):
    """Seeded init: matrices have variance ~1/fan_in, norm gains stay 1."""
    text = tiny_qwen_vl.family.text_model(tiny_qwen_vl.model)
    q = text.layers[0].self_attn.q_proj.weight  # [64, 64]
    assert q.std().item() == pytest.approx(64**-0.5, rel=0.1)
    assert torch.equal(text.norm.weight, torch.ones_like(text.norm.weight))


def test_tokenizer_round_trip_and_special_ids(tiny_model):
    tok = tiny_model.processor.tokenizer
    text = "Describe this image: a red square & 3 blue circles, 42% of it!\nWhat's next?"
    assert tok.decode(tok(text)["input_ids"]) == text
    cfg = tiny_model.model.config
    ids = {name: tok.convert_tokens_to_ids(name) for name in tiny.SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(tiny.SPECIAL_TOKENS)
    assert cfg.image_token_id == ids["<|image_pad|>"]
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert cfg.get_text_config().eos_token_id == ids["<|im_end|>"] == tok.eos_token_id
    assert cfg.get_text_config().vocab_size >= len(tok)
    for name, i in ids.items():  # each special token is one id and decodes back
        assert tok(name)["input_ids"] == [i]
        assert tok.decode([i]) == name


def test_tokenizer_is_deterministic():
    assert tiny.train_bpe() == tiny.train_bpe()


def test_chat_template_layout(tiny_qwen_vl):
    text = qwen2_vl.chat_text(tiny_qwen_vl.processor, 2, "What is this?")
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "What is this?<|im_end|>\n<|im_start|>assistant\n"
    )


# --- prepare ----------------------------------------------------------------------------------------------------


def test_prepare_one_image(tiny_model, test_image):
    loaded = tiny_model
    processed = loaded.family.process(loaded.processor, [test_image], "Describe this image.")
    assert processed["image_grid_thw"].tolist() == [[1, 24, 32]]
    vision = loaded.family.vision_embeddings(loaded, processed)
    inputs = loaded.family.prepare(loaded, [test_image], "Describe this image.")
    ids = inputs.input_ids  # [1, S]
    seq = ids.shape[1]
    image_token = loaded.model.config.image_token_id
    assert inputs.inputs_embeds.shape == (1, seq, 64)
    assert inputs.position_ids.shape == (3, 1, seq)
    assert inputs.attention_mask.shape == (1, seq) and bool(inputs.attention_mask.all())
    (span,) = inputs.spans[0]
    assert span.grid == (12, 16) and span.length == 192 == vision.shape[0]
    assert int((ids == image_token).sum()) == span.length
    assert bool((ids[0, span.start : span.end] == image_token).all())
    assert ids[0, span.start - 1] == loaded.model.config.vision_start_token_id
    assert ids[0, span.end] == loaded.model.config.vision_end_token_id
    # The vision embeddings are scattered into the placeholders; text positions keep token embeddings.
    torch.testing.assert_close(inputs.inputs_embeds[0, span.start : span.end], vision)
    text_emb = loaded.family.text_model(loaded.model).embed_tokens(ids[:, : span.start])
    torch.testing.assert_close(inputs.inputs_embeds[:, : span.start], text_emb)
    # M-RoPE: the image's tokens share a temporal id and follow the (h, w) grid; text after it is 1-D again.
    pos = inputs.position_ids[:, 0, span.start : span.end].view(3, 12, 16)  # [3, h, w]
    base = int(inputs.position_ids[0, 0, span.start])
    assert bool((pos[0] == base).all())
    assert torch.equal(pos[1], base + torch.arange(12).view(12, 1).expand(12, 16))
    assert torch.equal(pos[2], base + torch.arange(16).view(1, 16).expand(12, 16))
    assert int(inputs.position_ids[0, 0, span.end]) == base + 16
    assert int(inputs.decode_offset) == int(inputs.position_ids.max()) + 1 - seq


def test_prepare_two_images(tiny_model, test_image):
    loaded = tiny_model
    small = test_image.resize((224, 168))  # 6 x 8 LLM tokens
    inputs = loaded.family.prepare(loaded, [test_image, small], "Compare the two images.")
    first, second = inputs.spans[0]
    assert (first.grid, first.length) == ((12, 16), 192)
    assert (second.grid, second.length) == ((6, 8), 48)
    assert second.start > first.end
    image_token = loaded.model.config.image_token_id
    assert int((inputs.input_ids == image_token).sum()) == first.length + second.length
    # The second image's positions start after the first image's largest side.
    assert int(inputs.position_ids[0, 0, second.start]) > int(inputs.position_ids[:, 0, first.end - 1].max())


def test_process_needs_only_the_processor(tiny_qwen2_vl, test_image):
    """Engines run the processor with no torch model loaded: process() takes the processor alone."""
    processed = QWEN2_VL.process(tiny_qwen2_vl.processor, [test_image], "Describe this image.")
    assert processed["input_ids"].device.type == "cpu"
    spans = qwen2_vl.vision_spans(
        processed["input_ids"], tiny_qwen2_vl.model.config.image_token_id, processed["image_grid_thw"], 2
    )
    assert spans == tiny_qwen2_vl.family.prepare(tiny_qwen2_vl, [test_image], "Describe this image.").spans


@pytest.mark.parametrize(
    ("images", "prompt", "match"),
    [
        ([], "Describe this image.", "no image"),
        (None, "   ", "prompt is empty"),
        ([Image.new("RGB", (2, 600))], "Describe.", "2x600 pixels; the processor accepts aspect ratios up to 200"),
        (["picture.png"], "Describe.", "expected a PIL.Image.Image"),
    ],
)
def test_prepare_rejects_bad_input(tiny_qwen_vl, test_image, images, prompt, match):
    images = [test_image] if images is None else images
    with pytest.raises(InputError, match=match):
        tiny_qwen_vl.family.prepare(tiny_qwen_vl, images, prompt)


def test_a_typed_placeholder_is_text_not_an_image_slot(tiny_qwen_vl, test_image):
    """`<|image_pad|>` typed in a prompt is plain text: one image gives one vision span of its own tokens
    (the serving tests check the whole chat layout: test_serving_prompt.py)."""
    typed = tiny_qwen_vl.family.prepare(tiny_qwen_vl, [test_image], "what is <|image_pad|> here?")
    plain = tiny_qwen_vl.family.prepare(tiny_qwen_vl, [test_image], "what is here?")
    assert [len(row) for row in typed.spans] == [1]
    assert [(s.length, s.grid) for s in typed.spans[0]] == [(s.length, s.grid) for s in plain.spans[0]]
    assert typed.input_ids.shape[1] > plain.input_ids.shape[1]  # the typed text is there, as ordinary tokens


# --- loader -----------------------------------------------------------------------------------------------------


def save_checkpoint(loaded, path):
    loaded.model.save_pretrained(path)
    loaded.processor.save_pretrained(path)
    return path


def assert_same_model(loaded, reference, image):
    assert state_checksum(loaded.model) == state_checksum(reference.model)
    a = reference.family.prepare(reference, [image], "Describe this image.")
    b = loaded.family.prepare(loaded, [image], "Describe this image.")
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.position_ids, b.position_ids)
    torch.testing.assert_close(a.inputs_embeds, b.inputs_embeds, rtol=0, atol=0)


def test_load_local_directory(tiny_qwen2_vl, test_image, tmp_path):
    path = save_checkpoint(tiny_qwen2_vl, tmp_path / "ckpt")
    loaded = load_model(str(path))
    assert loaded.family is QWEN2_VL
    assert loaded.spec.key == str(path) and loaded.spec.family == "qwen2_vl"
    # Engines go to OUT/ckpt-<hash of the path>/..., never into the checkpoint itself, and never where another
    # folder named ckpt builds.
    assert loaded.spec.dir_name == f"ckpt-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
    assert loaded.spec.default_windows == get_spec("tiny-qwen2-vl").default_windows  # tiny-shaped checkpoint
    assert not loaded.model.training
    assert_same_model(loaded, tiny_qwen2_vl, test_image)


def test_load_from_hf_cache_layout(tiny_qwen_vl, test_image, tmp_path, monkeypatch):
    """qwen-vl resolves through HF_HUB_CACHE/models--Qwen--Qwen2.5-VL-7B-Instruct/snapshots/<rev> via refs/main."""
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-7B-Instruct"
    rev = "0123456789abcdef0123456789abcdef01234567"
    save_checkpoint(tiny_qwen_vl, repo / "snapshots" / rev)
    (repo / "snapshots" / "fedcba9876543210fedcba9876543210fedcba98").mkdir()  # a stale, incomplete snapshot
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("qwen-vl")
    assert loaded.spec == get_spec("qwen-vl")
    assert loaded.family is QWEN25_VL
    assert_same_model(loaded, tiny_qwen_vl, test_image)


def save_to_hub_cache(loaded, hub: Path, hf_id: str) -> Path:
    """`loaded` as the hub cache lays out `hf_id`: models--Org--Name/snapshots/<rev> with refs/main -> <rev>."""
    repo = hub / f"models--{hf_id.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    save_checkpoint(loaded, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return repo / "snapshots" / rev


def test_unregistered_hub_id_loads_from_the_cache_by_its_model_type(tiny_qwen2_vl, test_image, tmp_path, monkeypatch):
    """A fine-tune the registry does not know: the family comes from config.json's model_type."""
    save_to_hub_cache(tiny_qwen2_vl, tmp_path / "hub", "someone/Qwen2-VL-finetune")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("someone/Qwen2-VL-finetune")
    assert loaded.family is QWEN2_VL
    assert loaded.spec.key == "someone/Qwen2-VL-finetune" and loaded.spec.family == "qwen2_vl"
    assert loaded.spec.dir_name == "someone--Qwen2-VL-finetune"
    assert loaded.spec.default_windows == get_spec("tiny-qwen2-vl").default_windows  # tiny-shaped checkpoint
    assert_same_model(loaded, tiny_qwen2_vl, test_image)


def test_unregistered_hub_id_errors_name_that_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as err:
        load_model("someone/not-downloaded")
    msg = str(err.value)
    assert "huggingface-cli download someone/not-downloaded" in msg and "Qwen2.5-VL-7B" not in msg
    assert str(tmp_path / "hub") in msg  # where it looked
    snapshot = tmp_path / "hub" / "models--someone--a-llama" / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="model_type 'llama' is not supported"):
        load_model("someone/a-llama")


def test_missing_checkpoint_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelNotFoundError) as err:
        load_model("qwen-vl")
    msg = str(err.value)
    assert "huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct" in msg
    assert "tiny-qwen-vl" in msg and "local directory" in msg
    with pytest.raises(ModelNotFoundError, match="neither a model key nor a checkpoint directory"):
        load_model(str(tmp_path / "no-such-dir"))


def test_local_directory_errors(tiny_qwen2_vl, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="model_type 'llama' is not supported"):
        load_model(str(tmp_path))
    bare = tmp_path / "bare"
    tiny_qwen2_vl.model.config.save_pretrained(bare)
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_model(str(bare))


def test_random_weights_from_local_config(test_image, tmp_path):
    """--random-weights with only a config.json on disk: real vocabulary and M-RoPE, reduced depth and width."""
    cfg = QWEN25_VL.real_config_dict()
    cfg["text_config"].update(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    cfg["text_config"]["num_key_value_heads"] = 2
    cfg["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
    cfg["vision_config"].update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128)
    QWEN25_VL.config_class()(**cfg).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), random_weights=True)
    assert loaded.family is QWEN25_VL
    text = loaded.family.text_model(loaded.model)
    assert len(text.layers) == 2 and text.config.vocab_size == 152064
    assert loaded.model.config.image_token_id == loaded.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    inputs = loaded.family.prepare(loaded, [test_image], "Describe this image.")
    assert inputs.spans[0][0].grid == (12, 16)
    out = loaded.model(inputs_embeds=inputs.inputs_embeds, position_ids=inputs.position_ids)
    assert out.logits.shape == (1, inputs.input_ids.shape[1], 152064)
    assert torch.isfinite(out.logits).all()


def test_random_weights_without_checkpoint(tmp_path, monkeypatch):
    """A real key with nothing cached builds the known architecture (here shrunk) with the local tokenizer."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for key, value in {"num_hidden_layers": 2, "vocab_size": 1024, "intermediate_size": 256}.items():
        monkeypatch.setitem(qwen2_vl.REAL_TEXT, key, value)
    monkeypatch.setitem(qwen2_vl.REAL_VISION, "depth", 1)
    monkeypatch.setitem(qwen2_vl.REAL_VISION, "embed_dim", 64)
    loaded = load_model("qwen2-vl", random_weights=True, dtype=torch.bfloat16)
    assert loaded.spec == get_spec("qwen2-vl")
    text = loaded.family.text_model(loaded.model)
    assert len(text.layers) == 2 and text.config.hidden_size == 1536 and text.config.num_key_value_heads == 2
    assert text.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert loaded.model.config.vision_start_token_id == loaded.processor.tokenizer.convert_tokens_to_ids(
        "<|vision_start|>"
    )
    assert loaded.processor.image_processor.size["longest_edge"] == qwen2_vl.REAL_MAX_PIXELS


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@pytest.mark.parametrize(
    ("key", "dir_name"),
    [
        ("tiny-qwen-vl", "tiny-qwen-vl"),
        ("Org/Name", "Org--Name"),
        ("/abs/path/ckpt", f"ckpt-{short_hash('/abs/path/ckpt')}"),
        ("/abs/path/ckpt/", f"ckpt-{short_hash('/abs/path/ckpt')}"),  # the same folder, the same engines
        ("/other/path/ckpt", f"ckpt-{short_hash('/other/path/ckpt')}"),  # the same name elsewhere: not the same
        ("./rel/ckpt", f"ckpt-{short_hash('./rel/ckpt')}"),
        ("rel/deeper/ckpt", f"ckpt-{short_hash('rel/deeper/ckpt')}"),
        ("../ckpt", f"ckpt-{short_hash('../ckpt')}"),
    ],
)
def test_dir_name_is_one_safe_path_component(key, dir_name):
    spec = replace(get_spec("tiny-qwen-vl"), key=key)
    assert spec.dir_name == dir_name and len(Path(spec.dir_name).parts) == 1


def test_llava_keys_and_the_papers_schedule(monkeypatch, tmp_path):
    """llava / llava-13b name the paper's LLaVA-1.5 checkpoints; at --ratio 0.55 the solver gives the paper's
    schedule for the 7B's 32 layers (layers 12-18-24, windows 4-2-1, half of each window per stage); without the
    checkpoint, loading says how to get it."""
    from lightkv_export.method.schedule import resolve
    from lightkv_export.models import llava

    assert (get_spec("llava").hf_id, get_spec("llava-13b").hf_id) == (llava.HF_ID, llava.HF_ID_13B)
    assert get_spec("llava-hf/llava-1.5-7b-hf").key == "llava" and get_spec("LLaVA-1.5-13B").key == "llava-13b"
    assert get_spec("tiny-llava").tiny and get_spec("tiny-llava").family == "llava"
    layers = llava.REAL_CONFIG["text_config"]["num_hidden_layers"]
    windows = get_spec("llava").default_windows
    assert str(resolve(layers, ratio=0.55, schedule=None, windows=windows)) == "12:4:0.5,18:2:0.5,24:1:0.5"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError, match=r"huggingface-cli download llava-hf/llava-1.5-7b-hf"):
        load_model("llava")
