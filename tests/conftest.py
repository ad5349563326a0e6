"""Shared fixtures: the tiny presets, built once per test session, and a deterministic test image."""

from __future__ import annotations

import pytest

from lightkv_export.models.base import LoadedModel


@pytest.fixture(scope="session")
def tiny_qwen_vl() -> LoadedModel:
    """Tiny Qwen2.5-VL (8 layers, hidden 64), seeded weights, float32."""
    from lightkv_export.models.registry import load_model

    return load_model("tiny-qwen-vl")


@pytest.fixture(scope="session")
def tiny_qwen2_vl() -> LoadedModel:
    """Tiny Qwen2-VL (8 layers, hidden 64), seeded weights, float32."""
    from lightkv_export.models.registry import load_model

    return load_model("tiny-qwen2-vl")


@pytest.fixture(scope="session", params=["tiny_qwen_vl", "tiny_qwen2_vl"])
def tiny_model(request) -> LoadedModel:
    """Each tiny family in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def test_image():
    """336 x 448 RGB gradients and checkerboard: the tiny presets' default size, a 12 x 16 LLM token grid."""
    from lightkv_export.torch_runtime import test_pattern

    return test_pattern((336, 448))
