"""Parity's cases and what its report says it covered: every case, the smallest and the largest image included, is
held against the Hugging Face model at the identity level, and parity.json / report.md name those cases."""

from __future__ import annotations

import json

from lightkv_export.inputs import PARITY_MAX_PIXELS, parity_cases
from lightkv_export.models.tiny import TOKEN_PIXELS
from lightkv_export.parity import Check, ParityReport
from lightkv_export.runtime import Engine

CASES = ["one-image", "two-sizes", "tall-page", "other-prompt", "min-image", "max-image"]


def test_every_case_is_held_against_hugging_face_and_the_report_says_so(builds):
    """The tiny build's parity: each case has a merge-nothing and a vanilla-export check against the Hugging Face
    logits, and passed them; parity.json and report.md list the cases the identity level covered."""
    result = builds("tiny-qwen-vl", 0.55)
    report = result.parity["ort-cpu"]
    assert report.cases == CASES
    for case in CASES:
        outputs = {c.output: c.passed for c in report.checks if c.level == "identity" and c.case == case}
        assert outputs == {"merge-nothing-logits": True, "kv-lengths": True, "vanilla-export-logits": True}, case
    engine_dir = result.engine_dirs["ort-cpu"]
    saved = json.loads((engine_dir / "parity.json").read_text())
    assert saved["cases"] == saved["identity_cases"] == CASES
    assert "Hugging Face identity: every case (6)." in (engine_dir / "report.md").read_text()


def test_the_smallest_and_largest_cases_are_at_the_processors_limits(builds):
    """On a tiny preset (maximum 200,704 pixels, below the cap) the max-image case is within 10% of the processor's
    largest image and the min-image case is its smallest: the cap binds only for real checkpoints."""
    engine = Engine.load(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"])
    images = engine.processor.images
    low, high = images.pixel_range()
    assert high < PARITY_MAX_PIXELS
    cases = {name: imgs for name, imgs, _ in parity_cases(tuple(engine.manifest.image_size), (low, high))}
    smallest, largest = engine.processor.layouts([cases["min-image"][0].size, cases["max-image"][0].size])
    assert smallest.vision_tokens * TOKEN_PIXELS == low
    assert 0.9 * high <= largest.vision_tokens * TOKEN_PIXELS <= high


def test_a_real_checkpoints_largest_case_is_capped():
    """Qwen-VL's processor allows 12,845,056 pixels (16,384 tokens); parity's largest image stays just under
    PARITY_MAX_PIXELS (why: inputs.py), 3:4, and the smallest is the processor's minimum side."""
    cases = {name: imgs for name, imgs, _ in parity_cases((672, 672), (56 * 56, 28 * 28 * 16384))}
    (largest,) = cases["max-image"]
    w, h = largest.size
    assert 0.9 * PARITY_MAX_PIXELS <= w * h <= PARITY_MAX_PIXELS and h < w
    assert cases["min-image"][0].size == (56, 56)


def test_the_report_names_the_cases_the_identity_missed():
    """Coverage comes from the checks that ran: an identity level that ran on some cases, or on none (official
    positions and no vanilla export), is reported as such, never as every case."""
    report = ParityReport("e", cases=["a", "b", "c"])
    report.checks = [Check("model", "a", "logits", True), Check("identity", "b", "merge-nothing-logits", True)]
    assert report.identity_cases == ["b"]
    assert report.identity_coverage() == "Hugging Face identity: 1 of 3 cases (b); not on a, c."
    assert report.to_json()["identity_cases"] == ["b"]
    assert "1 of 3 cases (b); not on a, c." in report.to_markdown()
    report.checks = report.checks[:1]
    assert report.identity_coverage() == "Hugging Face identity: no case (see the notes)."
