"""Processors that size images other than the presets do. On ae5cbb5 both were refused before any work: a Qwen
processor whose budget (here 50,176 pixels) is below the 672 x 672 profile, and a LLaVA checkpoint whose processor
crops to 98 pixels under a 336 x 336 profile. Now each engine takes images as its processor sizes them, and a
checkpoint directory's default windows and reference image come from its processor (registry.fit_local_defaults)."""

from __future__ import annotations

import io
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


def qwen_checkpoint(directory: Path, max_tokens: int) -> Path:
    """A tiny Qwen2.5-VL whose processor gives an image at most `max_tokens` tokens of 28 x 28 pixels."""
    from lightkv_export.models import tiny
    from lightkv_export.models.registry import build_seeded, get_family

    family = get_family("qwen2_5_vl")
    config, _ = family.tiny_preset()
    build_seeded(family, config, None).save_pretrained(directory)
    image_processor = tiny.build_image_processor(tiny.MIN_PIXELS, 28 * 28 * max_tokens)
    family.tiny_processor(image_processor=image_processor).save_pretrained(directory)
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
    assert manifest["reference_request"]["image_layouts"] == [[[7, 7]]]  # the crop's 98 x 98 reference
    # 49 tokens fill tiny-llava's 2 x 2 windows in the first stage only (>= 32 tokens; then ~25).
    assert [stage.split(":")[1] for stage in manifest["schedule"].split(",")] == ["2", "1", "1"]
    served_as_the_processor_sizes(engine_dir, 49)


def test_a_qwen_checkpoint_takes_its_windows_and_reference_image_from_its_processor(tmp_path):
    """At most 48 tokens an image: tiny-qwen-vl's windows (2, 2, 1) become (2, 1, 1), since the second stage's
    image may hold only 24 tokens (< 8 x 2^2), and the build says so; its 336 x 448 reference image becomes
    the 168 x 224 the processor makes of it (6 x 8 tokens, every stage merging)."""
    from rich.console import Console

    from lightkv_export.config import BuildConfig
    from lightkv_export.pipeline import run

    checkpoint = qwen_checkpoint(tmp_path / "ckpt", 48)
    log = io.StringIO()
    result = run(BuildConfig(model=str(checkpoint), ratio=0.55, out=tmp_path / "engines"), Console(file=log, width=400))
    engine_dir = result.engine_dirs["ort-cpu"]
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert result.parity["ort-cpu"].passed
    assert [stage.split(":")[1] for stage in manifest["schedule"].split(",")] == ["2", "1", "1"]
    assert manifest["image_size"] == [168, 224] and manifest["reference_request"]["image_layouts"] == [[[6, 8]]]
    warnings = [line for line in log.getvalue().splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "reduced from tiny-qwen-vl's (2, 2, 1) to (2, 1, 1)" in warnings[0]
    assert "at most 48 vision tokens" in warnings[0]
    served_as_the_processor_sizes(engine_dir, 48)


def test_a_reference_image_over_the_processors_budget_is_sized_down(builds):
    """672 x 672 under a 50,176-pixel cap (64 tokens): smart_resize to 224 x 224, an 8 x 8 grid."""
    result = builds("tiny-qwen-vl", 0.55, image_size=(672, 672), max_image_pixels=28 * 28 * 64)
    engine_dir = result.engine_dirs["ort-cpu"]
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert result.parity["ort-cpu"].passed and manifest["max_image_pixels"] == 28 * 28 * 64
    assert manifest["reference_request"]["image_layouts"] == [[[8, 8]]]
    served_as_the_processor_sizes(engine_dir, 64)
