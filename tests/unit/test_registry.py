"""The registry's defaults for local checkpoints (windows and reference image fitted to the checkpoint's
processor), the families' own tiny-shape test, and the model knowledge kept inside the family modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lightkv_export.method.layout import MIN_TOKENS_PER_WINDOW
from lightkv_export.models import llava, tiny
from lightkv_export.models.family import FAMILIES
from lightkv_export.models.registry import (
    base_preset,
    fitting_windows,
    get_family,
    get_spec,
    largest_image_tokens,
    local_defaults,
)

PACKAGE = Path(__file__).resolve().parents[2] / "lightkv_export"
QWEN25_VL, LLAVA = get_family("qwen2_5_vl"), get_family("llava")


@pytest.mark.parametrize(
    ("windows", "tokens", "fitted"),
    [
        ((2, 2, 1), 256, (2, 2, 1)),  # the tiny presets' largest image: every stage filled
        ((6, 4, 2), 16384, (6, 4, 2)),  # the real Qwen processors' 16,384 tokens
        ((6, 4, 2), 1280, (6, 4, 2)),  # 1280 >= 8 * 36; 640 >= 8 * 16; 320 >= 8 * 4
        ((6, 4, 2), 256, (5, 4, 2)),  # 256 < 8 * 36: 5 x 5 windows need 200
        ((2, 2, 1), 48, (2, 1, 1)),  # stage 2 may see 24 tokens < 8 * 4
        ((4, 2, 1), 49, (2, 1, 1)),  # LLaVA at a 98 x 98 crop
        ((2, 2, 1), 31, (1, 1, 1)),  # one short of 8 * 2^2
        ((2, 2, 1), 32, (2, 1, 1)),  # exactly 8 * 2^2, then 16 < 32
        ((3, 3), 4, (1, 1)),  # too few for any window: one (the stage skips the image at run time)
        ((1,), 10**6, (1,)),  # never more windows than the preset's
    ],
)
def test_windows_fit_the_largest_image(windows, tokens, fitted):
    assert fitting_windows(windows, tokens) == fitted


def test_fitted_windows_fill_every_stage_of_the_largest_image_when_halved():
    """The rule itself: each fitted stage p has 8 p^2 tokens of the image left after earlier stages halved it, and
    p + 1 would not (unless p is the preset's)."""
    for tokens in range(1, 2000, 7):
        fitted = fitting_windows((6, 4, 2), tokens)
        left = tokens
        for p, preset in zip(fitted, (6, 4, 2), strict=True):
            assert p == 1 or left >= MIN_TOKENS_PER_WINDOW * p * p
            assert p == preset or left < MIN_TOKENS_PER_WINDOW * (p + 1) ** 2
            left = -(-left // 2)


def qwen_host(max_tokens: int):
    """Qwen2.5-VL's host over the tiny kit's processor capped at `max_tokens` tokens of 28 x 28 pixels."""
    image_processor = tiny.build_image_processor(tiny.MIN_PIXELS, 28 * 28 * max_tokens)
    return QWEN25_VL.image_host(QWEN25_VL.tiny_processor(image_processor=image_processor).to_dict())


@pytest.mark.parametrize(
    ("key", "max_tokens", "largest", "windows", "image_size"),
    [
        ("tiny-qwen-vl", 256, 256, (2, 2, 1), (336, 448)),  # the preset's own processor: nothing changes
        ("tiny-qwen-vl", 64, 64, (2, 2, 1), (168, 252)),  # 64: 2 x 2 windows still fill the first two stages
        ("tiny-qwen-vl", 48, 48, (2, 1, 1), (168, 224)),
        ("tiny-qwen-vl", 16, 16, (1, 1, 1), (84, 112)),
        ("qwen-vl", 256, 256, (5, 4, 2), (448, 448)),  # a real-sized checkpoint under a small processor
        ("qwen-vl", 16384, 16384, (6, 4, 2), (672, 672)),  # the real processors' budget
    ],
)
def test_local_defaults_follow_the_qwen_processors_budget(key, max_tokens, largest, windows, image_size):
    host = qwen_host(max_tokens)
    fitted = local_defaults(get_spec(key), host)
    assert fitted.largest_tokens == largest == largest_image_tokens(host)
    assert fitted.windows == windows
    assert fitted.image_size == image_size
    assert host.processed_size(*fitted.image_size) == image_size  # a size the processor keeps
    if windows == get_spec(key).default_windows:
        assert fitted.note is None
    else:
        assert f"reduced from {key}'s" in fitted.note and f"at most {largest} vision tokens" in fitted.note


@pytest.mark.parametrize(("crop", "windows"), [(336, (4, 2, 1)), (224, (4, 2, 1)), (98, (2, 1, 1))])
def test_local_defaults_follow_the_llava_crop(crop, windows):
    """CLIP crops every image to one size: that crop is both the largest image and the reference image."""
    host = LLAVA.image_host(llava.build_processor(image_size=crop).to_dict())
    fitted = local_defaults(get_spec("llava"), host)
    side = crop // 14
    assert (fitted.largest_tokens, fitted.windows, fitted.image_size) == (side * side, windows, (crop, crop))


def test_local_checkpoints_start_from_the_preset_of_their_shape():
    for family in {id(f): f for f in FAMILIES.values()}.values():
        tiny_config, _ = family.tiny_preset()
        real_config = family.config_class()(**family.real_config_dict(family.hf_id))
        assert family.tiny_shaped(tiny_config) and not family.tiny_shaped(real_config)
        assert base_preset(family, tiny_config).tiny and not base_preset(family, real_config).tiny
        assert base_preset(family, real_config).family == family.name and not base_preset(family, real_config).plan_only


def family_names() -> set[str]:
    return {name for family in FAMILIES.values() for name in (family.name, *family.model_types)}


def string_literals(path: Path) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_the_tiny_kit_names_no_family():
    """models/tiny.py is a kit each family calls with its own classes and sizes: no family name in its source, no
    table keyed by one."""
    source = (PACKAGE / "models" / "tiny.py").read_text()
    assert not [name for name in family_names() if re.search(rf"\b{name}\b", source)]
    tables = [v for v in vars(tiny).values() if isinstance(v, dict)]
    assert not [t for t in tables if family_names() & set(t)]


def test_no_module_outside_the_families_branches_on_a_family_name():
    """A family name as a string (a comparison, a table key, a lookup) appears only in its family's module (and
    the registry's tests); the registry reaches families through FAMILIES."""
    family_modules = {"qwen2_vl.py", "qwen2_5_vl.py", "llava.py"}
    named = {
        str(path.relative_to(PACKAGE)): sorted(family_names() & string_literals(path))
        for path in PACKAGE.rglob("*.py")
        if path.name not in family_modules or path.parent.name != "models"
    }
    assert {path: names for path, names in named.items() if names} == {}
