"""Checkpoint directories whose processors size images other than the presets do, built as a user would: no
--image-size. Each engine then takes images as that checkpoint's processor sizes them (issue 29: on ae5cbb5 both
were refused before any work, the Qwen one for a 672 x 672 profile over its 200,704-pixel budget, the LLaVA one for
a 336 x 336 profile over its 98-pixel crop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightkv_export.inputs import parity_images
from lightkv_export.runtime import Engine

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def qwen_checkpoint(directory: Path) -> Path:
    """tiny-qwen-vl with a processor that allows at most 64 tokens (50,176 pixels) per image."""
    from lightkv_export.models.registry import load_model

    loaded = load_model("tiny-qwen-vl").capped(28 * 28 * 64)
    loaded.model.save_pretrained(directory)
    loaded.processor.save_pretrained(directory)
    return directory


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


# 336 x 448 (the reference image of a tiny-shaped checkpoint) in 50,176 pixels: smart_resize to 168 x 252.
@pytest.mark.parametrize(("make", "grid"), [(qwen_checkpoint, (6, 9)), (llava_checkpoint, (7, 7))])
def test_a_checkpoint_directory_builds_without_image_size(tmp_path, monkeypatch, make, grid):
    monkeypatch.syspath_prepend(str(ROOT))
    import build

    checkpoint = make(tmp_path / "ckpt")
    out = tmp_path / "engines"
    assert build.main(["--model", str(checkpoint), "--ratio", "0.55", "--out", str(out)]) == 0
    (engine_dir,) = out.glob("ckpt-*/r0.55/ort-cpu")
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    parity = json.loads((engine_dir / "parity.json").read_text())
    assert parity["passed"] and manifest["reference_request"]["image_layouts"] == [[list(grid)]]
    engine = Engine.load(engine_dir)
    page, photo = parity_images((840, 280), 1), parity_images((480, 640), 2)  # each sized by the processor
    gen = engine.generate([page, photo], "Compare.", max_new_tokens=2)
    layouts = engine.processor.layouts([page.size, photo.size])
    assert gen.vision_tokens_in == sum(x.vision_tokens for x in layouts) and gen.token_ids
    assert all(x.vision_tokens <= 64 for x in layouts)  # within the checkpoint's own budget (or its crop)
