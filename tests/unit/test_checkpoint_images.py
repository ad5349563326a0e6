"""Processors that size images other than the presets do. On ae5cbb5 both were refused before any work: a Qwen
processor whose budget (here 50,176 pixels) is below the 672 x 672 profile, and a LLaVA checkpoint whose processor
crops to 98 pixels under a 336 x 336 profile. Now each engine takes images as its processor sizes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightkv_export.inputs import parity_images
from lightkv_export.runtime import Engine

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def llava_checkpoint(directory: Path) -> Path:
    """A tiny LLaVA whose CLIP tower and processor take 98 x 98 crops (7 x 7 = 49 vision tokens)."""
    from lightkv_export.models import llava
    from lightkv_export.models.registry import build_seeded, get_family

    family = get_family("llava")
    config, _ = family.tiny_preset()
    config.vision_config.image_size = 98
    build_seeded(family, config, None).save_pretrained(directory)
    llava.build_processor(image_size=98).save_pretrained(directory)
    return directory


def served_as_the_processor_sizes(engine_dir: Path, budget: int) -> None:
    """A page and a photo of other sizes in one request: each laid out by the engine's processor, within its budget."""
    engine = Engine.load(engine_dir)
    page, photo = parity_images((840, 280), 1), parity_images((480, 640), 2)
    gen = engine.generate([page, photo], "Compare.", max_new_tokens=2)
    layouts = engine.processor.layouts([page.size, photo.size])
    assert gen.vision_tokens_in == sum(x.vision_tokens for x in layouts) and gen.token_ids
    assert all(x.vision_tokens <= budget for x in layouts)


def test_a_checkpoint_directory_builds_without_image_size(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import build

    checkpoint = llava_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "engines"
    assert build.main(["--model", str(checkpoint), "--ratio", "0.55", "--out", str(out)]) == 0
    (engine_dir,) = out.glob("ckpt-*/r0.55/ort-cpu")
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert json.loads((engine_dir / "parity.json").read_text())["passed"]
    assert manifest["reference_request"]["image_layouts"] == [[[7, 7]]]  # the 224 x 224 reference, cropped to 98
    served_as_the_processor_sizes(engine_dir, 49)


def test_a_reference_image_over_the_processors_budget_is_sized_down(builds):
    """672 x 672 under a 50,176-pixel cap (64 tokens): smart_resize to 224 x 224, an 8 x 8 grid."""
    result = builds("tiny-qwen-vl", 0.55, image_size=(672, 672), max_image_pixels=28 * 28 * 64)
    engine_dir = result.engine_dirs["ort-cpu"]
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert result.parity["ort-cpu"].passed and manifest["max_image_pixels"] == 28 * 28 * 64
    assert manifest["reference_request"]["image_layouts"] == [[[8, 8]]]
    served_as_the_processor_sizes(engine_dir, 64)
