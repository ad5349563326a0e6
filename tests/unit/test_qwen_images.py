"""Qwen-VL's host image side (models/qwen2_vl.py QwenImages, models/qwen2_5_vl.py QwenWindowImages) held to
transformers' processor and vision utilities, and the dynamic vision graph held to the PyTorch encoder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from lightkv_export import contract
from lightkv_export.errors import InputError
from lightkv_export.export import export_vision
from lightkv_export.models import qwen2_5_vl, qwen2_vl, registry, tiny
from lightkv_export.models.family import FAMILIES

QWEN2_VL, QWEN25_VL = FAMILIES["qwen2_vl"], FAMILIES["qwen2_5_vl"]
REAL = (qwen2_vl.REAL_MIN_PIXELS, qwen2_vl.REAL_MAX_PIXELS)
REAL_WINDOW = qwen2_5_vl.REAL_VISION["window_size"]

# (width, height) as sent: wide, tall, a 1:3 page, under the tiny presets' min_pixels, over their max_pixels, odd
# sides, a single pixel, and a thin strip at aspect ratio 200.
SIZES = [(448, 224), (196, 588), (280, 840), (30, 40), (2000, 1500), (333, 517), (1, 1), (3, 600)]


def noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic noise picture (any content: the processors do the same to every pixel)."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def real_processor():
    """A processor with the real checkpoints' pixel budget (3136 to 12845056 pixels)."""
    return QWEN25_VL.tiny_processor(image_processor=tiny.build_image_processor(*REAL))


def hf_pixels(processor, image) -> tuple[np.ndarray, list[int]]:
    """transformers' pixel_values [N, F] and the image's (t, h, w) patch grid."""
    out = processor.image_processor(images=[image])
    return np.asarray(out["pixel_values"]), [int(x) for x in out["image_grid_thw"][0]]


@pytest.fixture(scope="module", params=["tiny_qwen_vl", "tiny_qwen2_vl"])
def tiny_loaded(request):
    return request.getfixturevalue(request.param)


# --- smart_resize ---------------------------------------------------------------------------------------------


def resize_cases() -> list[tuple[int, int]]:
    """(height, width): edges (tiny, thin, exact multiples, halves that round to even, aspect exactly 200 and just
    under, huge) and random sizes log-uniform over 1 to 30000 pixels a side."""
    edges = [(1, 1), (1, 200), (200, 1), (2, 400), (3, 599), (13, 13), (14, 14), (27, 29), (28, 28), (42, 70)]
    edges += [(28 * k, 28 * j) for k, j in ((1, 1), (2, 3), (24, 24), (128, 128), (100, 200))]
    edges += [(20000, 15000), (30000, 150), (150, 30000), (3584, 3584), (3585, 3583), (99, 19800), (4000, 3500)]
    rng = np.random.default_rng(29)
    sides = np.exp(rng.uniform(0, np.log(30000), size=(600, 2))).astype(int)
    randoms = [(int(h), int(w)) for h, w in sides if max(h, w) / min(h, w) <= 200]
    return edges + randoms


@pytest.mark.parametrize(
    ("factor", "low", "high"),
    [(28, *REAL), (28, tiny.MIN_PIXELS, tiny.MAX_PIXELS), (28, 784, 100352), (28, 3136, 6272), (32, 1024, 1 << 20)],
)
def test_smart_resize_equals_transformers(factor, low, high):
    for h, w in resize_cases():
        assert qwen2_vl.smart_resize(h, w, factor, low, high) == hf_smart_resize(h, w, factor, low, high), (h, w)


@pytest.mark.parametrize(("height", "width"), [(1, 201), (402, 2), (3, 601), (10000, 49)])
def test_smart_resize_refuses_what_transformers_refuses(height, width):
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_smart_resize(height, width, 28, *REAL)
    with pytest.raises(InputError, match=r"aspect ratio of 2\d\d\.\d; the processor accepts at most 200"):
        qwen2_vl.smart_resize(height, width, 28, *REAL)


def test_an_empty_image_is_refused_with_what_is_accepted():
    with pytest.raises(InputError, match="empty: both sides must be at least 1 pixel"):
        qwen2_vl.smart_resize(0, 50, 28, *REAL)
    host = QWEN2_VL.image_host(real_processor().to_dict())
    assert host.min_side == 1  # the processor scales any non-empty image up to min_pixels
    with pytest.raises(InputError, match="aspect ratio"):
        host.layout(1, 300)


# --- the host against the processor -----------------------------------------------------------------------------


