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


@pytest.fixture(scope="session")
def engines_out(tmp_path_factory):
    """One build output (engines and the export cache) for the whole test session."""
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def builds(engines_out):
    """builds(model, ratio, **config) -> BuildResult, built once per session into `engines_out`: every build
    after a family's first reuses its cached export and only transforms, writes the engine and runs parity."""
    from lightkv_export.config import BuildConfig
    from lightkv_export.pipeline import run

    cache: dict = {}

    def get(model: str, ratio: float | None = None, **kwargs):
        key = (model, ratio, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = run(BuildConfig(model=model, ratio=ratio, out=engines_out, **kwargs))
        return cache[key]

    return get
