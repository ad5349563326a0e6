"""The one description of where images sit in a sequence (method/spans.py) and the host's use of it: layouts with
several grids and fixed tokens, placeholder runs cut into one span per grid, each image's placeholder expanded to
its own tokens."""

from __future__ import annotations

import numpy as np
import pytest

from lightkv_export.errors import InputError
from lightkv_export.method.spans import ImageLayout, VisionSpan, spans_on_grids

TOKEN = 7


def test_a_layout_counts_grids_and_fixed_tokens_and_round_trips_through_json():
    tiles = ImageLayout(((2, 3), 1, (4, 4), 2))  # a tile, a separator, a thumbnail, two closing tokens
    assert tiles.grids == ((2, 3), (4, 4))
    assert (tiles.vision_tokens, tiles.fixed_tokens, tiles.tokens) == (22, 3, 25)
    assert ImageLayout.from_json(tiles.to_json()) == tiles
    assert ImageLayout.single(12, 16).to_json() == [[12, 16]]
    for bad in (((0, 3),), (2,), ((2, 3, 0),), ((2, 3, 1, 1),), ((2, 3), 0)):  # (h, w, n): n >= 1 inline
        with pytest.raises(ValueError):
            ImageLayout(bad)


def test_placeholder_runs_are_cut_into_one_span_per_grid_across_images():
    # [text, image 0: grid 2x2, text, image 1: two adjacent grids 1x3 + 2x2 (tiles without a separator), text]
    ids = np.array([[1, 1, *[TOKEN] * 4, 2, *[TOKEN] * 7, 3]])
    spans = spans_on_grids(ids, TOKEN, [(2, 2), (1, 3), (2, 2)], "hint")
    assert spans == [[VisionSpan(2, 4, (2, 2)), VisionSpan(7, 3, (1, 3)), VisionSpan(10, 4, (2, 2))]]
    with pytest.raises(InputError, match=r"does not fit its placeholder run.*hint"):
        spans_on_grids(ids, TOKEN, [(2, 2), (2, 4)], "hint")
    with pytest.raises(InputError, match=r"the images have 4 grids but the prompt holds placeholders for 3"):
        spans_on_grids(ids, TOKEN, [(2, 2), (1, 3), (2, 2), (1, 1)], "hint")
    with pytest.raises(InputError, match=r"more image placeholder tokens than the images' grids hold"):
        spans_on_grids(ids, TOKEN, [(2, 2), (1, 3)], "hint")


def test_each_image_placeholder_gets_its_own_images_tokens(tiny_qwen_engine_dir):
    """Two images of different sizes: the template's two placeholders expand to each image's own count, in
    order, and the sequence length the limits use (from sizes alone) is the one the request has."""
    from PIL import Image

    from lightkv_export.runtime import Engine

    engine = Engine.load(tiny_qwen_engine_dir)
    host = engine.processor
    images = [Image.new("RGB", (448, 224), "red"), Image.new("RGB", (196, 588), "blue")]
    got = host.process(images, "Compare.")
    layouts = host.layouts([im.size for im in images])
    assert got.layouts == layouts and layouts[0] != layouts[1]
    assert [s.grid for s in got.spans[0]] == [g for layout in layouts for g in layout.grids]
    assert [s.length for s in got.spans[0]] == [layout.vision_tokens for layout in layouts]
    total, parts = host.sequence_tokens(layouts, host.prompt_tokens("Compare."))
    assert total == got.input_ids.shape[1] and "template" in parts


@pytest.fixture(scope="module")
def tiny_qwen_engine_dir(builds):
    return builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"]