def check_against_processor(host, processor, image, window_size=None) -> None:
    """pixel_values bit for bit, the grid, the layout, the feeds' shapes and the grid-only feeds against
    transformers' vision utilities."""
    width, height = image.size
    prepared = host.prepare(image)
    ref_pixels, (t, gh, gw) = hf_pixels(processor, image)
    feeds = prepared.feeds
    assert feeds[contract.PIXEL_VALUES].dtype == np.float32
    assert np.array_equal(feeds[contract.PIXEL_VALUES], ref_pixels), image.size
    assert t == 1 and host.patch_grid(height, width) == (gh, gw)
    assert prepared.size == host.processed_size(height, width) == (gh * 14, gw * 14)
    assert prepared.layout == host.layout(height, width)
    assert prepared.layout.grids == ((gh // 2, gw // 2),)
    assert host.feed_shapes(height, width) == {name: value.shape for name, value in feeds.items()}
    grid = torch.tensor([[t, gh, gw]])
    assert_feed(feeds[qwen2_vl.POSITION_IDS], get_vision_position_ids(grid, 2))
    assert_feed(feeds[qwen2_vl.CU_SEQLENS], get_vision_cu_seqlens(grid))
    if window_size is None:
        assert qwen2_5_vl.WINDOW_INDEX not in feeds
        return
    index, bounds = get_vision_window_index(grid, 2, window_size, 14)
    assert_feed(feeds[qwen2_5_vl.WINDOW_INDEX], index)
    assert_feed(feeds[qwen2_5_vl.CU_WINDOW_SEQLENS], bounds)


def assert_feed(feed: np.ndarray, reference: torch.Tensor) -> None:
    """Same values and the same dtype (the graph input's: the exporter traced the reference's)."""
    assert feed.dtype == reference.numpy().dtype
    assert np.array_equal(feed, reference.numpy())


@pytest.mark.parametrize("size", SIZES)
def test_host_equals_the_tiny_processors(tiny_loaded, size):
    host = tiny_loaded.image_host()
    window = tiny_loaded.model.config.vision_config.window_size if tiny_loaded.family is QWEN25_VL else None
    check_against_processor(host, tiny_loaded.processor, noise(*size), window)


@pytest.mark.parametrize("size", [(448, 224), (196, 588), (280, 840), (30, 40), (333, 517), (3700, 3600), (1, 1)])
def test_host_equals_a_processor_with_the_real_settings(size):
    processor = real_processor()
    QWEN25_VL.with_vision_settings(processor, qwen2_5_vl.REAL_VISION)
    host = QWEN25_VL.image_host(processor.to_dict())
    assert (host.min_pixels, host.max_pixels, host.window_size) == (*REAL, REAL_WINDOW)
    check_against_processor(host, processor, noise(*size, seed=size[0]), REAL_WINDOW)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_other_image_modes_are_converted_as_the_processor_converts_them(tiny_qwen2_vl, mode):
    """Transparency is composited onto white (not dropped), grey and palette images become RGB."""
    image = noise(97, 61, mode="RGBA" if mode == "RGBA" else "L")
    image = image.convert("P") if mode == "P" else image
    check_against_processor(tiny_qwen2_vl.image_host(), tiny_qwen2_vl.processor, image)


@pytest.mark.parametrize(("rows", "cols"), [(2, 2), (4, 6), (6, 4), (16, 16), (18, 14), (2, 116), (30, 2)])
@pytest.mark.parametrize("window_size", [56, 84, 112])
def test_window_feeds_equal_transformers(rows, cols, window_size):
    """Qwen2.5-VL's windows on grids that are and are not multiples of the window."""
    host = qwen2_5_vl.QwenWindowImages(**qwen2_5_vl.QwenWindowImages.settings({}, None), window_size=window_size)
    feeds = host.grid_feeds(2 * rows, 2 * cols)
    index, bounds = get_vision_window_index(torch.tensor([[1, 2 * rows, 2 * cols]]), 2, window_size, 14)
    assert_feed(feeds[qwen2_5_vl.WINDOW_INDEX], index)
    assert_feed(feeds[qwen2_5_vl.CU_WINDOW_SEQLENS], bounds)
    assert host.grid_shapes(2 * rows, 2 * cols) == {name: value.shape for name, value in feeds.items()}


def test_expand_makes_the_processors_token_ids(tiny_loaded):
    """Two images of different sizes in one request: the template's placeholder per image replaced by `expand`
    tokenizes to the processor's input_ids."""
    images = [noise(448, 224), noise(280, 840, seed=1)]
    host = tiny_loaded.image_host()
    processed = tiny_loaded.family.process(tiny_loaded.processor, images, "What differs?")
    chat = qwen2_vl.chat_text(tiny_loaded.processor, 2, "What differs?")
    first, second = (host.expand(host.layout(im.height, im.width)) for im in images)
    assert len(first) != len(second)
    before, between, after = chat.split(host.image_token)  # the template writes one placeholder per image
    expanded = before + first + between + second + after
    ids = tiny_loaded.processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]
    assert ids == processed["input_ids"][0].tolist()


def test_small_images_are_taken_as_the_processor_takes_them(tiny_qwen_vl):
    """A 10 x 200 strip: the processor scales it up to min_pixels (no refusal), the host lays it out the same."""
    image = Image.new("RGB", (10, 200))
    processed = QWEN25_VL.process(tiny_qwen_vl.processor, [image], "Describe.")
    grid = processed["image_grid_thw"][0].tolist()
    assert tiny_qwen_vl.image_host().layout(200, 10).grids == ((grid[1] // 2, grid[2] // 2),)


# --- settings ---------------------------------------------------------------------------------------------------


def test_both_forms_of_the_pixel_budget_are_read():
    features = tiny.build_image_processor(*REAL).to_dict()
    del features["size"]
    old = {**features, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 100}
    assert QWEN2_VL.image_host(old).max_pixels == 28 * 28 * 100
    both = {**old, "size": {"shortest_edge": 1, "longest_edge": 2}}  # min_pixels / max_pixels win, as in HF
    assert (QWEN2_VL.image_host(both).min_pixels, QWEN2_VL.image_host(both).max_pixels) == (3136, 78400)
    nested = {"image_processor": {**features, "size": {"shortest_edge": 3136, "longest_edge": 78400}}}
    assert (QWEN2_VL.image_host(nested).min_pixels, QWEN2_VL.image_host(nested).max_pixels) == (3136, 78400)
    assert (QWEN2_VL.image_host({}).min_pixels, QWEN2_VL.image_host({}).max_pixels) == (3136, 28 * 28 * 1280)


def test_a_user_cap_lowers_the_processors_max(tiny_qwen2_vl):
    cap = 28 * 28 * 64
    host = QWEN2_VL.image_host(tiny_qwen2_vl.processor.to_dict(), max_pixels=cap)
    assert host.max_pixels == cap
    capped = QWEN2_VL.tiny_processor(image_processor=tiny.build_image_processor(tiny.MIN_PIXELS, cap))
    check_against_processor(host, capped, noise(700, 500))
    # Below 200 tokens' pixels a cap is not a bound: smart_resize keeps a side at least one token, so a 1:200 strip
    # gets 113 tokens; the range says so, and the strip reaches it.
    strip = host.processed_size(20, 4000)
    assert strip == hf_smart_resize(20, 4000, 28, tiny.MIN_PIXELS, cap) == (28, 28 * 113)
    assert host.pixel_range()[1] == strip[0] * strip[1]
    loose = QWEN2_VL.image_host(tiny_qwen2_vl.processor.to_dict(), max_pixels=10**9)
    assert loose.max_pixels == tiny.MAX_PIXELS  # a cap above the processor's changes nothing
    with pytest.raises(InputError, match="below the processor's min_pixels 3136"):
        QWEN2_VL.image_host(tiny_qwen2_vl.processor.to_dict(), max_pixels=3000)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"image_processor_type": "CLIPImageProcessor"}, "implements Qwen2VLImageProcessor only"),
        ({"do_resize": False}, "do_resize off is not supported"),
        ({"resample": "bicubic"}, "not a PIL resampling filter"),
        ({"size": {"shortest_edge": 5000, "longest_edge": 4000}}, "expected min_pixels <= max_pixels"),
        ({"size": {"shortest_edge": 1, "longest_edge": 700}}, "at least one token's 28x28 pixels"),
        ({"window_size": 20}, "window_size 20: expected the vision encoder's window in pixels"),
    ],
)
def test_settings_the_host_does_not_implement_are_refused(change, match):
    features = {**tiny.build_image_processor().to_dict(), **change}
    with pytest.raises(InputError, match=match):
        QWEN25_VL.image_host(features)


def test_processor_files_carry_the_window(tiny_qwen_vl, tmp_path):
    """The window (config.json) travels in the image processor's settings: in the tiny preset, through
    save_pretrained and loading, and from a checkpoint's config.json; without it images are sized, not prepared."""
    assert tiny_qwen_vl.processor.to_dict()["image_processor"]["window_size"] == 56
    tiny_qwen_vl.processor.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"window_size": 84}}))
    reloaded = registry.load_processor(tmp_path, "qwen2_5_vl")
    assert QWEN25_VL.image_host(reloaded.to_dict()).window_size == 84  # config.json's, over the saved one
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert QWEN25_VL.image_host(saved).window_size == 56
    del saved["image_processor"]["window_size"]
    bare = QWEN25_VL.image_host(saved)
    assert bare.layout(336, 448).grids == ((12, 16),)
    with pytest.raises(InputError, match="no 'window_size'"):
        bare.prepare(noise(448, 336))
    with pytest.raises(InputError, match="window_size None is not the vision encoder's window 56"):
        QWEN25_VL.check_vision_settings(bare, tiny_qwen_vl.model.config.vision_config)


@pytest.mark.parametrize(
    ("low", "high"), [REAL, (tiny.MIN_PIXELS, tiny.MAX_PIXELS), (784, 28 * 28 * 40), (3136, 3136), (3136, 6272)]
)
def test_pixel_range_covers_every_processed_size(low, high):
    settings = {**qwen2_vl.QwenImages.settings({}, None), "min_pixels": low, "max_pixels": high}
    host = qwen2_vl.QwenImages(**settings)
    lo, hi = host.pixel_range()
    seen = [h * w for h, w in (host.processed_size(*size) for size in resize_cases())]
    assert lo <= min(seen) and max(seen) <= hi
    if (low, high) in (REAL, (tiny.MIN_PIXELS, tiny.MAX_PIXELS)):
        assert (lo, hi) == (low, high)  # exact for the real and tiny settings
    else:
        assert min(seen) < low or max(seen) > high  # smart_resize reaches past these budgets: the bounds cover it


def test_the_family_modules_import_without_torch():
    code = (
        "import sys\nimport lightkv_export.models.qwen2_vl, lightkv_export.models.qwen2_5_vl\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the vision graph -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_onnx(tiny_loaded, tmp_path_factory):
    """(loaded, path) of the family's vision graph, exported once, traced on a 336 x 448 image."""
    path = tmp_path_factory.mktemp(tiny_loaded.spec.key) / "vision.onnx"
    export_vision(tiny_loaded, path, dtype=torch.float32)  # traced on the preset's 336 x 448 reference image
    return tiny_loaded, path


@pytest.fixture(scope="module")
def vision_graph(vision_onnx):
    """(loaded, ONNX Runtime session) of the family's vision graph."""
    loaded, path = vision_onnx
    return loaded, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_vision_graph_inputs_are_the_hosts_feeds(vision_graph):
    loaded, session = vision_graph
    feeds = loaded.image_host().prepare(noise(448, 336)).feeds
    onnx_types = {np.float32: "tensor(float)", np.int64: "tensor(int64)", np.int32: "tensor(int32)"}
    inputs = {i.name: i.type for i in session.get_inputs()}
    assert inputs == {name: onnx_types[value.dtype.type] for name, value in feeds.items()}


@pytest.mark.parametrize("size", [(448, 224), (280, 840), (20, 20), (333, 517), (2000, 1500)])
def test_vision_graph_takes_any_size_as_the_encoder_does(vision_graph, size):
    """Wide, a 1:3 page, under min_pixels (the processor's minimum), odd sides, over max_pixels: none is the
    export's example size, all equal the PyTorch encoder fed by the Hugging Face processor."""
    loaded, session = vision_graph
    image = noise(*size, seed=7)
    (embeds,) = session.run(None, loaded.image_host().prepare(image).feeds)
    reference = loaded.family.vision_embeddings(loaded, loaded.family.process(loaded.processor, [image], "x"))
    assert embeds.shape == tuple(reference.shape)
    np.testing.assert_allclose(embeds, reference.numpy(), rtol=0, atol=1e-4)


def joined_feeds(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several images' feeds as one packed sequence, as transformers' encoder lays out a batch of images: patches
    and positions concatenated, segment bounds and window order offset by the images before."""
    patches = np.cumsum([0] + [f[contract.PIXEL_VALUES].shape[0] for f in feeds])  # [images + 1]
    out = {
        contract.PIXEL_VALUES: np.concatenate([f[contract.PIXEL_VALUES] for f in feeds]),
        qwen2_vl.POSITION_IDS: np.concatenate([f[qwen2_vl.POSITION_IDS] for f in feeds]),
        qwen2_vl.CU_SEQLENS: patches.astype(np.int32),
    }
    if qwen2_5_vl.WINDOW_INDEX in feeds[0]:
        out[qwen2_5_vl.WINDOW_INDEX] = np.concatenate(
            [f[qwen2_5_vl.WINDOW_INDEX] + start // 4 for f, start in zip(feeds, patches, strict=False)]
        )  # merge 2: 4 patches per token
        bounds = [f[qwen2_5_vl.CU_WINDOW_SEQLENS][1:] + start for f, start in zip(feeds, patches, strict=False)]
        out[qwen2_5_vl.CU_WINDOW_SEQLENS] = np.concatenate([[0], *bounds]).astype(np.int32)
    return out


# (width, height) as sent; token grids 13 x 9 (odd sides: windows cut short at the right and bottom edges), then
# 8 x 16 and 27 x 9, then 2 x 2 (one partial window), 18 x 12 and 21 x 7.
@pytest.mark.parametrize("sizes", [[(252, 364)], [(448, 224), (280, 840)], [(20, 20), (333, 517), (196, 588)]])
def test_segment_attention_equals_the_encoder_on_several_images(tiny_loaded, sizes):
    """The vision graph's attention (varlen_attention, eager) on images of different sizes packed in one call
    equals transformers' encoder on the same images: per image in full-attention layers, per window in Qwen2.5-VL's
    windowed ones, the windows at the right and bottom edges cut short (odd token grids)."""
    images = [noise(*size, seed=i) for i, size in enumerate(sizes)]
    host = tiny_loaded.image_host()
    feeds = joined_feeds([host.prepare(image).feeds for image in images])
    if qwen2_5_vl.CU_WINDOW_SEQLENS in feeds:
        lengths = np.diff(feeds[qwen2_5_vl.CU_WINDOW_SEQLENS])
        assert lengths.min() < lengths.max() == tiny_loaded.family.vision_graph(tiny_loaded.model).window_patches
    graph = tiny_loaded.family.vision_graph(tiny_loaded.model).eval()
    with torch.no_grad():
        embeds = graph(*(torch.from_numpy(value) for value in feeds.values()))
    family = tiny_loaded.family
    reference = family.vision_embeddings(tiny_loaded, family.process(tiny_loaded.processor, images, "x"))
    assert embeds.shape == reference.shape
    torch.testing.assert_close(embeds, reference, rtol=0, atol=1e-5)


def intermediate_shapes(path, feeds: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every node output of the ONNX graph at `path` run by ONNX Runtime on `feeds`: name -> (op type, shape)."""
    import onnx

    model = onnx.load(str(path))
    ops = {name: node.op_type for node in model.graph.node for name in node.output if name}
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in ops)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(list(ops), feeds)
    return {name: (ops[name], value.shape) for name, value in zip(ops, values, strict=True)}


def test_vision_attention_holds_no_heads_by_patches_squared_tensor(vision_onnx):
    """No value of the vision graph is N x N per head for all heads at once (N patches): windowed layers attend in
    windows (N x window scores), full-attention layers one head group at a time (HEAD_GROUP x N x N). Counted on
    the shapes ONNX Runtime computes for one image: the score MatMuls of shape [1, HEAD_GROUP, N, N] are exactly
    full-attention layers x heads / HEAD_GROUP."""
    loaded, path = vision_onnx
    feeds = loaded.image_host().prepare(noise(448, 224)).feeds
    n = feeds[contract.PIXEL_VALUES].shape[0]  # 512 patches: no other axis of the tiny graph has this size
    shapes = intermediate_shapes(path, feeds)
    square = {name: shape for name, (_, shape) in shapes.items() if list(shape).count(n) >= 2}
    assert square and all(shape == (1, qwen2_vl.HEAD_GROUP, n, n) for shape in square.values()), square
    config = loaded.model.config.vision_config
    full = len(config.fullatt_block_indexes) if loaded.family is QWEN25_VL else config.depth
    scores = [name for name in square if shapes[name][0] == "MatMul"]
    assert len(scores) == full * config.num_heads // qwen2_vl.HEAD_GROUP
    if loaded.family is QWEN25_VL:  # the windowed layers' weights: [windows, heads, window, window]
        window = loaded.family.vision_graph(loaded.model).window_patches
        windowed = [s for op, s in shapes.values() if op == "Softmax" and s[-2:] == (window, window)]
        assert len(windowed) == config.depth - full and all(s[1] == config.num_heads for s in windowed)
